"""Async engine and session lifecycle: one transaction per request.

The engine is created in the app's lifespan (never at import); the ``SessionDep`` dependency opens a
transaction that commits when the endpoint returns and rolls back when it raises. Repositories only
``flush``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, Request
from sqlalchemy import event, text
from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from common.state import state_of


def async_url(url: str | URL) -> URL:
    """Accept ``postgresql://`` (libpq style, ``sslmode=``) and use the asyncpg driver.

    SQLAlchemy hands URL query parameters to ``asyncpg.connect()`` as keywords, where TLS is ``ssl``,
    not libpq's ``sslmode``; translate it so one URL works everywhere.
    """
    parsed = make_url(url) if isinstance(url, str) else url
    query = dict(parsed.query)
    if "sslmode" in query:
        query["ssl"] = query.pop("sslmode")
    return parsed.set(drivername="postgresql+asyncpg", query=query)


def _connect_or_unreachable(dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
    """The driver's own connect, with a server that is not there said as one. Over a Unix socket (the
    embedded server, a cloud SQL proxy) a stopped server is a missing socket file: FileNotFoundError, which
    would be answered as the service's own fault (500) instead of an unreachable database (503)."""
    try:
        return dialect.connect(*cargs, **cparams)
    except (ConnectionError, TimeoutError, socket.gaierror, ssl.SSLError):
        raise  # already told apart (a refused certificate is a configuration to fix, not a retry)
    except OSError as exc:
        raise ConnectionRefusedError(exc.errno, f"the database cannot be reached: {exc.strerror or exc}") from exc


