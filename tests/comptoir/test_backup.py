"""`comptoir backup` / `comptoir restore` on the embedded database: a real round trip, and refusals."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from comptoir.config import SERVICES, RunSettings
from comptoir.embedded import EmbeddedPostgres
from comptoir.provision import migrate, to_asyncpg_dsn
from services.audit.config import Settings as AuditSettings
from services.audit.main import create_app as audit_app
from tests.audit.support import event
from tests.conftest import running
from tests.support.tokens import TestIssuer, bearer

KEY = base64.urlsafe_b64encode(os.urandom(32)).decode()


def comptoir(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "comptoir.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


async def seed(admin_url: str, audit_url: str, data_dir: Path) -> uuid.UUID:
    product = uuid.uuid4()
    conn = await asyncpg.connect(to_asyncpg_dsn(admin_url))
    try:
        await conn.execute(
            "INSERT INTO inventory.products (id, sku, name, price_xaf) VALUES ($1, 'BKP-1', 'Savon de Marseille', 750)",
            product,
        )
    finally:
        await conn.close()
    issuer = TestIssuer()
    app = audit_app(
        AuditSettings(database_url=audit_url, environment="test", data_dir=data_dir), key_source=issuer.keys()
    )
    async with running(app) as client:
        headers = bearer(issuer.service(caller="orders", audience="audit"))
        response = await client.post("/internal/events", json={"events": [event() for _ in range(5)]}, headers=headers)
        assert response.status_code == 200, response.text
    return product


async def wipe(admin_url: str) -> None:
    conn = await asyncpg.connect(to_asyncpg_dsn(admin_url))
    try:
        await conn.execute("DROP SCHEMA auth, inventory, orders, audit CASCADE")
    finally:
        await conn.close()


async def read_back(admin_url: str) -> tuple[str | None, int]:
    conn = await asyncpg.connect(to_asyncpg_dsn(admin_url))
    try:
        name = await conn.fetchval("SELECT name FROM inventory.products WHERE sku = 'BKP-1'")
        events = await conn.fetchval("SELECT count(*) FROM audit.events")
        return name, int(events)
    finally:
        await conn.close()


@pytest.fixture
def installation(tmp_path: Path):  # noqa: ANN201
    embedded = EmbeddedPostgres(tmp_path)
    admin_url = embedded.start()
    roles = migrate(RunSettings(data_dir=tmp_path, database_url=admin_url), admin_url)
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env |= {"DATA_DIR": str(tmp_path), "DATABASE_URL": admin_url, "BACKUP_ENCRYPTION_KEY": KEY}
    try:
        yield admin_url, {r.service: r.url for r in roles}, env, tmp_path
    finally:
        embedded.stop()


def test_backup_wipe_restore_gives_the_same_data_and_a_valid_chain(installation) -> None:  # noqa: ANN001
    admin_url, urls, env, data_dir = installation
    asyncio.run(seed(admin_url, urls["audit"], data_dir))
    before = asyncio.run(read_back(admin_url))
    file = data_dir / "shop.backup"
    made = comptoir("backup", "--out", str(file), env=env)
    assert made.returncode == 0, made.stderr
    assert oct(file.stat().st_mode & 0o777) == "0o600"
    assert b"Savon de Marseille" not in file.read_bytes()  # encrypted

    asyncio.run(wipe(admin_url))
    restored = comptoir("restore", str(file), env=env)
    assert restored.returncode == 0, restored.stderr
    assert asyncio.run(read_back(admin_url)) == before == ("Savon de Marseille", 5)
    verdict = comptoir("audit", "verify", env=env)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr

    again = comptoir("restore", str(file), env=env)  # never over live data
    assert again.returncode == 1
    assert "not empty" in again.stderr


def test_tampered_truncated_or_foreign_backups_are_refused(installation) -> None:  # noqa: ANN001
    admin_url, _, env, data_dir = installation
    file = data_dir / "shop.backup"
    assert comptoir("backup", "--out", str(file), env=env).returncode == 0
    asyncio.run(wipe(admin_url))
    data = file.read_bytes()
    cases = {
        "flipped": data[:100] + bytes([data[100] ^ 1]) + data[101:],
        "truncated": data[: len(data) // 2],
        "not a backup": b"PGDMP" + data[5:],
    }
    for name, content in cases.items():
        bad = data_dir / f"{name}.backup"
        bad.write_bytes(content)
        result = comptoir("restore", str(bad), env=env)
        assert result.returncode == 1, name
    wrong_key = env | {"BACKUP_ENCRYPTION_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode()}
    assert comptoir("restore", str(file), env=wrong_key).returncode == 1
    # Onto another machine, with the wrong key: refused before an embedded database is set up there.
    fresh = data_dir.parent / "fresh-machine"
    elsewhere = {k: v for k, v in wrong_key.items() if not k.endswith("DATABASE_URL")} | {"DATA_DIR": str(fresh)}
    assert comptoir("restore", str(file), env=elsewhere).returncode == 1
    assert not (fresh / "pg").exists()
    weak = comptoir("backup", "--out", str(file), env=env | {"BACKUP_ENCRYPTION_KEY": "short"})
    assert weak.returncode == 2


def test_the_stream_format_catches_reordering() -> None:
    import io

    from comptoir.backup import CHUNK, BackupError, seal, unseal

    key = os.urandom(32)
    sealed = io.BytesIO()
    seal(io.BytesIO(os.urandom(CHUNK * 2 + 10)), sealed, key)
    raw = sealed.getvalue()
    header = len(b"COMPTOIR-BACKUP\x00v1") + 8
    first_len = int.from_bytes(raw[header : header + 4], "big")
    first = raw[header : header + 4 + first_len]
    second = raw[header + 4 + first_len : header + 8 + 2 * first_len]
    swapped = raw[:header] + second + first + raw[header + 8 + 2 * first_len :]
    with pytest.raises(BackupError):
        unseal(io.BytesIO(swapped), io.BytesIO(), key)


async def seed_and_sign(audit_url: str, data_dir: Path) -> str:
    """Five events and a checkpoint signed by this installation's key; returns the key id."""
    issuer = TestIssuer()
    settings = AuditSettings(database_url=audit_url, environment="test", data_dir=data_dir)
    app = audit_app(settings, key_source=issuer.keys(), run_checkpointer=False)
    async with running(app) as client:
        headers = bearer(issuer.service(caller="orders", audience="audit"))
        response = await client.post("/internal/events", json={"events": [event() for _ in range(5)]}, headers=headers)
        assert response.status_code == 200, response.text
        checkpoint = await app.state.audit.checkpoints.sign("manual")
        assert checkpoint is not None
        return str(checkpoint.key_id)


