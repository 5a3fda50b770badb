"""Public path prefix -> upstream service; ``/internal`` is never routed, however it is spelled."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from gateway.config import GatewaySettings

# Image uploads are the only multipart routes; they get the larger body limit.
IMAGE_UPLOAD_PATH = r"^/api/v1/products/[^/]+/images/?$"


@dataclass(frozen=True)
class Route:
    prefix: str
    upstream: str


def route_table() -> list[Route]:
    return [
        Route("/api/v1/auth", "auth"),
        Route("/api/v1/products", "inventory"),
        Route("/api/v1/orders", "orders"),
        Route("/api/v1/audit", "audit"),
    ]


def upstream_urls(settings: GatewaySettings) -> dict[str, str]:
    return {
        "auth": settings.auth_url,
        "inventory": settings.inventory_url,
        "orders": settings.orders_url,
        "audit": settings.audit_url,
    }


# No public route needs an encoded byte, a backslash, a dot segment or a doubled slash in its path,
# so such paths are refused outright instead of normalised: nothing can smuggle "/internal/" past us.
_OBFUSCATED = re.compile(r"%|\\|//|(^|/)\.{1,2}(/|$)")


def is_forbidden_path(path: str, raw_path: bytes | None) -> bool:
    # Asked on every request: the answers for the paths asked most (short ones) are remembered.
    if len(path) <= 200 and (raw_path is None or len(raw_path) <= 200):
        return _forbidden_remembered(path, raw_path)
    return _is_forbidden_path(path, raw_path)


def _is_forbidden_path(path: str, raw_path: bytes | None) -> bool:
    raw = raw_path.decode("latin-1") if raw_path is not None else path
    for candidate in (raw, path):
        if _OBFUSCATED.search(candidate) or "internal" in candidate.lower().split("/"):
            return True
    return False


_forbidden_remembered = functools.lru_cache(maxsize=4096)(_is_forbidden_path)

_UUIDISH = r"[^/]+"
# Routes that need no access token (a token that is present must still be valid).
PUBLIC_ROUTES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (method, re.compile(pattern))
    for method, pattern in (
        ("POST", r"^/api/v1/auth/register$"),
        ("POST", r"^/api/v1/auth/login$"),
        ("POST", r"^/api/v1/auth/login/mfa$"),
        ("POST", r"^/api/v1/auth/token/refresh$"),
        ("POST", r"^/api/v1/auth/password-reset/request$"),
        ("POST", r"^/api/v1/auth/password-reset/confirm$"),
        ("GET", r"^/api/v1/auth/\.well-known/jwks\.json$"),
        ("GET", r"^/api/v1/products$"),
        ("GET", rf"^/api/v1/products/{_UUIDISH}$"),
        ("GET", rf"^/api/v1/products/{_UUIDISH}/images/{_UUIDISH}$"),
    )
)


def is_public(method: str, path: str) -> bool:
    method = "GET" if method == "HEAD" else method
    return any(m == method and pattern.match(path) for m, pattern in PUBLIC_ROUTES)


def match(routes: list[Route], path: str) -> Route | None:
    for route in routes:
        if path == route.prefix or path.startswith(route.prefix + "/"):
            return route
    return None
