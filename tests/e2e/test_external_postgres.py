"""``comptoir migrate`` against a separately installed PostgreSQL (not the embedded pgserver one).

A throwaway cluster of the system's PostgreSQL (>= 14) listens on 127.0.0.1 with scram-sha-256 for
everyone. ``DATABASE_URL`` is its superuser; every service gets an explicit ``<SVC>_DATABASE_URL`` with a
role name and password chosen here. The test then connects as each role and starts a real service
process with nothing but its own URL.
"""

from __future__ import annotations

import glob
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.e2e

SERVICES = ["auth", "inventory", "orders", "audit"]
MIN_MAJOR = 14


def _postgres_bin() -> Path | None:
    """The newest system PostgreSQL >= 14 (Debian layout: /usr/lib/postgresql/<major>/bin)."""
    found = []
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        match = re.fullmatch(r"/usr/lib/postgresql/(\d+)/bin/initdb", initdb)
        if match and int(match.group(1)) >= MIN_MAJOR and os.access(initdb, os.X_OK):
            found.append((int(match.group(1)), Path(initdb).parent))
    return max(found)[1] if found else None


def _unprivileged_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, run the server as an existing system user."""
    if os.geteuid() != 0:
        return None
    import pwd

    for name in ("postgres", "pgserver"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    pytest.skip("running as root and no unprivileged 'postgres' or 'pgserver' user to run PostgreSQL")


def _as_user(user: str | None, argv: list[str]) -> list[str]:
    return ["runuser", "-u", user, "--", *argv] if user else argv


def _stop_cluster(user: str | None, bindir: Path, pgdata: Path) -> None:
    """A fast shutdown of a throwaway cluster (whatever state it is in)."""
    stop = [str(bindir / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "stop"]
    subprocess.run(_as_user(user, stop), capture_output=True, timeout=60, check=False)


def _run(argv: list[str], timeout: float = 60) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{argv[:6]} exited {done.returncode}\n{done.stdout}\n{done.stderr}"


@dataclass
class ExternalServer:
    admin_url: str
    host: str
    port: int
    database: str

    def url(self, user: str, password: str) -> str:
        return f"postgresql://{user}:{password}@{self.host}:{self.port}/{self.database}"


@dataclass
class Role:
    service: str
    user: str
    password: str
    url: str


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[ExternalServer]:
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip(f"no system PostgreSQL >= {MIN_MAJOR} (/usr/lib/postgresql/<major>/bin/initdb)")
    user = _unprivileged_user()
    base = Path(tempfile.mkdtemp(prefix="comptoir-extpg-", dir="/tmp"))
    base.chmod(0o755)
    pgdata = base / "data"
    pwfile = base / "pwfile"
    password = secrets.token_urlsafe(24)
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    if user:
        shutil.chown(base, user)
        shutil.chown(pwfile, user)
    started = False
    try:
        _run(
            _as_user(
                user,
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(pgdata),
                    "--auth=scram-sha-256",
                    "--username=admin",
                    f"--pwfile={pwfile}",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
            )
        )
        pwfile.unlink()
        port = free_port()
        with (pgdata / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{pgdata}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            )
        started = True  # from here on, always try to stop it
        pg_ctl = [str(bindir / "pg_ctl"), "-D", str(pgdata), "-l", str(base / "server.log"), "-w", "-t", "30"]
        try:
            _run(_as_user(user, [*pg_ctl, "start"]))
        except AssertionError as exc:
            log = base / "server.log"
            raise AssertionError(f"{exc}\n{log.read_text(errors='replace') if log.exists() else ''}") from None
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="admin", password=password, database="postgres")
        try:
            await conn.execute("CREATE DATABASE shop")
        finally:
            await conn.close()
        # PostgreSQL <= 14 lets PUBLIC create in schema public (15 no longer does): start from the old default
        # so the check that `comptoir migrate` revokes it means something on any version.
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="admin", password=password, database="shop")
        try:
            await conn.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
        finally:
            await conn.close()
        yield ExternalServer(f"postgresql://admin:{password}@127.0.0.1:{port}/shop", "127.0.0.1", port, "shop")
    finally:
        if started:
            _stop_cluster(user, bindir, pgdata)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def roles(server: ExternalServer) -> dict[str, Role]:
    """Role names that are not Comptoir's defaults, so the explicit URLs are what gets used."""
    chosen = {}
    for svc in SERVICES:
        user, password = f"shop_{svc}", secrets.token_urlsafe(18)
        chosen[svc] = Role(svc, user, password, server.url(user, password))
    return chosen


