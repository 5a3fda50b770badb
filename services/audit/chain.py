"""The hash chain: what exactly is hashed, and how.

Every stored event has a gap-free ``sequence`` (1, 2, 3 ...), a ``prev_hash`` and a ``hash``:

    hash = SHA-256( prev_hash ‖ document ) as 64 lowercase hex digits

- ``prev_hash`` is the previous event's ``hash`` as its 64 ASCII hex digits; the first event's
  ``prev_hash`` is ``GENESIS`` (64 zeros). After retention has archived a prefix, the first remaining
  event's ``prev_hash`` is the ``head_hash`` of the newest signed archive checkpoint.
- ``document`` is the UTF-8 encoding of the event's canonical JSON::

      json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)

  where ``doc`` has exactly the keys of ``DOCUMENT_FIELDS``: ``sequence`` (integer), ``id`` (UUID,
  lowercase with hyphens), ``occurred_at`` and ``recorded_at`` (UTC, ``YYYY-MM-DDTHH:MM:SS.ffffffZ``,
  always six fraction digits), ``service``, ``action``, ``actor_id``, ``actor_role``, ``resource_type``,
  ``resource_id``, ``ip``, ``user_agent``, ``method``, ``path``, ``request_id``, ``outcome`` (strings or
  null), ``old_values`` and ``new_values`` (JSON objects or null), after redaction (common.audit.scrub)
  and pseudonymisation (services/audit/pseudonyms.py).
- The document text is stored as is (``events.document``), so verification hashes the very bytes that
  were hashed at ingest: nothing depends on how PostgreSQL or a JSON library would re-serialise numbers.

The query columns of ``events`` (``id``, ``occurred_at``, ``service``, ``action`` ...) are copies of
document fields; verification checks that they still agree with the document.

Anyone can check an event returned by the API: rebuild ``doc`` from its fields (the keys above, minus
``hash``/``prev_hash``), serialise it as above and compare ``sha256(prev_hash + document)``.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

GENESIS = "0" * 64

DOCUMENT_FIELDS = (
    "sequence",
    "id",
    "occurred_at",
    "recorded_at",
    "service",
    "action",
    "actor_id",
    "actor_role",
    "resource_type",
    "resource_id",
    "ip",
    "user_agent",
    "method",
    "path",
    "request_id",
    "old_values",
    "new_values",
    "outcome",
)

# Columns that repeat a document field (for queries); verification compares them with the document.
COLUMN_FIELDS = (
    "id",
    "occurred_at",
    "recorded_at",
    "service",
    "action",
    "actor_id",
    "resource_type",
    "resource_id",
    "outcome",
)


def format_timestamp(value: datetime) -> str:
    """UTC with exactly six fraction digits: the one textual form of a timestamp in the chain."""
    if value.tzinfo is None:
        raise ValueError("timestamps in the chain are timezone-aware")
    utc = value.astimezone(UTC)
    if utc.year < 1000:  # strftime does not pad such a year to four digits; its text is kept as it was
        return utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # The same text as that strftime, at a third of its cost (every event formats two timestamps).
    return utc.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_timestamp(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


# json.dumps with these arguments, built once: json.dumps builds a new encoder on every call otherwise.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_json(value: Any) -> str:
    return _CANONICAL.encode(value)


def canonical_document(doc: Mapping[str, Any]) -> str:
    if set(doc) != set(DOCUMENT_FIELDS):
        raise ValueError("an event document has exactly the documented fields")
    return canonical_json(doc)


def chain_hash(prev_hash: str, document: str) -> str:
    return hashlib.sha256(prev_hash.encode("ascii") + document.encode("utf-8")).hexdigest()


def column_values(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The query columns for a document, typed as the database stores them."""
    return {
        "id": uuid.UUID(doc["id"]),
        "occurred_at": parse_timestamp(doc["occurred_at"]),
        "recorded_at": parse_timestamp(doc["recorded_at"]),
        "service": doc["service"],
        "action": doc["action"],
        "actor_id": doc["actor_id"],
        "resource_type": doc["resource_type"],
        "resource_id": doc["resource_id"],
        "outcome": doc["outcome"],
    }
