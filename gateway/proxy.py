"""The forwarding hot path: raw ASGI in, a pool of keep-alive connections per upstream out.

Measured on this machine (DESIGN.md, README): a pooled aiohttp session is ~5x faster than httpx here,
and the gateway's own httptools client (``common.upstream``) cheaper again, so the gateway speaks HTTP
through that one client only: the forwarding here, its own small calls (``Proxy.fetch``: aggregated
health, OpenAPI) over the same pools, and JWKS, revocations, service tokens and security events over
``common.http.PooledTransport``. An answer of up to ``BUFFERED_ANSWER_BYTES`` is read whole and its upstream
connection given back before the client is written to (a client that does not read holds only its own
socket); a larger one is streamed back chunk by chunk.

Failures and what the client is told (README, "Upstream failures"):
- circuit open, connection refused or timed out, own pool full: 503 with ``Retry-After`` (transient);
- no status line within the request's deadline (``upstream_deadline_seconds``): 504; a buffered answer's
  body that stops (504) or breaks (502) before the head is sent: the same, without counting against the
  circuit;
- an answer that is not HTTP/1.1, a connection cut mid-answer, a TLS handshake refused: 502 without
  ``Retry-After``, and never sent again (it would not heal, or the request may have been applied).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

import structlog
from prometheus_client import Counter, Gauge
from starlette.types import Message, Receive, Scope, Send

from common.errors import problem_response
from common.middleware import DEADLINE_HEADER
from common.upstream import BadResponse, ConnectFailed, PoolExhausted, UpstreamPool, UpstreamTimeout
from gateway.config import GatewaySettings
from gateway.routes import Route, upstream_urls

# A 304 or 204 carries no length of its own (a 304's would be the 200's: RFC 9110 §8.6).
_NO_LENGTH = frozenset({204, 304})
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
_UNAVAILABLE = "The upstream service is unavailable."
_TOO_SLOW = "The upstream service did not answer in time."
_INVALID = "The upstream service gave an invalid answer."
# Answers up to this size are read whole before the client gets them (larger ones stream): see forward.
BUFFERED_ANSWER_BYTES = 256 * 1024


def with_headers(send: Send, extra: list[tuple[bytes, bytes]] | None) -> Send:
    """``send``, adding ``extra`` to the answer's headers (the list as it is when the answer starts)."""
    if extra is None:
        return send

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), *extra]
        await send(message)

    return sending


