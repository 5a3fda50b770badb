"""audit outbox: a lease per row, so that the relay sends a claimed batch without holding a lock

Revision ID: auth_0006
Revises: auth_0005
Create Date: 2026-12-06
"""

from collections.abc import Sequence

from alembic import op

from common.audit import outbox_lease_column

revision: str = "auth_0006"
down_revision: str | None = "auth_0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("outbox", outbox_lease_column())


def downgrade() -> None:
    op.drop_column("outbox", "lease_expires_at")
