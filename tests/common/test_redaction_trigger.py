"""The quick test that decides whether a string is searched for secrets says what the trigger pattern says,
for every string: a secret it missed would be stored or logged in clear."""

from __future__ import annotations

import random
import uuid

from common.logging import _TRIGGER, _may_hold_secret, redact_text

PIECES = [
    "bearer",
    "BEARER",
    "BeArEr",
    "basic",
    "BASIC",
    "baſic",  # U+017F: 's' under IGNORECASE
    "\u212a",  # KELVIN SIGN: 'k' under IGNORECASE
    "eyJ",
    "EYJ",
    "eyj",
    "=",
    '"',
    "'",
    "token",
    "x",
    " ",
    "/api/v1/orders",
    "é",
    "198.51.100.7",
]


def test_the_quick_test_agrees_with_the_trigger_pattern_on_every_string() -> None:
    rng = random.Random(42)
    samples = [str(uuid.uuid4()), str(uuid.uuid4()).upper(), "", "customer", "POST", "bench/1"]
    samples += ["".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 5))) for _ in range(5000)]
    samples += ["".join(rng.choice(PIECES)[: rng.randrange(1, 7)] for _ in range(3)) for _ in range(5000)]
    alphabet = "abcdeIJKLMNOPrsty='\" /.:-_0123456789ſıİKé"  # letters that fold to ASCII ones, too
    for _ in range(20_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        samples += [text, text + "BeArEr", "bAsIc" + text, text + "EYj", text.upper()]
    for text in samples:
        assert _may_hold_secret(text) == (_TRIGGER.search(text) is not None), repr(text)


def test_secrets_are_still_redacted_in_ascii_and_in_other_text() -> None:
    jwt = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlc2lnbmF0dXJl"
    for text in (f"Authorization: BEARER {jwt}", f"é {jwt}", "password=hunter2", "baſic dXNlcjpwYXNz"):
        assert "[REDACTED]" in redact_text(text), text
    assert redact_text(str(uuid.UUID(int=7))) == str(uuid.UUID(int=7))
