"""CORS with an explicit origin allowlist: exact matches only, never ``*``, never ``null``."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

ALLOWED_METHODS = b"GET, POST, PATCH, PUT, DELETE, OPTIONS"
ALLOWED_HEADERS = frozenset(
    {
        b"authorization",
        b"content-type",
        b"idempotency-key",
        b"x-request-id",
        b"accept",
        b"accept-language",
        b"x-csrf-token",  # browser session mode: the double-submit token of POST /api/v1/auth/token/refresh
        b"if-none-match",  # a conditional read of the catalogue (304)
    }
)
# Every response header the API reference documents that a page could not read otherwise (a test holds
# this to the OpenAPI document): the idempotent replay, the ETag, the 401's challenge, the 405's methods.
EXPOSED_HEADERS = (
    b"X-Request-ID, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, Retry-After, Location, ETag, "
    b"Idempotent-Replayed, WWW-Authenticate, Allow"
)


class Cors:
    def __init__(self, origins: frozenset[str], *, allow_credentials: bool, max_age: int) -> None:
        self.origins = frozenset(o.encode("ascii") for o in origins)
        self.allow_credentials = allow_credentials
        self.max_age = str(max_age).encode()

    def allowed(self, origin: bytes | None) -> bool:
        # Exact, case-insensitive comparison of the whole origin: "https://shop.example.com.evil.tld"
        # and "null" are simply not in the set.
        return origin is not None and origin.lower() in self.origins

    def response_headers(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"access-control-allow-origin", origin),
            (b"access-control-expose-headers", EXPOSED_HEADERS),
        ]
        if self.allow_credentials:
            headers.append((b"access-control-allow-credentials", b"true"))
        return headers

    def preflight_headers(self, origin: bytes, requested_headers: bytes | None) -> list[tuple[bytes, bytes]] | None:
        """Headers for an allowed preflight, or None when a requested header is not allowed."""
        asked = [h.strip().lower() for h in (requested_headers or b"").split(b",") if h.strip()]
        if any(h not in ALLOWED_HEADERS for h in asked):
            return None
        return [
            *self.response_headers(origin),
            (b"access-control-allow-methods", ALLOWED_METHODS),
            (b"access-control-allow-headers", b", ".join(sorted(ALLOWED_HEADERS))),
            (b"access-control-max-age", self.max_age),
        ]


class CorsOnEveryAnswer:
    """The outermost layer of the gateway: an allowed origin's answer carries the CORS headers whoever made
    it. The pipeline adds them to what it answers, but a body too large (413), a type refused (415), a path
    outside the route table, the gateway's own health and OpenAPI answers are made elsewhere, and without
    them a browser hands the page a network error instead of the documented problem."""

    def __init__(self, app: ASGIApp, cors: Cors) -> None:
        self.app = app
        self.cors = cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = None
        if scope["type"] == "http":
            origin = next((v for k, v in scope.get("headers", ()) if k == b"origin"), None)
        if origin is None or not self.cors.allowed(origin):
            await self.app(scope, receive, send)
            return
        cors_headers = self.cors.response_headers(origin)

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(k.lower() == b"access-control-allow-origin" for k, _ in headers):
                    headers.extend(cors_headers)
                    if not any(k.lower() == b"vary" and b"origin" in v.lower() for k, v in headers):
                        headers.append((b"vary", b"Origin"))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, sending)
