"""``comptoir backup`` / ``comptoir restore``: encrypted, consistent dumps of the four schemas.

- The dump is ``pg_dump --format=custom`` of schemas auth, inventory, orders and audit, taken in one
  snapshot (pg_dump's default), so the schemas are consistent with each other.
- The file is sealed with AES-256-GCM in 1 MiB chunks: each chunk's nonce is a random per-file prefix
  plus its index, and its associated data is the header, its index and whether it is the last one, so a
  changed, reordered, dropped or truncated chunk is refused. The key (``BACKUP_ENCRYPTION_KEY``,
  urlsafe base64 of 32 bytes) is never written next to the backup.
- Restore goes into an empty database: roles and schemas are provisioned first (``comptoir migrate``'s
  code), the dump is restored, then the migrations run again (a no-op that re-asserts the grants).
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from comptoir.config import SERVICES, RunSettings

MAGIC = b"COMPTOIR-BACKUP\x00v1"
CHUNK = 1024 * 1024
_LENGTH = struct.Struct(">I")


class BackupError(Exception):
    pass


def load_key(encoded: str) -> bytes:
    try:
        key = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError) as exc:
        raise BackupError("BACKUP_ENCRYPTION_KEY is not urlsafe base64") from exc
    if len(key) != 32:
        raise BackupError(
            "BACKUP_ENCRYPTION_KEY must encode 32 bytes: python -c "
            "'import base64,os; print(base64.urlsafe_b64encode(os.urandom(32)).decode())'"
        )
    return key


def _aad(prefix: bytes, index: int, final: bool) -> bytes:
    return MAGIC + prefix + struct.pack(">Q?", index, final)


def seal(src: BinaryIO, dst: BinaryIO, key: bytes) -> None:
    aead = AESGCM(key)
    prefix = os.urandom(8)
    dst.write(MAGIC + prefix)
    index = 0
    chunk = src.read(CHUNK)
    while True:
        following = src.read(CHUNK)
        final = not following
        nonce = prefix + struct.pack(">I", index)
        sealed = aead.encrypt(nonce, chunk, _aad(prefix, index, final))
        dst.write(_LENGTH.pack(len(sealed)) + sealed)
        if final:
            return
        chunk, index = following, index + 1


def unseal(src: BinaryIO, dst: BinaryIO, key: bytes) -> None:
    aead = AESGCM(key)
    header = src.read(len(MAGIC) + 8)
    if len(header) != len(MAGIC) + 8 or not header.startswith(MAGIC):
        raise BackupError("not a Comptoir backup file")
    prefix = header[len(MAGIC) :]
    index = 0
    while True:
        raw_length = src.read(_LENGTH.size)
        if len(raw_length) != _LENGTH.size:
            raise BackupError("the backup file is truncated")
        (length,) = _LENGTH.unpack(raw_length)
        if length > CHUNK + 16:
            raise BackupError("the backup file is corrupt")
        sealed = src.read(length)
        nonce = prefix + struct.pack(">I", index)
        for final in (False, True):
            try:
                plain = aead.decrypt(nonce, sealed, _aad(prefix, index, final))
                break
            except InvalidTag:
                continue
        else:
            raise BackupError("the backup file was altered or the key is wrong")
        dst.write(plain)
        if final:
            if src.read(1):
                raise BackupError("data after the final chunk")
            return
        index += 1


def _pg_tool(name: str) -> str:
    """pg_dump/pg_restore: PG_BIN_DIR when set, else the ones pgserver ships (PostgreSQL 16)."""
    custom = os.environ.get("PG_BIN_DIR")
    if custom:
        return str(Path(custom) / name)
    from pgserver._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / name)


def backup(admin_url: str, out: Path, key: bytes) -> int:
    from comptoir.provision import to_asyncpg_dsn

    with tempfile.TemporaryDirectory(prefix="comptoir-backup-") as work:
        dump = Path(work) / "dump"
        args = [_pg_tool("pg_dump"), "--format=custom", "--no-password", f"--file={dump}"]
        args += [f"--schema={schema}" for schema in SERVICES]
        result = subprocess.run([*args, to_asyncpg_dsn(admin_url)], capture_output=True, check=False)
        if result.returncode != 0:
            raise BackupError("pg_dump failed: " + result.stderr.decode(errors="replace")[-500:])
        tmp = out.with_name(out.name + ".partial")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(dump, "rb") as src, os.fdopen(fd, "wb") as dst:
            seal(src, dst, key)
        os.replace(tmp, out)
    return out.stat().st_size


async def _schemas_in_use(admin_url: str) -> list[str]:
    import asyncpg

    from comptoir.provision import to_asyncpg_dsn

    conn = await asyncpg.connect(to_asyncpg_dsn(admin_url))
    try:
        rows = await conn.fetch(
            "SELECT DISTINCT table_schema FROM information_schema.tables"
            " WHERE table_schema = ANY($1::text[]) AND table_name <> 'alembic_version'",
            list(SERVICES),
        )
        in_use = []
        for row in rows:
            schema = row["table_schema"]
            tables = await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = $1"
                " AND table_name <> 'alembic_version'",
                schema,
            )
            for table in tables:
                if await conn.fetchval(f'SELECT EXISTS (SELECT 1 FROM "{schema}"."{table["table_name"]}")'):  # noqa: S608
                    in_use.append(f"{schema}.{table['table_name']}")
        return in_use
    finally:
        await conn.close()


def restore(admin_url: str, source: Path, key: bytes, settings: RunSettings) -> None:
    import asyncio

    from comptoir.provision import _provision, migrate, resolve_roles, to_asyncpg_dsn

    with tempfile.TemporaryDirectory(prefix="comptoir-restore-") as work:
        dump = Path(work) / "dump"
        with open(source, "rb") as src, open(dump, "wb") as dst:
            unseal(src, dst, key)  # refuse a tampered file before touching the database
        in_use = asyncio.run(_schemas_in_use(admin_url))
        if in_use:
            raise BackupError(f"the database is not empty ({', '.join(in_use[:5])}): restore into an empty one")
        roles = resolve_roles(settings, admin_url)
        asyncio.run(_provision(admin_url, roles))
        result = subprocess.run(
            [
                _pg_tool("pg_restore"),
                "--clean",
                "--if-exists",
                "--exit-on-error",
                "--single-transaction",
                "--no-password",
                f"--dbname={to_asyncpg_dsn(admin_url)}",
                str(dump),
            ],
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            raise BackupError("pg_restore failed: " + result.stderr.decode(errors="replace")[-800:])
        migrate(settings, admin_url)