@pytest.fixture(scope="module")
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="comptoir-extpg-data-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _base_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env.update({"DATA_DIR": str(data_dir), "ENVIRONMENT": "development", "LOG_LEVEL": "INFO"})
    return env


def run_migrate(server: ExternalServer, roles: dict[str, Role], data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = _base_env(data_dir)
    env["DATABASE_URL"] = server.admin_url
    env.update({f"{svc.upper()}_DATABASE_URL": role.url for svc, role in roles.items()})
    return subprocess.run(
        [sys.executable, "-m", "comptoir.cli", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def first_migrate(server: ExternalServer, roles: dict[str, Role], data_dir: Path) -> subprocess.CompletedProcess[str]:
    return run_migrate(server, roles, data_dir)


def assert_migrated(done: subprocess.CompletedProcess[str], roles: dict[str, Role]) -> None:
    assert done.returncode == 0, f"comptoir migrate exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    for role in roles.values():
        assert role.user in done.stdout
        assert role.password not in done.stdout + done.stderr


async def test_migrate_on_external_server_gives_each_service_its_own_role(
    server: ExternalServer, roles: dict[str, Role], data_dir: Path, first_migrate: subprocess.CompletedProcess[str]
) -> None:
    assert_migrated(first_migrate, roles)
    # The explicit URLs were used: no generated role passwords were stored.
    assert not (data_dir / "secrets" / "database-roles.json").exists()

    conns = {svc: await asyncpg.connect(role.url) for svc, role in roles.items()}
    try:
        for svc, conn in conns.items():
            assert await conn.fetchval("SELECT current_user") == roles[svc].user
            assert await conn.fetchval(f"SELECT count(*) FROM {svc}.alembic_version") == 1
            assert await conn.fetchval(f"SELECT version_num FROM {svc}.alembic_version")
            for other in SERVICES:
                if other != svc:
                    with pytest.raises(asyncpg.InsufficientPrivilegeError):
                        await conn.fetch(f"SELECT * FROM {other}.alembic_version")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute("CREATE TABLE public.x (id int)")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(f"CREATE TABLE {svc}.x (id int)")

        assert await conns["inventory"].fetchval("SELECT to_regclass('inventory.products') IS NOT NULL")
        product_id = uuid.uuid4()
        await conns["inventory"].execute(
            "INSERT INTO inventory.products (id, sku, name, price_xaf, on_hand) VALUES ($1, $2, 'Savon', 500, 3)",
            product_id,
            "EXT-001",
        )
        row = await conns["inventory"].fetchrow(
            "SELECT sku, price_xaf, on_hand FROM inventory.products WHERE id = $1", product_id
        )
        assert dict(row) == {"sku": "EXT-001", "price_xaf": 500, "on_hand": 3}
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conns["orders"].fetch("SELECT * FROM inventory.products")
    finally:
        for conn in conns.values():
            await conn.close()

    # A second run is a no-op for the data: same roles, same passwords, same rows.
    assert_migrated(run_migrate(server, roles, data_dir), roles)
    conn = await asyncpg.connect(roles["inventory"].url)
    try:
        assert await conn.fetchval("SELECT sku FROM inventory.products WHERE id = $1", product_id) == "EXT-001"
    finally:
        await conn.close()


async def test_service_process_runs_on_its_own_url(
    roles: dict[str, Role], data_dir: Path, first_migrate: subprocess.CompletedProcess[str], tmp_path: Path
) -> None:
    assert_migrated(first_migrate, roles)
    sku = f"EXT-{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(roles["inventory"].url)
    try:
        await conn.execute(
            "INSERT INTO inventory.products (id, sku, name, price_xaf, on_hand) VALUES ($1, $2, 'Riz', 1500, 7)",
            uuid.uuid4(),
            sku,
        )
    finally:
        await conn.close()

    port = free_port()
    env = _base_env(data_dir)
    env["INVENTORY_DATABASE_URL"] = roles["inventory"].url
    log_path = tmp_path / "inventory.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "comptoir.serve", "inventory", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
                try:
                    if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "inventory not healthy in 60 s\n" + log_path.read_text()[-3000:]
                time.sleep(0.1)

            assert httpx.get(base + "/readyz", timeout=5).status_code == 200
            catalogue = httpx.get(base + "/api/v1/products", params={"limit": 100}, timeout=5)
            assert catalogue.status_code == 200, catalogue.text
            items = {item["sku"]: item for item in catalogue.json()["items"]}
            assert sku in items
            assert items[sku]["price_xaf"] == 1500
            assert items[sku]["available"] == 7
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