def _connection_listed(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    listed: set[bytes] = set()
    for key, value in headers:
        if key == b"connection":
            listed.update(token.strip().lower() for token in value.split(b","))
    return listed


def _dropped(always: frozenset[bytes], headers: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """``always`` and the headers a ``Connection`` header names (no new set when it names none)."""
    listed = _connection_listed(headers)
    return always | listed if listed else always


class CircuitOpen(Exception):
    """The circuit refuses the request; ``retry_after`` is how long until it admits a probe."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("the circuit is open")
        self.retry_after = retry_after


# How each way out of an upstream call counts for the circuit. Only signs that the upstream itself is
# unreachable or too slow count against it; what the gateway or its client did (a pool of its own that
# is full, a caller that went away, a cancellation) and answers that are broken rather than absent
# (a retry would not mend them, and an open circuit would announce them as "retry later") are neutral.
_FAILURES = (ConnectFailed, UpstreamTimeout)


class Attempt:
    """One admitted call, settled exactly once when its ``with`` block ends (``__exit__``): success
    when the block ends normally (the upstream answered), failure on ``ConnectFailed`` or
    ``UpstreamTimeout``, neutral on anything else (``BadResponse``, ``PoolExhausted``, cancellation).

    Calls admitted while the circuit is closed share one stateless instance, so the hot path allocates
    nothing; each half-open probe gets its own, so that a probe abandoned after its deadline and
    settled late cannot release a newer probe's slot."""

    __slots__ = ("circuit",)

    def __init__(self, circuit: Circuit) -> None:
        self.circuit = circuit

    def __enter__(self) -> Attempt:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, _tb: object) -> None:
        circuit = self.circuit
        if exc_type is None and circuit.opened_at is None:  # the hot path: answered while closed
            circuit.failures = 0
            return
        circuit.settle(self, exc_type)


class Circuit:
    """Per upstream: ``threshold`` consecutive failures open the circuit; after ``open_seconds`` one
    probe may pass (half-open). The probe's success closes the circuit, its failure opens it again, and
    a neutral end (or no end within ``probe_seconds``) frees the half-open slot for the next request.

    Every admitted call is settled through the ``Attempt`` that ``admit`` returns, used as a context
    manager, so there is no path on which a call is admitted and never settled."""

    def __init__(
        self,
        threshold: int,
        open_seconds: float,
        probe_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        name: str = "",
    ) -> None:
        self.name = name
        self.threshold = threshold
        self.open_seconds = open_seconds
        self.probe_seconds = probe_seconds
        self.clock = clock
        self.failures = 0
        self.opened_at: float | None = None
        self.probe: Attempt | None = None
        self.probe_expires = 0.0
        self._closed = Attempt(self)

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    @property
    def probing(self) -> bool:
        """A probe is out and still within its deadline."""
        return self.probe is not None and self.clock() < self.probe_expires

    def admit(self) -> Attempt:
        """The attempt to settle, or ``CircuitOpen``."""
        opened_at = self.opened_at
        if opened_at is None:
            return self._closed
        now = self.clock()
        reopens = opened_at + self.open_seconds
        if now < reopens:
            raise CircuitOpen(reopens - now)
        if self.probe is not None and now < self.probe_expires:
            raise CircuitOpen(self.probe_expires - now)
        if self.probe is not None:
            log.warning("gateway.circuit.probe_abandoned", upstream=self.name)
        self.probe = Attempt(self)
        self.probe_expires = now + self.probe_seconds
        return self.probe

    def settle(self, attempt: Attempt, error: type[BaseException] | None) -> None:
        """Called by an attempt's ``__exit__`` (which settles a success while closed itself, the hot path)."""
        if error is None:  # success: the upstream answered
            if self.opened_at is not None:
                CIRCUIT_OPEN.labels(self.name).set(0)
                log.info("gateway.circuit.closed", upstream=self.name)
                self.opened_at, self.probe = None, None
            self.failures = 0
        elif issubclass(error, _FAILURES):
            self.failures += 1
            if attempt is self.probe:
                self.probe = None
                self.opened_at = self.clock()  # half-open → open for another pause
            elif self.opened_at is None and self.failures >= self.threshold:
                self.opened_at = self.clock()
                CIRCUIT_OPEN.labels(self.name).set(1)
                log.warning("gateway.circuit.opened", upstream=self.name, failures=self.failures)
        elif attempt is self.probe:  # neutral: the next request may probe at once
            self.probe = None


class Proxy:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.upstreams = upstream_urls(settings)
        self.circuits = {
            name: Circuit(
                settings.circuit_failure_threshold,
                settings.circuit_open_seconds,
                settings.upstream_deadline_seconds,
                name=name,
            )
            for name in self.upstreams
        }
        self.pools: dict[str, UpstreamPool] = {}

    async def start(self) -> None:
        for name, url in self.upstreams.items():
            self.pools[name] = _pool_for(url, self.settings)

    async def close(self) -> None:
        await asyncio.gather(*(pool.close() for pool in self.pools.values()))
        self.pools.clear()

    async def fetch(self, upstream: str, path: str, *, timeout: float) -> tuple[int, bytes]:
        """The gateway's own ``GET`` to an upstream (health, OpenAPI), answer read whole within ``timeout``;
        ``UpstreamError`` or ``TimeoutError`` when it fails. It does not go through the circuit."""
        pool = self.pools[upstream]
        async with asyncio.timeout(timeout):
            response, conn = await pool.request(b"GET", path.encode("ascii"), [(b"accept", b"application/json")], b"")
            try:
                whole = response.body_if_complete()
                if whole is None:
                    whole = b"".join([chunk async for chunk in response.iter_chunks()])
            finally:
                pool.release(conn)
        return response.status, whole

    def _request_headers(self, scope: Scope, client_ip: str | None) -> list[tuple[bytes, bytes]]:
        raw: list[tuple[bytes, bytes]] = scope.get("headers", ())
        drop = _dropped(_DROP_REQUEST, raw)
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
        deadline = time.time() + self.settings.upstream_deadline_seconds
        out.append((DEADLINE_HEADER, b"%.3f" % deadline))
        return out

    async def forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        route: Route,
        client_ip: str | None,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Forward the request and stream the upstream's answer back. ``extra``: the gateway's own headers (CORS,
        rate limits), added to the upstream's answer here, and to the gateway's own answer when it fails."""
        # The body is read whole before the circuit is asked: a client that goes away mid-body was never
        # admitted, so it can neither hold the half-open slot nor count against the upstream.
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
            with self.circuits[route.upstream].admit():
                upstream, conn = await pool.request(
                    scope["method"].encode("latin-1"), target, self._request_headers(scope, client_ip), body
                )
        except CircuitOpen as exc:
            retry = str(max(1, math.ceil(exc.retry_after)))
            failed = with_headers(send, extra)
            await self._fail(scope, receive, failed, 503, route, "The upstream service is unavailable.", retry)
            return
        except UpstreamTimeout:
            failed = with_headers(send, extra)
            await self._fail(scope, receive, failed, 504, route, _TOO_SLOW)
            return
        except (ConnectFailed, PoolExhausted):
            await self._fail(scope, receive, with_headers(send, extra), 503, route, _UNAVAILABLE, "1")
            return
        except BadResponse:
            # Not transient as far as anyone can tell: no Retry-After, and the request is not sent again.
            failed = with_headers(send, extra)
            await self._fail(scope, receive, failed, 502, route, _INVALID)
            return
        released = False
        try:
            drop = _dropped(_DROP_RESPONSE, upstream.headers)
            headers = [(k, v) for k, v in upstream.headers if k not in drop]
            try:
                whole = upstream.body_if_complete()
                if whole is None:
                    whole = await upstream.whole_within(BUFFERED_ANSWER_BYTES)
            except (UpstreamTimeout, BadResponse) as exc:
                status, detail = (504, _TOO_SLOW) if isinstance(exc, UpstreamTimeout) else (502, _INVALID)
                await self._fail(scope, receive, with_headers(send, extra), status, route, detail)
                return
            if whole is not None:
                # Given back before the client is written to: a client that does not read its answers
                # (or reads them slowly) holds its own socket, never one of the upstream's connections.
                pool.release(conn)
                released = True
                if (
                    scope["method"] != "HEAD"
                    and upstream.status not in _NO_LENGTH
                    and not any(k == b"content-length" for k, _ in headers)
                ):
                    headers.append((b"content-length", str(len(whole)).encode("ascii")))  # it was chunked
                if extra:
                    headers.extend(extra)
                await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
                await send({"type": "http.response.body", "body": whole, "more_body": False})
                return
            if extra:
                headers.extend(extra)
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
            if not released:
                pool.release(conn)

    async def _fail(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        status: int,
        route: Route,
        detail: str,
        retry_after: str | None = None,
    ) -> None:
        log.warning("gateway.upstream_failed", upstream=route.upstream, status=status)
        UPSTREAM_FAILURES.labels(route.upstream, str(status)).inc()
        if scope.get("comptoir.response_started"):
            raise RuntimeError("upstream failed after the response started")
        headers = {"Retry-After": retry_after} if retry_after else None
        await problem_response(status, scope=scope, detail=detail, headers=headers)(scope, receive, send)


def _pool_for(url: str, settings: GatewaySettings) -> UpstreamPool:
    return UpstreamPool.for_url(
        url,
        size=settings.upstream_pool_size,
        connect_timeout=settings.upstream_connect_timeout_seconds,
        read_timeout=settings.upstream_timeout_seconds,
        deadline=settings.upstream_deadline_seconds,
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
