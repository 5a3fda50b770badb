from __future__ import annotations

import re
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request, Response

from common.audit import Actor, record_denial
from common.errors import Forbidden, TokenRejected
from common.fastpath import direct_route
from common.pagination import DEFAULT_LIMIT, CursorParam, LimitParam, Page
from common.security import CurrentUser, RequireStaff, current_user
from common.tokens import Claims
from services.orders.deps import Orders, RequestId, orders_of, request_id_of
from services.orders.errors import IdempotencyKeyMissing
from services.orders.models import Status
from services.orders.rules import Viewer, user_id_of
from services.orders.schemas import OrderCreate, OrderRead, OrderStatus
from services.orders.service import OrderService

router = APIRouter(prefix="/api/v1/orders", tags=["orders"])

_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def _customer_id(claims: Claims) -> uuid.UUID:
    user_id = user_id_of(claims)
    if user_id is None:
        raise TokenRejected("The access token does not name a user.")
    return user_id


def checked_key(key: str | None, request: Request) -> str:
    """The Idempotency-Key header's value, or 400 when it is missing or malformed, or sent more than once
    (which one would be the key depends on the proxies on the way: some merge repeated headers, some not)."""
    if len(request.headers.getlist("idempotency-key")) > 1:
        raise IdempotencyKeyMissing("Send one Idempotency-Key header, not several.")
    if key is None or not key.strip():
        raise IdempotencyKeyMissing("Send an Idempotency-Key header with every POST /orders.")
    if not _KEY.match(key):
        raise IdempotencyKeyMissing("The Idempotency-Key must be 1-255 visible ASCII characters.")
    return key


async def idempotency_key(
    request: Request,
    key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Required. 1-255 visible ASCII characters, unique per intended order (a UUID is ideal). "
            "The same key with the same body returns the same order; with another body, 422.",
        ),
    ] = None,
) -> str:
    return checked_key(key, request)


async def place_order(
    data: OrderCreate,
    request: Request,
    orders: Orders,
    request_id: RequestId,
    claims: CurrentUser,
    key: Annotated[str, Depends(idempotency_key)],
) -> Response:
    """Place an order: stock is reserved at inventory, prices and names come from inventory.

    Each product may appear on one line only (duplicate lines are rejected, not merged). The order is
    `pending` until staff confirm it; it expires (stock released) at `expires_at`. A repeat with the
    same Idempotency-Key and body answers with the same order and `Idempotent-Replayed: true`; while the
    first request with the key still runs, a repeat waits for it (up to 10 s, then 409 with `Retry-After`).
    A key whose request placed no order (409 for stock, 422, 503) keeps nothing: sent again, it places
    the order if it can then. Use a new key for each order the user asks for.
    """
    order, replayed = await orders.place(
        _customer_id(claims), key, data, Actor.of(request, claims), request_id=request_id
    )
    headers = {"Location": f"/api/v1/orders/{order.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    # Serialised here, once: the order is built from checked values, so FastAPI's second validation of
    # the response model (a measurable part of an order's CPU) is skipped. The schema is still OrderRead.
    return Response(order.model_dump_json(), status_code=201, media_type="application/json", headers=headers)


async def _place_directly(request: Request) -> Response | None:
    """``place_order`` for a body that is a valid order, without FastAPI's per-request work
    (``common.fastpath``); None for any other body, which FastAPI's path then answers. For a valid body
    that path checks, in this order, the access token, then the Idempotency-Key, then runs
    ``place_order``: so does this one, with the same functions."""
    try:
        data = OrderCreate.model_validate_json(await request.body())
    except Exception:  # noqa: BLE001 - invalid, or unreadable (the client left): FastAPI's path answers it
        return None
    claims = await current_user(request)
    key = checked_key(request.headers.get("idempotency-key"), request)
    return await place_order(data, request, orders_of(request), request_id_of(request), claims, key)


router.add_api_route(
    "",
    place_order,
    methods=["POST"],
    response_model=OrderRead,
    status_code=201,
    responses={
        400: {"description": "Idempotency-Key header missing or malformed"},
        409: {
            "description": "Some items lack stock (`short_items`, nothing reserved; `withdrawn: true` for a "
            "product no longer sold), or the first request with this key is still running"
        },
        422: {
            "description": "Invalid body, unknown product, duplicate product lines, or the key reused with another body"
        },
        503: {"description": "Inventory unavailable: no order was placed"},
    },
    route_class_override=direct_route(_place_directly),
)


@router.get("", response_model=Page[OrderRead])
async def list_orders(
    orders: Orders,
    claims: CurrentUser,
    request: Request,
    limit: LimitParam = DEFAULT_LIMIT,
    cursor: CursorParam = None,
    status: Annotated[OrderStatus | None, Query()] = None,
    user_id: Annotated[uuid.UUID | None, Query(description="Staff only: one customer's orders.")] = None,
) -> Page[OrderRead]:
    """Orders, newest first: a customer's own, or everyone's for staff."""
    viewer = Viewer.of(claims)
    if user_id is not None and not viewer.staff:
        await record_denial(request, claims, "access.denied", {"required_role": "staff", "role": claims.role})
        raise Forbidden("Only staff may filter orders by user_id: a customer's list holds only their own.")
    return await orders.page(viewer, limit=limit, cursor=cursor, status=status, user_id=user_id)


@router.get("/{order_id}", response_model=OrderRead)
async def get_order(order_id: uuid.UUID, orders: Orders, claims: CurrentUser) -> OrderRead:
    """One order (another customer's order is 404, exactly like a missing one)."""
    return await orders.get(order_id, Viewer.of(claims))


async def _change(
    request: Request, orders: OrderService, request_id: str | None, claims: Claims, order_id: uuid.UUID, target: Status
) -> OrderRead:
    actor, viewer = Actor.of(request, claims), Viewer.of(claims)
    return await orders.change(order_id, target, actor, viewer, request_id=request_id)


@router.post("/{order_id}/cancel", response_model=OrderRead, responses={409: {"description": "Not cancellable"}})
async def cancel_order(
    order_id: uuid.UUID, request: Request, orders: Orders, request_id: RequestId, claims: CurrentUser
) -> OrderRead:
    """Cancel a pending or confirmed order (owner or staff); its stock goes back."""
    return await _change(request, orders, request_id, claims, order_id, Status.cancelled)


@router.post("/{order_id}/confirm", response_model=OrderRead, responses={409: {"description": "Not pending"}})
async def confirm_order(
    order_id: uuid.UUID, request: Request, orders: Orders, request_id: RequestId, claims: RequireStaff
) -> OrderRead:
    """pending → confirmed (staff): the reserved units leave on-hand stock."""
    return await _change(request, orders, request_id, claims, order_id, Status.confirmed)


@router.post("/{order_id}/ship", response_model=OrderRead, responses={409: {"description": "Not confirmed"}})
async def ship_order(
    order_id: uuid.UUID, request: Request, orders: Orders, request_id: RequestId, claims: RequireStaff
) -> OrderRead:
    """confirmed → shipped (staff)."""
    return await _change(request, orders, request_id, claims, order_id, Status.shipped)


@router.post("/{order_id}/deliver", response_model=OrderRead, responses={409: {"description": "Not shipped"}})
async def deliver_order(
    order_id: uuid.UUID, request: Request, orders: Orders, request_id: RequestId, claims: RequireStaff
) -> OrderRead:
    """shipped → delivered (staff)."""
    return await _change(request, orders, request_id, claims, order_id, Status.delivered)
