"""Upgrading an installation whose data predates a migration, with `comptoir migrate` on a real PostgreSQL:
what the new release reads from old rows must mean what it means for new ones."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
from alembic import command

from comptoir.config import RunSettings
from comptoir.embedded import EmbeddedPostgres
from comptoir.provision import alembic_config, migrate, to_asyncpg_dsn


async def _run(admin_url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(to_asyncpg_dsn(admin_url))
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def test_an_upgrade_keeps_long_time_customers_and_ends_old_sessions_only_where_a_second_factor_is_due(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    embedded = EmbeddedPostgres(data)
    admin_url = embedded.start()
    try:
        settings = RunSettings(data_dir=data, database_url=admin_url)
        roles = {role.service: role for role in migrate(settings, admin_url)}
        auth = roles["auth"]
        # The installation as the release before sign-in times (auth_0005) left it: a customer of three years
        # who signs in every day, with a session opened yesterday.
        command.downgrade(alembic_config("auth", admin_url, auth.owner, auth.user), "auth_0004")
        user_id, session_id = uuid.uuid4(), uuid.uuid4()
        asyncio.run(
            _run(
                admin_url,
                "INSERT INTO auth.users (id, email, password_hash, role, is_active, phone_verified, created_at,"
                " updated_at) VALUES ($1, 'awa@boutique.cm', 'x', 'customer', true, false,"
                " now() - interval '3 years', now() - interval '3 years')",
                user_id,
            )
        )
        asyncio.run(
            _run(
                admin_url,
                "INSERT INTO auth.sessions (id, user_id, created_at, last_used_at, expires_at, idle_expires_at,"
                " access_expires_at) VALUES ($1, $2, now() - interval '1 day', now() - interval '1 day',"
                " now() + interval '6 days', now() + interval '1 day', now())",
                session_id,
                user_id,
            )
        )

        # The upgrade, with the operator's command; it says what it applied, and a second run that nothing was.
        env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
        env |= {"DATA_DIR": str(data), "DATABASE_URL": admin_url}
        for expected in ("applied: auth auth_0004 -> auth_", "already current: auth auth_0"):
            run = subprocess.run(
                [sys.executable, "-m", "comptoir.cli", "migrate"], env=env, capture_output=True, text=True, timeout=120
            )
            assert run.returncode == 0, run.stdout + run.stderr
            assert run.stdout.splitlines()[-1].startswith(expected), run.stdout

        [user] = asyncio.run(_run(admin_url, "SELECT now() - last_login_at AS age FROM auth.users"))
        assert user["age"].total_seconds() < 3600  # counted from the upgrade, not from three years ago
        [session] = asyncio.run(_run(admin_url, "SELECT mfa_at FROM auth.sessions"))
        assert session["mfa_at"] is None  # opened without a second factor, as far as anyone knows
    finally:
        embedded.stop()
