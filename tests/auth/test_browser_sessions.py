"""Browser session mode with a real cookie jar (httpx's, which applies Secure and the cookie attributes):
the refresh token lives in a __Host- cookie, cookie refreshes need an allowed Origin and the CSRF token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http.cookiejar import Cookie
from typing import Any

import httpx

from tests.auth.conftest import PASSWORD, AuthClient, MakeAuth
from tests.conftest import assert_problem
from tests.support.tokens import bearer

ORIGIN = "https://shop.example.cm"
REFRESH = "__Host-comptoir-refresh"
CSRF = "__Host-comptoir-csrf"
DEVICE = "__Host-comptoir-device"


@asynccontextmanager
async def browser(auth: AuthClient) -> AsyncIterator[httpx.AsyncClient]:
    """A client with its own cookie jar, talking https to the same app (Secure cookies need it)."""
    transport = httpx.ASGITransport(app=auth.app, client=("203.0.113.7", 50001))
    async with httpx.AsyncClient(transport=transport, base_url="https://api.example.cm") as client:
        yield client


def jar(client: httpx.AsyncClient) -> dict[str, Cookie]:
    return {cookie.name: cookie for cookie in client.cookies.jar}


async def cookie_login(client: httpx.AsyncClient, email: str, **extra: Any) -> httpx.Response:
    return await client.post(
        "/api/v1/auth/login", json={"email": email, "password": PASSWORD, "session_mode": "cookie"} | extra
    )


async def test_cookie_login_puts_the_refresh_and_device_tokens_in_host_cookies(make_auth: MakeAuth) -> None:
    async with make_auth(browser_origins=[ORIGIN]) as auth, browser(auth) as client:
        user = await auth.register()
        response = await cookie_login(client, user["email"])
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["refresh_token"] is None
        assert body["device_token"] is None
        assert body["csrf_token"]
        assert (await auth.me(body["access_token"])).status_code == 200
        cookies = jar(client)
        assert set(cookies) == {REFRESH, CSRF, DEVICE}
        for name in (REFRESH, DEVICE, CSRF):
            cookie = cookies[name]
            assert cookie.secure
            assert cookie.path == "/"
            assert not cookie.domain_specified  # __Host-: bound to this host
        headers = response.headers.get_list("set-cookie")
        refresh_header = next(h for h in headers if h.startswith(REFRESH))
        for attribute in ("HttpOnly", "Secure", "SameSite=strict", "Path=/"):
            assert attribute.lower() in refresh_header.lower()
        csrf_header = next(h for h in headers if h.startswith(CSRF))
        assert "httponly" not in csrf_header.lower()
        assert cookies[CSRF].value == body["csrf_token"]


async def test_a_cookie_refresh_needs_the_origin_and_the_csrf_token_and_rotates_the_refresh_cookie(
    make_auth: MakeAuth,
) -> None:
    async with make_auth(browser_origins=[ORIGIN]) as auth, browser(auth) as client:
        user = await auth.register()
        csrf = (await cookie_login(client, user["email"])).json()["csrf_token"]
        first_refresh = jar(client)[REFRESH].value
        path = "/api/v1/auth/token/refresh"
        # A cross-site page: the cookies would be sent (if SameSite failed) but no Origin allowed, no token.
        for headers in (
            {},
            {"Origin": "https://evil.example"},
            {"Origin": ORIGIN},
            {"Origin": ORIGIN, "X-CSRF-Token": "guessed"},
            {"Origin": "https://evil.example", "X-CSRF-Token": csrf},
        ):
            refused = await client.post(path, headers=headers)
            assert assert_problem(refused, 403)["type"] == "urn:comptoir:problem:csrf-rejected"
        assert jar(client)[REFRESH].value == first_refresh  # nothing spent
        ok = await client.post(path, headers={"Origin": ORIGIN, "X-CSRF-Token": csrf})
        assert ok.status_code == 200, ok.text
        body = ok.json()
        assert body["refresh_token"] is None
        assert jar(client)[REFRESH].value != first_refresh
        assert body["csrf_token"] == csrf == jar(client)[CSRF].value  # the session's own: every tab holds it
        assert (await auth.me(body["access_token"])).status_code == 200
        # Another tab of the app (the same cookies, its own copy of the token) refreshes after this one.
        again = await client.post(path, headers={"Origin": ORIGIN, "X-CSRF-Token": csrf})
        assert again.status_code == 200, again.text
        # A spent refresh cookie replayed (stolen) ends the session, as in bearer mode.
        client.cookies.set(REFRESH, first_refresh, domain="api.example.cm", path="/")
        stolen = await client.post(path, headers={"Origin": ORIGIN, "X-CSRF-Token": again.json()["csrf_token"]})
        assert_problem(stolen, 401)
        assert await auth.events("auth.token.reuse_detected")


async def test_the_device_cookie_makes_the_browser_a_known_device(make_auth: MakeAuth) -> None:
    async with make_auth(browser_origins=[ORIGIN]) as auth, browser(auth) as client:
        user = await auth.register()
        assert (await cookie_login(client, user["email"])).status_code == 200
        for i in range(10):
            await auth.login(user["email"], "wrong guess here", headers={"X-Forwarded-For": f"198.51.100.{i}"})
        assert (await auth.login(user["email"])).status_code == 429  # unknown devices wait
        assert (await cookie_login(client, user["email"])).status_code == 200  # the browser does not
        assert (await auth.events("auth.login.succeeded"))[-1]["new_values"]["known_device"] is True


async def test_logout_clears_the_cookies_and_bearer_mode_is_unchanged(make_auth: MakeAuth) -> None:
    async with make_auth(browser_origins=[ORIGIN]) as auth, browser(auth) as client:
        user = await auth.register()
        access = (await cookie_login(client, user["email"])).json()["access_token"]
        out = await client.post("/api/v1/auth/logout", headers=bearer(access))
        assert out.status_code == 204
        assert REFRESH not in jar(client)
        assert CSRF not in jar(client)
        pair = await auth.tokens(user["email"])
        assert pair["refresh_token"]
        assert pair["device_token"]
        refreshed = await auth.refresh(pair["refresh_token"])
        assert refreshed.status_code == 200
        assert refreshed.json()["refresh_token"]
        assert "set-cookie" not in refreshed.headers


async def test_logout_all_clears_this_browsers_cookies_too(make_auth: MakeAuth) -> None:
    """Its session is among those ended: a refresh cookie left behind would only earn a 401 later."""
    async with make_auth(browser_origins=[ORIGIN]) as auth, browser(auth) as client:
        user = await auth.register()
        access = (await cookie_login(client, user["email"])).json()["access_token"]
        assert (await client.post("/api/v1/auth/logout-all", headers=bearer(access))).status_code == 204
        assert REFRESH not in jar(client)
        assert CSRF not in jar(client)


async def test_cookie_refresh_is_refused_when_no_origin_is_configured(auth: AuthClient) -> None:
    async with browser(auth) as client:
        user = await auth.register()
        csrf = (await cookie_login(client, user["email"])).json()["csrf_token"]
        refused = await client.post("/api/v1/auth/token/refresh", headers={"Origin": ORIGIN, "X-CSRF-Token": csrf})
        assert_problem(refused, 403)
        bad_mode = await client.post(
            "/api/v1/auth/login", json={"email": user["email"], "password": PASSWORD, "session_mode": "jar"}
        )
        assert_problem(bad_mode, 422)
