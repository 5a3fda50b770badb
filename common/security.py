"""Who is calling: FastAPI dependencies every service uses (services verify tokens themselves).

- ``CurrentUser``: a valid user access token (signature, iss, aud, time, type) whose session is not
  revoked; ``RequireStaff`` / ``RequireAdmin`` add a minimum role.
- ``require_service("orders", ...)``: internal endpoints accept only service tokens minted for this
  service (aud = its name) and only from the named callers. A user token is never a service token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

import structlog
from fastapi import Depends, Request

from common.audit import record_denial
from common.errors import Forbidden, TokenRejected, Unauthorized
from common.state import state_of
from common.tokens import Claims, InvalidToken, TokenVerifier

log = structlog.get_logger("comptoir.security")


def bearer_token(request: Request) -> str | None:
    values = request.headers.getlist("authorization")
    if not values:
        return None
    if len(values) > 1:
        raise TokenRejected("Send one Authorization header, not several.")
    value = values[0]
    scheme, _, token = value.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer":
        # Another scheme is no bearer token at all: the bare challenge, without an error code (RFC 6750 §3.1).
        raise Unauthorized("Send a bearer access token.")
    if not token or " " in token:
        raise TokenRejected("The Authorization header must be 'Bearer <token>'.")
    return token


async def _verify(request: Request, verifier: TokenVerifier) -> Claims:
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("Authentication required.")
    try:
        return await verifier.verify(token)
    except InvalidToken as exc:
        log.info("security.token_rejected", reason=exc.reason, path=request.url.path)
        raise TokenRejected("The access token is invalid or expired.") from exc


async def current_user(request: Request) -> Claims:
    state = state_of(request)
    claims = await _verify(request, state.access_verifier)
    if await state.is_revoked(claims):
        raise TokenRejected("The session has been revoked.")
    request.state.principal = claims
    return claims


async def optional_user(request: Request) -> Claims | None:
    """Public routes: anonymous is fine, but a token that is present must be valid."""
    if request.headers.get("authorization") is None:
        return None
    return await current_user(request)


def require_role(minimum: str) -> Callable[[Request, Claims], Awaitable[Claims]]:
    async def dependency(request: Request, claims: Annotated[Claims, Depends(current_user)]) -> Claims:
        if not claims.has_role(minimum):
            # A customer trying staff routes is what the audit trail is for: recorded, then refused.
            await record_denial(request, claims, "access.denied", {"required_role": minimum, "role": claims.role})
            raise Forbidden(f"This action needs the {minimum} role.")
        return claims

    return dependency


CurrentUser = Annotated[Claims, Depends(current_user)]
OptionalUser = Annotated[Claims | None, Depends(optional_user)]
RequireStaff = Annotated[Claims, Depends(require_role("staff"))]
RequireAdmin = Annotated[Claims, Depends(require_role("admin"))]


def require_service(*callers: str) -> Callable[[Request], Awaitable[Claims]]:
    allowed = frozenset(callers)

    async def dependency(request: Request) -> Claims:
        claims = await _verify(request, state_of(request).service_verifier)
        if claims.sub not in allowed:
            await record_denial(request, claims, "internal.denied", {"caller": claims.sub[:64]})
            raise Forbidden("This caller may not use this endpoint.")
        request.state.principal = claims
        return claims

    return dependency
