"""consent and activity: accepted terms version, marketing consent (with times), last login

Revision ID: auth_0005
Revises: auth_0004
Create Date: 2026-12-06
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "auth_0005"
down_revision: str | None = "auth_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column("users", sa.Column("terms_version", sa.String(32), nullable=True))
    op.add_column("users", sa.Column("terms_accepted_at", TS, nullable=True))
    op.add_column("users", sa.Column("marketing_consent", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("users", sa.Column("marketing_consent_at", TS, nullable=True))
    op.add_column("users", sa.Column("last_login_at", TS, nullable=True))


def downgrade() -> None:
    for column in ("last_login_at", "marketing_consent_at", "marketing_consent", "terms_accepted_at", "terms_version"):
        op.drop_column("users", column)
