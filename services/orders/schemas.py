from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from common.money import PriceXAF
from services.orders.models import MAX_LINES, MAX_QUANTITY

# Every status an order can show (the internal `placing` step is never an order yet).
OrderStatus = Literal["pending", "confirmed", "shipped", "delivered", "cancelled", "expired"]


class Schema(BaseModel):
    model_config = ConfigDict(from_attributes=True, extra="forbid")


class OrderLineIn(Schema):
    product_id: uuid.UUID
    quantity: Annotated[int, Field(strict=True, ge=1, le=MAX_QUANTITY, description="Whole units, 1 to 10,000.")]


class OrderCreate(Schema):
    """The products and quantities; prices and names come from inventory, never from the client."""

    items: Annotated[
        list[OrderLineIn],
        Field(
            min_length=1,
            max_length=MAX_LINES,
            description="1 to 100 lines, each product at most once: duplicate product lines are rejected "
            "with 422 (send one line with the total quantity).",
        ),
    ]

    @field_validator("items")
    @classmethod
    def one_line_per_product(cls, items: list[OrderLineIn]) -> list[OrderLineIn]:
        first: dict[uuid.UUID, int] = {}
        for number, item in enumerate(items):
            if item.product_id in first:
                raise ValueError(
                    f"line {number} repeats the product of line {first[item.product_id]}: "
                    "send one line with the total quantity"
                )
            first[item.product_id] = number
        return items


class OrderItemRead(Schema):
    product_id: uuid.UUID
    sku: str
    name: str
    quantity: int
    unit_price_xaf: int
    line_total_xaf: int


class OrderRead(Schema):
    id: uuid.UUID
    user_id: uuid.UUID
    status: OrderStatus
    items: list[OrderItemRead]
    total_xaf: int
    expires_at: datetime | None = Field(description="A pending order expires (stock released) at this time.")
    created_at: datetime
    updated_at: datetime


class UserOrdersExport(Schema):
    user_id: uuid.UUID
    orders: list[OrderRead]


class UserErasure(Schema):
    orders_anonymised: int


# What inventory answers (checked, never trusted blindly)


class ReservedLine(BaseModel):
    model_config = ConfigDict(extra="ignore")

    product_id: uuid.UUID
    sku: str = Field(max_length=64)
    name: str = Field(max_length=200)
    quantity: Annotated[int, Field(strict=True, ge=1, le=MAX_QUANTITY)]
    unit_price_xaf: PriceXAF


class Reservation(BaseModel):
    model_config = ConfigDict(extra="ignore")

    reservation_id: uuid.UUID
    status: str
    expires_at: datetime | None
    items: list[ReservedLine]


class ShortLine(BaseModel):
    model_config = ConfigDict(extra="ignore")

    product_id: uuid.UUID
    requested: int
    available: int
    withdrawn: bool = False
