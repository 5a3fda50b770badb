"""The forwarding hot path: raw ASGI in, a pool of keep-alive connections per upstream out.

Measured on this machine (DESIGN.md, README): a pooled aiohttp session is ~5x faster than httpx here,
and the gateway's own httptools client (``common.upstream``) cheaper again, so the hot path uses the
latter; answers are streamed back chunk by chunk, never buffered whole. The aiohttp sessions serve the
gateway's low-volume calls (aggregated health, OpenAPI).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import structlog
from prometheus_client import Counter, Gauge
from starlette.types import Receive, Scope, Send

from common.errors import problem_response
from common.upstream import BadResponse, ConnectFailed, UpstreamPool, UpstreamTimeout
from gateway.config import GatewaySettings
from gateway.routes import Route, upstream_urls

log = structlog.get_logger("gateway.proxy")

UPSTREAM_FAILURES = Counter(
    "comptoir_gateway_upstream_failures_total", "Requests the gateway could not forward.", ["upstream", "status"]
)
CIRCUIT_OPEN = Gauge("comptoir_gateway_circuit_open", "1 while the upstream's circuit breaker is open.", ["upstream"])

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Headers a client may never set for the services: only the gateway speaks them.
GATEWAY_OWNED_PREFIXES = (
    b"x-forwarded-",
    b"x-real-ip",
    b"x-user-",
    b"x-client-",
    b"forwarded",
    b"x-comptoir-",
)
_DROP_REQUEST = HOP_BY_HOP | {b"host", b"content-length", b"expect"}
_DROP_RESPONSE = HOP_BY_HOP | {b"server", b"date", b"x-request-id"}
_CHUNK = 64 * 1024


def _connection_listed(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    listed: set[bytes] = set()
    for key, value in headers:
        if key == b"connection":
            listed.update(token.strip().lower() for token in value.split(b","))
    return listed


class Circuit:
    """Consecutive connect failures or timeouts open the circuit; after a pause one probe may pass."""

    def __init__(
        self, threshold: int, open_seconds: float, clock: Callable[[], float] = time.monotonic, name: str = ""
    ) -> None:
        self.name = name
        self.threshold = threshold
        self.open_seconds = open_seconds
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self.probing = False

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def allow(self) -> bool:
        if self.opened_at is None:
            return True
        if not self.probing and self.clock() - self.opened_at >= self.open_seconds:
            self.probing = True
            return True
        return False

    def success(self) -> None:
        if self.opened_at is not None:
            CIRCUIT_OPEN.labels(self.name).set(0)
        self.failures, self.opened_at, self.probing = 0, None, False

    def failure(self) -> None:
        self.failures += 1
        self.probing = False
        if self.failures >= self.threshold:
            self.opened_at = self.clock()
            CIRCUIT_OPEN.labels(self.name).set(1)


class Proxy:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.upstreams = upstream_urls(settings)
        self.circuits = {
            name: Circuit(settings.circuit_failure_threshold, settings.circuit_open_seconds, name=name)
            for name in self.upstreams
        }
        self.sessions: dict[str, aiohttp.ClientSession] = {}
        self.pools: dict[str, UpstreamPool] = {}
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            connect=settings.upstream_connect_timeout_seconds,
            sock_read=settings.upstream_timeout_seconds,
        )

    async def start(self) -> None:
        for name, url in self.upstreams.items():
            self.pools[name] = _pool_for(url, self.settings)
            connector = aiohttp.TCPConnector(
                limit=self.settings.upstream_pool_size, keepalive_timeout=30, enable_cleanup_closed=True
            )
            self.sessions[name] = aiohttp.ClientSession(
                connector=connector,
                timeout=self.timeout,
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )

    async def close(self) -> None:
        await asyncio.gather(*(session.close() for session in self.sessions.values()))
        await asyncio.gather(*(pool.close() for pool in self.pools.values()))
        self.sessions.clear()
        self.pools.clear()

    def _request_headers(self, scope: Scope, client_ip: str | None) -> list[tuple[bytes, bytes]]:
        raw: list[tuple[bytes, bytes]] = scope.get("headers", ())
        drop = _DROP_REQUEST | _connection_listed(raw)
        out: list[tuple[bytes, bytes]] = []
        for key, value in raw:
            if key in drop or key.startswith(GATEWAY_OWNED_PREFIXES) or b"\r" in value or b"\n" in value:
                continue
            out.append((key, value))
        if client_ip:
            out.append((b"x-forwarded-for", client_ip.encode("latin-1")))
        out.append((b"x-forwarded-proto", scope.get("scheme", "http").encode("latin-1")))
        request_id = scope.get("state", {}).get("request_id")
        if request_id:
            out.append((b"x-request-id", request_id.encode("latin-1")))
        return out

    async def forward(self, scope: Scope, receive: Receive, send: Send, route: Route, client_ip: str | None) -> None:
        circuit = self.circuits[route.upstream]
        if not circuit.allow():
            await self._fail(scope, receive, send, 503, route, "The upstream service is unavailable.")
            return
        body = await _read_body(receive)
        if body is None:
            return
        query: bytes = scope.get("query_string", b"")
        # Forbidden paths (percent-encodings included) were refused before, so path and raw path agree.
        target = scope.get("raw_path") or scope["path"].encode("latin-1")
        if query:
            target = target + b"?" + query
        pool = self.pools[route.upstream]
        try:
            upstream, conn = await pool.request(
                scope["method"].encode("latin-1"), target, self._request_headers(scope, client_ip), body
            )
        except UpstreamTimeout:
            circuit.failure()
            await self._fail(scope, receive, send, 504, route, "The upstream service did not answer in time.")
            return
        except ConnectFailed:
            circuit.failure()
            await self._fail(scope, receive, send, 503, route, "The upstream service is unavailable.")
            return
        except BadResponse:
            await self._fail(scope, receive, send, 502, route, "The upstream service gave an invalid answer.")
            return
        circuit.success()
        try:
            drop = _DROP_RESPONSE | _connection_listed(upstream.headers)
            headers = [(k, v) for k, v in upstream.headers if k not in drop]
            whole = upstream.body_if_complete()
            if whole is not None:
                if scope["method"] != "HEAD" and not any(k == b"content-length" for k, _ in headers):
                    headers.append((b"content-length", str(len(whole)).encode("ascii")))  # it was chunked
                await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
                await send({"type": "http.response.body", "body": whole, "more_body": False})
                return
            await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
            try:
                async for chunk in upstream.iter_chunks():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except (UpstreamTimeout, BadResponse) as exc:
                # The status line is gone; all that is left is to cut the answer short.
                log.warning("gateway.upstream_failed_mid_answer", upstream=route.upstream, error=type(exc).__name__)
                UPSTREAM_FAILURES.labels(route.upstream, "aborted").inc()
                raise
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            pool.release(conn)

    async def _fail(self, scope: Scope, receive: Receive, send: Send, status: int, route: Route, detail: str) -> None:
        log.warning("gateway.upstream_failed", upstream=route.upstream, status=status)
        UPSTREAM_FAILURES.labels(route.upstream, str(status)).inc()
        if scope.get("comptoir.response_started"):
            raise RuntimeError("upstream failed after the response started")
        await problem_response(status, scope=scope, detail=detail)(scope, receive, send)


def _pool_for(url: str, settings: GatewaySettings) -> UpstreamPool:
    return UpstreamPool.for_url(
        url,
        size=settings.upstream_pool_size,
        connect_timeout=settings.upstream_connect_timeout_seconds,
        read_timeout=settings.upstream_timeout_seconds,
    )


async def _read_body(receive: Receive) -> bytes | None:
    """The whole body (bounded by BodyLimitMiddleware), or None when the client went away before the end
    (or the limit was crossed and 413 already answered): a partial body is never forwarded."""
    chunks = []
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)
