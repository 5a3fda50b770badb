"""``comptoir backup`` / ``comptoir restore``: encrypted, consistent dumps of the four schemas.

- The dump is ``pg_dump --format=custom`` of schemas auth, inventory, orders and audit, taken in one
  snapshot (pg_dump's default), so the schemas are consistent with each other.
- The file is sealed with AES-256-GCM in 1 MiB chunks: each chunk's nonce is a random per-file prefix
  plus its index, and its associated data is the header, its index and whether it is the last one, so a
  changed, reordered, dropped or truncated chunk is refused. The key (``BACKUP_ENCRYPTION_KEY``,
  urlsafe base64 of 32 bytes) is never written next to the backup.
- Restore goes into an empty database: roles and schemas are provisioned first (``comptoir migrate``'s
  code, with THIS installation's role names), each schema is restored as its owner role without the
  dump's owners and ACLs (they name the source's roles), the source's extra grants are re-applied to
  this installation's roles, then the migrations run again (a no-op that re-asserts the grants). A
  restore that fails once it has begun is undone (the four schemas dropped), so it can be run again.
- What verification needs travels with the data (format v2, a tar inside the sealed stream):
  ``database.dump``; the public half of every checkpoint key the installation trusts
  (``keys/trusted/<key id>.pub``); the checkpoint log kept outside the database
  (``audit/checkpoints.jsonl``); and, only when asked (``--include-private-key``), the private signing
  key (``keys/audit-checkpoint.key``). Restore puts the keys back under the new ``DATA_DIR``, so that
  ``comptoir audit verify`` checks the restored chain against the same signatures. v1 files (a bare
  dump) are still restored.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
import struct
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable

    from comptoir.config import RunSettings
    from comptoir.progress import Progress
    from comptoir.provision import ServiceRole
    from services.audit.config import Settings as AuditSettings

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from comptoir.config import SERVICES

_T = TypeVar("_T")

# The command line's interface (check_file and check_target run before any database is touched).
__all__ = [
    "CHUNK",
    "BackupContents",
    "BackupError",
    "backup",
    "check_file",
    "check_target",
    "load_key",
    "restore",
    "seal",
    "unseal",
]

MAGIC_V1 = b"COMPTOIR-BACKUP\x00v1"
MAGIC = b"COMPTOIR-BACKUP\x00v2"
DUMP = "database.dump"
MANIFEST = "manifest.json"
TRUSTED = "keys/trusted/"
PRIVATE_KEY = "keys/audit-checkpoint.key"
CHECKPOINT_LOG = "audit/checkpoints.jsonl"
CHUNK = 1024 * 1024
_LENGTH = struct.Struct(">I")


class BackupError(Exception):
    pass


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


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


def _aad(magic: bytes, prefix: bytes, index: int, final: bool) -> bytes:
    return magic + prefix + struct.pack(">Q?", index, final)


def seal(src: Readable, dst: BinaryIO, key: bytes, magic: bytes = MAGIC) -> None:
    aead = AESGCM(key)
    prefix = os.urandom(8)
    dst.write(magic + prefix)
    index = 0
    chunk = src.read(CHUNK)
    while True:
        following = src.read(CHUNK)
        final = not following
        nonce = prefix + struct.pack(">I", index)
        sealed = aead.encrypt(nonce, chunk, _aad(magic, prefix, index, final))
        dst.write(_LENGTH.pack(len(sealed)) + sealed)
        if final:
            return
        chunk, index = following, index + 1


def unseal(src: BinaryIO, dst: BinaryIO, key: bytes) -> bytes:
    """Decrypt ``src`` into ``dst``; returns the format's magic (v1: a bare dump, v2: a tar)."""
    aead = AESGCM(key)
    header = src.read(len(MAGIC) + 8)
    magic = header[: len(MAGIC)]
    if len(header) != len(MAGIC) + 8 or magic not in (MAGIC, MAGIC_V1):
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
                plain = aead.decrypt(nonce, sealed, _aad(magic, prefix, index, final))
                break
            except InvalidTag:
                continue
        else:
            raise BackupError("the backup file was altered or the key is wrong")
        dst.write(plain)
        if final:
            if src.read(1):
                raise BackupError("data after the final chunk")
            return magic
        index += 1


