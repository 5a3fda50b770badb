"""The outbox relay: delivers each service's audit events to the audit service, never losing one.

No transaction and no row lock is ever held across the network. A batch is claimed in one short
transaction: the due rows are picked with ``FOR UPDATE SKIP LOCKED`` (two replicas never pick the same
row at once), their ``lease_expires_at`` is set and the transaction commits. The batch is then sent to
``POST /internal/events`` with a service token, holding nothing (the send is abandoned after half the
lease, so that the lease always outlives it), and a second short transaction marks the rows delivered,
or, on failure, schedules the next attempt with exponential backoff and jitter and gives the lease up.
A process killed mid-send leaves its rows leased: they are due again when the lease runs out, and sent
again; the audit service stores each event once (idempotent by event id), so the chain neither loses
nor repeats one. After ``alert_after_attempts`` a batch stays pending, is counted in a metric and
logged as an alert: a dead letter waiting for ``comptoir outbox replay``.

A batch that audit refuses for what it holds (413, 422: an event it cannot store, an event from a newer
sender, a batch over its size limits) is halved and each half sent again, down to the single events it
refuses. Those, and only those, are set aside as dead letters at once; every other event is delivered in
order. Without this, one such event at the head of the outbox would hold back every event behind it for
good, since the oldest due rows are always claimed first.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import sqlalchemy as sa
import structlog
from prometheus_client import Counter, Gauge

from common.db import Database
from common.http import Answer, Transport
from common.service_tokens import ServiceTokenClient
from common.tasks import BackgroundLoop

log = structlog.get_logger("comptoir.outbox")

EVENTS_PATH = "/internal/events"

OUTBOX_PENDING = Gauge("comptoir_outbox_pending_events", "Audit events waiting in the outbox.", ["service"])
OUTBOX_LAG = Gauge("comptoir_outbox_oldest_pending_seconds", "Age of the oldest undelivered audit event.", ["service"])
OUTBOX_STUCK = Gauge(
    "comptoir_outbox_stuck_events", "Audit events that failed delivery too often (dead letters).", ["service"]
)
OUTBOX_DELIVERED = Counter("comptoir_outbox_delivered_total", "Audit events delivered.", ["service"])
OUTBOX_FAILURES = Counter("comptoir_outbox_delivery_failures_total", "Failed delivery attempts.", ["service"])


def backoff_seconds(attempts: int, maximum: float) -> float:
    """Exponential (1 s doubling) with full jitter, capped. Kept in the row (``next_attempt_at``), not in
    memory: the schedule of a batch must survive a restart, which an in-process retry loop cannot give."""
    ceiling = min(maximum, float(2 ** min(attempts, 20)))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not security


class DeliveryFailed(Exception):
    pass


# What audit answers when the events themselves are the problem: the same body can never be stored.
REFUSED_STATUSES = frozenset({413, 422})


class EventsRefused(DeliveryFailed):
    """Audit refused what the body holds (413, 422); sending it again as it is cannot succeed."""


def check_delivery(answer: Answer, tokens: ServiceTokenClient) -> None:
    """Audit's answer to ``POST /internal/events``: ``EventsRefused`` when it refuses what the body holds,
    ``DeliveryFailed`` for any other failure (a refused service token is forgotten, to be fetched again)."""
    if answer.status == 401:
        tokens.forget("audit")
    if answer.status in REFUSED_STATUSES:
        raise EventsRefused(f"audit answered {answer.status}: {answer.body[:300].decode(errors='replace')}")
    if not 200 <= answer.status < 300:
        raise DeliveryFailed(f"audit answered {answer.status}")


# The largest body one POST carries: half of what audit accepts by default (AUDIT_INGEST_MAX_BODY_BYTES,
# 8 MiB), so that a batch of large events is split rather than refused as too large again and again.
MAX_BODY_BYTES = 4 * 1024 * 1024


def bodies(payloads: list[bytes], max_bytes: int) -> list[bytes]:
    """``{"events": [...]}`` bodies holding the payloads in order, each at most ``max_bytes`` unless one
    payload alone is larger (it is then sent on its own)."""
    out: list[bytes] = []
    chunk: list[bytes] = []
    size = 0
    for payload in payloads:
        if chunk and size + len(payload) + 1 > max_bytes - len(b'{"events":[]}'):
            out.append(b'{"events":[' + b",".join(chunk) + b"]}")
            chunk, size = [], 0
        chunk.append(payload)
        size += len(payload) + 1
    if chunk:
        out.append(b'{"events":[' + b",".join(chunk) + b"]}")
    return out


class Leased(NamedTuple):
    """An outbox row leased for a send: the payload as the database's JSON text, sent as it is (decoding and
    encoding it again was a tenth of the orders service's CPU under load)."""

    id: uuid.UUID
    payload: str
    attempts: int
    occurred_at: datetime


