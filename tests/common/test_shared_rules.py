"""The rules several services share, written once in common/: keyset pages, idempotency fingerprints,
XAF bounds, cached service tokens and the audit actor."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from pydantic import BaseModel, ValidationError

from common.audit import Actor
from common.errors import BadRequest, ServiceUnavailable
from common.idempotency import request_hash
from common.money import MAX_PRICE_XAF, PriceXAF, price_range
from common.pagination import encode_cursor, number_before, page_of, time_key, time_key_after
from common.retries import retried
from common.service_tokens import CachedServiceTokens


@dataclass
class Row:
    created_at: datetime
    id: uuid.UUID


def test_a_time_keyed_page_carries_the_last_rows_key_only_when_more_follow() -> None:
    rows = [Row(datetime(2026, 12, 1, 12, n, tzinfo=UTC), uuid.uuid4()) for n in range(3)]
    page = page_of(rows, 2, lambda r: str(r.id), time_key)
    assert page.items == [str(rows[0].id), str(rows[1].id)]
    assert page.next_cursor is not None
    assert time_key_after(page.next_cursor) == (rows[1].created_at, rows[1].id)
    last = page_of(rows[:2], 2, lambda r: str(r.id), time_key)
    assert last.next_cursor is None


@pytest.mark.parametrize(
    "cursor", ["garbage", encode_cursor(["x", "y"]), encode_cursor(["2026-12-01T00:00:00+00:00"]), "\x00"]
)
def test_a_cursor_we_did_not_make_is_a_400(cursor: str) -> None:
    with pytest.raises(BadRequest):
        time_key_after(cursor)


def test_a_numbered_cursor_is_a_bigint_or_a_400() -> None:
    assert number_before(None) is None
    assert number_before("") is None
    assert number_before(encode_cursor(["42"])) == 42
    for bad in (["-1"], ["4.2"], ["9" * 20]):
        with pytest.raises(BadRequest):
            number_before(encode_cursor(bad))


@dataclass
class Line:
    product_id: uuid.UUID
    quantity: int


def test_the_request_fingerprint_depends_on_the_lines_and_their_order() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    assert request_hash([Line(a, 1), Line(b, 2)]) == request_hash([Line(a, 1), Line(b, 2)])
    assert request_hash([Line(a, 1), Line(b, 2)]) != request_hash([Line(a, 1), Line(b, 3)])
    assert request_hash([Line(a, 1), Line(b, 2)]) != request_hash([Line(b, 2), Line(a, 1)])


class Priced(BaseModel):
    price_xaf: PriceXAF


def test_prices_are_whole_xaf_within_the_shared_bound() -> None:
    assert Priced(price_xaf=MAX_PRICE_XAF).price_xaf == 10**12
    for bad in (MAX_PRICE_XAF + 1, -1, 1.5, "100"):
        with pytest.raises(ValidationError):
            Priced(price_xaf=bad)
    assert str(price_range("unit_price_xaf").sqltext) == "unit_price_xaf >= 0 AND unit_price_xaf <= 1000000000000"


class Counting(CachedServiceTokens):
    def __init__(self, clock: list[float]) -> None:
        super().__init__(clock=lambda: clock[0], refresh_margin_seconds=30)
        self.obtained: list[str] = []
        self.gate = asyncio.Event()

    async def _obtain(self, audience: str) -> tuple[str, float]:
        await self.gate.wait()
        self.obtained.append(audience)
        return f"token-{len(self.obtained)}", 300.0


async def test_service_tokens_are_shared_cached_and_renewed_before_they_expire() -> None:
    now = [1000.0]
    tokens = Counting(now)
    waiting = [asyncio.create_task(tokens.token_for("inventory")) for _ in range(3)]
    await asyncio.sleep(0)
    tokens.gate.set()
    assert await asyncio.gather(*waiting) == ["token-1"] * 3  # one request for the three callers
    now[0] += 269  # 31 s left: still good
    assert await tokens.headers_for("inventory") == {"Authorization": "Bearer token-1"}
    now[0] += 2  # 29 s left: inside the margin, renewed
    assert await tokens.token_for("inventory") == "token-2"
    tokens.forget("inventory")
    assert await tokens.token_for("inventory") == "token-3"
    assert tokens.obtained == ["inventory"] * 3


class Down(CachedServiceTokens):
    """A token source whose auth service can be taken down, or hung until ``answer`` is set."""

    def __init__(self, clock: list[float]) -> None:
        super().__init__(clock=lambda: clock[0], refresh_margin_seconds=30)
        self.up = True
        self.asked = 0
        self.answer = asyncio.Event()
        self.answer.set()

    async def _obtain(self, audience: str) -> tuple[str, float]:
        self.asked += 1
        await self.answer.wait()
        if not self.up:
            raise ServiceUnavailable("Could not obtain a service token from the auth service.")
        return f"token-{self.asked}", 300.0


async def test_while_auth_is_down_an_unexpired_token_is_used_and_then_the_failure_is_told() -> None:
    now = [1000.0]
    tokens = Down(now)
    assert await tokens.token_for("inventory") == "token-1"
    tokens.up = False
    now[0] += 280  # 20 s left: due for renewal, which fails; the token still works
    assert await tokens.token_for("inventory") == "token-1"
    assert await tokens.token_for("inventory") == "token-1"  # each later call tries auth again
    assert tokens.asked == 3
    now[0] += 17  # 3 s left: too little to use it
    with pytest.raises(ServiceUnavailable):
        await tokens.token_for("inventory")
    tokens.up = True  # auth is back: the very next call gets a token (no pause after a failure)
    assert await tokens.token_for("inventory") == "token-5"


async def test_callers_queued_behind_a_failing_request_share_its_failure() -> None:
    """auth hung and no usable token: one request waits on auth, not each caller in turn."""
    tokens = Down([1000.0])
    tokens.up = False
    tokens.answer.clear()
    callers = [asyncio.create_task(tokens.token_for("orders")) for _ in range(5)]
    await asyncio.sleep(0)
    tokens.answer.set()
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(outcome, ServiceUnavailable) for outcome in outcomes)
    assert tokens.asked == 1
    tokens.up = True
    assert await tokens.token_for("orders") == "token-2"


async def test_callers_do_not_wait_for_a_renewal_while_the_token_it_replaces_still_works() -> None:
    now = [1000.0]
    tokens = Counting(now)
    tokens.gate.set()
    assert await tokens.token_for("inventory") == "token-1"
    tokens.gate.clear()  # auth hangs
    now[0] += 280  # due for renewal
    renewal = asyncio.create_task(tokens.token_for("inventory"))
    await asyncio.sleep(0)
    assert await tokens.token_for("inventory") == "token-1"  # not queued behind the hung renewal
    tokens.gate.set()
    assert await renewal == "token-2"


def test_an_actor_saved_with_an_intent_comes_back_the_same() -> None:
    actor = Actor(id="u1", role="staff", context={"ip": "203.0.113.7", "request_id": "r1"})
    assert Actor.restore(actor.save()) == actor
    assert Actor.restore(None) == Actor(id=None, role=None)
    event = actor.event("orders", "orders.order.created", resource_type="order", resource_id="o1", new={"n": 1})
    assert (event.service, event.actor_id, event.actor_role, event.ip, event.request_id) == (
        "orders",
        "u1",
        "staff",
        "203.0.113.7",
        "r1",
    )
    assert event.new_values == {"n": 1}


class Flaky:
    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "done"


async def test_retried_tries_again_only_what_it_is_told_to() -> None:
    flaky = Flaky([ValueError(), ValueError()])
    assert await retried(flaky, ValueError, attempts=3, first_wait=0) == "done"
    assert flaky.calls == 3
    gives_up = Flaky([ValueError("first"), ValueError("second"), ValueError("third")])
    with pytest.raises(ValueError, match="second"):
        await retried(gives_up, ValueError, attempts=2, first_wait=0)
    assert gives_up.calls == 2  # attempts counts the bare first try
    other = Flaky([KeyError()])
    with pytest.raises(KeyError):
        await retried(other, ValueError, attempts=5, first_wait=0)
    assert other.calls == 1
    hooked = Flaky([ValueError(), KeyError()])
    assert await retried(
        hooked, lambda exc: 0.0 if isinstance(exc, KeyError) else True, attempts=None, first_wait=0
    ) == ("done")
    assert hooked.calls == 3
