"""Pure ASGI middlewares used by every process (no per-request framework objects on the hot path).

They sit *outside* Starlette's ServerErrorMiddleware (see ``common.app``), so 500s, 404s and the
413/415 answers produced here all carry the request id and the security headers.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.errors import problem_response
from common.logging import access_logged, log_access
from common.metrics import HTTP_LATENCY, HTTP_REQUESTS

REQUEST_ID_HEADER = b"x-request-id"
_REQUEST_ID_RE = re.compile(rb"^[A-Za-z0-9][A-Za-z0-9._:-]{7,127}$")

access_log = structlog.get_logger("comptoir.access")

# Probes and pollers: successful requests to these paths are counted in metrics but not logged.
QUIET_PATHS = ("/healthz", "/readyz", "/metrics", "/internal/revocations")


# The first hex digit of a UUID's variant field, its top two bits set to 10 (RFC 9562).
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


class _RequestIds:
    """Random (version 4) UUIDs drawn from a buffer refilled 256 at a time: one getrandom call per 256
    requests instead of one each."""

    _BATCH = 256

    def __init__(self) -> None:
        self._buffer = b""
        self._offset = 0
        os.register_at_fork(after_in_child=self._forget)  # a forked child must never reuse our ids

    def _forget(self) -> None:
        self._buffer, self._offset = b"", 0

    def __call__(self) -> str:
        if self._offset >= len(self._buffer):
            self._buffer, self._offset = os.urandom(16 * self._BATCH), 0
        offset = self._offset
        self._offset = offset + 16
        # The hex of a version 4 UUID, written directly (uuid.UUID's constructor checks cost more than this):
        # the version nibble is 4 and the variant's two top bits are 10.
        h = self._buffer[offset : offset + 16].hex()
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


new_request_id = _RequestIds()


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


class RequestContextMiddleware:
    """Request id (echo a well-formed one, else a new UUID), structured access log and metrics."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        service: str,
        quiet_paths: Iterable[str] = QUIET_PATHS,
        security: SecurityHeaders | None = None,
    ) -> None:
        self.app = app
        self.service = service
        # ``standard_stack`` hands the security headers to this layer: one pass over the answer's headers
        # instead of a second middleware that copies them again.
        self.security = security
        self.quiet_paths = frozenset(quiet_paths)
        self._metric_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = header(scope, REQUEST_ID_HEADER)
        request_id = sent.decode("ascii") if sent and _REQUEST_ID_RE.match(sent) else new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        rid_bytes = request_id.encode("ascii")
        status = 500
        started = time.perf_counter()

        security = self.security

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                scope["comptoir.response_started"] = True
                if status in _WITHOUT_CONTENT:
                    # No content, so no content type (FastAPI's JSON response class sets one on a 204).
                    message["headers"] = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"content-type"]
                if security is not None:
                    message["headers"] = security.apply(message.get("headers", ()), rid_bytes)
                else:
                    headers = [(k, v) for k, v in message.get("headers", ()) if k != REQUEST_ID_HEADER]
                    headers.append((REQUEST_ID_HEADER, rid_bytes))
                    message["headers"] = headers
            await send(message)

        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            # Starlette re-raises after its handler has logged the error and sent the 500; anything
            # else never got an answer, so answer and log it here.
            if not _response_started(scope):
                await problem_response(500, scope=scope, detail="An unexpected error occurred.")(
                    scope, receive, send_wrapper
                )
                access_log.error("http.unhandled_exception", exc_info=exc, path=scope.get("path"))
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or scope.get("comptoir.route") or "unmatched"
            method = scope.get("method", "GET")
            key = (method, template, status)
            children = self._metric_children.get(key)
            if children is None:  # labels() is a locked dict lookup; cache the children per key
                children = (
                    HTTP_REQUESTS.labels(self.service, method, template, str(status)),
                    HTTP_LATENCY.labels(self.service, method, template),
                )
                if len(self._metric_children) < 10_000:
                    self._metric_children[key] = children
            children[0].inc()
            children[1].observe(elapsed)
            if (status >= 400 or scope.get("path") not in self.quiet_paths) and access_logged():
                log_access(
                    method=method,
                    # A path that names a person (GDPR export/erasure) is logged as its template.
                    path=template if "{user_id}" in template else scope.get("path"),
                    route=template,
                    status=status,
                    duration_ms=round(elapsed * 1000, 2),
                    # The client the gateway resolved (behind a trusted proxy, the X-Forwarded-For hop), else the peer.
                    client=scope.get("comptoir.client_ip") or (scope.get("client") or ("", 0))[0],
                )
            structlog.contextvars.unbind_contextvars("request_id")