def check_file(source: Path, key: bytes) -> None:
    """Authenticate the whole backup file with ``key``, writing nothing: run before any database is
    touched (or an embedded one is set up under a fresh DATA_DIR)."""
    with open(source, "rb") as src, open(os.devnull, "wb") as sink:
        unseal(src, sink, key)


def _private_dir(directory: Path) -> None:
    """``directory`` and each missing parent created mode 0700 (``mkdir(parents=True)`` would make the
    parents 0755); existing directories are left as they are."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    for d in reversed(missing):
        d.mkdir(mode=0o700, exist_ok=True)
        d.chmod(0o700)


def _pg_tool(name: str) -> str:
    """pg_dump/pg_restore: PG_BIN_DIR when set, else the ones pgserver ships (PostgreSQL 16).

    pgserver's package is located, not imported: importing it picks a runtime directory through
    platformdirs, which warns (twice, on stderr) where XDG_RUNTIME_DIR is unset, e.g. under cron with
    DATABASE_URL, where the embedded server is not even used.
    """
    custom = os.environ.get("PG_BIN_DIR")
    if custom:
        return str(Path(custom) / name)
    import importlib.util

    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise BackupError(f"no {name}: install pgserver or set PG_BIN_DIR to PostgreSQL's bin directory")
    return str(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name)


@dataclass
class BackupContents:
    """What a backup holds besides the database (and what a restore put back)."""

    public_keys: list[str] = field(default_factory=list)  # key ids
    private_key: bool = False
    checkpoint_log: bool = False


def _trusted_public_keys(audit: AuditSettings) -> dict[str, str]:
    """key id -> base64url public key, for every checkpoint key this installation trusts."""
    from services.audit.signing import b64, key_id_of, load_key, parse_public_keys, public_bytes, read_trusted_dir

    keys = parse_public_keys(audit.checkpoint_trusted_keys) + read_trusted_dir(audit.checkpoint_trusted_dir)
    local = load_key(audit.checkpoint_key_path)
    if local is not None:
        keys.append(local.private.public_key())
    return {key_id_of(public_bytes(k)): b64(public_bytes(k)) for k in keys}


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o600) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = int(datetime.now(UTC).timestamp())
    tar.addfile(info, io.BytesIO(data))


def check_target(out: Path, *, overwrite: bool = False) -> None:
    """Refuse, before dumping anything, an ``--out`` that cannot or must not receive the backup."""
    if out.is_dir():
        raise BackupError(f"--out {out} is a directory: name the backup file, e.g. {out / 'shop.backup'}")
    if not out.parent.is_dir():
        raise BackupError(f"--out {out}: the directory {out.parent} does not exist")
    if not overwrite and (out.exists() or out.is_symlink()):
        raise BackupError(f"--out {out} already exists: choose another name (or --force to replace it)")


def _publish(tmp: Path, out: Path, *, overwrite: bool) -> None:
    """Move the finished file into place; without ``overwrite`` never over a file that appeared meanwhile."""
    if overwrite:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise BackupError(f"--out {out} already exists: choose another name (or --force to replace it)") from None
    except OSError:  # a file system without hard links: check, then rename
        check_target(out)
        os.replace(tmp, out)
        return
    tmp.unlink()


def backup(
    admin_url: str,
    out: Path,
    key: bytes,
    audit: AuditSettings,
    *,
    include_private_key: bool = False,
    overwrite: bool = False,
    report: Progress | None = None,
) -> tuple[int, BackupContents]:
    """Dump, bundle the checkpoint keys (public; private only if asked) and the checkpoint log, seal.

    An existing ``out`` is replaced only with ``overwrite``; nothing but ``out`` is left behind, even on
    failure (the sealed stream is written to ``<out>.partial`` first and removed if anything goes wrong).
    """
    from comptoir.provision import to_asyncpg_dsn

    check_target(out, overwrite=overwrite)
    contents = BackupContents()
    with tempfile.TemporaryDirectory(prefix="comptoir-backup-") as work:
        dump = Path(work) / "dump"
        if report:
            report.step("pg_dump of schemas auth, inventory, orders, audit")
        schemas = [f"--schema={schema}" for schema in SERVICES]
        _run_tool("pg_dump", "--format=custom", "--no-password", f"--file={dump}", *schemas, to_asyncpg_dsn(admin_url))
        bundle = Path(work) / "bundle.tar"
        with tarfile.open(bundle, "w") as tar:
            public = _trusted_public_keys(audit)
            for key_id, public_key in sorted(public.items()):
                _add_bytes(tar, f"{TRUSTED}{key_id}.pub", (public_key + "\n").encode(), 0o644)
            contents.public_keys = sorted(public)
            if include_private_key:
                if not audit.checkpoint_key_path.exists():
                    raise BackupError(
                        f"--include-private-key: there is no checkpoint key at {audit.checkpoint_key_path}"
                    )
                _add_bytes(tar, PRIVATE_KEY, audit.checkpoint_key_path.read_bytes())
                contents.private_key = True
            if audit.checkpoint_log_path.exists():
                _add_bytes(tar, CHECKPOINT_LOG, audit.checkpoint_log_path.read_bytes())
                contents.checkpoint_log = True
            manifest = {
                "format": 2,
                "created_at": datetime.now(UTC).isoformat(),
                "schemas": list(SERVICES),
                "public_keys": contents.public_keys,
                "private_key": contents.private_key,
                "checkpoint_log": contents.checkpoint_log,
            }
            _add_bytes(tar, MANIFEST, json.dumps(manifest, indent=2).encode())
            tar.add(dump, arcname=DUMP)
        if report:
            report.step("encrypting")
            report.update(0, bundle.stat().st_size)
        tmp = out.with_name(out.name + ".partial")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with open(bundle, "rb") as src, os.fdopen(fd, "wb") as dst:
                seal(_Counting(src, report), dst, key)
            _publish(tmp, out, overwrite=overwrite)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return out.stat().st_size, contents


class _Counting:
    """A reader that reports how many bytes went through (the progress bar of the encryption)."""

    def __init__(self, src: BinaryIO, report: Progress | None) -> None:
        self.src = src
        self.report = report

    def read(self, size: int = -1, /) -> bytes:
        data = self.src.read(size)
        if self.report:
            self.report.advance(len(data))
        return data


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


def _safe_members(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """The bundle's regular files by name; anything else (links, absolute or ``..`` paths) is refused."""
    members = {}
    for member in tar.getmembers():
        name = member.name
        if not member.isfile() or name.startswith("/") or ".." in Path(name).parts:
            raise BackupError(f"the backup holds an unexpected entry: {name!r}")
        members[name] = member
    if DUMP not in members:
        raise BackupError("the backup holds no database dump")
    return members


