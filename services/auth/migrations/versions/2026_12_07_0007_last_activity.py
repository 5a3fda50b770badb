"""users.last_login_at for the accounts it was never written for: the time of this upgrade

auth_0005 added the column empty, and retention counts an account without it as inactive since it was
created: the first purge after upgrading from a release without the column anonymised customers of over two
years who still signed in every day. Their last sign-in is unknown; the upgrade is the latest moment known
to be no later than it, so the inactivity period starts from there.

Revision ID: auth_0007
Revises: auth_0006
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

revision: str = "auth_0007"
down_revision: str | None = "auth_0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("UPDATE users SET last_login_at = now() WHERE last_login_at IS NULL AND erased_at IS NULL")


def downgrade() -> None:
    pass  # the times written are as true as the empty column was; nothing to undo
