from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from common.audit import outbox_table
from common.models import schema_metadata
from common.money import MAX_PRICE_XAF, price_range

MAX_QUANTITY = 10_000
MAX_LINES = 100
# 100 lines x 10,000 units x 10^12 XAF = 10^18 < 2^63 - 1: no total can overflow a BIGINT.
MAX_TOTAL_XAF = MAX_LINES * MAX_QUANTITY * MAX_PRICE_XAF


class Base(DeclarativeBase):
    metadata = schema_metadata("orders")


outbox = outbox_table(Base.metadata)


class Status(StrEnum):
    placing = "placing"  # internal: the reservation is being made; never shown, never an order yet
    pending = "pending"
    confirmed = "confirmed"
    shipped = "shipped"
    delivered = "delivered"
    cancelled = "cancelled"
    expired = "expired"


class Stock(StrEnum):
    """What orders knows of its reservation at inventory."""

    reserving = "reserving"
    held = "held"
    committed = "committed"
    released = "released"


class StockAction(StrEnum):
    """An inventory call that is owed or under way (a durable intent, so a crash cannot lose it)."""

    reserve = "reserve"
    commit = "commit"
    release = "release"


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = (
        CheckConstraint(
            "status IN ('placing', 'pending', 'confirmed', 'shipped', 'delivered', 'cancelled', 'expired')",
            name="status_known",
        ),
        CheckConstraint("stock IN ('reserving', 'held', 'committed', 'released')", name="stock_known"),
        CheckConstraint(
            "stock_action IS NULL OR stock_action IN ('reserve', 'commit', 'release')", name="stock_action_known"
        ),
        CheckConstraint("total_xaf >= 0 AND total_xaf <= 1000000000000000000", name="total_xaf_range"),
        UniqueConstraint("user_id", "idempotency_key"),
        UniqueConstraint("reservation_id"),
        Index("ix_orders_created_at_id", "created_at", "id"),
        Index("ix_orders_user_id_created_at_id", "user_id", "created_at", "id"),
        Index("ix_orders_pending_expires_at", "expires_at", postgresql_where=text("status = 'pending'")),
        Index("ix_orders_stock_action_since", "stock_action_since", postgresql_where=text("stock_action IS NOT NULL")),
    )
    __mapper_args__ = {"eager_defaults": True}

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    user_id: Mapped[uuid.UUID]
    status: Mapped[str] = mapped_column(String(16))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    reservation_id: Mapped[uuid.UUID]
    total_xaf: Mapped[int] = mapped_column(BigInteger, default=0)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    stock: Mapped[str] = mapped_column(String(16))
    stock_action: Mapped[str | None] = mapped_column(String(16), default=None)
    # Identifies the attempt that owns the action: a late finisher whose attempt was taken over does nothing.
    stock_action_id: Mapped[uuid.UUID | None] = mapped_column(default=None)
    stock_action_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    # Who asked for the action, from where: the audit event of a change the sweeper finishes carries it.
    stock_action_context: Mapped[dict[str, Any] | None] = mapped_column(JSONB, default=None)
    # The orders process doing its current stock action (its liveness lock's number): an action whose process
    # died is taken over once its lock is gone (services.orders.liveness), not after the timeouts.
    owner: Mapped[int | None] = mapped_column(Integer, default=None)
    anonymised_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    items: Mapped[list[OrderItem]] = relationship(lazy="raise", order_by="OrderItem.line")


class OrderItem(Base):
    __tablename__ = "order_items"
    __table_args__ = (
        CheckConstraint("quantity >= 1 AND quantity <= 10000", name="quantity_range"),
        price_range("unit_price_xaf"),
        CheckConstraint("line_total_xaf = quantity * unit_price_xaf", name="line_total_xaf_product"),
    )

    order_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("orders.id", ondelete="CASCADE"), primary_key=True)
    line: Mapped[int] = mapped_column(Integer, primary_key=True)
    product_id: Mapped[uuid.UUID]
    sku: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    quantity: Mapped[int] = mapped_column(Integer)
    unit_price_xaf: Mapped[int] = mapped_column(BigInteger)
    line_total_xaf: Mapped[int] = mapped_column(BigInteger)
