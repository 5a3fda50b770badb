"""Field types of the audit API's query parameters."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, AwareDatetime, BeforeValidator

from common.clock import in_utc

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")


def _rfc3339_only(value: Any) -> Any:
    """Timestamps are RFC 3339 text with an offset (API.md); pydantic would also read numbers as Unix time."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _RFC3339.match(value):
        raise ValueError("expected an RFC 3339 timestamp with a time zone, such as 2026-11-23T08:00:00Z")
    return value


RFC3339 = Annotated[AwareDatetime, BeforeValidator(_rfc3339_only), AfterValidator(in_utc)]
