"""Phone verification: codes in the message sink, stored as HMACs, single use, tries and send caps."""

from __future__ import annotations

import re

import httpx
import pytest
from prometheus_client import REGISTRY

from tests.auth.conftest import AuthClient, MakeAuth
from tests.conftest import assert_problem
from tests.support.tokens import bearer

PHONE = "+237671234567"


async def request_code(auth: AuthClient, token: str, **body: str) -> httpx.Response:
    return await auth.client.post("/api/v1/auth/otp/request", json=body or None, headers=bearer(token))


async def verify(auth: AuthClient, token: str, code: str) -> httpx.Response:
    return await auth.client.post("/api/v1/auth/otp/verify", json={"code": code}, headers=bearer(token))


def sends_metric(prefix: str) -> float:
    return REGISTRY.get_sample_value("comptoir_auth_otp_sends_total", {"prefix": prefix}) or 0.0


async def test_a_code_verifies_the_phone_once(auth: AuthClient) -> None:
    _, pair = await auth.user(phone="671 23 45 67")
    token = pair["access_token"]
    before = sends_metric("+23767")
    response = await request_code(auth, token)
    assert response.status_code == 202
    message = auth.messages(PHONE)[-1]
    assert message["channel"] == "sms"
    assert set(message) == {"channel", "to", "body", "sent_at"}
    code = auth.last_code(PHONE)
    assert re.fullmatch(r"\d{6}", code)
    assert sends_metric("+23767") == before + 1
    verified = await verify(auth, token, code)
    assert verified.status_code == 200
    assert verified.json()["phone_verified"] is True
    # Replay: the code is spent.
    await auth.sql("UPDATE auth.users SET phone_verified = false")
    assert_problem(await verify(auth, token, code), 400)
    stored = await auth.sql("SELECT code_mac FROM auth.otp_codes")
    assert code not in stored[0]["code_mac"]
    assert len(stored[0]["code_mac"]) == 64
    text = await auth.outbox_text()
    assert code not in text
    assert [e["action"] for e in await auth.events() if e["action"].startswith("auth.otp")] == [
        "auth.otp.sent",
        "auth.otp.verified",
        "auth.otp.failed",
    ]


async def test_five_wrong_tries_kill_the_code(auth: AuthClient) -> None:
    _, pair = await auth.user(phone=PHONE)
    token = pair["access_token"]
    await request_code(auth, token)
    code = auth.last_code(PHONE)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    for _ in range(5):
        body = assert_problem(await verify(auth, token, wrong), 400)
        assert body["type"] == "urn:comptoir:problem:invalid-code"
    assert_problem(await verify(auth, token, code), 400)
    failed = await auth.events("auth.otp.failed")
    assert [e["new_values"].get("attempts") for e in failed[:5]] == [1, 2, 3, 4, 5]
    assert failed[4]["new_values"]["code_dead"] is True


async def test_codes_expire_after_ten_minutes(auth: AuthClient) -> None:
    _, pair = await auth.user(phone=PHONE)
    await request_code(auth, pair["access_token"])
    code = auth.last_code(PHONE)
    auth.clock.advance(600)
    assert_problem(await verify(auth, pair["access_token"], code), 400)


async def test_only_the_latest_code_counts(auth: AuthClient) -> None:
    _, pair = await auth.user(phone=PHONE)
    token = pair["access_token"]
    await request_code(auth, token)
    first = auth.last_code(PHONE)
    await request_code(auth, token)
    second = auth.last_code(PHONE)
    if first != second:
        assert_problem(await verify(auth, token, first), 400)
    assert (await verify(auth, token, second)).status_code == 200


async def test_sends_are_capped_per_user_per_ten_minutes_and_per_day(auth: AuthClient) -> None:
    _, pair = await auth.user(phone=PHONE)
    token = pair["access_token"]
    statuses = [(await request_code(auth, token)).status_code for _ in range(4)]
    assert statuses == [202, 202, 202, 429]
    throttled = await request_code(auth, token)
    body = assert_problem(throttled, 429)
    assert int(throttled.headers["retry-after"]) == 600
    assert body["type"] == "urn:comptoir:problem:otp-throttled"
    assert len(auth.messages(PHONE)) == 3
    sent = 3
    while sent < 10:
        auth.clock.advance(601)
        # The access token lives an hour; sign in again when needed.
        pair = await auth.tokens((await auth.sql("SELECT email FROM auth.users"))[0]["email"])
        for _ in range(3):
            if sent < 10:
                assert (await request_code(auth, pair["access_token"])).status_code == 202
                sent += 1
    auth.clock.advance(601)
    pair = await auth.tokens((await auth.sql("SELECT email FROM auth.users"))[0]["email"])
    assert_problem(await request_code(auth, pair["access_token"]), 429)
    assert len(auth.messages(PHONE)) == 10
    assert await auth.events("auth.otp.throttled")


