"""A throwaway system PostgreSQL that accepts only TLS over TCP, with a CA and a server certificate made
here: what a deployment's `sslmode=verify-full` meets (the compose and Kubernetes tests)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import free_port
from tests.e2e.test_external_postgres import _as_user, _postgres_bin, _run, _stop_cluster, _unprivileged_user


@dataclass
class Postgres:
    port: int
    ca: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_certificates(directory: Path) -> None:
    """A CA and PostgreSQL's server certificate for "postgres" (and 127.0.0.1, where the test reaches it)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("comptoir-test-ca"))
        .issuer_name(_name("comptoir-test-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("postgres"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("postgres"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (directory / "ca.crt").write_bytes(ca.public_bytes(pem))
    (directory / "server.crt").write_bytes(server.public_bytes(pem))
    (directory / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


@contextmanager
def tls_postgres(superuser: str, password: str, database: str) -> Iterator[Postgres]:
    """A server on 127.0.0.1 with the given superuser and database; TCP only over TLS (scram-sha-256)."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("no system PostgreSQL >= 14 (/usr/lib/postgresql/<major>/bin/initdb)")
    user = _unprivileged_user()
    base = Path(tempfile.mkdtemp(prefix="comptoir-tls-pg-", dir="/tmp"))
    base.chmod(0o755)
    tls = base / "tls"
    tls.mkdir()
    make_certificates(tls)
    (tls / "server.key").chmod(0o600)
    pwfile = base / "pwfile"
    pwfile.write_text(password + "\n")
    if user:
        for path in (base, tls, tls / "server.key", tls / "server.crt", pwfile):
            shutil.chown(path, user)
    pgdata = base / "data"
    port = free_port()
    started = False
    try:
        initdb = [str(bindir / "initdb"), "-D", str(pgdata), "--auth=scram-sha-256", f"--username={superuser}"]
        _run(_as_user(user, [*initdb, f"--pwfile={pwfile}", "--encoding=UTF8", "--locale=C", "--no-sync"]))
        with (pgdata / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{pgdata}'\n"
                f"ssl = on\nssl_cert_file = '{tls / 'server.crt'}'\nssl_key_file = '{tls / 'server.key'}'\n"
                "ssl_min_protocol_version = 'TLSv1.2'\nfsync = off\nsynchronous_commit = off\n"
            )
        # Only TLS connections are accepted over TCP, as a database on a network should.
        (pgdata / "pg_hba.conf").write_text(
            "local all all scram-sha-256\nhostssl all all 127.0.0.1/32 scram-sha-256\n", encoding="utf-8"
        )
        started = True
        pg_ctl = [str(bindir / "pg_ctl"), "-D", str(pgdata), "-l", str(base / "server.log"), "-w", "-t", "30"]
        _run(_as_user(user, [*pg_ctl, "start"]))
        createdb = [str(bindir / "createdb"), "-h", str(pgdata), "-p", str(port), "-U", superuser, database]
        _run(_as_user(user, ["env", f"PGPASSWORD={password}", *createdb]))
        yield Postgres(port, tls / "ca.crt")
    finally:
        if started:
            _stop_cluster(user, bindir, pgdata)
        shutil.rmtree(base, ignore_errors=True)
