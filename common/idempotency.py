"""Idempotent requests: the fingerprint that tells a retry (same lines) from a reused key (other lines)."""

from __future__ import annotations

import hashlib
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
    reservation id each remember it, and refuse the same key or id with other lines.

    The text hashed is ``json.dumps([[str(product_id), quantity], ...], separators=(",", ":"))`` (hashes
    stored before are compared with new ones), written without the JSON encoder: a UUID's text needs no
    escaping and an int is its decimal digits."""
    canonical = ",".join([f'["{line.product_id}",{int(line.quantity)}]' for line in lines])
    return hashlib.sha256(f"[{canonical}]".encode()).hexdigest()
