"""The background task: runs the reconciliation at start-up, then expiry and reconciliation periodically."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from services.orders.service import OrderService

log = structlog.get_logger("comptoir.orders.sweeper")


class OrderSweeper:
    def __init__(self, service: OrderService, *, interval: float) -> None:
        self.service = service
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> dict[str, int]:
        return await self.service.sweep()

    async def _run(self) -> None:
        while True:  # the first pass runs at once: reconciliation on start
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the sweeper must outlive a database or inventory outage
                log.warning("orders.sweeper.failed", error=type(exc).__name__)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="orders-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
