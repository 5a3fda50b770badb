"""Each service boots on its own role, answers health checks and exports metrics."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import DatabaseFixture, assert_problem, assert_security_headers, free_port, running

SERVICES = ["auth", "inventory", "orders", "audit"]


def service_app(name: str, database: DatabaseFixture, **overrides: object):  # noqa: ANN201
    main = importlib.import_module(f"services.{name}.main")
    config = importlib.import_module(f"services.{name}.config")
    settings = config.Settings(database_url=database.url(name), environment="test", **overrides)
    return main.create_app(settings)


@pytest.mark.parametrize("name", SERVICES)
async def test_service_is_alive_ready_and_measured(name: str, database: DatabaseFixture) -> None:
    async with running(service_app(name, database)) as client:
        health = await client.get("/healthz")
        assert health.status_code == 200
        assert health.json() == {"status": "ok", "service": name}
        assert_security_headers(health)
        ready = await client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"database": True}
        metrics = await client.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        assert f'route="/readyz",service="{name}",status="200"' in metrics.text
        assert_problem(await client.get("/no/such/route"), 404)


@pytest.mark.parametrize("name", SERVICES)
async def test_service_refuses_to_start_without_a_database_url(name: str, database: DatabaseFixture) -> None:
    app = service_app(name, database)
    app.state  # noqa: B018 - building the app must not touch the database
    main = importlib.import_module(f"services.{name}.main")
    config = importlib.import_module(f"services.{name}.config")
    empty = main.create_app(config.Settings(database_url="", environment="test"))
    with pytest.raises(ValueError, match="no database URL"):
        async with running(empty):
            pass


def test_tls_in_a_database_url_works_for_sqlalchemy_and_asyncpg() -> None:
    """libpq's sslmode= must reach asyncpg as ssl= through SQLAlchemy, and stay sslmode= for asyncpg DSNs."""
    from common.db import async_url
    from comptoir.provision import to_asyncpg_dsn

    url = "postgresql://svc:pw@db.example:5432/comptoir?sslmode=verify-full"
    assert dict(async_url(url).query) == {"ssl": "verify-full"}
    assert to_asyncpg_dsn(async_url(url).render_as_string(hide_password=False)).endswith("?sslmode=verify-full")
    assert "sslmode=require" in to_asyncpg_dsn("postgresql://svc:pw@db.example/comptoir?sslmode=require")


def _routes(routes: list[object]) -> list[object]:
    found: list[object] = []
    for route in routes:
        included = getattr(route, "original_router", None)
        found.extend(_routes(included.routes) if included is not None else [route])
    return found


def _sync_calls(dependant: object) -> list[str]:
    found = []
    for sub in getattr(dependant, "dependencies", []):
        call = sub.call
        if call is not None and not (inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)):
            found.append(getattr(call, "__qualname__", repr(call)))
        found += _sync_calls(sub)
    return found


@pytest.mark.parametrize("name", SERVICES)
def test_no_endpoint_or_dependency_runs_in_the_thread_pool(name: str, database: DatabaseFixture) -> None:
    """FastAPI runs a plain ``def`` endpoint or dependency in a worker thread: a hop per request that, under
    load, waits for the GIL behind busy threads (it held orders' transactions open for milliseconds)."""
    from fastapi.routing import APIRoute

    app = service_app(name, database)
    api_routes = [r for r in _routes(app.routes) if isinstance(r, APIRoute)]
    assert api_routes
    offenders = {
        f"{route.path}: {call}"
        for route in api_routes
        for call in ([] if inspect.iscoroutinefunction(route.endpoint) else [route.endpoint.__qualname__])
        + _sync_calls(route.dependant)
    }
    assert not offenders


