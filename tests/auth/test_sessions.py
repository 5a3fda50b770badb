"""Refresh rotation, reuse detection, concurrency, logout, session cap, and the revocation feed."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import jwt

from common.http import HttpxTransport
from common.revocation import RevocationPoller, RevocationSet
from common.service_tokens import ServiceTokenClient
from tests.auth.conftest import CLIENT_SECRETS, PASSWORD, AuthClient, MakeAuth
from tests.conftest import assert_problem
from tests.support.tokens import bearer


def sid_of(access_token: str) -> str:
    return str(jwt.decode(access_token, options={"verify_signature": False})["sid"])


async def service_token(auth: AuthClient, caller: str = "gateway", audience: str = "auth") -> str:
    response = await auth.client.post(
        "/internal/token",
        json={"client_id": caller, "client_secret": CLIENT_SECRETS[caller], "audience": audience},
    )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


async def feed(auth: AuthClient, after: int = 0) -> dict[str, Any]:
    response = await auth.get("/internal/revocations", await service_token(auth), params={"after": after})
    assert response.status_code == 200, response.text
    return dict(response.json())


async def revoked_sids(auth: AuthClient) -> set[str]:
    items = (await feed(auth))["items"]
    assert isinstance(items, list)
    return {item["sid"] for item in items}


async def test_refresh_rotates_and_the_new_pair_works(auth: AuthClient) -> None:
    _, pair = await auth.user()
    auth.clock.advance(60)
    response = await auth.refresh(pair["refresh_token"])
    assert response.status_code == 200, response.text
    new = response.json()
    assert new["refresh_token"] != pair["refresh_token"]
    assert sid_of(new["access_token"]) == sid_of(pair["access_token"])
    assert new["refresh_expires_in"] == 604800 - 60
    assert (await auth.me(new["access_token"])).status_code == 200
    assert (await auth.refresh(new["refresh_token"])).status_code == 200


async def test_replayed_refresh_token_revokes_the_whole_session(auth: AuthClient) -> None:
    from services.auth.metrics import REFRESH_REUSE

    user, pair = await auth.user()
    auth.clock.advance(30)
    new = (await auth.refresh(pair["refresh_token"])).json()
    auth.clock.advance(30)
    reuses_before = REFRESH_REUSE._value.get()
    body = assert_problem(await auth.refresh(pair["refresh_token"]), 401)
    assert REFRESH_REUSE._value.get() == reuses_before + 1  # the signal the alert rule watches
    assert body["type"] == "urn:comptoir:problem:invalid-refresh-token"
    # Every token of the session is dead now, the legitimate new ones included.
    assert_problem(await auth.refresh(new["refresh_token"]), 401)
    assert_problem(await auth.me(new["access_token"]), 401)
    assert_problem(await auth.me(pair["access_token"]), 401)
    assert sid_of(pair["access_token"]) in await revoked_sids(auth)
    events = await auth.events("auth.token.reuse_detected")
    assert len(events) == 1
    assert events[0]["resource_id"] == sid_of(pair["access_token"])
    assert events[0]["actor_id"] == user["id"]
    assert events[0]["new_values"]["session_revoked"] is True
    assert events[0]["new_values"]["likely_concurrent_retry"] is False
    # Another session of the same user is untouched.
    other = await auth.tokens(user["email"])
    assert (await auth.me(other["access_token"])).status_code == 200


async def test_concurrent_refreshes_with_one_token_never_fork_the_session(auth: AuthClient) -> None:
    for _ in range(3):
        _, pair = await auth.user()
        answers = await asyncio.gather(*(auth.refresh(pair["refresh_token"]) for _ in range(4)))
        statuses = sorted(r.status_code for r in answers)
        assert statuses == [200, 401, 401, 401], statuses
        winner = next(r.json() for r in answers if r.status_code == 200)
        # The losers prove the token was presented twice: the session ends, the winner's pair too.
        assert_problem(await auth.refresh(winner["refresh_token"]), 401)
        assert_problem(await auth.me(winner["access_token"]), 401)
        sid = sid_of(pair["access_token"])
        rows = await auth.sql("SELECT count(*) AS n FROM auth.refresh_tokens t WHERE t.session_id = $1::uuid", sid)
        assert rows[0]["n"] == 2  # the original and exactly one successor
    races = await auth.events("auth.token.reuse_detected")
    assert races
    assert all(event["new_values"]["likely_concurrent_retry"] for event in races)


async def test_unknown_and_expired_refresh_tokens_are_401(auth: AuthClient) -> None:
    _, pair = await auth.user()
    assert_problem(await auth.refresh("not-a-token"), 401)
    auth.clock.advance(86400 + 1)  # idle timeout
    assert_problem(await auth.refresh(pair["refresh_token"]), 401)


async def test_a_refresh_without_a_token_or_a_session_cookie_is_401_not_a_csrf_refusal(auth: AuthClient) -> None:
    """An app that forgot its token (or a browser whose cookie expired): sign in again, no talk of origins."""
    for body in ({}, {"refresh_token": None}, None):
        refused = await auth.client.post("/api/v1/auth/token/refresh", json=body)
        problem = assert_problem(refused, 401)
        assert problem["type"] == "urn:comptoir:problem:invalid-refresh-token"
        assert problem["detail"] == "No refresh token was sent (nor a session cookie): sign in again."


async def test_a_refresh_the_gateway_gave_up_on_is_not_run_so_the_clients_retry_is_no_reuse(auth: AuthClient) -> None:
    """auth stopped (or starved) while the gateway's deadline ran out: the gateway answered 504 and the
    client retries with the token it holds. The late request must not rotate it behind the client's back."""
    _, pair = await auth.user()
    late = {"X-Comptoir-Deadline": "%.3f" % (time.time() - 30)}
    abandoned = await auth.client.post(
        "/api/v1/auth/token/refresh", json={"refresh_token": pair["refresh_token"]}, headers=late
    )
    assert_problem(abandoned, 504)
    retried = await auth.refresh(pair["refresh_token"])
    assert retried.status_code == 200, retried.text
    assert await auth.events("auth.token.reuse_detected") == []


