"""Releases reservations nobody committed or released within their lifetime."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog

from common.db import Database
from common.tasks import BackgroundLoop
from services.inventory.repository import ReservationRepository
from services.inventory.reservations import ReservationService, Reserver

log = structlog.get_logger("comptoir.inventory.sweeper")


class ReservationSweeper(BackgroundLoop):
    task_name = "inventory-reservation-sweeper"

    def __init__(
        self,
        db: Database,
        *,
        clock: Callable[[], datetime],
        ttl: timedelta,
        lock_timeout_ms: int,
        interval: float,
        batch: int = 100,
    ) -> None:
        self.db = db
        self.clock = clock
        self.ttl = ttl
        self.lock_timeout_ms = lock_timeout_ms
        self.interval = interval
        self.batch = batch
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> int:
        """Expire every reservation that is due now; returns how many were released."""
        now = self.clock()
        released = 0
        while True:
            async with self.db.sessionmaker() as session, session.begin():
                due = await ReservationRepository(session).expired_ids(now, limit=self.batch)
            done = 0
            for reservation_id in due:
                # One transaction per reservation: a failure (or a lock held by a commit) skips just that one.
                try:
                    async with self.db.sessionmaker() as session, session.begin():
                        service = ReservationService(
                            session, Reserver(self.db, ttl=self.ttl, lock_timeout_ms=self.lock_timeout_ms)
                        )
                        if await service.expire(reservation_id, now):
                            done += 1
                except Exception as exc:  # logged; the next sweep retries it
                    log.warning(
                        "inventory.reservation.expire_failed",
                        reservation_id=str(reservation_id),
                        error=type(exc).__name__,
                    )
            released += done
            if len(due) < self.batch or not done:
                break
        if released:
            log.info("inventory.reservations.expired", count=released)
        return released

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the sweeper must outlive a database outage
                log.warning("inventory.sweeper.failed", error=type(exc).__name__)
            await asyncio.sleep(self.interval)
