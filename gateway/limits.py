"""Rate limits (fixed windows, limits parsed and keyed by the ``limits`` library): per client IP when
anonymous, per user when authenticated, plus tighter per-route limits. In this process's memory by default;
Redis when ``REDIS_URL`` is set, so that several gateway workers and replicas share the counters.

The check runs on every request, so both storages are the gateway's own (``MemoryCounters`` here,
``RedisCounters``): ``limits``' memory storage took an ``asyncio.Lock`` and started a new expiry task on
every hit (measured: about a sixth of the gateway's CPU per request); the keys stay ``limits``' own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import structlog
from limits import RateLimitItem, parse
from limits.aio.storage import RedisStorage, Storage
from limits.limits import safe_string
from prometheus_client import Counter

from gateway.config import GatewaySettings
from gateway.redis_counters import RedisCounters
from gateway.routes import is_public

log = structlog.get_logger("gateway.limits")

RATE_LIMITED = Counter("comptoir_gateway_rate_limited_total", "Requests refused with 429.", ["route"])
STORAGE_ERRORS = Counter(
    "comptoir_gateway_rate_limit_storage_errors_total", "Rate-limit checks that could not reach the storage (Redis)."
)


class LimitStorageUnavailable(Exception):
    pass


class Decision(NamedTuple):
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


class MemoryCounters:
    """Fixed-window counters in this process's memory: the three calls ``RateLimits`` makes, without awaiting
    anything. A window starts with its first hit and lasts ``expiry`` seconds, as in ``limits``' storages.
    Expired windows are dropped whenever the table has doubled since the last sweep (never a live one: that
    would hand its client a fresh allowance)."""

    def __init__(self, clock: Callable[[], float] = time.time, *, sweep_size: int = 1024) -> None:
        self.clock = clock
        self._windows: dict[str, list[float]] = {}  # key -> [count, expires at]
        self._sweep_size = self._sweep_at = sweep_size

    async def incr(self, key: str, expiry: int) -> int:
        now = self.clock()
        window = self._windows.get(key)
        if window is None or window[1] <= now:
            if len(self._windows) >= self._sweep_at:
                self._sweep(now)
            window = self._windows[key] = [0, now + expiry]
        window[0] += 1
        return int(window[0])

    async def get(self, key: str) -> int:
        window = self._windows.get(key)
        return int(window[0]) if window is not None and window[1] > self.clock() else 0

    async def get_expiry(self, key: str) -> float:
        window = self._windows.get(key)
        return window[1] if window is not None else self.clock()

    async def check(self) -> bool:
        return True

    def _sweep(self, now: float) -> None:
        self._windows = {key: window for key, window in self._windows.items() if window[1] > now}
        self._sweep_at = max(self._sweep_size, 2 * len(self._windows))


def key_prefix_suffix(item: RateLimitItem, scope: str) -> tuple[str, str]:
    """``item.key_for(scope, identity) == prefix + identity + suffix`` for any ``str`` identity, without
    rebuilding the key from its parts on every request."""
    prefix = "/".join([item.namespace, safe_string(scope), ""])
    suffix = "/".join(["", str(item.amount), str(item.multiples), item.GRANULARITY.name])
    return prefix, suffix


Counters = Storage | RedisCounters | MemoryCounters


def make_storage(redis_url: str) -> Counters:
    if not redis_url:
        return MemoryCounters()
    scheme, sep, rest = redis_url.partition("://")
    if scheme in ("redis", "rediss"):
        return RedisCounters(redis_url)  # the same keys, at a tenth of redis-py's CPU per call
    return RedisStorage(f"async+{scheme}{sep}{rest}", implementation="redispy")


class RateLimits:
    def __init__(self, settings: GatewaySettings, storage: Counters | None = None) -> None:
        self.enabled = settings.rate_limits_enabled
        self.storage = storage or make_storage(settings.redis_url)
        # Fixed windows: the window's end, once known, is remembered so that a hit costs one storage call
        # (one Redis round trip) instead of the three of FixedWindowRateLimiter.hit + get_window_stats.
        self._resets: dict[str, float] = {}
        self.anonymous = parse(settings.anonymous_rate_limit)
        self.authenticated = parse(settings.authenticated_rate_limit)
        self.routes = parse_route_limits(settings.route_rate_limits)
        # A route anyone may call (login, register, reset...) is limited per client address whatever
        # credentials come with the request: keyed by the caller's user, each account an address opened
        # would have bought it a fresh allowance on these routes.
        self._by_address = {route: is_public(*route) for route in self.routes}
        self._keys: dict[tuple[RateLimitItem, str], tuple[str, str]] = {}
        self._global_rule = {
            flag: (item, *key_prefix_suffix(item, "all"))
            for flag, item in ((True, self.authenticated), (False, self.anonymous))
        }
        self._limited_all = RATE_LIMITED.labels("all")

    async def check(
        self, method: str, path: str, identity: str, *, authenticated: bool, address: str | None = None
    ) -> Decision | None:
        """Count this request; the most restrictive applicable limit decides. None when disabled.
        ``address`` (the client's address key, ``ip:...``) keys the limit of a public route when given;
        ``identity`` keys the rest."""
        if not self.enabled:
            return None
        item, prefix, suffix = self._global_rule[authenticated]
        route_item = self.routes.get((method, path)) if self.routes else None
        try:
            decision = await self._hit(item, prefix + identity + suffix)
            if route_item is None:  # the common case: one limit applies
                if not decision.allowed:
                    self._limited_all.inc()
                return decision
            decisions = [decision]
            if decision.allowed:
                scope = f"{method} {path}"
                parts = self._keys.get((route_item, scope))
                if parts is None:
                    parts = self._keys[(route_item, scope)] = key_prefix_suffix(route_item, scope)
                route_key = address if address is not None and self._by_address[(method, path)] else identity
                decisions.append(await self._hit(route_item, parts[0] + route_key + parts[1]))
        except Exception as exc:  # the storage library raises its driver's errors
            log.error("gateway.rate_limit_storage_unavailable", error=type(exc).__name__)
            STORAGE_ERRORS.inc()
            raise LimitStorageUnavailable from exc
        denied = [d for d in decisions if not d.allowed]
        if denied:
            RATE_LIMITED.labels(path).inc()
            return denied[0]
        return min(decisions, key=lambda d: (d.remaining, -d.reset_seconds))

    async def _hit(self, item: RateLimitItem, key: str) -> Decision:
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
