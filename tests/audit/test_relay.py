"""The real outbox relay delivering to the real audit app: audit down means events wait, never lost;
audit hung means nothing is locked or pinned while the relay waits; a relay gone mid-send loses and
repeats nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import CreateTable

from common.audit import AuditEvent, outbox_columns, outbox_lease_column, record
from common.db import Database
from common.http import HttpxTransport
from common.relay import OutboxRelay, bodies
from comptoir.cli import outbox_replay, outbox_status
from gateway.events import SecurityEvents
from tests.audit.support import AuditClient, chain_rows
from tests.conftest import DatabaseFixture
from tests.support.tokens import TestIssuer, bearer

TABLE = "audit_relay_probe_outbox"


class IssuerTokens:
    """Stands in for ServiceTokenClient: mints the service tokens the real verifier accepts."""

    def __init__(self, issuer: TestIssuer, caller: str) -> None:
        self.issuer = issuer
        self.caller = caller
        self.forgotten: list[str] = []

    async def headers_for(self, audience: str) -> dict[str, str]:
        return bearer(self.issuer.service(caller=self.caller, audience=audience))

    def forget(self, audience: str) -> None:
        self.forgotten.append(audience)


class Down(httpx.AsyncBaseTransport):
    """The audit service is not there."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)


def orders_relay(
    orders_db: Database, outbox: sa.Table, client: HttpxTransport, tokens: IssuerTokens, **options: Any
) -> OutboxRelay:
    """The orders service's relay of ``outbox`` to audit through ``client``."""
    return OutboxRelay(
        service="orders",
        db=orders_db,
        outbox=outbox,
        client=client,
        tokens=tokens,  # type: ignore[arg-type]
        **options,
    )


@pytest.fixture
async def outbox(database: DatabaseFixture) -> AsyncIterator[sa.Table]:
    """An outbox table in the orders schema, created by its owner role as a migration would."""
    table = sa.Table(TABLE, sa.MetaData(schema="orders"), *outbox_columns(), outbox_lease_column())
    ddl = str(CreateTable(table).compile(dialect=postgresql.dialect()))
    admin = await database.admin()
    try:
        await admin.execute("SET ROLE comptoir_orders_owner")
        await admin.execute(f"DROP TABLE IF EXISTS orders.{TABLE}")
        await admin.execute(ddl)
        yield table
        await admin.execute(f"DROP TABLE orders.{TABLE}")
    finally:
        await admin.close()


@pytest.fixture
async def orders_db(database: DatabaseFixture) -> AsyncIterator[Database]:
    db = Database(database.url("orders"), schema="orders", application_name="test-orders")
    yield db
    await db.dispose()


def to_audit(audit: AuditClient, transport: httpx.AsyncBaseTransport | None = None) -> HttpxTransport:
    inner = transport or httpx.ASGITransport(app=audit.app)
    return HttpxTransport(httpx.AsyncClient(transport=inner, base_url="http://audit"))


async def outbox_rows(db: Database, table: sa.Table) -> list[sa.Row[tuple[object, ...]]]:
    async with db.sessionmaker() as session:
        return list((await session.execute(sa.select(table).order_by(table.c.occurred_at))).all())


