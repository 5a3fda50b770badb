"""Browser session mode through the real gateway over real HTTP, with a real cookie jar.

The test plays the browser and the TLS-terminating proxy in front of the gateway (the deployment the
system supports: TLS_TERMINATING_PROXY, the proxy's address in TRUSTED_PROXIES, X-Forwarded-Proto).
The cookie jar sends Secure cookies to this loopback address, as browsers do for localhost.
"""

from __future__ import annotations

import uuid
from http.cookiejar import Cookie, CookieJar, DefaultCookiePolicy
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import new_system
from tests.support.accounts import CONSENT

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery staple 42"
ORIGIN = "https://shop.example.cm"
BEHIND_TLS = {"X-Forwarded-Proto": "https", "Origin": ORIGIN}


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    running = new_system(Path(tmp_path_factory.mktemp("browser")))
    running.env["AUTH_PBKDF2_ROUNDS"] = "1000"  # a cost setting, lowered through the setting users have
    running.env["AUTH_BROWSER_ORIGINS"] = f'["{ORIGIN}"]'
    running.env["CORS_ALLOWED_ORIGINS"] = ORIGIN
    running.env["TRUSTED_PROXIES"] = "127.0.0.1/32"
    running.env["TLS_TERMINATING_PROXY"] = "true"
    running.start()
    try:
        yield running
    finally:
        assert running.stop() == 0


class BrowserJar:
    """A cookie jar that, like a browser on localhost, treats this loopback connection as secure.

    (httpx copies a client's jar into one with the default policy on every request, which would drop
    Secure cookies over http://; event hooks apply this jar instead.)"""

    def __init__(self) -> None:
        self.cookies = httpx.Cookies(CookieJar(policy=DefaultCookiePolicy(secure_protocols=("https", "wss", "http"))))

    def send(self, request: httpx.Request) -> None:
        self.cookies.set_cookie_header(request)

    def receive(self, response: httpx.Response) -> None:
        self.cookies.extract_cookies(response)

    def names(self) -> set[str]:
        return {cookie.name for cookie in self.cookies.jar}

    def get(self, name: str) -> Cookie:
        return next(cookie for cookie in self.cookies.jar if cookie.name == name)


def browser(gateway: str, jar: BrowserJar) -> httpx.Client:
    return httpx.Client(
        base_url=gateway, headers=BEHIND_TLS, event_hooks={"request": [jar.send], "response": [jar.receive]}
    )


def test_cookie_login_refresh_and_logout_through_the_gateway(system) -> None:  # noqa: ANN001
    gateway = system.url()
    email = f"browser-{uuid.uuid4().hex[:10]}@boutique.cm"
    jar = BrowserJar()
    with browser(gateway, jar) as client:
        created = client.post(
            "/api/v1/auth/register",
            json={"email": email, "password": PASSWORD} | CONSENT,
        )
        assert created.status_code == 201, created.text
        login = client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD, "session_mode": "cookie"})
        assert login.status_code == 200, login.text
        assert login.headers["access-control-allow-origin"] == ORIGIN
        assert login.headers["access-control-allow-credentials"] == "true"
        body = login.json()
        assert body["refresh_token"] is None
        assert jar.names() == {"__Host-comptoir-refresh", "__Host-comptoir-csrf", "__Host-comptoir-device"}
        assert all(jar.get(name).secure and jar.get(name).path == "/" for name in jar.names())
        set_cookies = login.headers.get_list("set-cookie")
        refresh_header = next(h for h in set_cookies if h.startswith("__Host-comptoir-refresh="))
        assert "httponly" in refresh_header.lower()
        assert "samesite=strict" in refresh_header.lower()

        # The browser's preflight for the CSRF header is allowed for this origin.
        preflight = client.options(
            "/api/v1/auth/token/refresh",
            headers={"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "x-csrf-token"},
        )
        assert preflight.status_code in (200, 204), preflight.text
        assert "x-csrf-token" in preflight.headers["access-control-allow-headers"]

        refused = client.post("/api/v1/auth/token/refresh")
        assert refused.status_code == 403
        assert refused.json()["type"] == "urn:comptoir:problem:csrf-rejected"
        before = jar.get("__Host-comptoir-refresh").value
        refreshed = client.post("/api/v1/auth/token/refresh", headers={"X-CSRF-Token": body["csrf_token"]})
        assert refreshed.status_code == 200, refreshed.text
        after = jar.get("__Host-comptoir-refresh").value
        assert after != before
        access = refreshed.json()["access_token"]
        me = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {access}"})
        assert me.status_code == 200
        assert me.json()["email"] == email

        out = client.post("/api/v1/auth/logout", headers={"Authorization": f"Bearer {access}"})
        assert out.status_code == 204
        assert jar.names() == {"__Host-comptoir-device"}
        # The next login from this browser is a known device (its cookie went back by itself).
        again = client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD, "session_mode": "cookie"})
        assert again.status_code == 200


def test_a_second_factor_login_goes_through_the_gateway(system) -> None:  # noqa: ANN001
    """Enrol an authenticator, then sign in: the gateway lets the anonymous second step through to auth."""
    import pyotp

    gateway = system.url()
    email = f"mfa-{uuid.uuid4().hex[:10]}@boutique.cm"
    with httpx.Client(base_url=gateway, headers={"X-Forwarded-Proto": "https"}) as client:
        body = {"email": email, "password": PASSWORD} | CONSENT
        assert client.post("/api/v1/auth/register", json=body).status_code == 201
        access = client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD}).json()["access_token"]
        bearer = {"Authorization": f"Bearer {access}"}
        secret = client.post("/api/v1/auth/mfa/totp/enrol", headers=bearer).json()["secret"]
        confirmed = client.post(
            "/api/v1/auth/mfa/totp/confirm",
            json={"password": PASSWORD, "code": pyotp.TOTP(secret).now()},
            headers=bearer,
        )
        assert confirmed.status_code == 200, confirmed.text
        recovery = confirmed.json()["recovery_codes"]

        challenge = client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
        assert challenge.status_code == 401
        assert challenge.json()["type"].endswith("mfa-required")
        # A recovery code, not the app's: the app's current code was just spent on the confirmation.
        done = client.post(
            "/api/v1/auth/login/mfa", json={"mfa_token": challenge.json()["mfa_token"], "code": recovery[0]}
        )
        assert done.status_code == 200, done.text
        me = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {done.json()['access_token']}"})
        assert me.json()["email"] == email
        again = client.post(
            "/api/v1/auth/login/mfa", json={"mfa_token": challenge.json()["mfa_token"], "code": recovery[0]}
        )
        assert again.status_code == 401, "a challenge and a recovery code are single use"
