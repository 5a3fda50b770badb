"""Registration, login, profile: normalisation, the password policy, no enumeration, no mass assignment."""

from __future__ import annotations

import pytest

from tests.auth.conftest import PASSWORD, AuthClient
from tests.conftest import assert_problem
from tests.support.accounts import CONSENT
from tests.support.tokens import bearer

USER_FIELDS = {"id", "email", "full_name", "phone", "phone_verified", "role", "is_active", "created_at"}


async def test_register_returns_a_customer_with_normalised_email_and_phone(auth: AuthClient) -> None:
    response = await auth.client.post(
        "/api/v1/auth/register",
        json={
            "email": "  Awa.Ngono@Example.CM ",
            "password": PASSWORD,
            "full_name": "Awa",
            "phone": "6 71 23 45 67",
        }
        | CONSENT,
    )
    assert response.status_code == 201, response.text
    user = response.json()
    assert set(user) == USER_FIELDS
    assert user["email"] == "awa.ngono@example.cm"
    assert user["phone"] == "+237671234567"
    assert (user["role"], user["is_active"], user["phone_verified"]) == ("customer", True, False)
    assert "password" not in response.text
    stored = await auth.sql("SELECT password_hash FROM auth.users WHERE id = $1::uuid", user["id"])
    assert stored[0]["password_hash"].startswith("$pbkdf2-sha256$1000$")


@pytest.mark.parametrize(
    ("phone", "msg"),
    [
        ("12345", "not a valid phone number"),
        ("2 22 23 45 67", "not a mobile number: verification codes are sent by SMS"),  # a Cameroonian landline
        ("phone me", "not a phone number"),
    ],
)
async def test_a_phone_that_cannot_get_a_text_message_is_refused_saying_why(
    auth: AuthClient, phone: str, msg: str
) -> None:
    body = {"email": f"p{abs(hash(phone))}@example.cm", "password": PASSWORD, "phone": phone} | CONSENT
    problem = assert_problem(await auth.client.post("/api/v1/auth/register", json=body), 422)
    # The validator's own words, without pydantic's "Value error, " and without the input.
    assert problem["errors"] == [{"loc": ["body", "phone"], "msg": msg}]


async def test_a_mobile_number_of_any_country_is_accepted(auth: AuthClient) -> None:
    user = await auth.register(phone="+33 6 12 34 56 78")
    assert user["phone"] == "+33612345678"


async def test_email_is_unique_whatever_its_case(auth: AuthClient) -> None:
    await auth.register("kofi@example.cm")
    response = await auth.client.post(
        "/api/v1/auth/register", json={"email": "KOFI@example.CM", "password": PASSWORD} | CONSENT
    )
    assert_problem(response, 409)


@pytest.mark.parametrize(
    "body",
    [
        {"email": "not-an-email", "password": PASSWORD} | CONSENT,
        {"email": "a@example.cm", "password": PASSWORD, "phone": "12"} | CONSENT,
        {"email": "a@example.cm", "password": PASSWORD, "phone": "+33 6 12"} | CONSENT,
        {"email": "a@example.cm", "password": PASSWORD, "role": "admin"} | CONSENT,
        {"email": "a@example.cm", "password": PASSWORD, "is_active": False} | CONSENT,
        {"email": "a@example.cm"} | CONSENT,
        {"email": "a@example.cm", "password": PASSWORD},
        {"email": "a@example.cm", "password": PASSWORD, "accept_terms": False, "terms_version": "2026-12-01"},
        {"email": "a@example.cm", "password": PASSWORD, "accept_terms": True},
        {"email": "a@example.cm", "password": PASSWORD, "accept_terms": True, "terms_version": "2020-01-01"},
        {"email": "a@example.cm", "password": PASSWORD, "accept_terms": "yes", "terms_version": "2026-12-01"},
    ],
)
async def test_invalid_registrations_are_422(auth: AuthClient, body: dict[str, object]) -> None:
    assert_problem(await auth.client.post("/api/v1/auth/register", json=body), 422)
    assert await auth.sql("SELECT 1 FROM auth.users") == []


@pytest.mark.parametrize(
    ("password", "reasons"),
    [
        ("short one", ["at least 12"]),
        ("x" * 129, ["at most 128"]),
        ("password1234", ["too common"]),
        ("PassWord1234", ["too common"]),
        ("qwerty", ["at least 12", "too common"]),
        (" " * 12, ["repetition or a sequence"]),
        ("aaaaaaaaaaaa", ["repetition or a sequence"]),
        ("abab abab abab", ["repetition or a sequence"]),
        ("123456789012", ["repetition or a sequence"]),
        ("ZYXWVUTSRQPONM", ["repetition or a sequence"]),
        ("azertyuiopqsdf", ["repetition or a sequence"]),
        ("\u0301" * 12, ["repetition or a sequence"]),
        ("xyz", ["at least 12", "repetition or a sequence"]),
        ("my name is mbarga-paul!", ["e-mail"]),
        ("MBARGA-PAUL rules the world", ["e-mail"]),
    ],
)
async def test_password_policy_lists_every_reason(auth: AuthClient, password: str, reasons: list[str]) -> None:
    response = await auth.client.post(
        "/api/v1/auth/register", json={"email": "mbarga-paul@example.cm", "password": password} | CONSENT
    )
    body = assert_problem(response, 422)
    errors = body["errors"]
    assert isinstance(errors, list)
    assert len(errors) == len(reasons)
    for error, reason in zip(errors, reasons, strict=True):
        assert error["loc"] == ["body", "password"]
        assert reason in error["msg"]
    assert password not in response.text


