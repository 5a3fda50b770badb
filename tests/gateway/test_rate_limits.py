"""The gateway's in-memory rate-limit counters and its keys (the end-to-end limits are in test_security.py)."""

from __future__ import annotations

import asyncio

import pytest
from limits import parse

from gateway.config import GatewaySettings
from gateway.limits import MemoryCounters, RateLimits, key_prefix_suffix, make_storage


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("spec", ["100/hour", "5/minute", "2/5 seconds", "1000000000/hour", "10/day"])
@pytest.mark.parametrize("scope", ["all", "POST /api/v1/auth/login"])
@pytest.mark.parametrize("identity", ["ip:192.0.2.1", "ip:2001:db8::1", "user:8f14e45f-ceea-467f-a0e6-6a1f8b2f6c11"])
def test_keys_are_the_ones_limits_itself_makes(spec: str, scope: str, identity: str) -> None:
    """Workers and replicas share counters in Redis by key: the precomputed key must be limits' own."""
    item = parse(spec)
    prefix, suffix = key_prefix_suffix(item, scope)
    assert prefix + identity + suffix == item.key_for(scope, identity)


def test_an_empty_redis_url_counts_in_memory() -> None:
    assert isinstance(make_storage(""), MemoryCounters)


def test_a_window_counts_from_its_first_hit_and_starts_again_when_it_ends() -> None:
    clock = Clock()
    counters = MemoryCounters(clock)

    async def scenario() -> None:
        assert [await counters.incr("k", 60) for _ in range(3)] == [1, 2, 3]
        assert await counters.get_expiry("k") == clock.now + 60
        assert await counters.get("k") == 3
        clock.now += 59.9
        assert await counters.incr("k", 60) == 4  # still the same window
        clock.now += 0.1
        assert await counters.get("k") == 0  # the window has ended
        assert await counters.incr("k", 60) == 1
        assert await counters.get_expiry("k") == clock.now + 60
        assert await counters.get_expiry("never-hit") == clock.now
        assert await counters.check() is True

    asyncio.run(scenario())


def test_a_sweep_drops_ended_windows_and_never_a_live_one() -> None:
    clock = Clock()
    counters = MemoryCounters(clock, sweep_size=100)

    async def scenario() -> None:
        for n in range(90):
            await counters.incr(f"old:{n}", 10)
        clock.now += 5
        for n in range(10):
            await counters.incr(f"live:{n}", 3600)
            await counters.incr(f"live:{n}", 3600)
        clock.now += 5  # the old windows have ended, the live ones have not
        assert len(counters._windows) == 100
        await counters.incr("new", 3600)  # the table is at its sweep size: swept before this insert
        assert sorted(counters._windows) == sorted([*(f"live:{n}" for n in range(10)), "new"])
        assert all([await counters.get(f"live:{n}") == 2 for n in range(10)])
        assert await counters.incr("live:7", 3600) == 3
        # The next sweep waits until the table has doubled (or reached the sweep size).
        assert counters._sweep_at == 100

    asyncio.run(scenario())


def test_one_limit_then_the_tighter_route_limit_decides() -> None:
    settings = GatewaySettings(
        environment="test",
        anonymous_rate_limit="3/hour",
        route_rate_limits="POST /api/v1/auth/login=2/minute",
    )

    async def scenario() -> None:
        limits = RateLimits(settings)
        seen = [await limits.check("GET", "/api/v1/products", "ip:192.0.2.1", authenticated=False) for _ in range(4)]
        assert [d.allowed for d in seen if d is not None] == [True, True, True, False]
        assert [d.remaining for d in seen if d is not None] == [2, 1, 0, 0]
        denied = seen[3]
        assert denied is not None
        assert dict(denied.headers())[b"retry-after"] == str(denied.reset_seconds).encode()
        assert 3599 <= denied.reset_seconds <= 3600
        # Another client has its own window; on the login route the per-route limit is the tighter one.
        login = [
            await limits.check("POST", "/api/v1/auth/login", "ip:192.0.2.2", authenticated=False) for _ in range(3)
        ]
        assert [(d.allowed, d.limit, d.remaining) for d in login if d is not None] == [
            (True, 2, 1),
            (True, 2, 0),
            (False, 2, 0),
        ]
        assert login[2] is not None
        assert login[2].reset_seconds <= 60

    asyncio.run(scenario())