def _put_back_keys(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], audit: AuditSettings) -> BackupContents:
    from services.audit.signing import append_log, load_key, read_log, write_trusted_key

    contents = BackupContents()
    _private_dir(audit.checkpoint_trusted_dir)

    def read(name: str) -> bytes:
        handle = tar.extractfile(members[name])
        if handle is None:  # _safe_members let only regular files through
            raise BackupError(f"the backup's {name} is not a file")
        return handle.read()

    for name in sorted(n for n in members if n.startswith(TRUSTED) and n.endswith(".pub")):
        try:
            contents.public_keys.append(write_trusted_key(audit.checkpoint_trusted_dir, read(name).decode().strip()))
        except ValueError as exc:
            raise BackupError(f"the backup's {name} is not an Ed25519 public key") from exc
    if PRIVATE_KEY in members:
        path = audit.checkpoint_key_path
        if path.exists():
            existing = load_key(path)
            contents.private_key = existing is not None and existing.private.private_bytes_raw() == _raw_private(
                read(PRIVATE_KEY)
            )
        else:
            _private_dir(path.parent)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(read(PRIVATE_KEY))
            contents.private_key = True
    if CHECKPOINT_LOG in members:
        _private_dir(audit.checkpoint_log_path.parent)
        known = {entry.get("signature") for entry in read_log(audit.checkpoint_log_path)}
        for line in read(CHECKPOINT_LOG).decode().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("signature") not in known:
                append_log(audit.checkpoint_log_path, entry)
        contents.checkpoint_log = True
    return contents


