"""/internal/reservations: used by the orders service only (service token, caller "orders")."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from starlette.responses import JSONResponse

from common.errors import error_response
from common.security import require_service
from common.tokens import Claims
from services.inventory.deps import Now, Reservations
from services.inventory.reservations import ReserveAsk
from services.inventory.schemas import (
    ReservationBatch,
    ReservationBatchResults,
    ReservationRead,
    ReserveRequest,
)

OrdersOnly = Annotated[Claims, Depends(require_service("orders"))]

router = APIRouter(prefix="/internal/reservations", tags=["internal"])


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
    reservation_id: uuid.UUID,
    data: ReserveRequest,
    request: Request,
    reservations: Reservations,
    now: Now,
    _caller: OrdersOnly,
) -> Response:
    """Hold every item or none, for the reservation lifetime. Idempotent by reservation id."""
    outcome = await reservations.reserve(reservation_id, data.items, now)
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
async def reserve_batch(
    data: ReservationBatch, request: Request, reservations: Reservations, now: Now, _caller: OrdersOnly
) -> Response:
    """Several reserves in one call and one transaction (orders sends the reservations that arrive while
    its previous call is in flight). Each result carries the status and body the single `PUT` would
    have answered for that reservation; each reservation is all or nothing on its own."""
    asks = [ReserveAsk(entry.reservation_id, entry.items) for entry in data.reservations]
    outcomes = await reservations.reserve_many(asks, now)
    results = []
    for ask, outcome in zip(asks, outcomes, strict=True):
        status, body = outcome.answer(request.scope)
        results.append({"reservation_id": str(ask.reservation_id), "status": status, "body": body})
    return JSONResponse({"results": results})


@router.get("/{reservation_id}", response_model=ReservationRead)
async def get_reservation(
    reservation_id: uuid.UUID, reservations: Reservations, _caller: OrdersOnly
) -> ReservationRead:
    """A reservation's state and items."""
    return await reservations.get(reservation_id)


@router.post("/{reservation_id}/commit", response_model=ReservationRead)
async def commit(
    reservation_id: uuid.UUID, reservations: Reservations, now: Now, _caller: OrdersOnly
) -> ReservationRead:
    """Held units leave on-hand stock (409 if the reservation is no longer held). Idempotent."""
    return await reservations.commit(reservation_id, now)


@router.post("/{reservation_id}/release", response_model=ReservationRead)
async def release(
    reservation_id: uuid.UUID, reservations: Reservations, now: Now, _caller: OrdersOnly
) -> ReservationRead:
    """Give the units back (held: freed; committed: returned on hand). Idempotent; an unknown id is fenced."""
    return await reservations.release(reservation_id, now)
