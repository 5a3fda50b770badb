"""Money: integer XAF francs (no float anywhere on the money path), and the bounds every service shares."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field
from sqlalchemy import CheckConstraint

# One unit price: the CHECK constraints on price columns and the schemas that accept prices share it.
MAX_PRICE_XAF = 10**12

PriceXAF = Annotated[
    int,
    Field(strict=True, ge=0, le=MAX_PRICE_XAF, description="Integer XAF francs, 0 to 10^12."),
]


def price_range(column: str) -> CheckConstraint:
    """``column`` holds a unit price: 0 to MAX_PRICE_XAF (named ``<column>_range``)."""
    return CheckConstraint(f"{column} >= 0 AND {column} <= {MAX_PRICE_XAF}", name=f"{column}_range")
