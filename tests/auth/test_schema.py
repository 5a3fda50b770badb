"""The migrations build exactly the schema the models describe, owned by the schema's owner role."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from common.db import async_url
from services.auth.models import Base
from tests.conftest import DatabaseFixture


async def test_models_and_migrations_agree(database: DatabaseFixture) -> None:
    engine = create_async_engine(async_url(database.admin_url))

    def diff(connection: sa.Connection) -> list[Any]:
        context = MigrationContext.configure(
            connection,
            opts={
                "include_schemas": True,
                "include_name": lambda name, type_, _parent: type_ != "schema" or name == "auth",
                "version_table_schema": "auth",
            },
        )
        return list(compare_metadata(context, Base.metadata))

    try:
        async with engine.connect() as conn:
            differences = await conn.run_sync(diff)
    finally:
        await engine.dispose()
    # Tables other test modules create in the schema (privilege probes) are not the models' business.
    differences = [d for d in differences if not (d[0] == "remove_table" and d[1].name == "privilege_probe")]
    assert differences == []


async def test_auth_tables_belong_to_the_owner_and_the_runtime_role_has_dml_only(database: DatabaseFixture) -> None:
    conn = await database.admin()
    try:
        rows = await conn.fetch("SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'auth'")
        owners = {row["tableowner"] for row in rows if row["tablename"] != "privilege_probe"}
        assert owners == {f"{database.roles['auth'].user}_owner"}
        privileges = await conn.fetch(
            "SELECT DISTINCT privilege_type FROM information_schema.role_table_grants "
            "WHERE grantee = $1 AND table_schema = 'auth' AND table_name = 'users'",
            database.roles["auth"].user,
        )
        assert {row["privilege_type"] for row in privileges} == {"SELECT", "INSERT", "UPDATE", "DELETE"}
    finally:
        await conn.close()
