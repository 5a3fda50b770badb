"""Rate limits (``limits`` library): per client IP when anonymous, per user when authenticated, plus
tighter per-route limits. Memory storage by default; Redis when ``REDIS_URL`` is set, so that several
gateway replicas share the counters.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import structlog
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from prometheus_client import Counter

from gateway.config import GatewaySettings
from gateway.redis_counters import RedisCounters

log = structlog.get_logger("gateway.limits")

RATE_LIMITED = Counter("comptoir_gateway_rate_limited_total", "Requests refused with 429.", ["route"])
STORAGE_ERRORS = Counter(
    "comptoir_gateway_rate_limit_storage_errors_total", "Rate-limit checks that could not reach the storage (Redis)."
)


class LimitStorageUnavailable(Exception):
    pass


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_seconds: int

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"ratelimit-limit", str(self.limit).encode()),
            (b"ratelimit-remaining", str(self.remaining).encode()),
            (b"ratelimit-reset", str(self.reset_seconds).encode()),
        ]
        if not self.allowed:
            headers.append((b"retry-after", str(max(1, self.reset_seconds)).encode()))
        return headers


def parse_route_limits(spec: str) -> dict[tuple[str, str], RateLimitItem]:
    """``"POST /api/v1/auth/login=10/minute; ..."`` -> {(method, path): item}."""
    rules: dict[tuple[str, str], RateLimitItem] = {}
    for part in (p.strip() for p in spec.split(";") if p.strip()):
        target, _, limit = part.partition("=")
        method, _, path = target.strip().partition(" ")
        if not limit or not path:
            raise ValueError(f"bad route rate limit {part!r}: expected 'METHOD /path=N/period'")
        rules[(method.strip().upper(), path.strip())] = parse(limit.strip())
    return rules


def make_storage(redis_url: str) -> Storage | RedisCounters:
    if not redis_url:
        return MemoryStorage()
    scheme, sep, rest = redis_url.partition("://")
    if scheme in ("redis", "rediss"):
        return RedisCounters(redis_url)  # the same keys, at a tenth of redis-py's CPU per call
    return RedisStorage(f"async+{scheme}{sep}{rest}", implementation="redispy")


class RateLimits:
    def __init__(self, settings: GatewaySettings, storage: Storage | RedisCounters | None = None) -> None:
        self.enabled = settings.rate_limits_enabled
        self.storage = storage or make_storage(settings.redis_url)
        # Fixed windows: the window's end, once known, is remembered so that a hit costs one storage call
        # (one Redis round trip) instead of the three of FixedWindowRateLimiter.hit + get_window_stats.
        self._resets: dict[str, float] = {}
        self.anonymous = parse(settings.anonymous_rate_limit)
        self.authenticated = parse(settings.authenticated_rate_limit)
        self.routes = parse_route_limits(settings.route_rate_limits)

    async def check(self, method: str, path: str, identity: str, *, authenticated: bool) -> Decision | None:
        """Count this request; the most restrictive applicable limit decides. None when disabled."""
        if not self.enabled:
            return None
        rules = [(self.authenticated if authenticated else self.anonymous, "all")]
        route_item = self.routes.get((method, path))
        if route_item is not None:
            rules.append((route_item, f"{method} {path}"))
        decisions = []
        try:
            for item, scope in rules:
                decision = await self._hit(item, scope, identity)
                decisions.append(decision)
                if not decision.allowed:
                    break
        except Exception as exc:  # the storage library raises its driver's errors
            log.error("gateway.rate_limit_storage_unavailable", error=type(exc).__name__)
            STORAGE_ERRORS.inc()
            raise LimitStorageUnavailable from exc
        denied = [d for d in decisions if not d.allowed]
        if denied:
            RATE_LIMITED.labels(path if route_item is not None else "all").inc()
            return denied[0]
        return min(decisions, key=lambda d: (d.remaining, -d.reset_seconds))

    async def _hit(self, item: RateLimitItem, scope: str, identity: str) -> Decision:
        key = item.key_for(scope, identity)
        count = await self.storage.incr(key, item.get_expiry())
        now = time.time()
        reset_at = self._resets.get(key)
        if reset_at is None or reset_at <= now or count == 1:  # unknown, or a new window started
            reset_at = await self.storage.get_expiry(key)
            if len(self._resets) >= 100_000:
                self._resets.clear()
            self._resets[key] = reset_at
        remaining = max(0, item.amount - count)
        return Decision(count <= item.amount, item.amount, remaining, max(0, math.ceil(reset_at - now)))

    async def aclose(self) -> None:
        if isinstance(self.storage, RedisCounters):
            await self.storage.aclose()

    async def healthy(self) -> bool:
        try:
            return bool(await self.storage.check())
        except Exception:
            return False
