"""Pseudonymisation: real user ids never enter the hashed chain.

The user ids an event refers to (its ``subjects``) are:
- ``actor_id`` when it is a UUID (user ids are UUIDs; a service actor such as ``"orders"`` is not);
- ``resource_id`` when ``resource_type`` is ``"user"``;
- any UUID under a ``user_id`` / ``actor_id`` key inside ``old_values`` / ``new_values``, and the
  ``resource_id`` of any object there whose ``resource_type`` is ``"user"`` (an admin's query filters).
Each one is replaced, wherever it appears in any string of the event (paths such as
``/admin/users/<id>`` included), by the user's pseudonym: ``psn_`` and 32 random hex digits, kept in
``audit.pseudonyms``. The pseudonym is random, not derived from the id, so once the mapping row is
deleted (GDPR erasure) nothing links the events back to the person, and the chain still verifies
because only the pseudonym was ever hashed. Events about an already erased user get ``ERASED``.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

ERASED = "erased-subject"
_ID_KEYS = frozenset({"user_id", "actor_id"})
_SURROGATE = re.compile("[\ud800-\udfff]")


def new_pseudonym() -> str:
    return "psn_" + secrets.token_hex(16)


def erased_digest(user_id: uuid.UUID) -> str:
    """What is kept of an erased user: enough to recognise their id again, not to recover it."""
    return hashlib.sha256(b"comptoir.audit.erased:" + str(user_id).encode()).hexdigest()


def as_user_id(value: Any) -> uuid.UUID | None:
    if not isinstance(value, str) or len(value) != 36:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


_PLAIN = frozenset({str, int, float, bool, type(None)})


def _nested_ids(value: Any, out: set[uuid.UUID], depth: int = 0) -> None:
    if depth > 20 or type(value) in _PLAIN:  # most values: no ABC check (isinstance Mapping is slow)
        return
    if isinstance(value, Mapping):
        if value.get("resource_type") == "user" and (found := as_user_id(value.get("resource_id"))) is not None:
            out.add(found)
        for key, item in value.items():
            if key in _ID_KEYS and (found := as_user_id(item)) is not None:
                out.add(found)
            else:
                _nested_ids(item, out, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _nested_ids(item, out, depth + 1)


def subjects(event: Mapping[str, Any]) -> set[uuid.UUID]:
    found: set[uuid.UUID] = set()
    if (actor := as_user_id(event.get("actor_id"))) is not None:
        found.add(actor)
    if event.get("resource_type") == "user" and (resource := as_user_id(event.get("resource_id"))) is not None:
        found.add(resource)
    for key in ("old_values", "new_values"):
        _nested_ids(event.get(key), found)
    return found


_UUID_LENGTH = 36
_ANY_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _replace(value: Any, pattern: re.Pattern[str], mapping: Mapping[str, str]) -> Any:
    kind = type(value)
    if kind is str or isinstance(value, str):
        if len(value) < _UUID_LENGTH:  # most strings of an event: too short to hold an id
            return value
        return pattern.sub(lambda m: mapping.get(m.group(0).lower(), m.group(0)), value)
    if kind in _PLAIN:  # numbers, booleans, null: no ABC check
        return value
    if kind is dict or isinstance(value, Mapping):
        return {_replace(k, pattern, mapping): _replace(v, pattern, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace(v, pattern, mapping) for v in value]
    return value


def by_text(mapping: Mapping[uuid.UUID, str]) -> dict[str, str]:
    """The mapping keyed by the ids' text, as ``substitute`` wants it (build it once per batch)."""
    return {str(user_id): pseudonym for user_id, pseudonym in mapping.items()}


def substitute(event: dict[str, Any], texts: Mapping[str, str], skip: Iterable[str] = ("id",)) -> dict[str, Any]:
    """``event`` with every occurrence of a mapped user id (any letter case) replaced by its pseudonym.

    ``texts`` is ``by_text(mapping)``, built once per batch. One pattern for any UUID, then a lookup:
    linear in the event whatever the batch's size (a pattern built from the mapping made batches quadratic).
    """
    if not texts:
        return event
    kept = set(skip)
    return {key: value if key in kept else _replace(value, _ANY_UUID, texts) for key, value in event.items()}


def clean_string(value: str) -> str:
    """A string PostgreSQL and UTF-8 can hold: NUL and lone surrogates become U+FFFD."""
    if value.isascii():  # no surrogate: only NUL to look for (most strings, at a fraction of the cost)
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    return _SURROGATE.sub("\ufffd", value)


def clean_text(value: Any, depth: int = 0) -> Any:
    """Strings PostgreSQL and UTF-8 can hold: NUL and lone surrogates become U+FFFD, at any depth."""
    if depth > 20:
        return None
    if isinstance(value, str):
        return clean_string(value)
    if isinstance(value, Mapping):
        return {clean_text(k, depth + 1): clean_text(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_text(v, depth + 1) for v in value]
    return value