class RelayStatements:
    """The relay's statements on ``table`` (schema-qualified). Each is a whole unit of work on its own, so
    they run on the driver outside any transaction: through SQLAlchemy sessions, the claim and the gauges
    that every poll runs cost ~3 ms of CPU, twice a second in every emitting service, idle or not."""

    def __init__(self, table: str) -> None:
        self.claim = f"""
            UPDATE {table} SET lease_expires_at = now() + make_interval(secs => $2)
            WHERE id IN (
                SELECT id FROM {table}
                WHERE delivered_at IS NULL AND next_attempt_at <= now()
                    AND (lease_expires_at IS NULL OR lease_expires_at <= now())
                ORDER BY occurred_at, id
                LIMIT $1
                FOR UPDATE SKIP LOCKED
            )
            RETURNING id, payload::text, attempts, occurred_at
        """  # noqa: S608 - the table's name is the service's own, never input
        # Delivered rows are deleted, not kept: audit holds the event now (pseudonymised), and a row kept here
        # would tie the user's real id to the IP and user agent for good, past any erasure.
        self.delivered = f"DELETE FROM {table} WHERE id = ANY($1::uuid[])"  # noqa: S608
        # Rows an earlier version marked delivered and kept.
        self.kept = f"DELETE FROM {table} WHERE delivered_at IS NOT NULL"  # noqa: S608
        self.failed = f"""
            UPDATE {table}
            SET attempts = GREATEST(attempts + 1, $2), next_attempt_at = $3, lease_expires_at = NULL, last_error = $4
            WHERE id = ANY($1::uuid[])
        """  # noqa: S608
        self.pending = f"""
            SELECT count(*), min(occurred_at), count(*) FILTER (WHERE attempts >= $1)
            FROM {table} WHERE delivered_at IS NULL
        """  # noqa: S608


