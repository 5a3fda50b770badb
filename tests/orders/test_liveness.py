"""An orders process's liveness lock (services.orders.liveness), on a real PostgreSQL: held while the process
lives, gone with its connection, and taken again under the same number when the connection is lost under a
live process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from common.db import Database
from services.orders.liveness import LOCK_CLASS, Liveness
from tests.conftest import DatabaseFixture


@pytest.fixture
async def orders_db(database: DatabaseFixture) -> AsyncIterator[Database]:
    db = Database(database.url("orders"), schema="orders", application_name="test-liveness")
    yield db
    await db.dispose()


async def holder_of(admin: asyncpg.Connection, instance: int) -> int | None:
    """The backend pid holding that instance's lock, if any."""
    pid: int | None = await admin.fetchval(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = $1 AND objid = $2 AND objsubid = 2"
        " AND granted",
        LOCK_CLASS,
        instance,
    )
    return pid


async def test_the_lock_is_held_while_the_process_lives_and_taken_again_after_its_connection_is_lost(
    orders_db: Database, database: DatabaseFixture
) -> None:
    liveness = Liveness(orders_db, check_seconds=0.05)
    admin = await database.admin()
    try:
        async with liveness.alive():
            assert await liveness.wait_held(10)
            first = liveness.instance
            assert first is not None
            pid = await holder_of(admin, first)
            assert pid is not None  # on a connection of its own, not one of the pool's
            assert orders_db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]

            # The connection is lost (a server restart, a failover, an operator's pg_terminate_backend): the
            # same number is taken again on a new connection, so the work begun under it stays this process's.
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            async with asyncio.timeout(10):
                while (await holder_of(admin, first)) in (None, pid) or liveness.instance != first:
                    await asyncio.sleep(0.02)
            assert liveness.held.is_set()
            second = first
        # The process ends: its lock is gone with it.
        assert liveness.instance is None
        assert await holder_of(admin, second) is None
    finally:
        await admin.close()


async def test_a_start_without_a_database_serves_without_the_lock() -> None:
    nowhere = Database(
        "postgresql://nobody:nothing@127.0.0.1:9/none", schema="orders", application_name="t", connect_timeout=0.2
    )
    liveness = Liveness(nowhere, check_seconds=0.05)
    try:
        async with liveness.alive():
            assert await liveness.wait_held(0.3) is False
            assert liveness.instance is None
    finally:
        await nowhere.dispose()
