"""What the orders endpoints are given: the service's typed lifespan state and its rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from common.app import lifespan_state
from services.orders.inventory import InventoryClient
from services.orders.service import OrderService
from services.orders.sweeper import OrderSweeper


@dataclass(frozen=True)
class OrdersState:
    """Built in the lifespan, kept as ``app.state.orders``."""

    service: OrderService
    inventory: InventoryClient
    sweeper: OrderSweeper


def orders_of(request: Request) -> OrderService:
    return lifespan_state(request, "orders", OrdersState).service


def request_id_of(request: Request) -> str | None:
    """The request id the middleware bound, passed on to inventory as X-Request-ID."""
    value = request.scope.get("state", {}).get("request_id")
    return value if isinstance(value, str) else None


async def _orders(request: Request) -> OrderService:
    return orders_of(request)


async def _request_id(request: Request) -> str | None:
    return request_id_of(request)


Orders = Annotated[OrderService, Depends(_orders)]
RequestId = Annotated[str | None, Depends(_request_id)]
