"""GDPR access and erasure: auth's own data, and the other services asked with auth's service tokens."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt

from common.tokens import SERVICE, TokenVerifier
from tests.auth.conftest import PASSWORD, MakeAuth
from tests.conftest import assert_problem
from tests.support.tokens import ISSUER, bearer


@dataclass
class FakePeers:
    """The orders and audit services' internal endpoints, checking auth's service token like they would."""

    app: Any = None
    answers: dict[tuple[str, str], Callable[[], httpx.Response]] = field(default_factory=dict)
    calls: list[tuple[str, str, str]] = field(default_factory=list)

    async def handler(self, request: httpx.Request) -> httpx.Response:
        service = {8003: "orders", 8004: "audit"}[request.url.port or 0]
        token = request.headers["authorization"].removeprefix("Bearer ")
        verifier = TokenVerifier(
            self.app.state.auth.keys, issuer=ISSUER, audience=service, token_use=SERVICE, clock=self.app.state.clock
        )
        claims = await verifier.verify(token)
        assert claims.sub == "auth"
        kind = request.url.path.rsplit("/", 1)[-1]
        self.calls.append((service, request.method, request.url.path))
        answer = self.answers.get((service, kind))
        if answer is not None:
            return answer()
        if kind == "export":
            return httpx.Response(200, json={"service": service, "orders": [] if service == "orders" else None})
        return httpx.Response(204)


def down() -> httpx.Response:
    raise httpx.ConnectError("connection refused")


async def start(make_auth: MakeAuth, peers: FakePeers) -> Any:
    return make_auth(peer_transport=httpx.MockTransport(peers.handler))


async def test_export_gathers_everything_held_about_the_caller(make_auth: MakeAuth) -> None:
    peers = FakePeers(answers={("audit", "export"): lambda: httpx.Response(404)})
    async with make_auth(peer_transport=httpx.MockTransport(peers.handler)) as auth:
        peers.app = auth.app
        user, pair = await auth.user(phone="+237671234567", full_name="Awa")
        response = await auth.get("/api/v1/auth/me/export", pair["access_token"])
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["user"]["email"] == user["email"]
        assert body["user"]["full_name"] == "Awa"
        assert [s["id"] for s in body["sessions"]] == [
            jwt.decode(pair["access_token"], options={"verify_signature": False})["sid"]
        ]
        assert body["services"] == {"orders": {"service": "orders", "orders": []}, "audit": None}
        # What privacy.md lists as held: the account's dates and the second factor too.
        assert body["account"]["created_at"]
        assert body["account"]["last_login_at"]
        assert body["second_factor"] == {"totp_enabled": False, "recovery_codes_left": 0, "required": False}
        assert response.headers["cache-control"] == "no-store"
        assert PASSWORD not in response.text
        assert "password_hash" not in response.text
        uid = user["id"]
        assert peers.calls == [
            ("orders", "GET", f"/internal/users/{uid}/export"),
            ("audit", "GET", f"/internal/users/{uid}/export"),
        ]
        assert (await auth.events("auth.user.exported"))[0]["new_values"] == {
            "services": {"orders": True, "audit": False}
        }


async def test_export_with_a_service_down_is_503(make_auth: MakeAuth) -> None:
    peers = FakePeers(answers={("orders", "export"): down})
    async with make_auth(peer_transport=httpx.MockTransport(peers.handler)) as auth:
        peers.app = auth.app
        _, pair = await auth.user()
        assert_problem(await auth.get("/api/v1/auth/me/export", pair["access_token"]), 503)


async def test_erasure_anonymises_everywhere_and_frees_the_email(make_auth: MakeAuth) -> None:
    peers = FakePeers(answers={("audit", "erase"): lambda: httpx.Response(404)})
    async with make_auth(peer_transport=httpx.MockTransport(peers.handler)) as auth:
        peers.app = auth.app
        user, pair = await auth.user(phone="+237671234567", full_name="Awa")
        other = await auth.tokens(user["email"])
        response = await auth.client.request(
            "DELETE", "/api/v1/auth/me", json={"password": PASSWORD}, headers=bearer(pair["access_token"])
        )
        assert response.status_code == 204, response.text
        uid = user["id"]
        assert peers.calls == [
            ("orders", "POST", f"/internal/users/{uid}/erase"),
            ("audit", "POST", f"/internal/users/{uid}/erase"),
        ]
        row = (await auth.sql("SELECT * FROM auth.users WHERE id = $1::uuid", uid))[0]
        assert (row["email"], row["full_name"], row["phone"], row["password_hash"]) == (None, None, None, None)
        assert row["is_active"] is False
        assert row["erased_at"] is not None
        assert await auth.sql("SELECT 1 FROM auth.sessions WHERE user_id = $1::uuid", uid) == []
        for p in (pair, other):
            assert_problem(await auth.me(p["access_token"]), 401)
            assert_problem(await auth.refresh(p["refresh_token"]), 401)
        assert_problem(await auth.login(user["email"]), 401)
        # The revoked sessions are on the feed, so the gateway refuses their access tokens too.
        token = (
            await auth.client.post(
                "/internal/token",
                json={"client_id": "gateway", "client_secret": "gateway-secret-" + "x" * 32, "audience": "auth"},
            )
        ).json()["access_token"]
        feed = (await auth.get("/internal/revocations", token)).json()["items"]
        sids = {jwt.decode(p["access_token"], options={"verify_signature": False})["sid"] for p in (pair, other)}
        assert {item["sid"] for item in feed} == sids
        # The e-mail is free again, for a brand-new account.
        again = await auth.register(user["email"])
        assert again["id"] != uid
        erased = (await auth.events("auth.user.erased"))[0]
        assert erased["new_values"]["services"] == {"orders": "erased", "audit": "nothing held"}
        assert user["email"] not in json.dumps(erased)


async def test_erasure_needs_the_password(make_auth: MakeAuth) -> None:
    peers = FakePeers()
    async with make_auth(peer_transport=httpx.MockTransport(peers.handler)) as auth:
        peers.app = auth.app
        _, pair = await auth.user()
        response = await auth.client.request(
            "DELETE", "/api/v1/auth/me", json={"password": "not the password"}, headers=bearer(pair["access_token"])
        )
        assert_problem(response, 400)
        assert peers.calls == []
        assert (await auth.me(pair["access_token"])).status_code == 200
        missing = await auth.client.request("DELETE", "/api/v1/auth/me", headers=bearer(pair["access_token"]))
        assert_problem(missing, 422)


async def test_erasure_with_a_service_down_erases_nothing(make_auth: MakeAuth) -> None:
    for failure in (down, lambda: httpx.Response(500), lambda: httpx.Response(403)):
        peers = FakePeers(answers={("audit", "erase"): failure})
        async with make_auth(peer_transport=httpx.MockTransport(peers.handler)) as auth:
            peers.app = auth.app
            user, pair = await auth.user()
            response = await auth.client.request(
                "DELETE", "/api/v1/auth/me", json={"password": PASSWORD}, headers=bearer(pair["access_token"])
            )
            assert_problem(response, 503)
            assert (await auth.me(pair["access_token"])).json()["email"] == user["email"]
            assert (await auth.events("auth.user.erasure_failed"))[-1]["resource_id"] == user["id"]
