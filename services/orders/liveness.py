"""Which orders processes are alive, as PostgreSQL itself knows it.

Each orders process holds, for as long as it lives, a session-level advisory lock (``LOCK_CLASS``, its
instance number) on a connection of its own, and writes that number into every order it starts placing
(``orders.owner``). When the process dies, even by ``kill -9``, its connection ends and PostgreSQL drops the
lock: the sweepers of any replica, the restarted process's included, then release that process's unfinished
placements and finish its confirmations once two passes in a row have found it gone, instead of after the
placing timeout, so their idempotency keys and the stock they hold are free again within seconds (a flash
sale would otherwise show stock as sold out meanwhile). A process that is only slow, or stopped, keeps its
lock, and nothing it is still doing is taken over early.
A placement begun while no lock was held (the database was away) has no owner and waits for the timeout.
"""

from __future__ import annotations

import asyncio
import secrets

import asyncpg
import structlog
from sqlalchemy import Boolean, ColumnElement, literal_column

from common.db import Database
from common.tasks import BackgroundLoop

log = structlog.get_logger("comptoir.orders.liveness")

LOCK_CLASS = 1869771890  # b"ordr" as a 32-bit integer: the first key of every orders process's lock

# A placing order whose owner holds no lock any more: its process is gone.
OWNER_GONE: ColumnElement[bool] = literal_column(
    f"""(orders.owner IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM pg_catalog.pg_locks AS l
        WHERE l.locktype = 'advisory' AND l.classid = {LOCK_CLASS} AND l.objsubid = 2
            AND l.objid = orders.owner::oid AND l.granted
            AND l.database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
    ))""",  # noqa: S608 - a constant
    Boolean,
)


class Liveness(BackgroundLoop):
    """Holds this process's lock; ``instance`` is its number while it is held, None otherwise.

    A lost connection (a server restart, a failover, an operator's pg_terminate_backend) loses the lock while
    the process lives: the number is taken again on a new connection at once (``retry_seconds``), so the
    work begun under it stays this process's; the sweepers allow for that gap (``Reconciliation``: an owner
    must be found gone on two passes in a row)."""

    task_name = "orders-liveness"

    def __init__(self, db: Database, *, check_seconds: float = 5.0, retry_seconds: float = 0.5) -> None:
        self.db = db
        self.check_seconds = check_seconds
        self.retry_seconds = retry_seconds
        self.instance: int | None = None
        self.held = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        previous: int | None = None
        while True:
            try:
                async with self.db.dedicated() as conn:
                    await self._hold(conn, previous)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database went away: the lock went with the connection
                if self.instance is not None:
                    log.warning("orders.liveness.lost", instance=self.instance, error=type(exc).__name__)
            finally:
                previous = self.instance or previous
                self.instance = None
                self.held.clear()
            await asyncio.sleep(self.retry_seconds)

    async def _hold(self, conn: asyncpg.Connection, previous: int | None) -> None:
        candidate = previous  # the number this process's work was begun under, if it had one
        while candidate is None or not await conn.fetchval(
            "SELECT pg_try_advisory_lock($1, $2)", LOCK_CLASS, candidate
        ):
            candidate = secrets.randbelow(2**31 - 2) + 1  # a number another live process holds is drawn again
        self.instance = candidate
        self.held.set()
        while True:  # a lost connection is noticed here: its lock is gone with it
            await asyncio.sleep(self.check_seconds)
            await conn.fetchval("SELECT 1")

    async def wait_held(self, timeout: float) -> bool:
        """Whether the lock is held within ``timeout`` (a start-up that cannot reach the database goes on)."""
        try:
            await asyncio.wait_for(self.held.wait(), timeout)
        except TimeoutError:
            return False
        return True