async def test_events_wait_while_audit_is_down_then_arrive_exactly_once(
    audit: AuditClient, database: DatabaseFixture, outbox: sa.Table, orders_db: Database
) -> None:
    # Thirty changes in orders, each with its event written in the same transaction.
    for i in range(30):
        async with orders_db.sessionmaker() as session, session.begin():
            await record(
                session,
                outbox,
                AuditEvent(service="orders", action="orders.order.created", resource_type="order", resource_id=str(i)),
            )
    down = HttpxTransport(httpx.AsyncClient(transport=Down(), base_url="http://audit"))
    relay = orders_relay(
        orders_db, outbox, down, IssuerTokens(audit.issuer, "orders"), batch_size=10, max_backoff_seconds=600
    )

    # Audit is down: every batch fails, nothing is lost, and the next attempt moves further out.
    for _ in range(3):
        assert await relay.deliver_once() == 0
    assert await relay.deliver_once() == 0  # nothing due: all three batches wait for their backoff
    first = await outbox_rows(orders_db, outbox)
    recorded = [r.id for r in first]
    assert all(r.delivered_at is None and r.attempts == 1 for r in first)
    assert all(r.next_attempt_at > datetime.now(UTC) for r in first)
    assert all("ConnectError" in (r.last_error or "") for r in first)
    for _ in range(2):  # time passes (as an operator's replay would make them due): they fail again
        admin = await database.admin()
        try:
            await admin.execute(f"UPDATE orders.{TABLE} SET next_attempt_at = now()")
        finally:
            await admin.close()
        for _ in range(3):
            await relay.deliver_once()
    second = {r.id: r for r in await outbox_rows(orders_db, outbox)}
    assert all(r.attempts == 3 and r.delivered_at is None for r in second.values())
    assert all(second[r.id].next_attempt_at > r.next_attempt_at for r in first)
    assert await chain_rows(database) == []
    status = await outbox_status(database.admin_url, ["orders"], stuck_after=3, rows=5, table=TABLE)
    assert (status[0]["pending"], status[0]["stuck"], len(status[0]["rows"])) == (30, 30, 5)

    # Audit is back; the operator replays the dead letters; the relay delivers everything.
    relay.client = to_audit(audit)
    assert await outbox_replay(database.admin_url, "orders", stuck_after=3, table=TABLE) == 30
    delivered = 0
    for _ in range(10):
        delivered += await relay.deliver_once()
    assert delivered == 30
    # (A relay that crashed after audit stored a batch, before deleting it: the mid-send test below.)
    rows = await chain_rows(database)
    assert len(rows) == 30
    assert {r["id"] for r in rows} == set(recorded)
    assert await outbox_rows(orders_db, outbox) == []  # delivered rows are gone: audit holds the events
    assert (await audit.verify())["ok"] is True
    await down.aclose()
    await relay.client.aclose()


async def test_the_relay_loop_delivers_in_the_background(
    audit: AuditClient, database: DatabaseFixture, outbox: sa.Table, orders_db: Database
) -> None:
    client = to_audit(audit)
    relay = orders_relay(
        orders_db, outbox, client, IssuerTokens(audit.issuer, "orders"), batch_size=50, poll_seconds=0.05
    )
    relay.start()
    try:
        for i in range(120):
            async with orders_db.sessionmaker() as session, session.begin():
                event = AuditEvent(service="orders", action="orders.order.created", resource_id=str(i))
                await record(session, outbox, event)
            relay.wake()
        for _ in range(100):
            if len(await chain_rows(database)) == 120:
                break
            await asyncio.sleep(0.05)
    finally:
        await relay.stop()
        await client.aclose()
    assert len(await chain_rows(database)) == 120
    assert (await audit.verify())["ok"] is True


async def test_rows_an_earlier_version_kept_after_delivery_are_deleted_when_the_relay_starts(
    audit: AuditClient, database: DatabaseFixture, outbox: sa.Table, orders_db: Database
) -> None:
    """Kept, each tied a user's real id to an IP and a user agent for good, past any erasure."""
    await record_events(orders_db, outbox, 3)
    admin = await database.admin()
    try:
        await admin.execute(f"UPDATE orders.{TABLE} SET delivered_at = now()")  # as the earlier relay marked them
    finally:
        await admin.close()
    client = to_audit(audit)
    relay = orders_relay(orders_db, outbox, client, IssuerTokens(audit.issuer, "orders"), poll_seconds=0.05)
    relay.start()
    try:
        for _ in range(200):
            if not await outbox_rows(orders_db, outbox):
                break
            await asyncio.sleep(0.05)
    finally:
        await relay.stop()
        await client.aclose()
    assert await outbox_rows(orders_db, outbox) == []
    assert await chain_rows(database) == []  # deleted, not sent again


