"""Async engine and session lifecycle: one transaction per request.

The engine is created in the app's lifespan (never at import); the ``SessionDep`` dependency opens a
transaction that commits when the endpoint returns and rolls back when it raises. Repositories only
``flush``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine


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
    ) -> None:
        if not url:
            raise ValueError(f"no database URL configured for {application_name}")
        self.schema = schema
        self.engine: AsyncEngine = create_async_engine(
            async_url(url),
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_pre_ping=True,
            pool_recycle=1800,
            connect_args={
                "timeout": connect_timeout,
                "command_timeout": statement_timeout_ms / 1000 + 5,
                "server_settings": {
                    "search_path": schema,
                    "statement_timeout": str(statement_timeout_ms),
                    "lock_timeout": "5000",
                    "idle_in_transaction_session_timeout": "60000",
                    "application_name": application_name,
                },
            },
        )
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)

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


async def _session(request: Request) -> AsyncIterator[AsyncSession]:
    db: Database = request.app.state.db
    async with db.sessionmaker() as session, session.begin():
        yield session


# scope="function": the commit happens before the response is sent, so a failed commit is an error
# response, never a 2xx for data that was not stored.
SessionDep = Annotated[AsyncSession, Depends(_session, scope="function")]
