"""/internal/reservations: used by the orders service only (service token, caller "orders")."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from starlette.responses import JSONResponse

from common.app import lifespan_state
from common.errors import error_response
from common.fastpath import direct_route
from common.security import require_service
from common.state import state_of
from common.tokens import Claims
from services.inventory.deps import InventoryState, Now, Reservations, reserver_in
from services.inventory.reservations import ReserveAsk, Reserver
from services.inventory.schemas import (
    ReservationBatch,
    ReservationBatchResults,
    ReservationRead,
    ReserveRequest,
)

OrdersOnly = Annotated[Claims, Depends(require_service("orders"))]

router = APIRouter(prefix="/internal/reservations", tags=["internal"])
# The batch route on a router of its own, included before every other (services.inventory.main): FastAPI
# tries the routes in order, and this one is called once per batch of orders under load (matching it past
# the catalogue's routes cost more than the batch's own checks). Its path is literal, so no other route
# can shadow it or be shadowed by it.
batch_router = APIRouter(prefix="/internal/reservations", tags=["internal"])


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


async def reserve_batch(
    data: ReservationBatch, request: Request, reservations: Reservations, now: Now, _caller: OrdersOnly
) -> Response:
    return await _reserve_batch(data, request, reservations.reserver, now)


async def _reserve_batch(data: ReservationBatch, request: Request, reserver: Reserver, now: datetime) -> Response:
    asks = [ReserveAsk(entry.reservation_id, entry.items) for entry in data.reservations]
    outcomes = await reserver.reserve_many(asks, now)
    results = []
    for ask, outcome in zip(asks, outcomes, strict=True):
        status, body = outcome.answer(request.scope)
        results.append({"reservation_id": str(ask.reservation_id), "status": status, "body": body})
    return JSONResponse({"results": results})


_orders_only = require_service("orders")


async def _reserve_batch_directly(request: Request) -> Response | None:
    """``reserve_batch`` for a valid batch without FastAPI's per-request work (``common.fastpath``): one
    call per batch of orders. None for any other body, which FastAPI's path then answers. The checks and
    the transaction are those of the dependency's path: the service token, then the reserve statements'
    one transaction (``services.inventory.reservations.Reserver``, no ORM session), committed before the
    answer is sent and rolled back when anything raises."""
    try:
        data = ReservationBatch.model_validate_json(await request.body())
    except Exception:  # noqa: BLE001 - invalid, or unreadable (the client left): FastAPI's path answers it
        return None
    await _orders_only(request)
    state = lifespan_state(request, "inventory", InventoryState)
    return await _reserve_batch(data, request, reserver_in(state, state_of(request).db), state.clock())


batch_router.add_api_route(
    "/batch",
    reserve_batch,
    methods=["POST"],
    response_model=ReservationBatchResults,
    responses={200: {"description": "One result per reservation asked for, in the order asked"}},
    route_class_override=direct_route(_reserve_batch_directly),
)


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
