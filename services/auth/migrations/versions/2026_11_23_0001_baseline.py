"""baseline: the auth schema's version history starts here

Revision ID: auth_0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

revision: str = "auth_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """The schema and its roles are created by comptoir migrate; tables arrive in later revisions."""


def downgrade() -> None:
    """Nothing to undo."""
