"""What the inventory endpoints are given: the service's typed lifespan state and its rules, ready to use.

Routers take these as annotated parameters (``catalogue: Catalogue``); they never build a repository.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import Depends, Request

from common.app import lifespan_state
from common.clock import Clock
from common.db import Database, SessionDep
from common.state import state_of
from services.inventory.config import Settings
from services.inventory.repository import ProductRepository
from services.inventory.reservations import ReservationService, Reserver
from services.inventory.service import CatalogueReader, CatalogueService, ImageService, ImageStore, StockService
from services.inventory.sweeper import ReservationSweeper


@dataclass(frozen=True)
class InventoryState:
    """Built in the lifespan, kept as ``app.state.inventory``."""

    settings: Settings
    clock: Clock
    images: ImageStore
    decode_slots: asyncio.Semaphore  # each decode may hold a 40-megapixel bitmap: two at a time per process
    sweeper: ReservationSweeper


async def _state(request: Request) -> InventoryState:
    return lifespan_state(request, "inventory", InventoryState)


State = Annotated[InventoryState, Depends(_state)]


async def _reader(request: Request) -> CatalogueReader:
    return CatalogueReader(state_of(request).db)


async def _catalogue(session: SessionDep) -> CatalogueService:
    return CatalogueService(ProductRepository(session))


async def _stock(state: State, session: SessionDep) -> StockService:
    return StockService(ProductRepository(session), lock_timeout_ms=state.settings.lock_timeout_ms)


async def _images(state: State, session: SessionDep) -> ImageService:
    return ImageService(
        ProductRepository(session),
        state.images,
        max_pixels=state.settings.image_max_pixels,
        max_images=state.settings.max_images_per_product,
        decode_slots=state.decode_slots,
    )


def reserver_in(state: InventoryState, db: Database) -> Reserver:
    """Reserve calls on ``db``, with the configured reservation lifetime and lock wait."""
    return Reserver(
        db,
        ttl=timedelta(seconds=state.settings.reservation_ttl_seconds),
        lock_timeout_ms=state.settings.lock_timeout_ms,
    )


async def _reservations(request: Request, state: State, session: SessionDep) -> ReservationService:
    return ReservationService(session, reserver_in(state, state_of(request).db))


async def _now(state: State) -> datetime:
    return state.clock()


Reader = Annotated[CatalogueReader, Depends(_reader)]
Catalogue = Annotated[CatalogueService, Depends(_catalogue)]
Stock = Annotated[StockService, Depends(_stock)]
Images = Annotated[ImageService, Depends(_images)]
Reservations = Annotated[ReservationService, Depends(_reservations)]
Now = Annotated[datetime, Depends(_now)]