async def test_sends_are_capped_per_phone_across_accounts(auth: AuthClient) -> None:
    statuses = []
    for _ in range(7):
        _, pair = await auth.user(phone=PHONE)
        statuses.append((await request_code(auth, pair["access_token"])).status_code)
    assert statuses == [202] * 6 + [429]


async def test_another_account_claiming_a_number_cannot_lock_its_owner_out(auth: AuthClient) -> None:
    _, owner = await auth.user(phone=PHONE)
    _, mallory = await auth.user()
    claims = [(await request_code(auth, mallory["access_token"], phone=PHONE)).status_code for _ in range(4)]
    assert claims == [202, 202, 202, 429]  # Mallory's own cap
    assert (await request_code(auth, owner["access_token"])).status_code == 202
    verified = await verify(auth, owner["access_token"], auth.last_code(PHONE))
    assert verified.status_code == 200, verified.text


async def test_sends_are_capped_per_client_ip(make_auth: MakeAuth) -> None:
    async with make_auth(otp_ip_max_per_window=2) as auth:
        statuses = []
        for i in range(3):
            _, pair = await auth.user(phone=f"+2376712345{i:02d}")
            statuses.append((await request_code(auth, pair["access_token"])).status_code)
        assert statuses == [202, 202, 429]
        _, pair = await auth.user(phone="+237671234599")
        response = await auth.client.post(
            "/api/v1/auth/otp/request", headers=bearer(pair["access_token"]) | {"X-Forwarded-For": "192.0.2.8"}
        )
        assert response.status_code == 202


async def test_requesting_for_a_new_phone_sets_it_unverified(auth: AuthClient) -> None:
    _, pair = await auth.user()
    token = pair["access_token"]
    assert_problem(await request_code(auth, token), 422)
    assert (await request_code(auth, token, phone="6 99 88 77 66")).status_code == 202
    me = (await auth.me(token)).json()
    assert (me["phone"], me["phone_verified"]) == ("+237699887766", False)
    assert (await verify(auth, token, auth.last_code("+237699887766"))).status_code == 200
    assert_problem(await request_code(auth, token), 409)
    assert_problem(await request_code(auth, token, phone="not a phone"), 422)


async def test_profile_changes_are_audited_without_the_names_and_numbers(auth: AuthClient) -> None:
    """The audit trail is insert-only and outlives an erasure: a name or number written there could never be
    erased. Events say which fields changed, and a number's country and operator prefix only."""
    _, pair = await auth.user(full_name="Erin Secretname", phone=PHONE)
    token = pair["access_token"]
    await request_code(auth, token)
    assert (await verify(auth, token, auth.last_code(PHONE))).status_code == 200
    changed = {"full_name": "Erin Othername", "phone": "+237699887766"}
    assert (await auth.client.patch("/api/v1/auth/me", json=changed, headers=bearer(token))).status_code == 200
    assert (await request_code(auth, token, phone="+237655443322")).status_code == 202
    text = await auth.outbox_text()
    for value in ("Secretname", "Othername", "671234567", "699887766", "655443322"):
        assert value not in text
    updates = [(e["old_values"], e["new_values"]) for e in await auth.events("auth.user.updated")]
    assert updates == [
        (None, {"fields": ["full_name", "phone", "phone_verified"], "phone_verified": False, "phone_prefix": "+23769"}),
        (None, {"fields": ["phone"], "phone_prefix": "+23765"}),
    ]


async def test_a_code_for_an_old_number_does_not_verify_the_new_one(auth: AuthClient) -> None:
    _, pair = await auth.user(phone=PHONE)
    token = pair["access_token"]
    await request_code(auth, token)
    code = auth.last_code(PHONE)
    await auth.client.patch("/api/v1/auth/me", json={"phone": "+237699887766"}, headers=bearer(token))
    assert_problem(await verify(auth, token, code), 400)
    assert (await auth.me(token)).json()["phone_verified"] is False


async def test_otp_endpoints_need_a_user(auth: AuthClient) -> None:
    assert_problem(await auth.client.post("/api/v1/auth/otp/request"), 401)
    assert_problem(await auth.client.post("/api/v1/auth/otp/verify", json={"code": "123456"}), 401)


def test_phone_caps_at_or_below_a_users_are_refused() -> None:
    """Equal to a user's caps, one other account claiming a number could use them all and lock its owner out."""
    from pydantic import ValidationError

    from services.auth.config import Settings

    for caps in ({"otp_phone_max_per_window": 3}, {"otp_phone_max_per_day": 10}):
        with pytest.raises(ValidationError, match="above AUTH_OTP_MAX_PER_WINDOW"):
            Settings(**caps)  # type: ignore[arg-type]
