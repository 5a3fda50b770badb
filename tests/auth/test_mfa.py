"""TOTP second factor: enrolment, login challenge, recovery codes, throttling, disabling, role policy, audit."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlparse

import pyotp

from tests.auth.conftest import PASSWORD, AuthClient, MakeAuth
from tests.conftest import assert_problem
from tests.support.tokens import bearer


def code_at(secret: str, moment: float) -> str:
    return pyotp.TOTP(secret).at(moment)


async def enrol(auth: AuthClient, access: str) -> tuple[str, list[str]]:
    """Set up an authenticator for the caller: (secret, recovery codes)."""
    started = await auth.client.post("/api/v1/auth/mfa/totp/enrol", headers=bearer(access))
    assert started.status_code == 200, started.text
    secret = started.json()["secret"]
    confirm = await auth.client.post(
        "/api/v1/auth/mfa/totp/confirm",
        json={"password": PASSWORD, "code": code_at(secret, auth.clock.now)},
        headers=bearer(access),
    )
    assert confirm.status_code == 200, confirm.text
    return secret, confirm.json()["recovery_codes"]


async def test_a_stolen_access_token_alone_cannot_bind_an_authenticator(auth: AuthClient) -> None:
    """Turning the second factor on takes the password: with only a victim's access token, an attacker who
    bound their own authenticator would lock the owner out, a password reset included."""
    user, pair = await auth.user()
    headers = bearer(pair["access_token"])
    secret = (await auth.client.post("/api/v1/auth/mfa/totp/enrol", headers=headers)).json()["secret"]
    confirm = "/api/v1/auth/mfa/totp/confirm"
    code = code_at(secret, auth.clock.now)
    refused = await auth.client.post(confirm, json={"password": "a guessed passphrase", "code": code}, headers=headers)
    assert assert_problem(refused, 400)["type"] == "urn:comptoir:problem:wrong-password"
    assert_problem(await auth.client.post(confirm, json={"code": code}, headers=headers), 422)
    assert (await auth.get("/api/v1/auth/mfa", pair["access_token"])).json()["totp_enabled"] is False
    assert (await auth.login(user["email"])).status_code == 200  # no second factor asked
    failed = await auth.events("auth.password.verification_failed")
    assert [e["new_values"]["purpose"] for e in failed] == ["mfa_confirm"]


def challenge_of(response: Any) -> dict[str, Any]:
    body = assert_problem(response, 401)
    assert body["type"] == "urn:comptoir:problem:mfa-required"
    return body


async def complete(auth: AuthClient, token: str, code: str, **extra: Any) -> Any:
    return await auth.client.post("/api/v1/auth/login/mfa", json={"mfa_token": token, "code": code} | extra)


async def test_enrolment_gives_a_provisioning_uri_and_is_confirmed_by_a_code(auth: AuthClient) -> None:
    user, pair = await auth.user()
    started = await auth.client.post("/api/v1/auth/mfa/totp/enrol", headers=bearer(pair["access_token"]))
    assert started.status_code == 200
    body = started.json()
    uri = urlparse(body["provisioning_uri"])
    assert uri.scheme == "otpauth"
    assert uri.netloc == "totp"
    assert parse_qs(uri.query)["secret"] == [body["secret"]]
    assert parse_qs(uri.query)["issuer"] == ["Comptoir"]
    # Not live until confirmed: the login still needs the password only.
    assert (await auth.login(user["email"])).status_code == 200
    wrong = await auth.client.post(
        "/api/v1/auth/mfa/totp/confirm",
        json={"password": PASSWORD, "code": "000000"},
        headers=bearer(pair["access_token"]),
    )
    assert assert_problem(wrong, 400)["type"] == "urn:comptoir:problem:wrong-mfa-code"
    right = await auth.client.post(
        "/api/v1/auth/mfa/totp/confirm",
        json={"password": PASSWORD, "code": code_at(body["secret"], auth.clock.now)},
        headers=bearer(pair["access_token"]),
    )
    assert right.status_code == 200
    codes = right.json()["recovery_codes"]
    assert len(codes) == 10
    assert len(set(codes)) == 10
    # The secret is not stored in clear, and the recovery codes only as HMACs.
    rows = await auth.sql("SELECT secret_box FROM auth.mfa_totp")
    assert body["secret"] not in rows[0]["secret_box"]
    macs = await auth.sql("SELECT code_mac FROM auth.mfa_recovery_codes")
    assert {row["code_mac"] for row in macs}.isdisjoint(codes)
    status = await auth.get("/api/v1/auth/mfa", pair["access_token"])
    assert status.json() == {"totp_enabled": True, "recovery_codes_left": 10, "required": False}
    again = await auth.client.post("/api/v1/auth/mfa/totp/enrol", headers=bearer(pair["access_token"]))
    assert_problem(again, 409)
    outbox = await auth.outbox_text()
    assert body["secret"] not in outbox
    assert all(code not in outbox for code in codes)


async def test_login_answers_a_challenge_and_a_second_call_completes_it(auth: AuthClient) -> None:
    user, pair = await auth.user()
    secret, _ = await enrol(auth, pair["access_token"])
    auth.clock.advance(30)
    challenge = challenge_of(await auth.login(user["email"]))
    assert challenge["methods"] == ["totp", "recovery_code"]
    assert challenge["expires_in"] == 300
    assert "access_token" not in challenge
    # A wrong code: 401, the challenge stays usable.
    wrong = await complete(auth, challenge["mfa_token"], "123456")
    assert assert_problem(wrong, 401)["type"] == "urn:comptoir:problem:invalid-mfa-code"
    done = await complete(auth, challenge["mfa_token"], code_at(secret, auth.clock.now))
    assert done.status_code == 200, done.text
    tokens = done.json()
    assert tokens["device_token"]
    assert tokens["recovery_codes"] is None
    assert (await auth.me(tokens["access_token"])).status_code == 200
    # The token is spent, and the same code is never accepted twice.
    assert_problem(await complete(auth, challenge["mfa_token"], code_at(secret, auth.clock.now)), 401)
    replay = challenge_of(await auth.login(user["email"]))
    assert_problem(await complete(auth, replay["mfa_token"], code_at(secret, auth.clock.now)), 401)
    # A wrong password never reaches the second factor.
    wrong_password = assert_problem(await auth.login(user["email"], "wrong password!"), 401)
    assert wrong_password["type"] == "urn:comptoir:problem:invalid-credentials"
    actions = [e["action"] for e in await auth.events() if e["action"].startswith("auth.mfa.")]
    for action in ("auth.mfa.enrolment_started", "auth.mfa.enabled", "auth.mfa.challenged", "auth.mfa.failed"):
        assert action in actions
    assert actions.count("auth.mfa.verified") == 1


async def test_recovery_codes_work_once(auth: AuthClient) -> None:
    user, pair = await auth.user()
    _, codes = await enrol(auth, pair["access_token"])
    first = challenge_of(await auth.login(user["email"]))
    used = await complete(auth, first["mfa_token"], codes[0].upper().replace("-", " "))
    assert used.status_code == 200
    second = challenge_of(await auth.login(user["email"]))
    assert_problem(await complete(auth, second["mfa_token"], codes[0]), 401)
    assert (await complete(auth, second["mfa_token"], codes[1])).status_code == 200
    assert (await auth.events("auth.mfa.recovery_code_used"))[0]["resource_id"] == user["id"]
    status = await auth.get("/api/v1/auth/mfa", used.json()["access_token"])
    assert status.json()["recovery_codes_left"] == 8


async def test_wrong_codes_are_throttled_and_a_challenge_dies_after_five(auth: AuthClient) -> None:
    user, pair = await auth.user()
    secret, _ = await enrol(auth, pair["access_token"])
    challenge = challenge_of(await auth.login(user["email"]))
    statuses = [(await complete(auth, challenge["mfa_token"], "000000")).status_code for _ in range(5)]
    assert statuses == [401] * 4 + [429]
    # Even the right code waits now; and this challenge is out of attempts for good.
    auth.clock.advance(31)
    dead = await complete(auth, challenge["mfa_token"], code_at(secret, auth.clock.now))
    assert assert_problem(dead, 401)["type"] == "urn:comptoir:problem:invalid-mfa-challenge"
    fresh = challenge_of(await auth.login(user["email"]))
    assert (await complete(auth, fresh["mfa_token"], code_at(secret, auth.clock.now))).status_code == 200
    # Expired challenges are refused too.
    late = challenge_of(await auth.login(user["email"]))
    auth.clock.advance(301)
    assert_problem(await complete(auth, late["mfa_token"], code_at(secret, auth.clock.now)), 401)


async def test_a_code_refused_with_429_during_a_wait_uses_none_of_the_challenges_tries(auth: AuthClient) -> None:
    user, pair = await auth.user()
    secret, _ = await enrol(auth, pair["access_token"])
    first = challenge_of(await auth.login(user["email"]))
    statuses = [(await complete(auth, first["mfa_token"], "000000")).status_code for _ in range(5)]
    assert statuses == [401] * 4 + [429]
    # The owner logs in again and their app keeps sending the right code while the wait runs.
    second = challenge_of(await auth.login(user["email"]))
    for _ in range(6):
        waiting = await complete(auth, second["mfa_token"], code_at(secret, auth.clock.now))
        assert_problem(waiting, 429)
    auth.clock.advance(31)
    done = await complete(auth, second["mfa_token"], code_at(secret, auth.clock.now))
    assert done.status_code == 200, done.text


async def test_disabling_needs_the_password_and_a_code(auth: AuthClient) -> None:
    user, pair = await auth.user()
    secret, _ = await enrol(auth, pair["access_token"])
    headers = bearer(pair["access_token"])
    auth.clock.advance(30)
    no_password = await auth.client.post(
        "/api/v1/auth/mfa/totp/disable",
        json={"password": "wrong password!", "code": code_at(secret, auth.clock.now)},
        headers=headers,
    )
    assert_problem(no_password, 400)
    no_code = await auth.client.post(
        "/api/v1/auth/mfa/totp/disable", json={"password": PASSWORD, "code": "000000"}, headers=headers
    )
    assert_problem(no_code, 400)
    assert_problem(await auth.client.post("/api/v1/auth/mfa/totp/disable", json={}, headers=headers), 422)
    assert (await auth.get("/api/v1/auth/mfa", pair["access_token"])).json()["totp_enabled"] is True
    done = await auth.client.post(
        "/api/v1/auth/mfa/totp/disable",
        json={"password": PASSWORD, "code": code_at(secret, auth.clock.now)},
        headers=headers,
    )
    assert done.status_code == 204
    assert (await auth.login(user["email"])).status_code == 200
    assert (await auth.events("auth.mfa.disabled"))[0]["resource_id"] == user["id"]
    assert await auth.sql("SELECT 1 FROM auth.mfa_recovery_codes") == []


async def test_a_role_that_requires_mfa_enrols_at_its_first_login(make_auth: MakeAuth) -> None:
    async with make_auth(mfa_required_roles=["admin"]) as auth:
        user = await auth.register()
        await auth.sql("UPDATE auth.users SET role = 'admin' WHERE id = $1", user["id"])
        challenge = challenge_of(await auth.login(user["email"]))
        assert challenge["methods"] == ["totp"]
        secret = challenge["enrolment"]["secret"]
        assert challenge["enrolment"]["provisioning_uri"].startswith("otpauth://totp/")
        done = await complete(auth, challenge["mfa_token"], code_at(secret, auth.clock.now))
        assert done.status_code == 200, done.text
        tokens = done.json()
        assert len(tokens["recovery_codes"]) == 10
        status = await auth.get("/api/v1/auth/mfa", tokens["access_token"])
        assert status.json() == {"totp_enabled": True, "recovery_codes_left": 10, "required": True}
        # It cannot be turned off while the role requires it.
        auth.clock.advance(30)
        refused = await auth.client.post(
            "/api/v1/auth/mfa/totp/disable",
            json={"password": PASSWORD, "code": code_at(secret, auth.clock.now)},
            headers=bearer(tokens["access_token"]),
        )
        assert_problem(refused, 409)
        # Customers are not asked.
        customer = await auth.register()
        assert (await auth.login(customer["email"])).status_code == 200


async def test_a_session_opened_before_its_role_required_a_second_factor_ends_at_its_next_refresh(
    make_auth: MakeAuth,
) -> None:
    async with make_auth() as auth:  # no role requires a second factor yet
        user = await auth.register()
        await auth.sql("UPDATE auth.users SET role = 'admin' WHERE id = $1", user["id"])
        before = (await auth.login(user["email"])).json()
        assert (await auth.get("/api/v1/auth/me", before["access_token"])).status_code == 200

        # The operator requires it for admins (a setting, or an upgrade to a release that has second factors).
        auth.app.state.auth.settings.mfa_required_roles = ["admin"]
        refused = await auth.refresh(before["refresh_token"])
        body = assert_problem(refused, 401)
        assert body["type"] == "urn:comptoir:problem:invalid-refresh-token"
        assert "second factor" in body["detail"]
        # The session is over: its access token is refused too, and signing in asks for the second factor.
        assert (await auth.get("/api/v1/auth/me", before["access_token"])).status_code == 401
        [row] = await auth.sql("SELECT revoked_reason FROM auth.sessions WHERE user_id = $1", user["id"])
        assert row["revoked_reason"] == "mfa_required"
        assert [e["new_values"] for e in await auth.events("auth.session.revoked")] == [{"reason": "mfa_required"}]
        challenge = challenge_of(await auth.login(user["email"]))
        secret = challenge["enrolment"]["secret"]
        done = await complete(auth, challenge["mfa_token"], code_at(secret, auth.clock.now))
        assert done.status_code == 200, done.text

        # A session opened through the second factor refreshes as before.
        again = await auth.refresh(done.json()["refresh_token"])
        assert again.status_code == 200, again.text


def test_production_requires_mfa_for_admins_and_development_for_nobody() -> None:
    from services.auth.config import Settings

    assert Settings(environment="production").mfa_roles == frozenset({"admin"})
    assert Settings(environment="development").mfa_roles == frozenset()
    assert Settings(environment="production", mfa_required_roles=["admin", "staff"]).mfa_roles == {"admin", "staff"}


async def test_bad_input_gets_problem_answers_and_changes_nothing(auth: AuthClient) -> None:
    _, pair = await auth.user()
    headers = bearer(pair["access_token"])
    right = {"password": PASSWORD}
    bad = ({}, right | {"code": ""}, right | {"code": "1" * 33}, right | {"code": "123456", "extra": 1})
    for body in (*bad, {"code": "123456"}, {"password": "", "code": "123456"}):
        assert_problem(await auth.client.post("/api/v1/auth/mfa/totp/confirm", json=body, headers=headers), 422)
    confirm = {"password": PASSWORD, "code": "123456"}
    assert_problem(await auth.client.post("/api/v1/auth/mfa/totp/confirm", json=confirm, headers=headers), 409)
    assert_problem(await complete(auth, "not-a-token", "123456"), 401)
    assert_problem(await auth.client.post("/api/v1/auth/login/mfa", json={"mfa_token": "x"}), 422)
    assert_problem(await auth.client.post("/api/v1/auth/mfa/totp/enrol"), 401)
    assert await auth.sql("SELECT 1 FROM auth.mfa_totp") == []
