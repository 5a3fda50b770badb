"""The token contract: claims, JWKS, key files, rotation without restart, service tokens, who may call what."""

from __future__ import annotations

import os
import stat
import time
from typing import Any

import httpx
import jwt
import pytest

from common.http import HttpxTransport
from common.tokens import ACCESS, SERVICE, RemoteJWKS, TokenVerifier
from services.auth.bootstrap import rotate_keys
from services.auth.keys import KeyStore, add_key, rotate
from tests.auth.conftest import CLIENT_SECRETS, AuthClient, MakeAuth
from tests.conftest import assert_problem
from tests.support.tokens import AUDIENCE, ISSUER, TestIssuer, bearer


async def jwks(auth: AuthClient, path: str = "/.well-known/jwks.json") -> dict[str, Any]:
    response = await auth.client.get(path)
    assert response.status_code == 200
    return dict(response.json())


def kid_of(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


async def remote_verifier(auth: AuthClient, *, audience: str = AUDIENCE, token_use: str = ACCESS) -> TokenVerifier:
    """How the gateway and the other services verify: over HTTP from the JWKS, with their own code."""
    keys = RemoteJWKS("/.well-known/jwks.json", HttpxTransport(auth.client), min_refetch_seconds=0)
    return TokenVerifier(keys, issuer=ISSUER, audience=audience, token_use=token_use, clock=auth.clock)


async def test_access_token_header_and_claims(auth: AuthClient) -> None:
    user, pair = await auth.user("staff")
    token = pair["access_token"]
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "kid": header["kid"], "typ": "at+jwt"}
    claims = await (await remote_verifier(auth)).verify(token)
    assert (claims.sub, claims.role, claims.iss, claims.aud) == (user["id"], "staff", ISSUER, AUDIENCE)
    assert claims.exp - claims.iat == 3600
    assert claims.nbf == claims.iat
    assert claims.raw["token_use"] == "access"
    assert claims.sid
    assert claims.jti
    assert set(claims.raw) == {"iss", "aud", "sub", "role", "sid", "jti", "iat", "nbf", "exp", "token_use"}


async def test_jwks_is_published_at_both_paths(auth: AuthClient) -> None:
    document = await jwks(auth)
    assert document == await jwks(auth, "/api/v1/auth/.well-known/jwks.json")
    keys = document["keys"]
    assert isinstance(keys, list)
    assert len(keys) == 1
    assert set(keys[0]) == {"kty", "crv", "x", "kid", "alg", "use"}
    assert (keys[0]["kty"], keys[0]["crv"], keys[0]["alg"], keys[0]["use"]) == ("OKP", "Ed25519", "EdDSA", "sig")
    assert "d" not in keys[0]


