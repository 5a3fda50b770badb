"""Field types of the audit API's query parameters."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, AwareDatetime, BeforeValidator

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")


def _rfc3339_only(value: Any) -> Any:
    """Timestamps are RFC 3339 text with an offset (API.md); pydantic would also read numbers as Unix time."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _RFC3339.match(value):
        raise ValueError("expected an RFC 3339 timestamp with a time zone, such as 2026-11-23T08:00:00Z")
    return value


def _in_utc(value: datetime) -> datetime:
    """The same instant in UTC; one that has none there (9999-12-31T23:59:59-12:00 is in year 10000) is
    refused here, not by the database."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("the timestamp is out of range") from None


RFC3339 = Annotated[AwareDatetime, BeforeValidator(_rfc3339_only), AfterValidator(_in_utc)]
