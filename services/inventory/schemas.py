from __future__ import annotations

import unicodedata
import uuid
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, model_validator
from typing_extensions import TypedDict

from common.money import PriceXAF

MAX_QUANTITY = 10_000
MAX_LINES = 100
MAX_BATCH = 100  # reservations in one batch call
MAX_ADJUSTMENT = 10**9
MAX_INITIAL_STOCK = 10**9


def check_printable(value: str, *, multiline: bool) -> str:
    """Text is stored and returned exactly as sent, but never with control characters or lone surrogates.

    PostgreSQL cannot store NUL, a lone surrogate cannot be encoded, and other control characters in a
    name are only ever an attack on whoever displays it (newlines are fine in a description).
    """
    allowed = {"\n", "\r", "\t"} if multiline else set()
    for char in value:
        category = unicodedata.category(char)
        if (category == "Cc" and char not in allowed) or category == "Cs":
            raise ValueError("must not contain control characters")
    return value


def _one_line(value: str) -> str:
    check_printable(value, multiline=False)
    if not value.strip():
        raise ValueError("must not be blank")
    return value


def _multi_line(value: str) -> str:
    return check_printable(value, multiline=True)


Sku = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"),
    Field(description="Letters, digits, '.', '_' and '-', 1-64 characters; unique ignoring case."),
]
# What check_printable and _one_line enforce, said in the schema (JSON Schema patterns are ECMA 262).
ONE_LINE_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f][^\x00-\x1f\x7f-\x9f]*$"
MULTI_LINE_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]*$"
SEARCH_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"
Name = Annotated[
    str,
    StringConstraints(min_length=1, max_length=200),
    AfterValidator(_one_line),
    Field(json_schema_extra={"pattern": ONE_LINE_PATTERN}),
]
Description = Annotated[
    str,
    StringConstraints(max_length=5000),
    AfterValidator(_multi_line),
    Field(json_schema_extra={"pattern": MULTI_LINE_PATTERN}),
]
Reason = Annotated[
    str,
    StringConstraints(min_length=1, max_length=500),
    AfterValidator(_one_line),
    Field(json_schema_extra={"pattern": ONE_LINE_PATTERN}),
]
Quantity = Annotated[int, Field(strict=True, ge=1, le=MAX_QUANTITY)]


class Schema(BaseModel):
    model_config = ConfigDict(from_attributes=True, extra="forbid")


class ProductRead(Schema):
    id: uuid.UUID
    sku: str
    name: str
    description: str
    price_xaf: int
    is_active: bool
    available: int
    image_urls: list[str] = []
    created_at: datetime
    updated_at: datetime


class ProductFields(TypedDict):
    """A ProductRead as the plain dict the catalogue's read path builds from a row: the same fields in the same
    order, serialized by the same pydantic core (tests/inventory/test_catalogue_json.py holds them equal)."""

    id: uuid.UUID
    sku: str
    name: str
    description: str
    price_xaf: int
    is_active: bool
    available: int
    image_urls: list[str]
    created_at: datetime
    updated_at: datetime


class ProductPageFields(TypedDict):
    """A Page[ProductRead] of ProductFields."""

    items: list[ProductFields]
    next_cursor: str | None


# The catalogue's answers are serialized from the rows as they are, in pydantic's Rust core, without an ORM
# object and a validated model per product (with those and a transaction, a page of 50 cost about twice the CPU).
PRODUCT_JSON: TypeAdapter[ProductFields] = TypeAdapter(ProductFields)
PRODUCT_PAGE_JSON: TypeAdapter[ProductPageFields] = TypeAdapter(ProductPageFields)


class ProductCreate(Schema):
    sku: Sku
    name: Name
    description: Description = ""
    price_xaf: PriceXAF
    initial_stock: Annotated[int, Field(strict=True, ge=0, le=MAX_INITIAL_STOCK)] = 0


def _omit_not_null(schema: dict[str, Any]) -> None:
    """The schema says what no_nulls enforces: each field may be left out, never sent as null."""
    for name, prop in schema.get("properties", {}).items():
        variants = [v for v in prop.get("anyOf", ()) if v.get("type") != "null"]
        if len(variants) == 1:
            schema["properties"][name] = {**variants[0], **{k: v for k, v in prop.items() if k in ("title",)}}


class ProductUpdate(Schema):
    """Only the fields sent are changed; null is not a value for any of them."""

    model_config = ConfigDict(json_schema_extra=_omit_not_null)

    name: Name | None = None
    description: Description | None = None
    price_xaf: PriceXAF | None = None
    is_active: Annotated[bool, Field(strict=True)] | None = None

    @model_validator(mode="after")
    def no_nulls(self) -> ProductUpdate:
        for field in self.model_fields_set:
            if getattr(self, field) is None:
                raise ValueError(f"{field} may be omitted but not null")
        return self


class StockRead(Schema):
    product_id: uuid.UUID
    on_hand: int
    reserved: int
    available: int


class StockAdjustment(Schema):
    delta: Annotated[
        int,
        Field(
            strict=True,
            ge=-MAX_ADJUSTMENT,
            le=MAX_ADJUSTMENT,
            description="Units added (> 0) or removed (< 0); never 0.",
            json_schema_extra={"not": {"enum": [0]}},
        ),
    ]
    reason: Reason

    @model_validator(mode="after")
    def non_zero(self) -> StockAdjustment:
        if self.delta == 0:
            raise ValueError("delta must not be 0")
        return self


class MovementRead(Schema):
    id: int
    kind: str
    delta_on_hand: int
    delta_reserved: int
    reservation_id: uuid.UUID | None
    reason: str | None
    actor_id: str | None
    created_at: datetime


class ImageRead(Schema):
    id: uuid.UUID
    url: str
    content_type: str
    size: int
    width: int
    height: int


# Internal (orders only)


class ReserveItem(Schema):
    product_id: uuid.UUID
    quantity: Quantity


class ReserveRequest(Schema):
    items: Annotated[list[ReserveItem], Field(min_length=1, max_length=MAX_LINES)]

    @model_validator(mode="after")
    def distinct_products(self) -> ReserveRequest:
        ids = [item.product_id for item in self.items]
        if len(set(ids)) != len(ids):
            raise ValueError("each product may appear once")
        return self


class ReservationAsk(ReserveRequest):
    reservation_id: uuid.UUID


class ReservationBatch(Schema):
    reservations: Annotated[list[ReservationAsk], Field(min_length=1, max_length=MAX_BATCH)]


class ReservationResult(Schema):
    reservation_id: uuid.UUID
    status: int = Field(description="What the single PUT would have answered: 201, 200, 409 or 422")
    body: dict[str, Any] = Field(description="The reservation, or the problem document")


class ReservationBatchResults(Schema):
    results: list[ReservationResult]


class ReservedItem(Schema):
    product_id: uuid.UUID
    sku: str
    name: str
    quantity: int
    unit_price_xaf: int


class ReservationRead(Schema):
    reservation_id: uuid.UUID
    status: str
    expires_at: datetime | None
    items: list[ReservedItem]


class ShortItem(Schema):
    product_id: uuid.UUID
    requested: int
    available: int
    withdrawn: bool = False  # inactive: not sold any more, rather than out of stock
