"""Roles are shared by every database of a PostgreSQL server: a second installation must not take over
the first one's roles (changing their passwords would lock the first installation out)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from comptoir.config import SERVICES, RunSettings
from comptoir.embedded import EmbeddedPostgres
from comptoir.provision import RoleConflictError, migrate, to_asyncpg_dsn


def comptoir(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "comptoir.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


async def _admin(admin_url: str, sql: str) -> None:
    conn = await asyncpg.connect(to_asyncpg_dsn(admin_url))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _fetchval(url: str, sql: str) -> object:
    conn = await asyncpg.connect(to_asyncpg_dsn(url))
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def other_database(admin_url: str, name: str) -> str:
    asyncio.run(_admin(admin_url, f"CREATE DATABASE {name}"))
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture
def server(tmp_path: Path):  # noqa: ANN201
    """A running installation (d1) on an embedded server: its admin URL and runtime role URLs."""
    d1 = tmp_path / "d1"
    embedded = EmbeddedPostgres(d1)
    admin_url = embedded.start()
    roles = migrate(RunSettings(data_dir=d1, database_url=admin_url), admin_url)
    try:
        yield admin_url, {r.service: r.url for r in roles}, d1
    finally:
        embedded.stop()


def test_a_second_installation_on_the_same_server_cannot_take_over_the_first_ones_roles(
    server,  # noqa: ANN001
    tmp_path: Path,
) -> None:
    admin_url, urls, d1 = server
    shop2 = other_database(admin_url, "shop2")
    d7 = tmp_path / "d7"
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env |= {"DATA_DIR": str(d7), "DATABASE_URL": shop2}

    refused = comptoir("migrate", env=env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "comptoir_auth" in line
    assert "'comptoir'" in line  # the database that uses it
    assert "AUTH_DATABASE_URL" in line
    assert "Traceback" not in refused.stderr
    # Nothing changed: d1 still logs in with its passwords, shop2 got no schema, d7 no generated roles.
    for service, url in urls.items():
        assert asyncio.run(_fetchval(url, "SELECT current_user")) == f"comptoir_{service}"
    assert asyncio.run(_fetchval(shop2, "SELECT count(*) FROM pg_namespace WHERE nspname = 'auth'")) == 0
    assert not (d7 / "secrets" / "database-roles.json").exists()

    # `comptoir run` provisions at each start the same way: refused too, before changing anything.
    with pytest.raises(RoleConflictError):
        migrate(RunSettings(data_dir=d7, database_url=shop2), shop2)

    # Its own role names (the documented settings): the second installation provisions, the first still works.
    own = {
        svc: make_url(shop2).set(username=f"shop2_{svc}", password=f"pw-{svc}-0123456789").render_as_string(False)
        for svc in SERVICES
    }
    settings = RunSettings(
        data_dir=d7,
        database_url=shop2,
        **{f"{svc}_database_url": url for svc, url in own.items()},  # type: ignore[arg-type]
    )
    roles = migrate(settings, shop2)
    assert [r.user for r in roles] == [f"shop2_{svc}" for svc in SERVICES]
    assert asyncio.run(_fetchval(own["auth"], "SELECT count(*) FROM auth.alembic_version")) == 1
    for service, url in urls.items():
        assert asyncio.run(_fetchval(url, "SELECT current_user")) == f"comptoir_{service}"

    # The normal upgrade path: migrate again on each installation's own database keeps working.
    again = migrate(RunSettings(data_dir=d1, database_url=admin_url), admin_url)
    assert {r.service: r.url for r in again} == urls
    assert [r.user for r in migrate(settings, shop2)] == [f"shop2_{svc}" for svc in SERVICES]