_WITHOUT_CONTENT = frozenset({204, 304})


def _response_started(scope: Scope) -> bool:
    return bool(scope.get("comptoir.response_started"))


def security_headers(*, hsts_seconds: int | None) -> list[tuple[bytes, bytes]]:
    """The response headers every answer carries (values from DESIGN.md, Mozilla Observatory A+)."""
    headers = [
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
        (b"referrer-policy", b"strict-origin-when-cross-origin"),
        (
            b"permissions-policy",
            b"accelerometer=(), autoplay=(), camera=(), display-capture=(), fullscreen=(), geolocation=(), "
            b"gyroscope=(), magnetometer=(), microphone=(), midi=(), payment=(), usb=()",
        ),
        (b"cross-origin-opener-policy", b"same-origin"),
        (b"cross-origin-resource-policy", b"same-origin"),
        # The legacy XSS auditor is itself an XSS vector; "0" is OWASP's current advice.
        (b"x-xss-protection", b"0"),
    ]
    if hsts_seconds:
        headers.append((b"strict-transport-security", b"max-age=%d; includeSubDomains" % hsts_seconds))
    return headers


class SecurityHeaders:
    """The security headers every answer carries, and no ``Server`` header.

    ``Cache-Control: no-store`` is the default; a route that serves cacheable public data (images,
    catalogue) sets its own ``Cache-Control`` and keeps it.
    """

    # A route may declare these itself (public images are embeddable cross-origin); the rest are forced.
    OVERRIDABLE = frozenset({b"cross-origin-resource-policy"})

    def __init__(self, *, hsts_seconds: int | None = None) -> None:
        self.headers = security_headers(hsts_seconds=hsts_seconds)
        self.forced = frozenset(name for name, _ in self.headers if name not in self.OVERRIDABLE) | {b"server"}
        self.defaults = [(name, value) for name, value in self.headers if name in self.OVERRIDABLE]
        self.always = [(name, value) for name, value in self.headers if name not in self.OVERRIDABLE]
        self._watched = self.OVERRIDABLE | {b"cache-control"}

    def apply(self, raw: Iterable[tuple[bytes, bytes]], request_id: bytes | None = None) -> list[tuple[bytes, bytes]]:
        """The answer's headers, names lower-cased, with the forced ones replaced, the defaults added when the
        answer has none of its own and, when given, ``request_id`` as the one ``X-Request-ID``."""
        forced, watched = self.forced, self._watched
        headers: list[tuple[bytes, bytes]] = []
        present: set[bytes] | None = None
        for name, value in raw:
            name = name.lower()
            if name in forced or (request_id is not None and name == REQUEST_ID_HEADER):
                continue
            if name in watched:
                if present is None:
                    present = set()
                present.add(name)
            headers.append((name, value))
        if request_id is not None:
            headers.append((REQUEST_ID_HEADER, request_id))
        headers.extend(self.always)
        if present is None:
            headers.extend(self.defaults)
            headers.append((b"cache-control", b"no-store"))
        else:
            headers.extend((name, value) for name, value in self.defaults if name not in present)
            if b"cache-control" not in present:
                headers.append((b"cache-control", b"no-store"))
        return headers


# HTTP versions whose request bodies are announced by Content-Length or Transfer-Encoding (not HTTP/2 or 3).
_FRAMED_BY_HEADERS = frozenset({"1.0", "1.1"})