class Hung(httpx.AsyncBaseTransport):
    """The audit service takes the request and then does not answer until ``release`` is set."""

    def __init__(self, app: object) -> None:
        self.inner = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.arrived.set()
        await self.release.wait()
        return await self.inner.handle_async_request(request)


async def record_events(db: Database, table: sa.Table, count: int) -> None:
    for i in range(count):
        async with db.sessionmaker() as session, session.begin():
            await record(
                session, table, AuditEvent(service="orders", action="orders.order.created", resource_id=str(i))
            )


async def test_while_audit_hangs_no_row_is_locked_and_no_connection_waits_in_a_transaction(
    audit: AuditClient, database: DatabaseFixture, outbox: sa.Table, orders_db: Database
) -> None:
    await record_events(orders_db, outbox, 5)
    hung = Hung(audit.app)
    tokens = IssuerTokens(audit.issuer, "orders")
    relay = orders_relay(orders_db, outbox, to_audit(audit, hung), tokens)
    other = orders_relay(orders_db, outbox, to_audit(audit), tokens)
    sending = asyncio.create_task(relay.deliver_once())
    await hung.arrived.wait()  # the batch is on its way and audit sits on it
    admin = await database.admin()
    try:
        ids = [r.id for r in await outbox_rows(orders_db, outbox)]
        leased = await admin.fetch(f"SELECT lease_expires_at > now() AS held FROM orders.{TABLE}")
        assert [r["held"] for r in leased] == [True] * 5
        # Another connection can lock every row at once, without waiting: nobody holds them.
        async with admin.transaction():
            locked = await admin.fetch(f"SELECT id FROM orders.{TABLE} WHERE id = ANY($1) FOR UPDATE NOWAIT", ids)
            assert len(locked) == 5
        relation_locks = await admin.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
            " WHERE c.relname = $1 AND l.pid <> pg_backend_pid()",
            TABLE,
        )
        assert relation_locks == 0
        pinned = await admin.fetch(
            "SELECT state FROM pg_stat_activity WHERE application_name = 'test-orders' AND state <> 'idle'"
        )
        assert pinned == []  # in particular, none 'idle in transaction'
        # A second relay (another replica) does not take the leased batch.
        assert await other.deliver_once() == 0
    finally:
        await admin.close()
    hung.release.set()
    assert await sending == 5
    assert await outbox_rows(orders_db, outbox) == []
    assert len(await chain_rows(database)) == 5


async def test_a_batch_whose_relay_died_mid_send_is_sent_again_after_its_lease_and_chained_once(
    audit: AuditClient, database: DatabaseFixture, outbox: sa.Table, orders_db: Database
) -> None:
    await record_events(orders_db, outbox, 8)
    tokens = IssuerTokens(audit.issuer, "orders")
    dead = orders_relay(orders_db, outbox, to_audit(audit), tokens)
    # The relay claims and sends, audit stores the batch, and the relay dies before marking it delivered.
    batch = await dead.claim()
    await dead.send(batch)
    assert len(await chain_rows(database)) == 8
    survivor = orders_relay(orders_db, outbox, to_audit(audit), tokens)
    assert await survivor.deliver_once() == 0  # still leased to the dead relay
    admin = await database.admin()
    try:
        await admin.execute(f"UPDATE orders.{TABLE} SET lease_expires_at = now()")  # the lease runs out
    finally:
        await admin.close()
    assert await survivor.deliver_once() == 8
    rows = await chain_rows(database)
    assert sorted(str(r["id"]) for r in rows) == sorted(str(r.id) for r in batch)  # each event once
    assert await outbox_rows(orders_db, outbox) == []
    assert (await audit.verify())["ok"] is True


class CountingRelay(OutboxRelay):
    """The real relay, noting how many events it had delivered each time it counted the pending outbox."""

    delivered = 0
    refreshed_at: list[int]

    async def deliver_once(self) -> int:
        count = await super().deliver_once()
        self.delivered += count
        return count

    async def refresh_metrics(self) -> None:
        await super().refresh_metrics()
        self.refreshed_at.append(self.delivered)  # noted once the gauges are set, so the test waits for them


