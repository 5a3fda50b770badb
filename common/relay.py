"""The outbox relay: delivers each service's audit events to the audit service, never losing one.

Rows are claimed with ``FOR UPDATE SKIP LOCKED`` (two replicas never send the same batch at once; the
audit service is idempotent by event id anyway), sent in batches to ``POST /internal/events`` with a
service token, and marked delivered only after the audit service has stored them. A failed batch is
retried with exponential backoff and jitter; after ``alert_after_attempts`` it stays pending, is
counted in a metric and logged as an alert: a dead letter waiting for ``comptoir outbox replay``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from datetime import UTC, datetime, timedelta

import httpx
import sqlalchemy as sa
import structlog
from prometheus_client import Counter, Gauge

from common.db import Database
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
    """Exponential (1 s doubling) with full jitter, capped."""
    ceiling = min(maximum, float(2 ** min(attempts, 20)))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not security


class OutboxRelay(BackgroundLoop):
    def __init__(
        self,
        *,
        service: str,
        db: Database,
        outbox: sa.Table,
        client: httpx.AsyncClient,
        tokens: ServiceTokenClient,
        batch_size: int = 200,
        poll_seconds: float = 0.5,
        max_backoff_seconds: float = 300.0,
        alert_after_attempts: int = 10,
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
        self._task: asyncio.Task[None] | None = None
        self.task_name = f"outbox-relay-{service}"
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Deliver now rather than at the next poll (after a commit that added events)."""
        self._wake.set()

    async def deliver_once(self) -> int:
        """One batch; returns how many events were delivered."""
        table = self.outbox
        async with self.db.sessionmaker() as session, session.begin():
            rows = (
                await session.execute(
                    sa.select(table.c.id, table.c.payload, table.c.attempts)
                    .where(table.c.delivered_at.is_(None), table.c.next_attempt_at <= sa.func.now())
                    .order_by(table.c.occurred_at, table.c.id)
                    .limit(self.batch_size)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not rows:
                return 0
            ids = [row.id for row in rows]
            try:
                headers = await self.tokens.headers_for("audit")
                response = await self.client.post(
                    EVENTS_PATH, json={"events": [row.payload for row in rows]}, headers=headers
                )
                if response.status_code == 401:
                    self.tokens.forget("audit")
                response.raise_for_status()
            except Exception as exc:  # any failure: keep the events, retry later
                attempts = max(row.attempts for row in rows) + 1
                delay = backoff_seconds(attempts, self.max_backoff)
                await session.execute(
                    sa.update(table)
                    .where(table.c.id.in_(ids))
                    .values(
                        attempts=table.c.attempts + 1,
                        next_attempt_at=datetime.now(UTC) + timedelta(seconds=delay),
                        last_error=f"{type(exc).__name__}: {str(exc)[:200]}",
                    )
                )
                OUTBOX_FAILURES.labels(self.service).inc()
                level = log.error if attempts >= self.alert_after else log.warning
                level("audit.outbox.delivery_failed", attempts=attempts, events=len(ids), retry_in=round(delay, 1))
                return 0
            await session.execute(sa.update(table).where(table.c.id.in_(ids)).values(delivered_at=sa.func.now()))
        OUTBOX_DELIVERED.labels(self.service).inc(len(ids))
        return len(ids)

    async def refresh_metrics(self) -> None:
        table = self.outbox
        async with self.db.sessionmaker() as session:
            pending, oldest, stuck = (
                await session.execute(
                    sa.select(
                        sa.func.count(),
                        sa.func.min(table.c.occurred_at),
                        sa.func.count().filter(table.c.attempts >= self.alert_after),
                    ).where(table.c.delivered_at.is_(None))
                )
            ).one()
        OUTBOX_PENDING.labels(self.service).set(pending)
        OUTBOX_STUCK.labels(self.service).set(stuck)
        OUTBOX_LAG.labels(self.service).set((datetime.now(UTC) - oldest).total_seconds() if oldest else 0.0)

    async def _run(self) -> None:
        while True:
            delivered = 0
            try:
                delivered = await self.deliver_once()
                await self.refresh_metrics()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database may be briefly away; try again next round
                log.warning("audit.outbox.relay_error", error=type(exc).__name__)
            if delivered >= self.batch_size:
                continue  # a full batch: more may be waiting
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.poll_seconds)