async def test_long_passphrases_and_unicode_are_fine(auth: AuthClient) -> None:
    user = await auth.register(password="ñandú à Yaoundé, 2026 — très bien " + "x" * 90)
    assert (await auth.login(user["email"], "ñandú à Yaoundé, 2026 — très bien " + "x" * 90)).status_code == 200


async def test_login_returns_the_token_pair(auth: AuthClient) -> None:
    user = await auth.register()
    response = await auth.login(user["email"].upper())
    assert response.status_code == 200, response.text
    pair = response.json()
    assert pair["token_type"] == "bearer"
    assert pair["expires_in"] == 3600
    assert pair["refresh_expires_in"] == 604800
    assert pair["refresh_idle_expires_in"] == 86400
    assert len(pair["refresh_token"]) >= 43  # 256 bits, base64url
    me = await auth.me(pair["access_token"])
    assert me.status_code == 200
    assert me.json()["id"] == user["id"]
    assert me.headers["cache-control"] == "no-store"


async def test_login_does_not_tell_unknown_email_from_wrong_password(auth: AuthClient) -> None:
    user = await auth.register()
    await auth.sql(
        "INSERT INTO auth.users (id, email, password_hash, created_at, updated_at, is_active) "
        "VALUES (gen_random_uuid(), 'off@example.cm', 'x', now(), now(), false)"
    )
    answers = [
        await auth.login(user["email"], "wrong password 123"),
        await auth.login("nobody@example.cm", "wrong password 123"),
        await auth.login("not even an email", "wrong password 123"),
        await auth.login("off@example.cm", "wrong password 123"),
    ]
    bodies = []
    for response in answers:
        body = assert_problem(response, 401)
        body.pop("request_id")
        bodies.append(body)
        assert response.headers["www-authenticate"] == 'Bearer realm="comptoir"'
    assert all(body == bodies[0] for body in bodies)


async def test_disabled_account_gets_the_same_401_with_the_right_password(auth: AuthClient) -> None:
    user = await auth.register()
    await auth.sql("UPDATE auth.users SET is_active = false WHERE id = $1::uuid", user["id"])
    body = assert_problem(await auth.login(user["email"]), 401)
    assert body["type"] == "urn:comptoir:problem:invalid-credentials"


async def test_me_patch_changes_only_name_and_phone(auth: AuthClient) -> None:
    user, pair = await auth.user(phone="+237 671 23 45 67")
    await auth.sql("UPDATE auth.users SET phone_verified = true WHERE id = $1::uuid", user["id"])
    token = pair["access_token"]
    response = await auth.client.patch("/api/v1/auth/me", json={"full_name": "Awa N."}, headers=bearer(token))
    assert response.status_code == 200
    assert response.json()["full_name"] == "Awa N."
    assert response.json()["phone_verified"] is True
    response = await auth.client.patch("/api/v1/auth/me", json={"phone": "0033612345678"}, headers=bearer(token))
    assert response.status_code == 200
    assert (response.json()["phone"], response.json()["phone_verified"]) == ("+33612345678", False)
    assert_problem(await auth.client.patch("/api/v1/auth/me", json={"phone": "abc"}, headers=bearer(token)), 422)


@pytest.mark.parametrize(
    "field",
    [
        {"role": "admin"},
        {"is_active": False},
        {"phone_verified": True},
        {"email": "new@example.cm"},
        {"password_hash": "x"},
        {"id": "00000000-0000-0000-0000-000000000000"},
        {"failed_logins": 0},
    ],
)
async def test_mass_assignment_through_me_is_refused(auth: AuthClient, field: dict[str, object]) -> None:
    user, pair = await auth.user()
    response = await auth.client.patch(
        "/api/v1/auth/me", json={"full_name": "Mallory"} | field, headers=bearer(pair["access_token"])
    )
    assert_problem(response, 422)
    row = (await auth.sql("SELECT * FROM auth.users WHERE id = $1::uuid", user["id"]))[0]
    assert (row["role"], row["is_active"], row["phone_verified"], row["full_name"]) == ("customer", True, False, None)


async def test_register_and_login_are_audited_without_secrets(auth: AuthClient) -> None:
    user = await auth.register()
    pair = await auth.tokens(user["email"])
    await auth.login(user["email"], "wrong password 123")
    registered = await auth.events("auth.user.registered")
    assert registered[0]["resource_id"] == user["id"]
    assert registered[0]["ip"] == "203.0.113.7"
    ok = (await auth.events("auth.login.succeeded"))[0]
    assert ok["actor_id"] == user["id"]
    assert ok["actor_role"] == "customer"
    assert ok["request_id"]
    failed = (await auth.events("auth.login.failed"))[0]
    assert (failed["outcome"], failed["resource_id"]) == ("failure", user["id"])
    text = await auth.outbox_text()
    for secret in (PASSWORD, "wrong password 123", pair["access_token"], pair["refresh_token"], "pbkdf2"):
        assert secret not in text