class OutboxRelay(BackgroundLoop):
    def __init__(
        self,
        *,
        service: str,
        db: Database,
        outbox: sa.Table,
        client: Transport,
        tokens: ServiceTokenClient,
        batch_size: int = 500,
        poll_seconds: float = 0.5,
        max_backoff_seconds: float = 300.0,
        alert_after_attempts: int = 10,
        lease_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        self.service = service
        self.db = db
        self.outbox = outbox
        self.client = client
        self.tokens = tokens
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.max_backoff = max_backoff_seconds
        self.alert_after = alert_after_attempts
        self.lease_seconds = lease_seconds
        self._task: asyncio.Task[None] | None = None
        self.task_name = f"outbox-relay-{service}"
        self._wake = asyncio.Event()
        self.clock = clock
        self.max_body_bytes = max_body_bytes
        self._metrics_due = float("-inf")
        self._sql = RelayStatements(outbox.fullname)

    def wake(self) -> None:
        """Deliver now rather than at the next poll (after a commit that added events)."""
        self._wake.set()

    async def claim(self) -> list[Leased]:
        """Lease a batch of due rows: one statement, which commits on its own; from then on no lock is held,
        and no other relay takes these rows until the lease runs out."""
        async with self.db.autocommit() as driver:
            rows = await driver.fetch(self._sql.claim, self.batch_size, self.lease_seconds)
        return sorted((Leased(*row) for row in rows), key=lambda row: (row.occurred_at, row.id))

    async def send(self, rows: list[Leased]) -> None:
        """The rows in as few POSTs as their size allows (``bodies``); ``EventsRefused`` when audit refuses
        what a body holds, ``DeliveryFailed`` or a transport error for any other failure. Either way the
        rows are sent again (audit stores the events it already has once)."""
        headers = await self.tokens.headers_for("audit")
        for body in bodies([row.payload.encode() for row in rows], self.max_body_bytes):
            check_delivery(
                await self.client.request("POST", EVENTS_PATH, json_bytes=body, headers=headers), self.tokens
            )

    async def deliver_once(self) -> int:
        """One batch, all within half the lease; returns how many events were delivered.

        A refused part is halved and both halves sent, in order, until the events audit refuses are alone;
        those are set aside (``set_aside``). Any other failure, or the time running out, keeps every
        undelivered row of the batch for a later attempt (``retry_later``)."""
        rows = await self.claim()
        delivered = 0
        parts = [rows] if rows else []
        deadline = asyncio.get_running_loop().time() + self.lease_seconds / 2
        while parts:
            part = parts.pop(0)
            try:
                async with asyncio.timeout_at(deadline):
                    await self.send(part)
            except EventsRefused as exc:
                if len(part) > 1:
                    half = len(part) // 2
                    parts[:0] = [part[:half], part[half:]]
                else:
                    await self.set_aside(part[0], exc)
                continue
            except Exception as exc:  # any other failure: keep the events, retry later
                await self.retry_later([row for rows_left in (part, *parts) for row in rows_left], exc)
                break
            async with self.db.autocommit() as driver:
                await driver.execute(self._sql.delivered, [row.id for row in part])
            OUTBOX_DELIVERED.labels(self.service).inc(len(part))
            delivered += len(part)
        return delivered

    async def retry_later(self, rows: list[Leased], exc: Exception) -> None:
        attempts = max(row.attempts for row in rows) + 1
        delay = backoff_seconds(attempts, self.max_backoff)
        await self._failed(rows, 0, delay, exc)
        OUTBOX_FAILURES.labels(self.service).inc()
        level = log.error if attempts >= self.alert_after else log.warning
        level("audit.outbox.delivery_failed", attempts=attempts, events=len(rows), retry_in=round(delay, 1))

    async def set_aside(self, row: Leased, exc: EventsRefused) -> None:
        """An event audit refuses on its own: a dead letter at once (counted as stuck, shown by ``comptoir
        outbox status``), tried again only after the longest backoff (audit may have been upgraded by
        then) or when an operator replays it."""
        attempts = max(row.attempts + 1, self.alert_after)
        await self._failed([row], attempts, self.max_backoff, exc)
        OUTBOX_FAILURES.labels(self.service).inc()
        log.error("audit.outbox.event_refused", event_id=str(row.id), attempts=attempts, error=str(exc)[:300])

    async def _failed(self, rows: list[Leased], at_least: int, delay: float, exc: Exception) -> None:
        """One more attempt on each row (and at least ``at_least``), the next one after ``delay``."""
        async with self.db.autocommit() as driver:
            await driver.execute(
                self._sql.failed,
                [row.id for row in rows],
                at_least,
                datetime.now(UTC) + timedelta(seconds=delay),
                f"{type(exc).__name__}: {str(exc)[:300]}",
            )

    async def refresh_metrics(self) -> None:
        async with self.db.autocommit() as driver:
            pending, oldest, stuck = await driver.fetchrow(self._sql.pending, self.alert_after)
        OUTBOX_PENDING.labels(self.service).set(pending)
        OUTBOX_STUCK.labels(self.service).set(stuck)
        OUTBOX_LAG.labels(self.service).set((datetime.now(UTC) - oldest).total_seconds() if oldest else 0.0)

    async def _refresh_metrics_if_due(self, *, backlog: bool) -> None:
        """The gauges count the whole pending outbox: before every wait (they are exact while idle), and at
        most once a poll interval while a backlog is delivered batch after batch (counting thousands of
        pending rows after every batch cost the database more than the batches themselves)."""
        now = self.clock()
        if backlog and now < self._metrics_due:
            return
        await self.refresh_metrics()
        self._metrics_due = now + self.poll_seconds

    async def _run(self) -> None:
        with contextlib.suppress(Exception):  # the database may be away at start: the next start retries
            async with self.db.autocommit() as driver:
                await driver.execute(self._sql.kept)
        while True:
            delivered = 0
            try:
                delivered = await self.deliver_once()
                await self._refresh_metrics_if_due(backlog=delivered >= self.batch_size)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database may be briefly away; try again next round
                log.warning("audit.outbox.relay_error", error=type(exc).__name__)
            if delivered >= self.batch_size:
                continue  # a full batch: more may be waiting
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_seconds)
