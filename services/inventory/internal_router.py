"""/internal/reservations: used by the orders service only (service token, caller "orders")."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from starlette.responses import JSONResponse

from common.db import SessionDep
from common.errors import problem_response
from common.security import require_service
from common.tokens import Claims
from services.inventory.config import Settings
from services.inventory.errors import InsufficientStock
from services.inventory.reservations import ReservationService
from services.inventory.schemas import ReservationRead, ReserveRequest

OrdersOnly = Annotated[Claims, Depends(require_service("orders"))]

router = APIRouter(prefix="/internal/reservations", tags=["internal"])


def _service(request: Request, session: SessionDep) -> ReservationService:
    settings: Settings = request.app.state.settings
    return ReservationService(
        session, ttl=timedelta(seconds=settings.reservation_ttl_seconds), lock_timeout_ms=settings.lock_timeout_ms
    )


def _now(request: Request) -> datetime:
    clock: Callable[[], datetime] = request.app.state.clock
    return clock()


@router.put(
    "/{reservation_id}",
    response_model=ReservationRead,
    status_code=201,
    responses={
        200: {"description": "The same reservation asked for again: the first result"},
        409: {"description": "Some items lack stock (`short_items`); nothing is held"},
        422: {"description": "Unknown products, or this id was used with other items"},
    },
)
async def reserve(
    reservation_id: uuid.UUID, data: ReserveRequest, request: Request, session: SessionDep, _caller: OrdersOnly
) -> Response:
    """Hold every item or none, for the reservation lifetime. Idempotent by reservation id."""
    outcome = await _service(request, session).reserve(reservation_id, data.items, _now(request))
    if outcome.short_items is not None:
        # Not an exception: the rejection is stored (and committed) so that a repeat gets the same answer.
        return problem_response(
            InsufficientStock.status,
            scope=request.scope,
            title=InsufficientStock.title,
            type_="urn:comptoir:problem:" + InsufficientStock.slug,
            detail="Some items lack stock; nothing was reserved.",
            extra={"short_items": [s.model_dump(mode="json") for s in outcome.short_items]},
        )
    assert outcome.reservation is not None
    return JSONResponse(outcome.reservation.model_dump(mode="json"), status_code=201 if outcome.created else 200)


@router.get("/{reservation_id}", response_model=ReservationRead)
async def get_reservation(
    reservation_id: uuid.UUID, request: Request, session: SessionDep, _caller: OrdersOnly
) -> ReservationRead:
    """A reservation's state and items."""
    return await _service(request, session).get(reservation_id)


@router.post("/{reservation_id}/commit", response_model=ReservationRead)
async def commit(
    reservation_id: uuid.UUID, request: Request, session: SessionDep, _caller: OrdersOnly
) -> ReservationRead:
    """Held units leave on-hand stock (409 if the reservation is no longer held). Idempotent."""
    return await _service(request, session).commit(reservation_id, _now(request))


@router.post("/{reservation_id}/release", response_model=ReservationRead)
async def release(
    reservation_id: uuid.UUID, request: Request, session: SessionDep, _caller: OrdersOnly
) -> ReservationRead:
    """Give the units back (held: freed; committed: returned on hand). Idempotent; an unknown id is fenced."""
    return await _service(request, session).release(reservation_id, _now(request))
