"""The background task: runs the reconciliation at start-up, then expiry and reconciliation periodically."""

from __future__ import annotations

import asyncio

import structlog

from common.tasks import BackgroundLoop
from services.orders.service import OrderService

log = structlog.get_logger("comptoir.orders.sweeper")


class OrderSweeper(BackgroundLoop):
    task_name = "orders-sweeper"

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
