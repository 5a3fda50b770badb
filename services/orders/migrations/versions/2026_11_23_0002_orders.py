"""orders, their lines (prices as reserved) and the audit outbox

Revision ID: orders_0002
Revises: orders_0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from common.audit import outbox_columns

revision: str = "orders_0002"
down_revision: str | None = "orders_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("reservation_id", sa.Uuid(), nullable=False),
        sa.Column("total_xaf", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stock", sa.String(16), nullable=False),
        sa.Column("stock_action", sa.String(16), nullable=True),
        sa.Column("stock_action_id", sa.Uuid(), nullable=True),
        sa.Column("stock_action_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stock_action_context", JSONB(), nullable=True),
        sa.Column("anonymised_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint(
            "status IN ('placing', 'pending', 'confirmed', 'shipped', 'delivered', 'cancelled', 'expired')",
            name="ck_orders_status_known",
        ),
        sa.CheckConstraint("stock IN ('reserving', 'held', 'committed', 'released')", name="ck_orders_stock_known"),
        sa.CheckConstraint(
            "stock_action IS NULL OR stock_action IN ('reserve', 'commit', 'release')",
            name="ck_orders_stock_action_known",
        ),
        sa.CheckConstraint("total_xaf >= 0 AND total_xaf <= 1000000000000000000", name="ck_orders_total_xaf_range"),
        sa.PrimaryKeyConstraint("id", name="pk_orders"),
        sa.UniqueConstraint("user_id", "idempotency_key", name="uq_orders_user_id_idempotency_key"),
        sa.UniqueConstraint("reservation_id", name="uq_orders_reservation_id"),
    )
    op.create_index("ix_orders_created_at_id", "orders", ["created_at", "id"])
    op.create_index("ix_orders_user_id_created_at_id", "orders", ["user_id", "created_at", "id"])
    op.create_index(
        "ix_orders_pending_expires_at", "orders", ["expires_at"], postgresql_where=sa.text("status = 'pending'")
    )
    op.create_index(
        "ix_orders_stock_action_since",
        "orders",
        ["stock_action_since"],
        postgresql_where=sa.text("stock_action IS NOT NULL"),
    )

    op.create_table(
        "order_items",
        sa.Column("order_id", sa.Uuid(), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("product_id", sa.Uuid(), nullable=False),
        sa.Column("sku", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("unit_price_xaf", sa.BigInteger(), nullable=False),
        sa.Column("line_total_xaf", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("quantity >= 1 AND quantity <= 10000", name="ck_order_items_quantity_range"),
        sa.CheckConstraint(
            "unit_price_xaf >= 0 AND unit_price_xaf <= 1000000000000", name="ck_order_items_unit_price_xaf_range"
        ),
        sa.CheckConstraint(
            "line_total_xaf = quantity * unit_price_xaf", name="ck_order_items_line_total_xaf_product"
        ),
        sa.ForeignKeyConstraint(
            ["order_id"], ["orders.id"], name="fk_order_items_order_id_orders", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("order_id", "line", name="pk_order_items"),
    )

    op.create_table("outbox", *outbox_columns())
    op.create_index(
        "ix_outbox_pending", "outbox", ["next_attempt_at"], postgresql_where=sa.text("delivered_at IS NULL")
    )


def downgrade() -> None:
    op.drop_table("outbox")
    op.drop_table("order_items")
    op.drop_table("orders")
