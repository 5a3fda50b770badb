"""The wall clock, injectable: services take a ``Clock`` so that tests can move time."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def in_utc(value: datetime) -> datetime:
    """The same instant in UTC; ``ValueError`` when it has none there (9999-12-31T23:59:59-12:00 is in year
    10000), so that it is refused as input, never by the database."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("the timestamp is out of range") from None