async def test_refresh_tokens_die_at_the_absolute_lifetime(auth: AuthClient) -> None:
    _, pair = await auth.user()
    token = pair["refresh_token"]
    statuses = []
    for _ in range(8):
        auth.clock.advance(86400 - 100)  # always within the idle timeout
        response = await auth.refresh(token)
        statuses.append(response.status_code)
        if response.status_code == 200:
            token = response.json()["refresh_token"]
    # 7 x 86,300 s is inside the 7 days; the 8th refresh comes after them.
    assert statuses == [200] * 7 + [401]


async def test_an_access_token_is_not_a_refresh_token(auth: AuthClient) -> None:
    _, pair = await auth.user()
    assert_problem(await auth.refresh(pair["access_token"]), 401)


async def test_logout_ends_this_session_at_once_and_publishes_it(auth: AuthClient) -> None:
    user, pair = await auth.user()
    other = await auth.tokens(user["email"])
    response = await auth.client.post("/api/v1/auth/logout", headers=bearer(pair["access_token"]))
    assert response.status_code == 204
    assert_problem(await auth.me(pair["access_token"]), 401)
    assert_problem(await auth.refresh(pair["refresh_token"]), 401)
    assert (await auth.me(other["access_token"])).status_code == 200
    body = await feed(auth)
    items = body["items"]
    assert isinstance(items, list)
    assert [item["sid"] for item in items] == [sid_of(pair["access_token"])]
    assert items[0]["seq"] >= 1
    assert abs(items[0]["expires_at"] - (auth.clock.now + 3600)) < 5
    assert body["has_more"] is False
    assert (await auth.events("auth.logout"))[0]["resource_id"] == sid_of(pair["access_token"])


async def test_logout_all_ends_every_session(auth: AuthClient) -> None:
    user, pair = await auth.user()
    others = [await auth.tokens(user["email"]) for _ in range(2)]
    assert (await auth.client.post("/api/v1/auth/logout-all", headers=bearer(pair["access_token"]))).status_code == 204
    for p in [pair, *others]:
        assert_problem(await auth.me(p["access_token"]), 401)
        assert_problem(await auth.refresh(p["refresh_token"]), 401)
    assert await revoked_sids(auth) == {sid_of(p["access_token"]) for p in [pair, *others]}


async def test_sessions_list_and_delete(auth: AuthClient) -> None:
    user, first = await auth.user()
    auth.clock.advance(1)
    second = await auth.tokens(user["email"])
    _, theirs = await auth.user()
    response = await auth.get("/api/v1/auth/sessions", second["access_token"], headers={"user-agent": "ua-test"})
    assert response.status_code == 200
    items = response.json()["items"]
    assert {i["id"] for i in items} == {sid_of(first["access_token"]), sid_of(second["access_token"])}
    assert [i["current"] for i in items] == [True, False]
    assert set(items[0]) == {"id", "created_at", "last_used_at", "ip", "user_agent", "current"}
    assert items[0]["ip"] == "203.0.113.7"
    # Someone else's session is not found, and stays alive.
    path = f"/api/v1/auth/sessions/{sid_of(theirs['access_token'])}"
    assert_problem(await auth.client.delete(path, headers=bearer(first["access_token"])), 404)
    assert_problem(
        await auth.client.delete(f"/api/v1/auth/sessions/{uuid.uuid4()}", headers=bearer(first["access_token"])), 404
    )
    assert (await auth.me(theirs["access_token"])).status_code == 200
    path = f"/api/v1/auth/sessions/{sid_of(first['access_token'])}"
    assert (await auth.client.delete(path, headers=bearer(second["access_token"]))).status_code == 204
    assert_problem(await auth.me(first["access_token"]), 401)
    assert (await auth.me(second["access_token"])).status_code == 200
    assert sid_of(first["access_token"]) in await revoked_sids(auth)


