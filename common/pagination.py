"""Cursor pagination: ``?limit=`` (default 50, max 200) and an opaque ``?cursor=``."""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Annotated, Any, Generic, Protocol, TypeVar

from fastapi import Query
from pydantic import BaseModel

from common.clock import in_utc
from common.db import BIGINT_MAX
from common.errors import BadRequest

T = TypeVar("T")
R = TypeVar("R")

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
_DIGITS = re.compile(r"^[0-9]{1,19}$")

LimitParam = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Page size (1-200).")]
# The pattern is the cursor's alphabet (unpadded base64url), said in the schema only: a string that is not
# a cursor the server made, of that alphabet or not, is a 400 ("The cursor is not valid"); empty is no cursor.
CursorParam = Annotated[
    str | None,
    Query(
        max_length=512,
        description="Opaque cursor from next_cursor.",
        json_schema_extra={"pattern": "^[A-Za-z0-9_-]*$"},
    ),
]


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None


def encode_cursor(values: list[Any]) -> str:
    raw = json.dumps(values, separators=(",", ":"), default=str).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, arity: int) -> list[Any]:
    """The key values a cursor carries; a cursor that was not made by us is a 400."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        values = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("The cursor is not valid.") from exc
    if not isinstance(values, list) or len(values) != arity or not all(isinstance(v, str) for v in values):
        raise BadRequest("The cursor is not valid.")
    return values


# Keyset pagination: a page is asked for with one row more than its size; that row only says whether
# another page follows, and the cursor carries the key of the page's last row.


class TimeKeyed(Protocol):
    @property
    def created_at(self) -> datetime: ...

    @property
    def id(self) -> uuid.UUID: ...


def time_key_after(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    """Where a newest-first page on (created_at, id) goes on: None for the first page, a 400 for a bad cursor.

    The cursors made here carry an instant with its offset; one without, or one that is no instant in UTC
    (year 9999 at -12:00 is year 10000 there), is not one of them and never reaches the database."""
    if not cursor:
        return None
    created, ident = decode_cursor(cursor, 2)
    try:
        instant = datetime.fromisoformat(created)
        if instant.utcoffset() is None:
            raise ValueError("no offset")
        return in_utc(instant), uuid.UUID(ident)
    except ValueError as exc:
        raise BadRequest("The cursor is not valid.") from exc


def time_key(row: TimeKeyed) -> list[str]:
    return [row.created_at.isoformat(), str(row.id)]


def number_before(cursor: str | None) -> int | None:
    """Where a page on a descending BIGINT key goes on: None for the first page, a 400 for a bad cursor."""
    if not cursor:
        return None
    (value,) = decode_cursor(cursor, 1)
    # ASCII digits only (str.isdigit also takes "²"), and within the database's BIGINT.
    if not _DIGITS.match(value) or int(value) > BIGINT_MAX:
        raise BadRequest("The cursor is not valid.")
    return int(value)


def page_of(rows: Sequence[R], limit: int, read: Callable[[R], T], key: Callable[[R], list[str]]) -> Page[T]:
    """The page from ``limit + 1`` rows: ``limit`` items, and a cursor when the extra row says more follow."""
    page = rows[:limit]
    next_cursor = encode_cursor(key(page[-1])) if len(rows) > limit and page else None
    return Page[T](items=[read(row) for row in page], next_cursor=next_cursor)