def _raw_private(pem: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(private, Ed25519PrivateKey):
        raise BackupError("the backup's checkpoint key is not an Ed25519 private key")
    return private.private_bytes_raw()


async def _drop_schemas(admin_url: str) -> None:
    """Drop the four schemas and everything in them (only ever called on a database found empty)."""
    import asyncpg

    from comptoir.provision import ident, to_asyncpg_dsn

    conn = await asyncpg.connect(to_asyncpg_dsn(admin_url))
    try:
        async with conn.transaction():
            for schema in SERVICES:
                await conn.execute(f"DROP SCHEMA IF EXISTS {ident(schema)} CASCADE")
    finally:
        await conn.close()


def _undo_on_failure(admin_url: str, step: Callable[[], _T]) -> _T:
    """Run a step of the restore and return what it returns; if it fails, drop what was restored so that
    the database is empty again (a retry would otherwise be refused as "not empty")."""
    import asyncio

    try:
        return step()
    except BaseException as exc:
        try:
            asyncio.run(_drop_schemas(admin_url))
        except Exception as cleanup:  # noqa: BLE001 - report both, the first one first
            raise BackupError(
                f"restore failed ({_one_line(exc)}) and undoing it failed too ({_one_line(cleanup)}): "
                "drop schemas auth, inventory, orders and audit (DROP SCHEMA … CASCADE) before restoring again"
            ) from exc
        if not isinstance(exc, Exception):
            raise
        raise BackupError(
            f"restore failed: {_one_line(exc)}; nothing was kept (schemas auth, inventory, orders and audit "
            "were emptied again): fix the cause and run the restore again"
        ) from exc


def _one_line(exc: BaseException) -> str:
    """The error on one line (pg_restore's message spans several)."""
    return " ".join(str(getattr(exc, "orig", None) or exc).split())[:800] or type(exc).__name__


_ACL_ENTRY = re.compile(r"^\d+; \d+ \d+ ACL (?P<schema>\S+) .* (?P<owner>\S+)$")
_GRANT = re.compile(r'^(?P<head>(?:GRANT .+ TO|REVOKE .+ FROM)) (?P<grantee>"(?:[^"]|"")+"|[^\s";]+)(?P<tail>[^;]*);$')


def _unquote(name: str) -> str:
    return name[1:-1].replace('""', '"') if name.startswith('"') else name


def _acl_statements(dump: Path, listing: list[str], schema: str, role: ServiceRole, work: Path) -> list[str]:
    """The dump's GRANT/REVOKE on the objects of ``schema``, for this installation's roles.

    The source's grants are what migrations granted beyond the default privileges (e.g. audit's UPDATE
    on alerts), but they name the source's roles: its owner (the objects' owner in the dump) and runtime
    role (the owner's name without ``_owner``) become this installation's; PUBLIC stays; any other
    grantee is a role of the source server and is left out.
    """
    from comptoir.provision import ident

    entries, owners = [], set()
    for line in listing:
        match = _ACL_ENTRY.match(line)
        if match and match["schema"] == schema:
            entries.append(line)
            owners.add(match["owner"])
    if not entries:
        return []
    chosen = work / f"acl-{schema}.list"
    chosen.write_text("\n".join(entries) + "\n", encoding="utf-8")
    script = _run_tool("pg_restore", f"--use-list={chosen}", "--file=-", str(dump)).decode(errors="replace")
    mapping = {"PUBLIC": "PUBLIC"}
    for owner in owners:
        mapping[owner] = ident(role.owner)
        if owner.endswith("_owner"):
            mapping[owner.removesuffix("_owner")] = ident(role.user)
    statements = []
    for line in script.splitlines():
        match = _GRANT.match(line.strip())
        if match and (grantee := mapping.get(_unquote(match["grantee"]))):
            statements.append(f"{match['head']} {grantee}{match['tail']}")
    return statements


NO_TLS_HINT = (
    " (the bundled tools, pgserver's, are built without TLS: set PG_BIN_DIR to the bin directory of "
    "PostgreSQL client tools with TLS, of the server's major version or newer, e.g. /usr/lib/postgresql/16/bin)"
)


def _run_tool(name: str, *args: str) -> bytes:
    result = subprocess.run([_pg_tool(name), *args], capture_output=True, check=False)
    if result.returncode != 0:
        error = result.stderr.decode(errors="replace")[-800:]
        hint = NO_TLS_HINT if "SSL support is not compiled in" in error and not os.environ.get("PG_BIN_DIR") else ""
        raise BackupError(f"{name} failed: {error.rstrip()}{hint}")
    return result.stdout


async def _apply_grants(admin_url: str, role: ServiceRole, statements: list[str]) -> None:
    import asyncpg

    from comptoir.provision import ident, to_asyncpg_dsn

    conn = await asyncpg.connect(to_asyncpg_dsn(admin_url))
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL ROLE {ident(role.owner)}")
            for statement in statements:
                await conn.execute(statement)
    finally:
        await conn.close()


def _restore_as_target(admin_url: str, dump: Path, roles: list[ServiceRole], work: Path) -> None:
    """Restore each schema as THIS installation's owner role, whatever roles the source had.

    The dump's owners and ACLs name the source's roles, which need not exist here: each schema is
    restored without them (``--no-owner --no-acl``) under ``--role=<owner>``, so every object belongs
    to the owner provisioning just created, and the default privileges it set grant the runtime role;
    the source's extra grants are then applied with the role names mapped. The schemas themselves are
    the ones provisioning made (emptied first: the database was checked to hold no rows). If anything
    fails, the four schemas are dropped again so a retry finds an empty database.
    """
    import asyncio

    from comptoir.provision import _provision, to_asyncpg_dsn

    def restore_all() -> None:
        asyncio.run(_drop_schemas(admin_url))  # leftovers without rows, e.g. tables of an earlier migrate
        asyncio.run(_provision(admin_url, roles))
        listing = _run_tool("pg_restore", "--list", str(dump)).decode(errors="replace").splitlines()
        for role in roles:
            _run_tool(
                "pg_restore",
                f"--schema={role.service}",
                "--no-owner",
                "--no-acl",
                f"--role={role.owner}",
                "--exit-on-error",
                "--single-transaction",
                "--no-password",
                f"--dbname={to_asyncpg_dsn(admin_url)}",
                str(dump),
            )
            grants = _acl_statements(dump, listing, role.service, role, work)
            asyncio.run(_apply_grants(admin_url, role, grants))

    _undo_on_failure(admin_url, restore_all)


def restore(
    admin_url: str,
    source: Path,
    key: bytes,
    settings: RunSettings,
    audit: AuditSettings,
    report: Progress | None = None,
) -> BackupContents:
    """Restore into an empty database and put the keys and the checkpoint log back under DATA_DIR."""
    import asyncio

    from comptoir.provision import migrate, refuse_shared_roles, resolve_roles, save_roles

    with tempfile.TemporaryDirectory(prefix="comptoir-restore-") as work:
        plain = Path(work) / "plain"
        if report:
            report.step("decrypting and checking the file")
        with open(source, "rb") as src, open(plain, "wb") as dst:
            magic = unseal(src, dst, key)  # refuse a tampered file before touching the database
        tar: tarfile.TarFile | None = None
        if magic == MAGIC:
            try:
                tar = tarfile.open(plain, "r")
                members = _safe_members(tar)
            except tarfile.TarError as exc:
                raise BackupError("the backup's contents are unreadable") from exc
            dump = Path(work) / "dump"
            handle = tar.extractfile(members[DUMP])
            if handle is None:
                raise BackupError("the backup's database dump is not a file")
            with open(dump, "wb") as out:
                while chunk := handle.read(CHUNK):
                    out.write(chunk)
        else:
            dump = plain
        try:
            in_use = asyncio.run(_schemas_in_use(admin_url))
            if in_use:
                raise BackupError(f"the database is not empty ({', '.join(in_use[:5])}): restore into an empty one")
            if report:
                report.step("pg_restore")
            roles = resolve_roles(settings, admin_url, save=False)
            asyncio.run(refuse_shared_roles(admin_url, roles))  # roles another database uses: before any change
            _restore_as_target(admin_url, dump, roles, Path(work))  # provisions the roles and schemas, once
            save_roles(settings, roles)  # generated passwords are kept once the database accepted the roles
            if report:
                report.step("migrations")
            _undo_on_failure(admin_url, lambda: migrate(settings, admin_url))
            if tar is None:
                return BackupContents()
            if report:
                report.step("checkpoint keys and log")
            return _undo_on_failure(admin_url, lambda: _put_back_keys(tar, members, audit))
        finally:
            if tar is not None:
                tar.close()
