"""The inventory service: create_app() for uvicorn's --factory."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI

from common.app import ComptoirAPI, create_service_app
from common.clock import Clock, utcnow
from common.state import service_state
from common.tokens import KeySource
from services.inventory.config import IMAGE_UPLOAD_PATH, MULTIPART_OVERHEAD_BYTES, Settings
from services.inventory.deps import InventoryState
from services.inventory.etag import CatalogueETags
from services.inventory.internal_router import batch_router
from services.inventory.internal_router import router as internal_router
from services.inventory.models import outbox
from services.inventory.router import router
from services.inventory.service import ImageStore
from services.inventory.sweeper import ReservationSweeper


def create_app(
    settings: Settings | None = None,
    *,
    key_source: KeySource | None = None,
    clock: Clock = utcnow,
    run_sweeper: bool = True,
) -> ComptoirAPI:
    """``clock`` replaces the wall clock for reservation lifetimes (tests move time forward)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sweeper = ReservationSweeper(
            service_state(app.state).db,
            clock=clock,
            ttl=timedelta(seconds=settings.reservation_ttl_seconds),
            lock_timeout_ms=settings.lock_timeout_ms,
            interval=settings.sweep_interval_seconds,
        )
        app.state.inventory = InventoryState(
            settings=settings,
            clock=clock,
            images=ImageStore(settings.images_dir),
            decode_slots=asyncio.Semaphore(2),
            sweeper=sweeper,
        )
        async with sweeper.alive(run_sweeper):
            yield

    app = create_service_app(
        name="inventory",
        settings=settings,
        key_source=key_source,
        routers=[batch_router, router, internal_router],
        lifespan_hook=lifespan,
        outbox=outbox,
        body_limits=[(IMAGE_UPLOAD_PATH, settings.image_max_bytes + MULTIPART_OVERHEAD_BYTES)],
        multipart_paths=IMAGE_UPLOAD_PATH,
    )
    app.add_middleware(CatalogueETags)
    return app
