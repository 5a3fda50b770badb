"""orders: the process placing an order (its liveness lock's number), so that a placement whose process
died is released as soon as PostgreSQL drops that process's lock

Revision ID: orders_0004
Revises: orders_0003
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "orders_0004"
down_revision: str | None = "orders_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("orders", sa.Column("owner", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("orders", "owner")