@pytest.mark.parametrize("ping_after", [0.0, 3600.0])
async def test_a_pooled_connection_killed_while_idle_is_replaced(database: DatabaseFixture, ping_after: float) -> None:
    """Idle connections are pinged at checkout (busy ones are not: that ping cost 15 % of an order)."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    from common.db import Database

    db = Database(
        database.url("orders"), schema="orders", application_name="ping-test", ping_after_idle_seconds=ping_after
    )
    admin = await database.admin()
    try:
        async with db.engine.connect() as conn:
            first = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        await admin.execute("SELECT pg_terminate_backend($1)", first)
        if ping_after == 0.0:
            async with db.engine.connect() as conn:
                second = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            assert second != first
        else:  # not idle long enough to be pinged: the dead connection surfaces (a 503 to retry: see below)
            with pytest.raises(DBAPIError):
                async with db.engine.connect() as conn:
                    await conn.execute(text("SELECT 1"))
    finally:
        await admin.close()
        await db.dispose()


async def test_hand_written_statements_fail_like_orm_ones_and_never_leak_a_transaction(
    database: DatabaseFixture,
) -> None:
    from sqlalchemy.exc import DBAPIError

    from common.db import Database
    from common.errors import sqlstate_of

    db = Database(database.url("orders"), schema="orders", application_name="driver-test", pool_size=1, max_overflow=0)
    try:
        with pytest.raises(DBAPIError) as failed:
            async with db.autocommit() as conn:
                await conn.execute("SELECT * FROM no_such_table")
        assert sqlstate_of(failed.value) == "42P01"  # what the error handler keys its answer on
        async with db.autocommit() as conn:
            first = await conn.fetchval("SELECT pg_backend_pid()")
            await conn.execute("BEGIN")  # left open: the connection must not go back to the pool like this
        async with db.autocommit() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT pg_backend_pid()") != first
    finally:
        await db.dispose()


async def test_hand_written_statements_first_in_a_transaction_are_inside_it(database: DatabaseFixture) -> None:
    """SQLAlchemy sends BEGIN with its own first statement: when the first is hand-written (a login's
    counters are locked that way), ``driver_of`` begins the transaction, or each statement would commit on
    its own and a row lock would end with its statement."""
    from sqlalchemy import text

    from common.db import Database, driver_of

    db = Database(database.url("orders"), schema="orders", application_name="driver-test", pool_size=1, max_overflow=0)
    try:
        async with db.sessionmaker() as session, session.begin():
            async with driver_of(await session.connection()) as driver:
                assert driver.is_in_transaction()
                first = await driver.fetchval("SELECT txid_current()")
                second = await driver.fetchval("SELECT txid_current()")
            third = (await session.execute(text("SELECT txid_current()"))).scalar_one()
        assert first == second == third
        async with db.autocommit() as driver:  # outside a transaction, each statement is its own
            assert await driver.fetchval("SELECT txid_current()") != await driver.fetchval("SELECT txid_current()")
    finally:
        await db.dispose()


@pytest.mark.parametrize("first", ["orm", "hand-written"])
async def test_a_connection_found_dead_is_dropped_whichever_statement_finds_it(
    database: DatabaseFixture, first: str
) -> None:
    """The server ends a pooled connection (a restart, a failover): the statement that finds it fails as
    SQLAlchemy's DBAPIError, and the connection is dropped, so the next request gets a live one."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    from common.db import Database, driver_of

    db = Database(database.url("orders"), schema="orders", application_name="driver-test", pool_size=1, max_overflow=0)
    killed: list[int] = []

    async def a_statement_on_a_connection_the_server_ended() -> None:
        async with db.sessionmaker() as session, session.begin():
            conn = await session.connection()
            killed.append((await conn.get_raw_connection()).dbapi_connection.driver_connection.get_server_pid())
            admin = await database.admin()
            try:
                await admin.execute("SELECT pg_terminate_backend($1)", killed[0])
            finally:
                await admin.close()
            if first == "orm":
                await session.execute(text("SELECT 1"))
            else:
                async with driver_of(conn) as driver:
                    await driver.fetchval("SELECT 1")

    try:
        with pytest.raises(DBAPIError):
            await a_statement_on_a_connection_the_server_ended()
        async with db.sessionmaker() as session:  # the pool's only connection: a new one
            assert (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one() != killed[0]
    finally:
        await db.dispose()


async def test_a_request_that_finds_its_connection_dead_gets_503_and_the_next_one_is_served(
    database: DatabaseFixture,
) -> None:
    """The database restarted or failed over under a running service: the request whose statement finds
    its pooled connection dead is answered 503 with Retry-After (not 500), and the retry is served."""
    from services.inventory.config import Settings
    from services.inventory.main import create_app

    settings = Settings(database_url=database.url("inventory"), environment="test", db_pool_size=1, db_max_overflow=0)
    # No sweeper: nothing but the requests below may take the pool's one connection.
    async with running(create_app(settings, run_sweeper=False)) as client:
        assert (await client.get("/api/v1/products")).status_code == 200
        admin = await database.admin()
        try:
            ended = await admin.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'comptoir-inventory'"
            )
        finally:
            await admin.close()
        assert ended  # the service's pooled connection
        lost = await client.get("/api/v1/products")
        body = assert_problem(lost, 503)
        assert lost.headers["retry-after"] == "1"
        assert body["retry_after"] == 1
        assert (await client.get("/api/v1/products")).status_code == 200


@pytest.mark.parametrize("how", ["credentials refused", "nobody listening", "no socket file"])
async def test_a_database_that_refuses_the_service_is_a_503_not_a_500(
    database: DatabaseFixture, how: str, tmp_path: Path
) -> None:
    """A second installation reset the roles' passwords, or the database is down: every request that needs
    it used to be a 500 (a DBAPIError with SQLSTATE 28P01; a bare ConnectionRefusedError from the pool; a
    FileNotFoundError when a server reached over a Unix socket, as the embedded one is, is stopped)."""
    from services.inventory.config import Settings
    from services.inventory.main import create_app

    url = database.url("inventory")
    if how == "credentials refused":
        password = urlsplit(url).password
        url = url.replace(f":{password}@", ":not-the-password@")
    elif how == "nobody listening":
        url = f"postgresql://comptoir_inventory:secret@127.0.0.1:{free_port()}/comptoir"
    else:
        url = f"postgresql://comptoir_inventory:secret@/comptoir?host={tmp_path}"
    async with running(create_app(Settings(database_url=url, environment="test"), run_sweeper=False)) as client:
        refused = await client.get("/api/v1/products")
        body = assert_problem(refused, 503)
        assert refused.headers["retry-after"] == "1"
        assert body["retry_after"] == 1
        assert (await client.get("/readyz")).status_code == 503
