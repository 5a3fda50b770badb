from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Text,
    Uuid,
    cast,
    func,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, aggregate_order_by
from sqlalchemy.orm import DeclarativeBase, Mapped, column_property, mapped_column, relationship

from common.audit import outbox_table
from common.models import schema_metadata
from common.money import price_range

# No product ever holds more units than this; keeps every sum of quantities far from BIGINT overflow.
MAX_STOCK = 10**12


class Base(DeclarativeBase):
    metadata = schema_metadata("inventory")


outbox = outbox_table(Base.metadata)


class MovementKind(StrEnum):
    receive = "receive"  # units arrive (initial stock)
    adjust = "adjust"  # a staff correction, with a reason
    reserve = "reserve"  # units held for an order
    release = "release"  # a hold is given back (or committed units return on hand)
    commit = "commit"  # held units leave the shelf


class ReservationStatus(StrEnum):
    held = "held"
    committed = "committed"
    released = "released"
    expired = "expired"
    rejected = "rejected"


class ProductImage(Base):
    __tablename__ = "product_images"
    __table_args__ = (
        CheckConstraint("content_type IN ('image/jpeg', 'image/png', 'image/webp')", name="content_type_allowed"),
        CheckConstraint("size > 0", name="size_positive"),
        CheckConstraint("storage_key ~ '^[0-9a-f]{32}\\.(jpg|png|webp)$'", name="storage_key_random"),
        Index("ix_product_images_product_id", "product_id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    product_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("products.id"))
    # A random server-side file name; the client's file name is never stored or used.
    storage_key: Mapped[str] = mapped_column(String(64), unique=True)
    content_type: Mapped[str] = mapped_column(String(32))
    size: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    @property
    def url(self) -> str:
        return f"/api/v1/products/{self.product_id}/images/{self.id}"


class Product(Base):
    __tablename__ = "products"
    __table_args__ = (
        price_range("price_xaf"),
        CheckConstraint("on_hand >= 0", name="on_hand_non_negative"),
        CheckConstraint("reserved >= 0 AND reserved <= on_hand", name="reserved_within_on_hand"),
        # "abc-1" and "ABC-1" are the same sku to a person reading a label.
        Index("uq_products_upper_sku", text("upper(sku)"), unique=True),
    )
    # Fetch created_at/updated_at with RETURNING: an async session cannot lazy-load them afterwards.
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    sku: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    price_xaf: Mapped[int] = mapped_column(BigInteger)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    on_hand: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    # The product's image ids in upload order, in the same SELECT (a catalogue read is one round trip).
    image_ids: Mapped[list[uuid.UUID]] = column_property(
        select(
            func.coalesce(
                func.array_agg(aggregate_order_by(ProductImage.id, ProductImage.created_at, ProductImage.id)),
                cast(literal_column("'{}'"), ARRAY(Uuid())),
            )
        )
        .where(ProductImage.product_id == id)
        .correlate_except(ProductImage)
        .scalar_subquery(),
        deferred=True,
        raiseload=True,
    )

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved

    @property
    def image_urls(self) -> list[str]:
        return [f"/api/v1/products/{self.id}/images/{image_id}" for image_id in self.image_ids]


class StockMovement(Base):
    """The ledger: for every product, on_hand = sum(delta_on_hand) and reserved = sum(delta_reserved)."""

    __tablename__ = "stock_movements"
    __table_args__ = (
        CheckConstraint(
            "kind IN ('receive', 'adjust', 'reserve', 'release', 'commit')",
            name="kind_known",
        ),
        CheckConstraint(
            "(kind = 'receive' AND delta_on_hand > 0 AND delta_reserved = 0)"
            " OR (kind = 'adjust' AND delta_on_hand <> 0 AND delta_reserved = 0)"
            " OR (kind = 'reserve' AND delta_on_hand = 0 AND delta_reserved > 0)"
            " OR (kind = 'release' AND ((delta_on_hand = 0 AND delta_reserved < 0)"
            " OR (delta_on_hand > 0 AND delta_reserved = 0)))"
            " OR (kind = 'commit' AND delta_on_hand < 0 AND delta_reserved = delta_on_hand)",
            name="deltas_match_kind",
        ),
        Index("ix_stock_movements_product_id_id", "product_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    product_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("products.id"))
    kind: Mapped[str] = mapped_column(String(16))
    delta_on_hand: Mapped[int] = mapped_column(BigInteger)
    delta_reserved: Mapped[int] = mapped_column(BigInteger)
    reservation_id: Mapped[uuid.UUID | None] = mapped_column(default=None)
    reason: Mapped[str | None] = mapped_column(String(500), default=None)
    actor_id: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Reservation(Base):
    """Stock held for one order, idempotent by its id (chosen by the caller)."""

    __tablename__ = "reservations"
    __table_args__ = (
        CheckConstraint(
            "status IN ('held', 'committed', 'released', 'expired', 'rejected')",
            name="status_known",
        ),
        Index("ix_reservations_held_expires_at", "expires_at", postgresql_where=text("status = 'held'")),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    # SHA-256 of the items first asked for; a tombstone left by a release of an unknown id has none.
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    # The first answer to a rejected reserve (replayed as is).
    rejection: Mapped[dict[str, Any] | None] = mapped_column(JSONB, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    items: Mapped[list[ReservationItem]] = relationship(lazy="raise", order_by="ReservationItem.line")


class ReservationItem(Base):
    __tablename__ = "reservation_items"
    __table_args__ = (
        CheckConstraint("quantity > 0", name="quantity_positive"),
        price_range("unit_price_xaf"),
        Index("ix_reservation_items_product_id", "product_id"),
    )

    reservation_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("reservations.id"), primary_key=True)
    product_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("products.id"), primary_key=True)
    line: Mapped[int] = mapped_column(Integer)
    quantity: Mapped[int] = mapped_column(BigInteger)
    # What the product was called and cost when it was reserved: orders never takes prices from clients.
    sku: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    unit_price_xaf: Mapped[int] = mapped_column(BigInteger)
