"""The request fingerprint is compared with fingerprints stored earlier: its hashed text never changes."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass

from common.idempotency import request_hash


@dataclass(frozen=True)
class Line:
    product_id: uuid.UUID
    quantity: int


def stored_form(lines: list[Line]) -> str:
    """The fingerprint as first defined: SHA-256 of the lines' compact JSON."""
    text = json.dumps([[str(line.product_id), line.quantity] for line in lines], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def test_the_fingerprint_is_the_sha256_of_the_lines_compact_json() -> None:
    cases = [
        [Line(uuid.uuid4(), 1)],
        [Line(uuid.uuid4(), n) for n in (1, 10_000, 42)],
        [Line(uuid.UUID(int=0), 7), Line(uuid.UUID(int=2**128 - 1), 9_999)],
        [Line(uuid.uuid4(), n % 10_000 + 1) for n in range(100)],
        [],
    ]
    for lines in cases:
        assert request_hash(lines) == stored_form(lines)
    # A value known from before the encoder was left out.
    known = [Line(uuid.UUID("00000000-0000-4000-8000-000000000001"), 3)]
    assert request_hash(known) == hashlib.sha256(b'[["00000000-0000-4000-8000-000000000001",3]]').hexdigest()