@pytest.mark.parametrize(("tick", "expected"), [(0.0, [10, 45]), (1.0, [10, 20, 30, 40, 45])])
async def test_a_backlog_is_counted_at_most_once_a_poll_interval_and_the_gauges_end_exact(
    audit: AuditClient,
    database: DatabaseFixture,
    outbox: sa.Table,
    orders_db: Database,
    tick: float,
    expected: list[int],
) -> None:
    await record_events(orders_db, outbox, 45)
    now = [0.0]

    def clock() -> float:
        now[0] += tick  # 0: time stands still while the backlog drains; 1.0: a poll interval per batch
        return now[0]

    service = f"orders-probe-{int(tick)}"
    client = to_audit(audit)
    relay = CountingRelay(
        service=service,
        db=orders_db,
        outbox=outbox,
        client=client,
        tokens=IssuerTokens(audit.issuer, "orders"),  # type: ignore[arg-type]
        batch_size=10,
        poll_seconds=0.5,
        clock=clock,
    )
    relay.refreshed_at = []
    relay.start()
    try:
        for _ in range(200):
            if relay.delivered == 45 and len(relay.refreshed_at) >= len(expected):
                break
            await asyncio.sleep(0.05)
    finally:
        await relay.stop()
        await client.aclose()
    assert len(await chain_rows(database)) == 45
    # Counted after the first full batch, then not again until the backlog was gone (or time had passed).
    assert sorted(set(relay.refreshed_at)) == expected
    assert relay.refreshed_at[: len(expected)] == expected
    assert REGISTRY.get_sample_value("comptoir_outbox_pending_events", {"service": service}) == 0
    assert REGISTRY.get_sample_value("comptoir_outbox_oldest_pending_seconds", {"service": service}) == 0


class Counting(httpx.AsyncBaseTransport):
    """The real audit app behind a transport that notes each body's size and fails the POST numbered
    ``fail_at`` (counting from 1) with a 503, once."""

    def __init__(self, app: object, fail_at: int | None = None) -> None:
        self.inner = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        self.sizes: list[int] = []
        self.fail_at = fail_at

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        self.sizes.append(len(body))
        if len(self.sizes) == self.fail_at:
            self.fail_at = None
            return httpx.Response(503, request=request)
        return await self.inner.handle_async_request(request)


def test_bodies_hold_every_payload_in_order_within_the_size() -> None:
    payloads = [json.dumps({"n": i, "pad": "x" * (i * 37 % 500)}).encode() for i in range(200)]
    payloads.insert(50, json.dumps({"n": "big", "pad": "y" * 5000}).encode())
    split = bodies(payloads, 2000)
    assert len(split) > 10
    events = [event for body in split for event in json.loads(body)["events"]]
    assert events == [json.loads(p) for p in payloads]
    assert all(len(body) <= 2000 for body in split if b'"big"' not in body)
    assert [body for body in split if b'"big"' in body] == [b'{"events":[' + payloads[50] + b"]}"]
    assert bodies([], 2000) == []