async def test_keys_are_generated_private_on_first_start(auth: AuthClient) -> None:
    directory = auth.settings.resolved_keys_dir
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = [p for p in directory.iterdir() if not p.name.startswith(".")]
    assert {p.suffix for p in files} == {".pem", ".key"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


async def test_rotation_without_restart_keeps_old_tokens_valid(auth: AuthClient) -> None:
    user, before = await auth.user()
    old_kid = kid_of(before["access_token"])
    new_key = rotate(auth.settings.resolved_keys_dir, activation_delay=10, retire_after=3660, now=auth.clock.now)
    auth.clock.advance(3)  # the directory is re-read every 2 s
    kids = [k["kid"] for k in (await jwks(auth))["keys"]]
    assert kids == [old_kid, new_key.kid]  # published before it signs
    assert kid_of((await auth.tokens(user["email"]))["access_token"]) == old_kid
    auth.clock.advance(10)
    after = await auth.tokens(user["email"])
    assert kid_of(after["access_token"]) == new_key.kid
    verifier = await remote_verifier(auth)
    for token in (before["access_token"], after["access_token"]):
        await verifier.verify(token)
        assert (await auth.me(token)).status_code == 200
    # The old key stays published until its last token has expired, then it goes.
    auth.clock.advance(3600)
    assert [k["kid"] for k in (await jwks(auth))["keys"]] == [old_kid, new_key.kid]
    auth.clock.advance(100)
    assert [k["kid"] for k in (await jwks(auth))["keys"]] == [new_key.kid]


def test_rotate_prunes_keys_that_no_token_needs(tmp_path: object) -> None:
    from pathlib import Path

    directory = Path(str(tmp_path)) / "keys"
    now = time.time()
    first = add_key(directory, not_before=now - 10_000)
    add_key(directory, not_before=now - 5_000)
    rotate(directory, activation_delay=10, retire_after=3660, now=now)
    store = KeyStore(directory=directory, clock=lambda: now + 20, publish_after_retirement=3660)
    store.load()
    assert first.kid not in {k.kid for k in store.published()}
    assert len(list(directory.glob("*.pem"))) == 2


def test_comptoir_keys_rotate_uses_the_settings(tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    from pathlib import Path

    from services.auth.config import Settings

    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    key = rotate_keys(Settings())
    files = list((Path(str(tmp_path)) / "keys").glob("*.pem"))
    assert len(files) == 1
    assert int(files[0].name.split("-")[0]) >= int(time.time()) + 9
    assert key.kid


async def test_keys_can_come_from_a_setting(make_auth: MakeAuth, tmp_path: object) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pems = [
        Ed25519PrivateKey.generate()
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode()
        for _ in range(2)
    ]
    async with make_auth(signing_keys="\n".join(pems), otp_hmac_key="k" * 40) as auth:
        kids = [k["kid"] for k in (await jwks(auth))["keys"]]
        assert len(kids) == 2
        _, pair = await auth.user()
        assert kid_of(pair["access_token"]) == kids[-1]


async def test_tokens_signed_by_anyone_else_are_refused(auth: AuthClient) -> None:
    user, _ = await auth.user("admin")
    forged = TestIssuer().access(sub=user["id"], role="admin")
    assert_problem(await auth.me(forged), 401)
    assert_problem(await auth.get("/api/v1/auth/admin/users", forged), 401)


# ---- service tokens ----


async def ask(auth: AuthClient, client_id: str, secret: str, audience: str) -> httpx.Response:
    return await auth.client.post(
        "/internal/token", json={"client_id": client_id, "client_secret": secret, "audience": audience}
    )


@pytest.mark.parametrize(
    ("caller", "audience"),
    [("gateway", "auth"), ("gateway", "audit"), ("orders", "inventory"), ("inventory", "audit"), ("audit", "auth")],
)
async def test_service_tokens_for_allowed_audiences(auth: AuthClient, caller: str, audience: str) -> None:
    response = await ask(auth, caller, CLIENT_SECRETS[caller], audience)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["token_type"], body["expires_in"]) == ("bearer", 300)
    token = body["access_token"]
    assert jwt.get_unverified_header(token)["typ"] == "service+jwt"
    claims = await (await remote_verifier(auth, audience=audience, token_use=SERVICE)).verify(token)
    assert (claims.sub, claims.aud, claims.raw["token_use"]) == (caller, audience, "service")
    assert claims.exp - claims.iat == 300


@pytest.mark.parametrize(
    ("caller", "secret", "audience", "status"),
    [
        ("gateway", "wrong secret", "auth", 401),
        ("nobody", CLIENT_SECRETS["gateway"], "auth", 401),
        ("gateway", CLIENT_SECRETS["orders"], "auth", 401),
        ("gateway", CLIENT_SECRETS["gateway"], "orders", 403),
        ("gateway", CLIENT_SECRETS["gateway"], "inventory", 403),
        ("audit", CLIENT_SECRETS["audit"], "orders", 403),
        ("auth", CLIENT_SECRETS["auth"], "orders", 403),
    ],
)
async def test_bad_client_credentials_and_audiences(
    auth: AuthClient, caller: str, secret: str, audience: str, status: int
) -> None:
    body = assert_problem(await ask(auth, caller, secret, audience), status)
    assert secret not in str(body)
    denied = await auth.events("auth.service_token.denied")
    assert len(denied) == 1
    assert secret not in await auth.outbox_text()


async def test_a_user_token_is_never_accepted_on_internal_endpoints(auth: AuthClient) -> None:
    _, pair = await auth.user("admin")
    assert_problem(await auth.get("/internal/revocations", pair["access_token"]), 401)


async def test_a_service_token_is_never_accepted_on_public_endpoints(auth: AuthClient) -> None:
    token = (await ask(auth, "gateway", CLIENT_SECRETS["gateway"], "auth")).json()["access_token"]
    for path in ("/api/v1/auth/me", "/api/v1/auth/sessions", "/api/v1/auth/admin/users"):
        assert_problem(await auth.get(path, token), 401)


async def test_the_feed_accepts_only_its_callers_and_audience(auth: AuthClient) -> None:
    wrong_audience = (await ask(auth, "gateway", CLIENT_SECRETS["gateway"], "audit")).json()["access_token"]
    assert_problem(await auth.get("/internal/revocations", wrong_audience), 401)
    stranger = TestIssuer().service(caller="gateway", audience="auth")
    assert_problem(await auth.get("/internal/revocations", stranger), 401)
    assert_problem(await auth.client.get("/internal/revocations"), 401)
    for caller in ("gateway", "inventory", "orders", "audit"):
        token = (await ask(auth, caller, CLIENT_SECRETS[caller], "auth")).json()["access_token"]
        assert (await auth.get("/internal/revocations", token)).status_code == 200
    assert_problem(await auth.get("/internal/revocations", token, params={"after": -1}), 422)


async def test_the_feed_checks_its_caller_before_its_query_on_either_path(auth: AuthClient) -> None:
    """A plain ``after`` is served without FastAPI's per-request work; any other query by FastAPI: both
    refuse a stranger before looking at the query, then answer a bad query with 422."""
    token = (await ask(auth, "gateway", CLIENT_SECRETS["gateway"], "auth")).json()["access_token"]
    bad = ("after=-1", "after=x", f"after={2**63}", "after=", "after=1%00")
    for query in (*bad, "after=5", ""):
        assert_problem(await auth.client.get(f"/internal/revocations?{query}"), 401)
    for query in bad:
        assert_problem(await auth.get(f"/internal/revocations?{query}", token), 422)
    for query in (f"after={2**63 - 1}", "after=0", "", "after=1&after=2", "other=1"):
        answer = await auth.get(f"/internal/revocations?{query}", token)
        assert (answer.status_code, answer.json()) == (200, {"items": [], "has_more": False})
        assert answer.headers["content-type"] == "application/json"


async def test_expired_access_tokens_are_refused(auth: AuthClient) -> None:
    _, pair = await auth.user()
    auth.clock.advance(3600)
    assert_problem(await auth.me(pair["access_token"]), 401)


async def test_key_files_are_not_world_readable_even_with_a_loose_umask(make_auth: MakeAuth) -> None:
    old = os.umask(0)
    try:
        async with make_auth() as auth:
            for path in auth.settings.resolved_keys_dir.iterdir():
                if not path.name.startswith("."):
                    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)


async def test_bearer_header_shapes(auth: AuthClient) -> None:
    _, pair = await auth.user()
    for value in ("Basic abc", f"Bearer {pair['access_token']} extra", "Bearer"):
        refused = await auth.client.get("/api/v1/auth/me", headers={"Authorization": value})
        assert_problem(refused, 401)
        # RFC 6750 §3.1: another scheme is no bearer token, so the challenge carries no error code.
        assert ("error=" in refused.headers["www-authenticate"]) is value.startswith("Bearer")
    assert (await auth.client.get("/api/v1/auth/me", headers=bearer(pair["access_token"]))).status_code == 200


async def test_the_openapi_document_describes_the_auth_api(auth: AuthClient) -> None:
    document = (await auth.client.get("/openapi.json")).json()
    for path in ("/api/v1/auth/login", "/api/v1/auth/token/refresh", "/api/v1/auth/me", "/internal/revocations"):
        assert path in document["paths"]
