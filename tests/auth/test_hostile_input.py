"""No input makes the auth service answer 500, and no error echoes what was sent."""

from __future__ import annotations

import pytest

from tests.auth.conftest import AuthClient
from tests.support.accounts import CONSENT
from tests.support.tokens import bearer

NASTY: list[object] = ["a\x00b", "x" * 5000, 12, None, [], {"$ne": ""}, "' OR 1=1 --", "😀" * 200, True]

ANON: list[tuple[str, str, dict[str, object]]] = [
    (
        "POST",
        "/api/v1/auth/register",
        {"email": "ok@example.cm", "password": "fine long passphrase", "phone": None} | CONSENT,
    ),
    ("POST", "/api/v1/auth/login", {"email": "ok@example.cm", "password": "fine long passphrase", "device_token": "x"}),
    ("POST", "/api/v1/auth/login/mfa", {"mfa_token": "abc", "code": "123456", "device_token": "x"}),
    ("POST", "/api/v1/auth/token/refresh", {"refresh_token": "abc"}),
    ("POST", "/api/v1/auth/password-reset/request", {"email": "ok@example.cm"}),
    ("POST", "/api/v1/auth/password-reset/confirm", {"token": "abc", "new_password": "fine long passphrase"}),
    ("POST", "/internal/token", {"client_id": "gateway", "client_secret": "x", "audience": "auth"}),
]
USER: list[tuple[str, str, dict[str, object]]] = [
    ("POST", "/api/v1/auth/logout", {"refresh_token": "abc"}),
    ("PATCH", "/api/v1/auth/me", {"full_name": "A", "phone": "+237671234567"}),
    ("POST", "/api/v1/auth/me/password", {"current_password": "x", "new_password": "fine long passphrase"}),
    ("POST", "/api/v1/auth/otp/request", {"phone": "+237671234567"}),
    ("POST", "/api/v1/auth/otp/verify", {"code": "123456"}),
    ("DELETE", "/api/v1/auth/me", {"password": "x"}),
    ("PATCH", "/api/v1/auth/me/consent", {"marketing_consent": True, "accept_terms_version": "2026-12-01"}),
    ("POST", "/api/v1/auth/mfa/totp/confirm", {"password": "x", "code": "123456"}),
    ("POST", "/api/v1/auth/mfa/recovery-codes", {"code": "123456"}),
    ("POST", "/api/v1/auth/mfa/totp/disable", {"password": "x", "code": "123456"}),
]


@pytest.mark.parametrize(("method", "path", "body"), ANON + USER)
async def test_no_field_value_causes_a_500(auth: AuthClient, method: str, path: str, body: dict[str, object]) -> None:
    _, pair = await auth.user("admin")
    headers = bearer(pair["access_token"])
    for field in body:
        for value in NASTY:
            response = await auth.client.request(method, path, json=body | {field: value}, headers=headers)
            assert response.status_code < 500, (field, value, response.text)
            if response.status_code >= 400 and isinstance(value, str) and len(value) > 3:
                assert value not in response.text
    for raw in (b"", b"{", b"[]", b'"x"', b"null", b"\xff\xfe"):
        response = await auth.client.request(
            method, path, content=raw, headers=headers | {"content-type": "application/json"}
        )
        assert response.status_code < 500, (raw, response.text)


async def test_query_and_path_parameters(auth: AuthClient) -> None:
    _, pair = await auth.user("admin")
    for params in ({"q": "a\x00b"}, {"q": "%_\\"}, {"role": "root"}, {"limit": "1e9"}, {"cursor": "\x00"}):
        response = await auth.get("/api/v1/auth/admin/users", pair["access_token"], params=params)
        assert response.status_code < 500, (params, response.text)
    for path in ("/api/v1/auth/sessions/%00", "/api/v1/auth/admin/users/1/unlock", "/internal/revocations?after=x"):
        response = await auth.client.request(
            "DELETE" if "sessions" in path else "POST", path, headers=bearer(pair["access_token"])
        )
        assert response.status_code < 500, path