async def test_a_batch_larger_than_a_body_is_sent_in_parts_and_a_failed_part_resends_the_batch_once(
    audit: AuditClient, database: DatabaseFixture, outbox: sa.Table, orders_db: Database
) -> None:
    for i in range(25):
        async with orders_db.sessionmaker() as session, session.begin():
            event = AuditEvent(service="orders", action="orders.order.updated", new_values={"note": f"{i} " * 300})
            await record(session, outbox, event)
    recorded = {r.id for r in await outbox_rows(orders_db, outbox)}
    transport = Counting(audit.app, fail_at=3)
    client = HttpxTransport(httpx.AsyncClient(transport=transport, base_url="http://audit"))
    relay = orders_relay(
        orders_db, outbox, client, IssuerTokens(audit.issuer, "orders"), batch_size=25, max_body_bytes=6000
    )
    try:
        # The third part is refused: the batch stays pending (the parts before it are in the chain).
        assert await relay.deliver_once() == 0
        assert len(transport.sizes) == 3
        stored_first = len(await chain_rows(database))
        assert 0 < stored_first < 25
        admin = await database.admin()
        try:
            await admin.execute(f"UPDATE orders.{TABLE} SET next_attempt_at = now()")
        finally:
            await admin.close()
        transport.sizes.clear()
        assert await relay.deliver_once() == 25
    finally:
        await client.aclose()
    assert len(transport.sizes) >= 4
    assert all(size <= 6000 for size in transport.sizes)
    rows = await chain_rows(database)
    assert len(rows) == 25
    assert {r["id"] for r in rows} == recorded
    assert await outbox_rows(orders_db, outbox) == []
    assert (await audit.verify())["ok"] is True


async def poison(database: DatabaseFixture, index: int, change: str) -> None:
    """Make the outbox's ``index``-th event (in order) one that audit refuses: ``change`` is a jsonb expression
    applied to its payload."""
    admin = await database.admin()
    try:
        await admin.execute(
            f"UPDATE orders.{TABLE} SET payload = {change} WHERE id ="  # noqa: S608 - the test's own table
            f" (SELECT id FROM orders.{TABLE} ORDER BY occurred_at, id OFFSET {index} LIMIT 1)"
        )
    finally:
        await admin.close()


async def make_due(database: DatabaseFixture) -> None:
    admin = await database.admin()
    try:
        await admin.execute(f"UPDATE orders.{TABLE} SET next_attempt_at = now() WHERE delivered_at IS NULL")
    finally:
        await admin.close()


# A newer sender's field, and a date the chain cannot hold: audit answers 422 to any batch holding either.
NEWER_SENDER = 'payload || \'{"tenant": "north"}\'::jsonb'
YEAR_999 = "jsonb_set(payload, '{occurred_at}', '\"0999-01-01T00:00:00+00:00\"')"


async def test_events_audit_refuses_are_set_aside_alone_and_every_other_event_is_delivered_in_order(
    audit: AuditClient, database: DatabaseFixture, outbox: sa.Table, orders_db: Database
) -> None:
    await record_events(orders_db, outbox, 40)
    await poison(database, 3, NEWER_SENDER)
    await poison(database, 31, YEAR_999)
    order = [r.id for r in await outbox_rows(orders_db, outbox)]
    refused = {order[3], order[31]}
    transport = Counting(audit.app)
    client = HttpxTransport(httpx.AsyncClient(transport=transport, base_url="http://audit"))
    relay = orders_relay(orders_db, outbox, client, IssuerTokens(audit.issuer, "orders"), batch_size=50)
    try:
        # One claim: the refused batch is halved until the two events are alone; the other 38 arrive.
        assert await relay.deliver_once() == 38
        assert len(transport.sizes) <= 2 * 2 * 6 + 1  # halving, not one POST per event
        rows = await chain_rows(database)
        assert [r["id"] for r in rows] == [i for i in order if i not in refused]  # in the outbox's order
        left = [r for r in await outbox_rows(orders_db, outbox) if r.delivered_at is None]
        assert {r.id for r in left} == refused
        assert all(r.attempts == relay.alert_after and "422" in r.last_error for r in left)
        assert all((r.next_attempt_at - datetime.now(UTC)).total_seconds() > relay.max_backoff - 60 for r in left)
        status = await outbox_status(database.admin_url, ["orders"], stuck_after=relay.alert_after, table=TABLE)
        assert (status[0]["pending"], status[0]["stuck"]) == (2, 2)

        # Set aside means not due: the next rounds send nothing, and new events are not held behind them.
        transport.sizes.clear()
        await record_events(orders_db, outbox, 5)
        assert await relay.deliver_once() == 5
        assert len(transport.sizes) == 1

        # An operator's replay makes them due; audit still refuses them, and they are set aside again.
        assert await outbox_replay(database.admin_url, "orders", stuck_after=relay.alert_after, table=TABLE) == 2
        transport.sizes.clear()
        assert await relay.deliver_once() == 0
        assert len(transport.sizes) == 3
        left = [r for r in await outbox_rows(orders_db, outbox) if r.delivered_at is None]
        assert {r.id for r in left} == refused
        assert all(r.attempts == relay.alert_after for r in left)
    finally:
        await client.aclose()
    assert len(await chain_rows(database)) == 43
    assert (await audit.verify())["ok"] is True