class Database:
    def __init__(
        self,
        url: str,
        *,
        schema: str,
        application_name: str,
        pool_size: int = 5,
        max_overflow: int = 5,
        connect_timeout: float = 5.0,
        statement_timeout_ms: int = 15_000,
        ping_after_idle_seconds: float = 5.0,
    ) -> None:
        if not url:
            raise ValueError(f"no database URL configured for {application_name}")
        self.schema = schema
        self._connect_args = {
            "timeout": connect_timeout,
            "command_timeout": statement_timeout_ms / 1000 + 5,
            "server_settings": {
                "search_path": schema,
                "statement_timeout": str(statement_timeout_ms),
                "lock_timeout": "5000",
                "idle_in_transaction_session_timeout": "60000",
                "application_name": application_name,
            },
        }
        self.engine: AsyncEngine = create_async_engine(
            async_url(url),
            pool_size=pool_size,
            max_overflow=max_overflow,
            # Not pool_pre_ping: with asyncpg that is three round trips (BEGIN, ping, ROLLBACK) on every
            # checkout, measured at 15 % of an order's CPU. Only a connection idle for a while is pinged.
            pool_pre_ping=False,
            pool_recycle=1800,
            connect_args=self._connect_args,
        )
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)
        self.ping_after_idle_seconds = ping_after_idle_seconds
        event.listen(self.engine.sync_engine, "do_connect", _connect_or_unreachable)
        event.listen(self.engine.sync_engine.pool, "checkin", _note_checkin)
        event.listen(self.engine.sync_engine.pool, "checkout", self._ping_if_idle)

    def _ping_if_idle(self, dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        """A connection that sat in the pool may have been closed by the server (restart, failover, idle
        timeout): ping it, and let the pool replace it if it is dead. Busy connections are not pinged."""
        since = record.info.get("checked_in_at")
        if since is None or time.monotonic() - since < self.ping_after_idle_seconds:
            return
        try:
            dbapi_connection.ping()
        except Exception as exc:  # the pool retries the checkout with a fresh connection
            raise DisconnectionError("pooled connection is dead") from exc

    async def ping(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                async with self.engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
            return True
        except Exception:  # any failure, including timeouts, means "not ready"
            return False

    async def dispose(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def dedicated(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection of its own, outside the pool and outside any transaction, for as long as the block
        lasts: for what lives with a session (a session-level advisory lock), never a pooled connection
        that another caller would get next."""
        engine = create_async_engine(self.engine.url, poolclass=NullPool, connect_args=self._connect_args)
        event.listen(engine.sync_engine, "do_connect", _connect_or_unreachable)
        try:
            async with engine.connect() as conn, driver_of(conn) as driver:
                yield driver
        finally:
            await engine.dispose()

    @asynccontextmanager
    async def autocommit(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection's asyncpg driver outside any transaction: each statement commits on its own.

        For hot paths whose unit of work is one statement (SQLAlchemy's statement building and bookkeeping
        cost more CPU than the database work there).
        """
        async with self.engine.connect() as conn:
            async with driver_of(conn) as driver:
                yield driver


@asynccontextmanager
async def driver_of(conn: AsyncConnection) -> AsyncIterator[asyncpg.Connection]:
    """The asyncpg driver under a SQLAlchemy connection, for hand-written statements.

    Database errors leave as SQLAlchemy's ``DBAPIError``, so the error handlers answer them as they answer
    every other (a lock or statement timeout is a 503); a connection left inside a transaction it did not
    start (a failed COMMIT or ROLLBACK) is invalidated, never handed back to the pool.
    """
    adapter: Any = (await conn.get_raw_connection()).dbapi_connection
    driver: asyncpg.Connection = adapter.driver_connection
    # SQLAlchemy sends BEGIN with the first statement it executes itself. A transaction whose first statement
    # is hand-written is begun here, through the same adapter, which then commits it: without this, each
    # statement would commit on its own and a row lock would end with its statement.
    begin = conn.in_transaction() and not driver.is_in_transaction() and adapter.isolation_level != "autocommit"
    outer = begin or driver.is_in_transaction()
    invalidated = False
    try:
        if begin:
            await adapter._start_transaction()
        yield driver
    except asyncpg.PostgresError as exc:
        if driver.is_closed():  # the server ended the connection (a restart, a failover)
            invalidated = True
            await conn.invalidate()
        raise DBAPIError(None, None, exc, connection_invalidated=invalidated) from exc
    except (asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, AsyncAdapt_asyncpg_dbapi.Error) as exc:
        # The connection is gone, or its protocol state is broken (a server's termination notice arriving
        # between two messages of a statement raises InternalClientError): it is dropped, never handed back to
        # the pool, as the ORM drops a connection its statement found dead.
        invalidated = True
        await conn.invalidate()
        raise DBAPIError(None, None, exc, connection_invalidated=True) from exc
    finally:
        if not outer and not invalidated and driver.is_in_transaction():
            await conn.invalidate()


# What PostgreSQL can hold: a BIGINT's largest value, and text without NUL (a query pattern for text
# parameters compared with stored text).
BIGINT_MAX = 2**63 - 1
NO_NUL = r"^[^\x00]*$"


def escape_like(text: str) -> str:
    """``text`` matched literally inside a LIKE pattern (with ``escape="\\"``): no wildcard from a user."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def columns(rows: Iterable[Any], *fields: str | int) -> list[list[Any]]:
    """Rows turned into one list per field, for statements that take arrays (``unnest($1::uuid[], ...)``):
    a whole batch of rows in one statement. A field is a position (an int: a tuple's item), a mapping's key or
    an object's attribute."""
    rows = list(rows)
    return [
        [row[f] if isinstance(f, int) or isinstance(row, Mapping) else getattr(row, f) for row in rows] for f in fields
    ]


def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
    record.info["checked_in_at"] = time.monotonic()


async def _session(request: Request) -> AsyncIterator[AsyncSession]:
    db = state_of(request).db
    async with db.sessionmaker() as session, session.begin():
        yield session


# scope="function": the commit happens before the response is sent, so a failed commit is an error
# response, never a 2xx for data that was not stored.
SessionDep = Annotated[AsyncSession, Depends(_session, scope="function")]