async def test_the_sixth_session_evicts_the_oldest(auth: AuthClient) -> None:
    user = await auth.register()
    pairs = []
    for _ in range(6):
        pairs.append(await auth.tokens(user["email"]))
        auth.clock.advance(1)
    assert_problem(await auth.me(pairs[0]["access_token"]), 401)
    assert_problem(await auth.refresh(pairs[0]["refresh_token"]), 401)
    for pair in pairs[1:]:
        assert (await auth.me(pair["access_token"])).status_code == 200
    sessions = (await auth.get("/api/v1/auth/sessions", pairs[-1]["access_token"])).json()["items"]
    assert len(sessions) == 5
    assert await revoked_sids(auth) == {sid_of(pairs[0]["access_token"])}
    evicted = await auth.events("auth.session.revoked")
    assert evicted[0]["new_values"] == {"reason": "session_cap"}
    assert [e["resource_id"] for e in evicted] == [sid_of(pairs[0]["access_token"])]
    # Each login's event names its own new session, the one that evicted another included.
    succeeded = await auth.events("auth.login.succeeded")
    assert [e["resource_id"] for e in succeeded] == [sid_of(p["access_token"]) for p in pairs]


async def test_session_cap_is_a_setting(make_auth: MakeAuth) -> None:
    async with make_auth(max_sessions_per_user=2) as auth:
        user = await auth.register()
        pairs = []
        for _ in range(3):
            pairs.append(await auth.tokens(user["email"]))
            auth.clock.advance(1)
        assert [(await auth.me(p["access_token"])).status_code for p in pairs] == [401, 200, 200]


async def test_password_change_revokes_the_other_sessions(auth: AuthClient) -> None:
    user, pair = await auth.user()
    other = await auth.tokens(user["email"])
    new_password = "a brand new passphrase"
    response = await auth.client.post(
        "/api/v1/auth/me/password",
        json={"current_password": PASSWORD, "new_password": new_password},
        headers=bearer(pair["access_token"]),
    )
    assert response.status_code == 204, response.text
    assert (await auth.me(pair["access_token"])).status_code == 200
    assert_problem(await auth.me(other["access_token"]), 401)
    assert_problem(await auth.login(user["email"]), 401)
    assert (await auth.login(user["email"], new_password)).status_code == 200
    assert await revoked_sids(auth) == {sid_of(other["access_token"])}
    assert (await auth.events("auth.password.changed"))[0]["new_values"] == {"other_sessions_revoked": 1}


async def test_password_change_needs_the_current_password_and_a_good_new_one(auth: AuthClient) -> None:
    _, pair = await auth.user()
    headers = bearer(pair["access_token"])
    wrong = await auth.client.post(
        "/api/v1/auth/me/password",
        json={"current_password": "not my password", "new_password": "another fine passphrase"},
        headers=headers,
    )
    assert_problem(wrong, 400)
    weak = await auth.client.post(
        "/api/v1/auth/me/password", json={"current_password": PASSWORD, "new_password": "password"}, headers=headers
    )
    errors = assert_problem(weak, 422)["errors"]
    assert isinstance(errors, list)
    assert {e["loc"][-1] for e in errors} == {"new_password"}


async def test_feed_pages_in_order_and_prunes_expired_entries(make_auth: MakeAuth) -> None:
    async with make_auth(max_sessions_per_user=100) as auth:
        user, pair = await auth.user()
        for _ in range(4):
            await auth.tokens(user["email"])
        await auth.client.post("/api/v1/auth/logout-all", headers=bearer(pair["access_token"]))
        page = await feed(auth, after=2)
        items = page["items"]
        assert isinstance(items, list)
        assert [i["seq"] for i in items] == [3, 4, 5]
        auth.clock.advance(3600 + 1)
        from services.auth.main import prune

        await prune(auth.app.state.auth)
        assert (await feed(auth))["items"] == []


async def test_feed_pages_hold_at_most_500_entries(auth: AuthClient) -> None:
    await auth.sql(
        "INSERT INTO auth.revocations (sid, expires_at) "
        "SELECT gen_random_uuid(), now() + interval '1 hour' FROM generate_series(1, 501)"
    )
    first = await feed(auth)
    assert (len(first["items"]), first["has_more"]) == (500, True)
    assert [i["seq"] for i in first["items"]] == list(range(1, 501))
    rest = await feed(auth, after=500)
    assert ([i["seq"] for i in rest["items"]], rest["has_more"]) == ([501], False)


async def test_the_shared_poller_reads_the_feed(auth: AuthClient) -> None:
    """common.revocation as the gateway runs it, against this service: logout is seen on the next poll."""
    _, pair = await auth.user()
    client = HttpxTransport(auth.client)
    tokens = ServiceTokenClient(client, client_id="gateway", client_secret=CLIENT_SECRETS["gateway"])
    revocations = RevocationSet()
    poller = RevocationPoller(client, tokens, revocations, interval=0.25)
    await poller.poll_once()
    assert not revocations.is_revoked(sid_of(pair["access_token"]))
    await auth.client.post("/api/v1/auth/logout", headers=bearer(pair["access_token"]))
    assert await poller.poll_once() == 1
    assert revocations.is_revoked(sid_of(pair["access_token"]))
