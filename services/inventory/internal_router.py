"""/internal/reservations: used by the orders service only (service token, caller "orders")."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from starlette.responses import JSONResponse

from common.db import SessionDep
from common.errors import error_response
from common.security import require_service
from common.tokens import Claims
from services.inventory.config import Settings
from services.inventory.reservations import ReservationService, ReserveAsk
from services.inventory.schemas import (
    ReservationBatch,
    ReservationBatchResults,
    ReservationRead,
    ReserveRequest,
)

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
    # Errors are answered, not raised: the transaction has committed (a rejection is stored, so that a
    # repeat gets the same answer).
    if outcome.error is not None:
        return error_response(outcome.error, request.scope)
    status, body = outcome.answer(request.scope)
    return JSONResponse(body, status_code=status)


@router.post(
    "/batch",
    response_model=ReservationBatchResults,
    responses={200: {"description": "One result per reservation asked for, in the order asked"}},
)
async def reserve_batch(data: ReservationBatch, request: Request, session: SessionDep, _caller: OrdersOnly) -> Response:
    """Several reserves in one call and one transaction (orders sends the reservations that arrive while
    its previous call is in flight). Each result carries the status and body the single `PUT` would
    have answered for that reservation; each reservation is all or nothing on its own."""
    asks = [ReserveAsk(entry.reservation_id, entry.items) for entry in data.reservations]
    outcomes = await _service(request, session).reserve_many(asks, _now(request))
    results = []
    for ask, outcome in zip(asks, outcomes, strict=True):
        status, body = outcome.answer(request.scope)
        results.append({"reservation_id": str(ask.reservation_id), "status": status, "body": body})
    return JSONResponse({"results": results})


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