async def tamper(admin_url: str) -> None:
    conn = await asyncpg.connect(to_asyncpg_dsn(admin_url))
    try:
        async with conn.transaction():
            await conn.execute("ALTER TABLE audit.events DISABLE TRIGGER events_append_only")
            await conn.execute("UPDATE audit.events SET actor_id = 'someone-else' WHERE sequence = 3")
            await conn.execute("ALTER TABLE audit.events ENABLE TRIGGER events_append_only")
    finally:
        await conn.close()


def verdict_of(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    import json

    parsed = json.loads(result.stdout)
    assert isinstance(parsed, dict)
    return parsed


@pytest.fixture
def elsewhere(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A second, empty installation: another DATA_DIR with its own embedded database."""
    data_dir = tmp_path_factory.mktemp("elsewhere")
    embedded = EmbeddedPostgres(data_dir)
    admin_url = embedded.start()
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env |= {"DATA_DIR": str(data_dir), "DATABASE_URL": admin_url, "BACKUP_ENCRYPTION_KEY": KEY}
    try:
        yield admin_url, env, data_dir
    finally:
        embedded.stop()


def test_a_restore_elsewhere_verifies_against_the_restored_keys_and_catches_tampering(installation, elsewhere) -> None:  # noqa: ANN001
    _, urls, env, data_dir = installation
    key_id = asyncio.run(seed_and_sign(urls["audit"], data_dir))
    file = data_dir / "shop.backup"
    made = comptoir("backup", "--out", str(file), env=env)
    assert made.returncode == 0, made.stderr
    assert key_id in made.stdout
    assert "not the private key" in made.stdout

    other_url, other_env, other_dir = elsewhere
    restored = comptoir("restore", str(file), env=other_env)
    assert restored.returncode == 0, restored.stderr
    assert f"copy from your file backup before the first start: {other_dir / 'keys'} (auth's token" in restored.stdout
    assert (other_dir / "keys" / "trusted-checkpoint-keys" / f"{key_id}.pub").exists()
    assert not (other_dir / "keys" / "audit-checkpoint.key").exists()  # the private key stayed home
    verdict = comptoir("audit", "verify", env=other_env)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    result = verdict_of(verdict)
    assert result["ok"] is True
    assert result["warnings"] == []
    assert result["checkpoints_checked"] >= 1

    asyncio.run(tamper(other_url))
    broken = comptoir("audit", "verify", env=other_env)
    assert broken.returncode == 1
    assert verdict_of(broken)["ok"] is False
    assert "CRITICAL" in broken.stderr
    assert "Traceback" not in broken.stderr


def test_a_checkpoint_signed_by_an_unknown_key_is_a_warning_not_tampering(installation, elsewhere) -> None:  # noqa: ANN001
    _, urls, env, data_dir = installation
    key_id = asyncio.run(seed_and_sign(urls["audit"], data_dir))
    file = data_dir / "shop.backup"
    assert comptoir("backup", "--out", str(file), env=env).returncode == 0
    _, other_env, other_dir = elsewhere
    assert comptoir("restore", str(file), env=other_env).returncode == 0
    for kept in (other_dir / "keys" / "trusted-checkpoint-keys").iterdir():
        kept.unlink()  # as if the keys had not come back with the data
    verdict = comptoir("audit", "verify", env=other_env)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr
    result = verdict_of(verdict)
    assert result["ok"] is True
    (warning,) = result["warnings"]  # type: ignore[misc]
    assert warning["key_id"] == key_id
    assert "AUDIT_CHECKPOINT_TRUSTED_KEYS" in warning["reason"]
    assert key_id in verdict.stderr
    assert "warning" in verdict.stderr


def test_the_private_key_leaves_only_when_asked_and_comes_back(installation, elsewhere) -> None:  # noqa: ANN001
    _, urls, env, data_dir = installation
    asyncio.run(seed_and_sign(urls["audit"], data_dir))
    file = data_dir / "full.backup"
    made = comptoir("backup", "--out", str(file), "--include-private-key", env=env)
    assert made.returncode == 0, made.stderr
    _, other_env, other_dir = elsewhere
    assert comptoir("restore", str(file), env=other_env).returncode == 0
    restored_key = other_dir / "keys" / "audit-checkpoint.key"
    assert restored_key.read_bytes() == (data_dir / "keys" / "audit-checkpoint.key").read_bytes()
    assert oct(restored_key.stat().st_mode & 0o777) == "0o600"


def test_development_generates_and_keeps_a_backup_key_production_requires_one(installation) -> None:  # noqa: ANN001
    _, _, env, data_dir = installation
    dev = {k: v for k, v in env.items() if k != "BACKUP_ENCRYPTION_KEY"} | {"ENVIRONMENT": "development"}
    first = comptoir("backup", "--out", str(data_dir / "a.backup"), env=dev)
    assert first.returncode == 0, first.stderr
    key_file = data_dir / "secrets" / "backup.key"
    assert "generated the development backup key" in first.stderr
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    kept = key_file.read_bytes()
    second = comptoir("backup", "--out", str(data_dir / "b.backup"), env=dev)
    assert second.returncode == 0
    assert "generated" not in second.stderr
    assert key_file.read_bytes() == kept
    refused = comptoir("backup", "--out", str(data_dir / "c.backup"), env=dev | {"ENVIRONMENT": "production"})
    assert refused.returncode == 2
    assert "BACKUP_ENCRYPTION_KEY is required in production" in refused.stderr
    assert not (data_dir / "c.backup").exists()


def _own_role_urls(admin_url: str, prefix: str) -> dict[str, str]:
    """``<SVC>_DATABASE_URL`` for every service: the settings that give an installation its own role names."""
    from sqlalchemy.engine import make_url

    return {
        f"{svc.upper()}_DATABASE_URL": make_url(admin_url)
        .set(username=f"{prefix}_{svc}", password=f"{prefix}-{svc}-password-0123")
        .render_as_string(hide_password=False)
        for svc in SERVICES
    }


async def runtime_can_work(urls: dict[str, str], product_name: str) -> None:
    """Each runtime role reads its schema, and writes where the service writes (the restored data included)."""
    for service, url in urls.items():
        conn = await asyncpg.connect(to_asyncpg_dsn(url))
        try:
            assert await conn.fetchval(f"SELECT count(*) FROM {service}.alembic_version") == 1  # noqa: S608
            if service == "inventory":
                assert await conn.fetchval("SELECT name FROM inventory.products WHERE sku = 'BKP-1'") == product_name
                await conn.execute(
                    "INSERT INTO inventory.products (id, sku, name, price_xaf) VALUES ($1, 'BKP-2', 'Karité', 900)",
                    uuid.uuid4(),
                )
                await conn.execute("UPDATE inventory.products SET price_xaf = 800 WHERE sku = 'BKP-1'")
            if service == "audit":
                assert await conn.fetchval("SELECT count(*) FROM audit.events") == 5
                # granted by a migration beyond the default privileges: must follow the restore
                assert await conn.fetchval("SELECT has_table_privilege('audit.alerts', 'UPDATE')")
                assert await conn.fetchval("SELECT has_table_privilege('audit.pseudonyms', 'DELETE')")
                assert not await conn.fetchval("SELECT has_table_privilege('audit.events', 'UPDATE')")
            if service == "auth":
                assert await conn.fetchval("SELECT count(*) FROM auth.users") == 0
        finally:
            await conn.close()


async def owners_of(admin_url: str) -> set[str]:
    conn = await asyncpg.connect(to_asyncpg_dsn(admin_url))
    try:
        rows = await conn.fetch(
            "SELECT DISTINCT pg_get_userbyid(c.relowner) AS owner FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname IN ('auth', 'inventory', 'orders', 'audit')"
        )
        return {row["owner"] for row in rows}
    finally:
        await conn.close()


@pytest.fixture
def renamed(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """An installation whose roles have non-default names (s2_*), set by the documented settings."""
    data_dir = tmp_path_factory.mktemp("renamed")
    embedded = EmbeddedPostgres(data_dir)
    admin_url = embedded.start()
    own = _own_role_urls(admin_url, "s2")
    settings = RunSettings(data_dir=data_dir, database_url=admin_url, **{k.lower(): v for k, v in own.items()})  # type: ignore[arg-type]
    roles = migrate(settings, admin_url)
    assert roles[0].user == "s2_auth"
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env |= {"DATA_DIR": str(data_dir), "DATABASE_URL": admin_url, "BACKUP_ENCRYPTION_KEY": KEY} | own
    try:
        yield admin_url, {r.service: r.url for r in roles}, env, data_dir
    finally:
        embedded.stop()


def test_a_backup_restores_under_other_role_names(renamed, elsewhere) -> None:  # noqa: ANN001
    admin_url, urls, env, data_dir = renamed
    asyncio.run(seed(admin_url, urls["audit"], data_dir))
    file = data_dir / "s2.backup"
    made = comptoir("backup", "--out", str(file), env=env)
    assert made.returncode == 0, made.stderr

    # A fresh DATA_DIR with the default role names (comptoir_*): the source's s2_* roles do not exist there.
    other_url, other_env, other_dir = elsewhere
    restored = comptoir("restore", str(file), env=other_env)
    assert restored.returncode == 0, restored.stderr
    assert asyncio.run(owners_of(other_url)) == {f"comptoir_{svc}_owner" for svc in SERVICES}
    roles = migrate(RunSettings(data_dir=other_dir, database_url=other_url), other_url)  # what `comptoir run` does
    asyncio.run(runtime_can_work({r.service: r.url for r in roles}, "Savon de Marseille"))
    assert oct((other_dir / "keys").stat().st_mode & 0o777) == "0o700"
    assert oct((other_dir / "keys" / "trusted-checkpoint-keys").stat().st_mode & 0o777) == "0o700"
    verdict = comptoir("audit", "verify", env=other_env)
    assert verdict.returncode == 0, verdict.stdout + verdict.stderr

    # A new database on the source's own server, with roles of its own (s3_*).
    shop3 = asyncio.run(create_database(admin_url, "shop3"))
    own3 = _own_role_urls(shop3, "s3")
    env3 = env | {"DATABASE_URL": shop3, "DATA_DIR": str(data_dir / "d3")} | own3
    into_shop3 = comptoir("restore", str(file), env=env3)
    assert into_shop3.returncode == 0, into_shop3.stderr
    assert asyncio.run(owners_of(shop3)) == {f"s3_{svc}_owner" for svc in SERVICES}
    asyncio.run(runtime_can_work({k.split("_")[0].lower(): v for k, v in own3.items()}, "Savon de Marseille"))
    asyncio.run(runtime_can_work(urls, "Savon de Marseille"))  # the source still works, its data untouched


async def create_database(admin_url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    conn = await asyncpg.connect(to_asyncpg_dsn(admin_url))
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def test_a_restore_that_fails_midway_leaves_the_database_empty_for_a_retry(
    installation,  # noqa: ANN001
    elsewhere,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from comptoir import backup as backup_module
    from comptoir.backup import BackupError, _schemas_in_use, restore

    admin_url, urls, env, data_dir = installation
    asyncio.run(seed(admin_url, urls["audit"], data_dir))
    file = data_dir / "shop.backup"
    assert comptoir("backup", "--out", str(file), env=env).returncode == 0
    other_url, _, other_dir = elsewhere
    settings = RunSettings(data_dir=other_dir, database_url=other_url)
    audit = AuditSettings(data_dir=other_dir, environment="test")
    real = backup_module._run_tool
    restores = []

    def failing_on_the_third_schema(name: str, *args: str) -> bytes:
        if name == "pg_restore" and any(a.startswith("--dbname=") for a in args):
            restores.append(args)
            if len(restores) == 3:
                raise BackupError("pg_restore failed: pg_restore: error: could not execute query: disk full")
        return real(name, *args)

    monkeypatch.setattr(backup_module, "_run_tool", failing_on_the_third_schema)
    with pytest.raises(BackupError, match="emptied again"):
        restore(other_url, file, base64.urlsafe_b64decode(KEY), settings, audit)
    assert asyncio.run(_schemas_in_use(other_url)) == []  # the first two schemas' rows are gone too
    monkeypatch.setattr(backup_module, "_run_tool", real)

    def full_disk(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    # The very last step, the checkpoint keys and log put back into DATA_DIR, is undone the same way.
    monkeypatch.setattr(backup_module, "_put_back_keys", full_disk)
    with pytest.raises(BackupError, match="emptied again"):
        restore(other_url, file, base64.urlsafe_b64decode(KEY), settings, audit)
    assert asyncio.run(_schemas_in_use(other_url)) == []
    monkeypatch.undo()
    restore(other_url, file, base64.urlsafe_b64decode(KEY), settings, audit)
    assert asyncio.run(read_back(other_url)) == ("Savon de Marseille", 5)


def test_backup_refuses_a_directory_or_an_existing_file_and_leaves_nothing_behind(installation) -> None:  # noqa: ANN001
    admin_url, _, env, data_dir = installation
    folder = data_dir / "backups"
    folder.mkdir()
    into_dir = comptoir("backup", "--out", str(folder), env=env)
    assert into_dir.returncode == 2
    (line,) = into_dir.stderr.strip().splitlines()
    assert "is a directory" in line
    assert not (data_dir / "backups.partial").exists()

    file = folder / "shop.backup"
    assert comptoir("backup", "--out", str(file), env=env).returncode == 0
    kept = file.read_bytes()
    again = comptoir("backup", "--out", str(file), env=env)
    assert again.returncode == 2
    assert "already exists" in again.stderr
    assert file.read_bytes() == kept
    assert sorted(p.name for p in folder.iterdir()) == ["shop.backup"]
    assert comptoir("backup", "--out", str(file), "--force", env=env).returncode == 0
    assert file.read_bytes() != kept  # replaced (each backup is sealed with a fresh nonce)
    assert sorted(p.name for p in folder.iterdir()) == ["shop.backup"]


def test_a_failed_encryption_leaves_no_partial_file(installation, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from comptoir import backup as backup_module

    admin_url, _, _, data_dir = installation

    def broken_seal(*_args: object, **_kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(backup_module, "seal", broken_seal)
    out = data_dir / "full-disk.backup"
    with pytest.raises(OSError, match="No space"):
        backup_module.backup(
            admin_url, out, base64.urlsafe_b64decode(KEY), AuditSettings(data_dir=data_dir, environment="test")
        )
    assert not out.exists()
    assert not (data_dir / "full-disk.backup.partial").exists()


def test_the_file_and_key_are_checked_without_a_database(installation) -> None:  # noqa: ANN001
    """``check_file`` needs no database: the command line runs it before it sets up an embedded one."""
    from comptoir.backup import BackupError, check_file

    _, _, env, data_dir = installation
    file = data_dir / "shop.backup"
    assert comptoir("backup", "--out", str(file), env=env).returncode == 0
    with pytest.raises(BackupError, match="key is wrong"):
        check_file(file, os.urandom(32))
    check_file(file, base64.urlsafe_b64decode(KEY))


def test_backup_and_restore_with_database_url_print_no_platformdirs_warning(installation, elsewhere) -> None:  # noqa: ANN001
    _, _, env, data_dir = installation
    no_runtime_dir = {k: v for k, v in env.items() if k != "XDG_RUNTIME_DIR"}
    file = data_dir / "quiet.backup"
    made = comptoir("backup", "--out", str(file), env=no_runtime_dir)
    assert made.returncode == 0, made.stderr
    assert "Warning" not in made.stderr, made.stderr
    _, other_env, _ = elsewhere
    restored = comptoir("restore", str(file), env={k: v for k, v in other_env.items() if k != "XDG_RUNTIME_DIR"})
    assert restored.returncode == 0, restored.stderr
    assert "Warning" not in restored.stderr, restored.stderr


def test_tls_with_the_bundled_tools_says_what_to_do(installation) -> None:  # noqa: ANN001
    """pgserver's pg_dump is built without TLS: a URL asking for TLS gets the way out, not only libpq's words."""
    admin_url, _, env, data_dir = installation
    tls_url = admin_url + ("&" if "?" in admin_url else "?") + "sslmode=verify-full"
    env = {k: v for k, v in env.items() if k != "PG_BIN_DIR"} | {"DATABASE_URL": tls_url}
    refused = comptoir("backup", "--out", str(data_dir / "tls.backup"), env=env)
    assert refused.returncode != 0
    assert "set PG_BIN_DIR" in refused.stderr, refused.stderr
    assert not (data_dir / "tls.backup").exists()
