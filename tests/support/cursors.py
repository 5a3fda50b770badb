"""Cursors no server made, though each decodes to a (created_at, id) pair: a newest-first list answers 400."""

from __future__ import annotations

import base64
import json

_ID = "00000000-0000-0000-0000-000000000001"


def _cursor(values: list[str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


FORGED_TIME_CURSORS = [
    _cursor(["9999-12-31T23:59:59.999999-12:00", _ID]),  # year 10000 in UTC: beyond what Python or asyncpg send
    _cursor(["0001-01-01T00:00:00+14:00", _ID]),  # year 0 in UTC
    _cursor(["2026-12-07T10:00:00", _ID]),  # no offset: the server's cursors always carry one
]
