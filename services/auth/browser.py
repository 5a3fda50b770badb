"""Browser session mode: the refresh token never reaches JavaScript.

A login (or ``/login/mfa``) with ``"session_mode": "cookie"`` answers like any login, except that the
refresh token and the device token are not in the body but in cookies:

- ``__Host-comptoir-refresh``: HttpOnly, Secure, SameSite=Strict, Path=/ (the ``__Host-`` prefix
  requires Path=/ and no Domain, so the cookie is bound to the API's exact host; only
  ``POST /api/v1/auth/token/refresh`` reads it);
- ``__Host-comptoir-device``: HttpOnly, the device token (sent back on the next logins by itself);
- ``__Host-comptoir-csrf``: readable by the page, also given as ``csrf_token`` in the body.

``POST /token/refresh`` without a body (or without ``refresh_token``) is the cookie mode: it is accepted
only from an allowed ``Origin`` (``AUTH_BROWSER_ORIGINS``) and with an ``X-CSRF-Token`` header equal
to the CSRF cookie (double submit); each refresh rotates the refresh cookie (the CSRF token stays the
session's, so that every tab keeps a valid one). The access
token stays a bearer token in memory, so every other request is unaffected by cookies (no CSRF there).
Logout clears the cookies. Bearer mode for apps is unchanged.
"""

from __future__ import annotations

import hmac
import secrets

from fastapi import Request, Response

from common.errors import Forbidden
from services.auth.config import Settings
from services.auth.errors import InvalidRefreshToken
from services.auth.schemas import LoginResponse, TokenPair

REFRESH_COOKIE = "__Host-comptoir-refresh"
DEVICE_COOKIE = "__Host-comptoir-device"
CSRF_COOKIE = "__Host-comptoir-csrf"
CSRF_HEADER = "X-CSRF-Token"
CSRF_BYTES = 32


class CsrfRejected(Forbidden):
    slug = "csrf-rejected"
    title = "Cross-site request refused"


def _set(response: Response, name: str, value: str, max_age: int, *, http_only: bool = True) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", secure=True, httponly=http_only, samesite="strict")


def device_token_of(request: Request, given: str | None) -> str | None:
    """The device token of a login: the body's, else the browser's cookie."""
    return given if given is not None else request.cookies.get(DEVICE_COOKIE)


def set_session(
    response: Response, pair: TokenPair, settings: Settings, device_token: str | None = None, csrf: str | None = None
) -> str:
    """Put the refresh (and device) token in cookies; the CSRF token to hand to the page: a new one at a
    login, the session's own (``csrf``) at a refresh. Kept for the session, every tab of the app holds a
    valid one: the tabs share the cookies but each keeps its own copy of the token, and one tab's refresh
    must not lock the others out."""
    csrf = csrf or secrets.token_urlsafe(CSRF_BYTES)
    lifetime = pair.refresh_expires_in
    _set(response, REFRESH_COOKIE, pair.refresh_token or "", lifetime)
    _set(response, CSRF_COOKIE, csrf, lifetime, http_only=False)
    if device_token is not None:
        _set(response, DEVICE_COOKIE, device_token, settings.device_ttl_days * 86_400)
    return csrf


def finish_login(response: Response, answer: LoginResponse, settings: Settings, mode: str) -> LoginResponse:
    """In cookie mode, the tokens a script must not hold move from the body to cookies."""
    if mode != "cookie":
        return answer
    csrf = set_session(response, answer, settings, answer.device_token)
    return answer.model_copy(update={"refresh_token": None, "device_token": None, "csrf_token": csrf})


def check_cookie_request(request: Request, settings: Settings) -> str:
    """The refresh cookie of a request from an allowed origin that proves it read the CSRF cookie."""
    origin = (request.headers.get("origin") or "").lower()
    if not origin or origin not in {o.lower() for o in settings.browser_origins}:
        raise CsrfRejected("This origin may not use the session cookie.")
    header = request.headers.get(CSRF_HEADER) or ""
    cookie = request.cookies.get(CSRF_COOKIE) or ""
    if not header or not cookie or not hmac.compare_digest(header.encode(), cookie.encode()):
        raise CsrfRejected(f"The {CSRF_HEADER} header must repeat the CSRF cookie.")
    token = request.cookies.get(REFRESH_COOKIE)
    if not token or len(token) > 4096:
        raise InvalidRefreshToken()
    return token


def clear_session(response: Response) -> None:
    for name in (REFRESH_COOKIE, CSRF_COOKIE):
        response.delete_cookie(name, path="/", secure=True, httponly=name != CSRF_COOKIE, samesite="strict")
