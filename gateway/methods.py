"""The methods each public path has, so that any other method is a 405 with a true ``Allow``.

The gateway answers it itself, before authentication and rate limiting: the answer depends only on the
path template, never on who asks, so it reveals nothing. The table is checked against the services' real
OpenAPI document by ``tests/gateway/test_openapi.py``; a path that matches none of its templates is a 404,
also before authentication (the API reference lists every path).
"""

from __future__ import annotations

import functools

from starlette.types import Receive, Scope, Send

from common.errors import problem_response

# path template -> methods (HEAD is implied by GET: every GET route also answers HEAD).
PUBLIC_METHODS: dict[str, tuple[str, ...]] = {
    "/api/v1/auth/register": ("POST",),
    "/api/v1/auth/login": ("POST",),
    "/api/v1/auth/login/mfa": ("POST",),
    "/api/v1/auth/mfa": ("GET",),
    "/api/v1/auth/mfa/totp/enrol": ("POST",),
    "/api/v1/auth/mfa/totp/confirm": ("POST",),
    "/api/v1/auth/mfa/recovery-codes": ("POST",),
    "/api/v1/auth/mfa/totp/disable": ("POST",),
    "/api/v1/auth/me/consent": ("GET", "PATCH"),
    "/api/v1/auth/me/devices": ("GET",),
    "/api/v1/auth/me/devices/{device_id}": ("DELETE",),
    "/api/v1/auth/token/refresh": ("POST",),
    "/api/v1/auth/password-reset/request": ("POST",),
    "/api/v1/auth/password-reset/confirm": ("POST",),
    "/api/v1/auth/.well-known/jwks.json": ("GET",),
    "/api/v1/auth/logout": ("POST",),
    "/api/v1/auth/logout-all": ("POST",),
    "/api/v1/auth/sessions": ("GET",),
    "/api/v1/auth/sessions/{session_id}": ("DELETE",),
    "/api/v1/auth/me": ("GET", "PATCH", "DELETE"),
    "/api/v1/auth/me/password": ("POST",),
    "/api/v1/auth/me/export": ("GET",),
    "/api/v1/auth/otp/request": ("POST",),
    "/api/v1/auth/otp/verify": ("POST",),
    "/api/v1/auth/admin/users": ("GET",),
    "/api/v1/auth/admin/users/{user_id}": ("PATCH",),
    "/api/v1/auth/admin/users/{user_id}/unlock": ("POST",),
    "/api/v1/products": ("GET", "POST"),
    "/api/v1/products/{product_id}": ("GET", "PATCH"),
    "/api/v1/products/{product_id}/stock": ("GET",),
    "/api/v1/products/{product_id}/stock-adjustments": ("POST",),
    "/api/v1/products/{product_id}/stock-movements": ("GET",),
    "/api/v1/products/{product_id}/images": ("POST",),
    "/api/v1/products/{product_id}/images/{image_id}": ("GET",),
    "/api/v1/orders": ("GET", "POST"),
    "/api/v1/orders/{order_id}": ("GET",),
    "/api/v1/orders/{order_id}/cancel": ("POST",),
    "/api/v1/orders/{order_id}/confirm": ("POST",),
    "/api/v1/orders/{order_id}/ship": ("POST",),
    "/api/v1/orders/{order_id}/deliver": ("POST",),
    "/api/v1/audit/events": ("GET",),
    "/api/v1/audit/verify": ("GET",),
    "/api/v1/audit/checkpoints": ("GET", "POST"),
    "/api/v1/audit/alerts": ("GET",),
    "/api/v1/audit/alerts/{alert_id}/resolve": ("POST",),
}


def _segments(path: str) -> tuple[str, ...]:
    # No stripping: "/api/v1/products/" has an empty last segment and matches no template.
    return tuple(path.split("/")[1:])


# By segment count, literal templates first: a request path is matched against a handful of tuples.
_BY_LENGTH: dict[int, list[tuple[tuple[str, ...], frozenset[str], str]]] = {}
for _template, _methods in sorted(PUBLIC_METHODS.items(), key=lambda item: item[0].count("{")):
    _allowed = frozenset(_methods) | ({"HEAD"} if "GET" in _methods else set())
    _order = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
    _header = ", ".join(m for m in _order if m in _allowed)
    _BY_LENGTH.setdefault(len(_segments(_template)), []).append((_segments(_template), _allowed, _header))


def allowed_methods(path: str) -> tuple[frozenset[str], str] | None:
    """The methods of the public path template ``path`` matches, and its ``Allow`` value; None if unknown."""
    # Asked on every request: the answers for the paths asked most (short ones) are remembered.
    return _remembered(path) if len(path) <= _REMEMBERED_LENGTH else _allowed_methods(path)


_REMEMBERED_LENGTH = 200


def _allowed_methods(path: str) -> tuple[frozenset[str], str] | None:
    parts = _segments(path)
    for template, allowed, header in _BY_LENGTH.get(len(parts), ()):
        if all(t == p or (t.startswith("{") and p) for t, p in zip(template, parts, strict=True)):
            return allowed, header
    return None


_remembered = functools.lru_cache(maxsize=4096)(_allowed_methods)


async def method_not_allowed(scope: Scope, receive: Receive, send: Send, allow: str) -> None:
    await problem_response(
        405,
        scope=scope,
        detail="This method is not supported on this path; the Allow header lists the ones that are.",
        headers={"Allow": allow},
    )(scope, receive, send)
