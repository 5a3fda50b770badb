"""Idempotent requests: the fingerprint that tells a retry (same lines) from a reused key (other lines)."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from typing import Protocol


class Line(Protocol):
    @property
    def product_id(self) -> uuid.UUID: ...

    @property
    def quantity(self) -> int: ...


def request_hash(lines: Iterable[Line]) -> str:
    """SHA-256 of the (product, quantity) lines, in order: orders' Idempotency-Key and inventory's
    reservation id each remember it, and refuse the same key or id with other lines."""
    canonical = json.dumps([[str(line.product_id), line.quantity] for line in lines], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
