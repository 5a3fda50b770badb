"""CORS with an explicit origin allowlist: exact matches only, never ``*``, never ``null``."""

from __future__ import annotations

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
