"""stock ledger, reservations, product images and the audit outbox

Revision ID: inventory_0003
Revises: inventory_0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

from common.audit import outbox_columns

revision: str = "inventory_0003"
down_revision: str | None = "inventory_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MOVEMENT_DELTAS = (
    "(kind = 'receive' AND delta_on_hand > 0 AND delta_reserved = 0)"
    " OR (kind = 'adjust' AND delta_on_hand <> 0 AND delta_reserved = 0)"
    " OR (kind = 'reserve' AND delta_on_hand = 0 AND delta_reserved > 0)"
    " OR (kind = 'release' AND ((delta_on_hand = 0 AND delta_reserved < 0)"
    " OR (delta_on_hand > 0 AND delta_reserved = 0)))"
    " OR (kind = 'commit' AND delta_on_hand < 0 AND delta_reserved = delta_on_hand)"
)


def upgrade() -> None:
    op.create_index("uq_products_upper_sku", "products", [sa.text("upper(sku)")], unique=True)

    op.create_table(
        "stock_movements",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("product_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("delta_on_hand", sa.BigInteger(), nullable=False),
        sa.Column("delta_reserved", sa.BigInteger(), nullable=False),
        sa.Column("reservation_id", sa.Uuid(), nullable=True),
        sa.Column("reason", sa.String(500), nullable=True),
        sa.Column("actor_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint(
            "kind IN ('receive', 'adjust', 'reserve', 'release', 'commit')", name="ck_stock_movements_kind_known"
        ),
        sa.CheckConstraint(MOVEMENT_DELTAS, name="ck_stock_movements_deltas_match_kind"),
        sa.ForeignKeyConstraint(["product_id"], ["products.id"], name="fk_stock_movements_product_id_products"),
        sa.PrimaryKeyConstraint("id", name="pk_stock_movements"),
    )
    op.create_index("ix_stock_movements_product_id_id", "stock_movements", ["product_id", "id"])
    # Products that existed before the ledger get their opening balance, so the invariant holds for all.
    op.execute(
        "INSERT INTO stock_movements (product_id, kind, delta_on_hand, delta_reserved, reason)"
        " SELECT id, 'receive', on_hand, 0, 'opening balance' FROM products WHERE on_hand > 0"
    )
    op.execute(
        "INSERT INTO stock_movements (product_id, kind, delta_on_hand, delta_reserved, reason)"
        " SELECT id, 'reserve', 0, reserved, 'opening balance' FROM products WHERE reserved > 0"
    )

    op.create_table(
        "reservations",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rejection", JSONB(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "status IN ('held', 'committed', 'released', 'expired', 'rejected')", name="ck_reservations_status_known"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_reservations"),
    )
    op.create_index(
        "ix_reservations_held_expires_at",
        "reservations",
        ["expires_at"],
        postgresql_where=sa.text("status = 'held'"),
    )

    op.create_table(
        "reservation_items",
        sa.Column("reservation_id", sa.Uuid(), nullable=False),
        sa.Column("product_id", sa.Uuid(), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.Column("sku", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("unit_price_xaf", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("quantity > 0", name="ck_reservation_items_quantity_positive"),
        sa.CheckConstraint(
            "unit_price_xaf >= 0 AND unit_price_xaf <= 1000000000000", name="ck_reservation_items_unit_price_xaf_range"
        ),
        sa.ForeignKeyConstraint(
            ["reservation_id"], ["reservations.id"], name="fk_reservation_items_reservation_id_reservations"
        ),
        sa.ForeignKeyConstraint(["product_id"], ["products.id"], name="fk_reservation_items_product_id_products"),
        sa.PrimaryKeyConstraint("reservation_id", "product_id", name="pk_reservation_items"),
    )
    op.create_index("ix_reservation_items_product_id", "reservation_items", ["product_id"])

    op.create_table(
        "product_images",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("product_id", sa.Uuid(), nullable=False),
        sa.Column("storage_key", sa.String(64), nullable=False),
        sa.Column("content_type", sa.String(32), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint(
            "content_type IN ('image/jpeg', 'image/png', 'image/webp')", name="ck_product_images_content_type_allowed"
        ),
        sa.CheckConstraint("size > 0", name="ck_product_images_size_positive"),
        sa.CheckConstraint(
            "storage_key ~ '^[0-9a-f]{32}\\.(jpg|png|webp)$'", name="ck_product_images_storage_key_random"
        ),
        sa.ForeignKeyConstraint(["product_id"], ["products.id"], name="fk_product_images_product_id_products"),
        sa.PrimaryKeyConstraint("id", name="pk_product_images"),
        sa.UniqueConstraint("storage_key", name="uq_product_images_storage_key"),
    )
    op.create_index("ix_product_images_product_id", "product_images", ["product_id"])

    op.create_table("outbox", *outbox_columns())
    op.create_index(
        "ix_outbox_pending", "outbox", ["next_attempt_at"], postgresql_where=sa.text("delivered_at IS NULL")
    )


def downgrade() -> None:
    op.drop_table("outbox")
    op.drop_table("product_images")
    op.drop_table("reservation_items")
    op.drop_table("reservations")
    op.drop_table("stock_movements")
    op.drop_index("uq_products_upper_sku", table_name="products")
