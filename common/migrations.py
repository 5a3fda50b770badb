"""The body of every service's Alembic ``env.py``.

Migrations run with the installation's admin URL but ``SET ROLE`` to the schema's owner role, so
every object belongs to that owner and the service's runtime role gets only the privileges granted
to it. The version table lives inside the service's own schema.
"""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from alembic import context
from sqlalchemy import MetaData, pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from common.db import async_url


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def run_migrations(target_metadata: MetaData) -> None:
    config = context.config
    schema = target_metadata.schema
    if not schema:
        raise ValueError("a service's metadata must name its schema")
    url: str = config.attributes.get("url") or config.get_main_option("sqlalchemy.url") or ""
    owner_role: str | None = config.attributes.get("owner_role")
    runtime_role: str | None = config.attributes.get("runtime_role")

    if context.is_offline_mode():
        context.configure(
            url=url,
            target_metadata=target_metadata,
            literal_binds=True,
            version_table_schema=schema,
        )
        with context.begin_transaction():
            context.run_migrations()
        return

    def do_run(connection: Connection) -> None:
        if owner_role:
            connection.exec_driver_sql(f"SET ROLE {_quote_ident(owner_role)}")
        if runtime_role:
            # Migrations that grant the runtime role more than the default privileges read its name
            # here: current_setting('comptoir.runtime_role') (see runtime_role_grant below).
            connection.execute(
                sa.text("SELECT set_config('comptoir.runtime_role', :role, false)"), {"role": runtime_role}
            )
        connection.exec_driver_sql(f"SET search_path TO {_quote_ident(schema)}")
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            version_table_schema=schema,
            include_name=lambda name, type_, _parent: type_ != "schema" or name == schema,
        )
        with context.begin_transaction():
            context.run_migrations()
        # The SET statements opened the transaction, so Alembic joined it: commit it here.
        connection.commit()

    async def online() -> None:
        engine = create_async_engine(async_url(url), poolclass=pool.NullPool)
        try:
            async with engine.connect() as connection:
                await connection.run_sync(do_run)
        finally:
            await engine.dispose()

    asyncio.run(online())


def runtime_role_grant(privileges: str, table: str) -> str:
    """SQL for a migration: GRANT extra privileges on ``table`` to the service's runtime role."""
    return (
        "DO $$ BEGIN EXECUTE format('GRANT "
        + privileges
        + " ON "
        + table
        + " TO %I', current_setting('comptoir.runtime_role')); END $$"
    )