class BodyLimitMiddleware:
    """413 before a body over the limit is read: by Content-Length, or while a chunked body streams.

    ``limits`` maps path patterns to their own limit (image uploads); other requests get ``default``.
    When a streamed body crosses the limit, this middleware answers 413 itself and tells the app the
    client disconnected (frameworks turn exceptions raised while reading a body into a 400).
    """

    def __init__(self, app: ASGIApp, *, default: int, limits: Iterable[tuple[str, int]] = ()) -> None:
        self.app = app
        self.default = default
        self.limits = [(re.compile(pattern), limit) for pattern, limit in limits]

    def limit_for(self, path: str) -> int:
        for pattern, limit in self.limits:
            if pattern.match(path):
                return limit
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared: bytes | None = None
        streamed = False
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                if declared is None:
                    declared = value
            elif key == b"transfer-encoding":
                streamed = True
        if declared is None and not streamed and scope.get("http_version") in _FRAMED_BY_HEADERS:
            # HTTP/1.x: a request with neither header has no body (RFC 9112, 6.3), so there is nothing to count.
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        if declared is not None:
            try:
                too_large = int(declared) > limit
            except ValueError:
                await problem_response(400, scope=scope, detail="Invalid Content-Length header.")(scope, receive, send)
                return
            if too_large:
                await _too_large(scope, receive, send, limit)
                return

        received = 0
        started = False
        answered = False

        async def limited_receive() -> Message:
            nonlocal received, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if started:
                        return {"type": "http.disconnect"}
                    answered = True
                    await _too_large(scope, receive, send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if answered:
                return  # the 413 has been sent; whatever the app says now goes nowhere
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except Exception:
            if not answered:
                raise


async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    response = problem_response(
        413,
        scope=scope,
        detail=f"The request body exceeds the limit of {limit} bytes for this route.",
        headers={"Connection": "close"},
    )
    await response(scope, receive, send)


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _media_type(value: bytes) -> str:
    return value.split(b";", 1)[0].strip().lower().decode("latin-1")


class ContentTypeMiddleware:
    """415 for a request body that is not JSON (or multipart on the routes that take uploads)."""

    def __init__(self, app: ASGIApp, *, multipart_paths: str | None = None) -> None:
        self.app = app
        self.multipart = re.compile(multipart_paths) if multipart_paths else None

    def allowed(self, path: str, media_type: str) -> bool:
        if media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json")):
            return True
        return media_type == "multipart/form-data" and self.multipart is not None and bool(self.multipart.match(path))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in _BODY_METHODS and _has_body(scope):
            content_type = header(scope, b"content-type")
            if content_type is None or not self.allowed(scope["path"], _media_type(content_type)):
                response = problem_response(415, scope=scope, detail="Send the request body as application/json.")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _has_body(scope: Scope) -> bool:
    length = header(scope, b"content-length")
    if length is not None:
        return length.strip() not in (b"0", b"")
    return header(scope, b"transfer-encoding") is not None


# The gateway's deadline for a forwarded request (epoch seconds), so that a service does not run a request
# the gateway has already answered 504 (it sat unread while the service was stopped, hung or starved).
DEADLINE_HEADER = b"x-comptoir-deadline"
# How far the gateway's and a service's clocks may differ (NTP keeps hosts far closer).
DEADLINE_TOLERANCE_SECONDS = 2.0


class DeadlineMiddleware:
    """A request whose gateway deadline has passed is not run: nobody waits for its answer any more, and
    its effects would surprise the client that retried (a refresh token rotated twice looks stolen)."""

    def __init__(self, app: ASGIApp, *, clock: Any = time.time) -> None:
        self.app = app
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = header(scope, DEADLINE_HEADER) if scope["type"] == "http" else None
        if raw is not None:
            try:
                late = self.clock() - float(raw)
            except ValueError:
                late = 0.0
            if late > DEADLINE_TOLERANCE_SECONDS:
                access_log.warning("http.deadline_passed", path=scope.get("path"), late_seconds=round(late, 3))
                detail = "The gateway stopped waiting for this request before it was handled; it was not run."
                await problem_response(504, scope=scope, detail=detail)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def standard_stack(
    app: ASGIApp,
    *,
    service: str,
    hsts_seconds: int | None,
    max_body_bytes: int,
    body_limits: Iterable[tuple[str, int]] = (),
    multipart_paths: str | None = None,
    content_type_check: bool = True,
) -> Any:
    """Wrap ``app`` in the standard middlewares, outermost first: context and headers, (behind the gateway)
    the request's deadline, size, type."""
    inner: ASGIApp = ContentTypeMiddleware(app, multipart_paths=multipart_paths) if content_type_check else app
    inner = BodyLimitMiddleware(inner, default=max_body_bytes, limits=body_limits)
    if service != "gateway":
        inner = DeadlineMiddleware(inner)
    # The security headers are applied by the request-context layer, in the same pass as the request id.
    return RequestContextMiddleware(inner, service=service, security=SecurityHeaders(hsts_seconds=hsts_seconds))