async def test_a_failure_while_a_refused_batch_is_halved_keeps_every_undelivered_event_for_a_retry(
    audit: AuditClient, database: DatabaseFixture, outbox: sa.Table, orders_db: Database
) -> None:
    await record_events(orders_db, outbox, 20)
    await poison(database, 15, NEWER_SENDER)
    # The whole batch is refused (422), then audit fails the first half with a 503: nothing is set aside,
    # since nothing is known yet about which event audit refuses.
    transport = Counting(audit.app, fail_at=2)
    client = HttpxTransport(httpx.AsyncClient(transport=transport, base_url="http://audit"))
    relay = orders_relay(orders_db, outbox, client, IssuerTokens(audit.issuer, "orders"), batch_size=50)
    try:
        assert await relay.deliver_once() == 0
        assert len(transport.sizes) == 2
        rows = await outbox_rows(orders_db, outbox)
        assert all(r.delivered_at is None and r.attempts == 1 and "503" in r.last_error for r in rows)

        await make_due(database)
        assert await relay.deliver_once() == 19
        left = [r for r in await outbox_rows(orders_db, outbox) if r.delivered_at is None]
        assert len(left) == 1
        assert left[0].attempts == relay.alert_after
    finally:
        await client.aclose()


async def test_a_batch_over_audits_event_limit_is_halved_until_it_fits_and_nothing_is_set_aside(
    audit: AuditClient, audit_settings: Any, database: DatabaseFixture, outbox: sa.Table, orders_db: Database
) -> None:
    audit_settings.max_batch_events = 6  # an operator lowered AUDIT_MAX_BATCH_EVENTS below the relay's batch
    await record_events(orders_db, outbox, 25)
    client = to_audit(audit)
    relay = orders_relay(orders_db, outbox, client, IssuerTokens(audit.issuer, "orders"), batch_size=25)
    try:
        assert await relay.deliver_once() == 25
    finally:
        await client.aclose()
    assert len(await chain_rows(database)) == 25
    assert await outbox_rows(orders_db, outbox) == []


async def test_the_gateway_drops_only_the_security_events_audit_refuses_and_delivers_the_rest_in_order(
    audit: AuditClient, audit_settings: Any, database: DatabaseFixture
) -> None:
    client = to_audit(audit)
    events = SecurityEvents(client, IssuerTokens(audit.issuer, "gateway"))  # type: ignore[arg-type]
    refused = REGISTRY.get_sample_value("comptoir_gateway_security_events_refused_total") or 0.0
    try:
        for i in range(6):
            events.record({"method": "GET", "path": f"/internal/{i}", "headers": []}, "gateway.path.blocked")
        events.queue[2]["tenant"] = "north"  # a newer gateway's field: audit refuses any batch holding it
        assert await events.flush() == 5
        assert not events.queue
        # An operator lowered AUDIT_MAX_BATCH_EVENTS below the gateway's batch: every event still arrives.
        audit_settings.max_batch_events = 2
        for i in range(6, 9):
            events.record({"method": "GET", "path": f"/internal/{i}", "headers": []}, "gateway.path.blocked")
        assert await events.flush() == 3
    finally:
        await client.aclose()
    stored = [json.loads(r["document"])["path"] for r in await chain_rows(database)]
    assert stored == [f"/internal/{i}" for i in (0, 1, 3, 4, 5, 6, 7, 8)]
    assert REGISTRY.get_sample_value("comptoir_gateway_security_events_refused_total") == refused + 1
