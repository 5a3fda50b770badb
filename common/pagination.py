"""Cursor pagination: ``?limit=`` (default 50, max 200) and an opaque ``?cursor=``."""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel

from common.errors import BadRequest

T = TypeVar("T")

DEFAULT_LIMIT = 50
MAX_LIMIT = 200

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
