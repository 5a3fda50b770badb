"""sessions.mfa_at: when the login that opened the session passed a second factor (NULL: it did not)

A refresh of a session whose user's role requires a second factor, and which did not pass one, is refused
(the user signs in again, through the second factor): sessions opened before the role required one (an
upgrade from a release without second factors, a change of AUTH_MFA_REQUIRED_ROLES) no longer go on
without it. Every session that exists at this upgrade did not pass one, as far as anyone knows.

Revision ID: auth_0008
Revises: auth_0007
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "auth_0008"
down_revision: str | None = "auth_0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("sessions", sa.Column("mfa_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("sessions", "mfa_at")
