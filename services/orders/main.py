"""The orders service: create_app() for uvicorn's --factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from common.app import ComptoirAPI, create_service_app
from common.clock import Clock, utcnow
from common.http import HttpxTransport, PooledTransport, Transport
from common.state import service_state
from common.tokens import KeySource
from services.orders.config import Settings
from services.orders.deps import OrdersState
from services.orders.internal_router import router as internal_router
from services.orders.inventory import InventoryClient, TokenSource
from services.orders.liveness import Liveness
from services.orders.models import outbox
from services.orders.router import router
from services.orders.service import OrderService
from services.orders.sweeper import OrderSweeper

# How long a start waits for its liveness lock before it serves anyway (the database may be away).
LIVENESS_WAIT_SECONDS = 5.0


def create_app(
    settings: Settings | None = None,
    *,
    key_source: KeySource | None = None,
    clock: Clock = utcnow,
    inventory_transport: httpx.AsyncBaseTransport | None = None,
    run_sweeper: bool = True,
) -> ComptoirAPI:
    """``clock`` replaces the wall clock; ``inventory_transport`` replaces the network to inventory (tests)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = service_state(app.state)
        if inventory_transport is None:
            client: Transport = PooledTransport(
                settings.inventory_url,
                timeout=settings.inventory_timeout_seconds,
                connect_timeout=settings.inventory_connect_timeout_seconds,
            )
        else:
            client = HttpxTransport(httpx.AsyncClient(transport=inventory_transport, base_url=settings.inventory_url))

        def tokens() -> TokenSource:
            return state.service_tokens  # read at call time: a test may replace it after start-up

        inventory = InventoryClient(
            client,
            tokens,
            attempts=settings.inventory_attempts,
            budget_seconds=settings.inventory_budget_seconds,
            batch_size=settings.reserve_batch_size,
            batches_in_flight=settings.reserve_batches_in_flight,
        )
        liveness = Liveness(state.db)
        service = OrderService(state.db, inventory, settings, clock, owner=lambda: liveness.instance)
        sweeper = OrderSweeper(service, interval=settings.sweep_interval_seconds)
        app.state.orders = OrdersState(service=service, inventory=inventory, sweeper=sweeper)
        try:
            async with liveness.alive():
                # Placements begun before the lock is held have no owner (they wait for the placing timeout).
                await liveness.wait_held(LIVENESS_WAIT_SECONDS)
                async with sweeper.alive(run_sweeper):
                    yield
        finally:
            await service.close()
            await inventory.close()
            await client.aclose()

    app = create_service_app(
        name="orders",
        settings=settings,
        key_source=key_source,
        routers=[router, internal_router],
        lifespan_hook=lifespan,
        outbox=outbox,
    )
    return app
