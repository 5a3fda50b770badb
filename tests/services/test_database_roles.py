"""Least privilege on the real database: each service's role reaches its own schema and nothing else."""

from __future__ import annotations

import asyncpg
import pytest

from tests.conftest import DatabaseFixture

SERVICES = ["auth", "inventory", "orders", "audit"]


@pytest.fixture(scope="module", autouse=True)
async def foreign_tables(database: DatabaseFixture) -> None:
    """A probe table in every schema, owned by that schema's owner role (as migrations create them)."""
    admin = await database.admin()
    try:
        for svc in SERVICES:
            await admin.execute(f'SET ROLE "comptoir_{svc}_owner"')
            await admin.execute(f"CREATE TABLE IF NOT EXISTS {svc}.privilege_probe (id int PRIMARY KEY, note text)")
            await admin.execute(f"INSERT INTO {svc}.privilege_probe VALUES (1, 'x') ON CONFLICT DO NOTHING")
            await admin.execute("RESET ROLE")
    finally:
        await admin.close()


@pytest.mark.parametrize("me", SERVICES)
async def test_role_cannot_touch_another_schema(database: DatabaseFixture, me: str) -> None:
    conn = await database.connect_as(me)
    try:
        for other in SERVICES:
            if other == me:
                continue
            for sql in (
                f"SELECT * FROM {other}.privilege_probe",
                f"INSERT INTO {other}.privilege_probe VALUES (2, 'y')",
                f"UPDATE {other}.privilege_probe SET note = 'z'",
                f"DELETE FROM {other}.privilege_probe",
                f"CREATE TABLE {other}.intruder (id int)",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(sql)
    finally:
        await conn.close()


@pytest.mark.parametrize("me", SERVICES)
async def test_role_has_no_ddl_rights_anywhere(database: DatabaseFixture, me: str) -> None:
    conn = await database.connect_as(me)
    try:
        for sql in (
            f"CREATE TABLE {me}.intruder (id int)",
            "CREATE TABLE public.intruder (id int)",
            f"DROP TABLE {me}.privilege_probe",
            f"ALTER TABLE {me}.privilege_probe ADD COLUMN x int",
            f"UPDATE {me}.alembic_version SET version_num = 'forged'",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql)
        assert await conn.fetchval(f"SELECT count(*) FROM {me}.alembic_version") == 1
    finally:
        await conn.close()


@pytest.mark.parametrize("me", ["auth", "inventory", "orders"])
async def test_role_reads_and_writes_its_own_schema(database: DatabaseFixture, me: str) -> None:
    conn = await database.connect_as(me)
    try:
        await conn.execute(
            f"INSERT INTO {me}.privilege_probe VALUES (3, 'mine') ON CONFLICT (id) DO UPDATE SET note = 'mine'"
        )
        assert await conn.fetchval(f"SELECT note FROM {me}.privilege_probe WHERE id = 3") == "mine"
        await conn.execute(f"DELETE FROM {me}.privilege_probe WHERE id = 3")
    finally:
        await conn.close()


async def test_audit_role_is_insert_only(database: DatabaseFixture) -> None:
    conn = await database.connect_as("audit")
    try:
        await conn.execute("INSERT INTO audit.privilege_probe VALUES (4, 'event')")
        assert await conn.fetchval("SELECT note FROM audit.privilege_probe WHERE id = 4") == "event"
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("UPDATE audit.privilege_probe SET note = 'rewritten'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("DELETE FROM audit.privilege_probe")
    finally:
        await conn.close()


async def test_a_role_cannot_log_in_with_another_roles_name(database: DatabaseFixture) -> None:
    """The embedded server asks every role for its password (no trust authentication)."""
    from comptoir.provision import to_asyncpg_dsn, with_credentials

    forged = with_credentials(database.admin_url, "postgres", database.roles["auth"].password)
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(to_asyncpg_dsn(forged))
