"""Token verification against the attacks RFC 8725 lists."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from common.http import HttpxTransport
from common.revocation import RevocationSet
from common.tokens import InvalidToken, RemoteJWKS, TokenVerifier
from gateway.auth import GatewayAuth
from tests.support.tokens import AUDIENCE, ISSUER, TestIssuer


@pytest.fixture
def issuer() -> TestIssuer:
    return TestIssuer()


@pytest.fixture
def verifier(issuer: TestIssuer) -> TokenVerifier:
    return TokenVerifier(issuer.keys(), issuer=ISSUER, audience=AUDIENCE)


def b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def test_a_good_token_verifies(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    claims = await verifier.verify(issuer.access(role="staff", sub="u-1", sid="s-1"))
    assert (claims.sub, claims.role, claims.sid, claims.token_use) == ("u-1", "staff", "s-1", "access")
    assert claims.has_role("customer")
    assert claims.has_role("staff")
    assert not claims.has_role("admin")


async def test_alg_none_is_refused(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    header = {"alg": "none", "typ": "at+jwt", "kid": issuer.kid}
    with pytest.raises(InvalidToken, match="algorithm"):
        await verifier.verify(f"{b64(header)}.{b64(issuer.access_claims())}.")


async def test_hs256_signed_with_the_public_key_is_refused(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    public = issuer.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    forged = jwt.encode(
        issuer.access_claims(role="admin"), public, algorithm="HS256", headers={"kid": issuer.kid, "typ": "at+jwt"}
    )
    with pytest.raises(InvalidToken, match="algorithm"):
        await verifier.verify(forged)


@pytest.mark.parametrize("header", ["jku", "x5u", "jwk", "x5c"])
async def test_key_material_in_the_header_is_refused(issuer: TestIssuer, verifier: TokenVerifier, header: str) -> None:
    value: object = {"kty": "OKP"} if header == "jwk" else "https://evil.example/keys"
    with pytest.raises(InvalidToken, match="key material"):
        await verifier.verify(issuer.sign(issuer.access_claims(), headers={header: value}))


async def test_another_key_is_refused(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    impostor = TestIssuer(kid=issuer.kid)  # same kid, different key
    with pytest.raises(InvalidToken):
        await verifier.verify(impostor.access())


@pytest.mark.parametrize("kid", ["../../etc/passwd", "' OR 1=1 --", "x" * 129, ""])
async def test_kid_is_opaque(issuer: TestIssuer, verifier: TokenVerifier, kid: str) -> None:
    with pytest.raises(InvalidToken):
        await verifier.verify(issuer.sign(issuer.access_claims(), headers={"kid": kid}))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"iss": "urn:evil"}, "InvalidIssuerError"),
        ({"aud": "urn:other-api"}, "InvalidAudienceError"),
        ({"exp": int(time.time()) - 1}, "expired"),
        ({"nbf": int(time.time()) + 600, "iat": int(time.time()) + 600}, "not yet valid"),
        ({"token_use": "refresh"}, "wrong token use"),
        ({"role": "superuser"}, "bad access claims"),
        ({"sid": None}, "bad access claims"),
        ({"exp": "never"}, "bad time claims"),
    ],
)
async def test_bad_claims_are_refused(issuer: TestIssuer, verifier: TokenVerifier, change: dict, reason: str) -> None:
    claims = issuer.access_claims() | change
    with pytest.raises(InvalidToken, match=reason):
        await verifier.verify(issuer.sign(claims))


async def test_missing_claims_are_refused(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    claims = issuer.access_claims()
    del claims["jti"]
    with pytest.raises(InvalidToken):
        await verifier.verify(issuer.sign(claims))


async def test_a_service_token_is_not_an_access_token(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    with pytest.raises(InvalidToken, match="type"):
        await verifier.verify(issuer.service(caller="orders", audience=AUDIENCE))


async def test_an_access_token_is_not_a_service_token(issuer: TestIssuer) -> None:
    service_verifier = TokenVerifier(issuer.keys(), issuer=ISSUER, audience="inventory", token_use="service")
    assert (await service_verifier.verify(issuer.service(caller="orders", audience="inventory"))).sub == "orders"
    with pytest.raises(InvalidToken):
        await service_verifier.verify(issuer.access(aud="inventory"))
    with pytest.raises(InvalidToken):  # minted for another callee
        await service_verifier.verify(issuer.service(caller="orders", audience="audit"))


async def test_the_clock_is_injectable(issuer: TestIssuer) -> None:
    now = [time.time()]
    verifier = TokenVerifier(issuer.keys(), issuer=ISSUER, audience=AUDIENCE, clock=lambda: now[0])
    token = issuer.access(ttl=60)
    await verifier.verify(token)
    now[0] += 61
    with pytest.raises(InvalidToken, match="expired"):
        await verifier.verify(token)


async def test_a_repeated_token_skips_the_signature_check_but_never_the_clock(issuer: TestIssuer) -> None:
    # The verifier's clock is the real one plus a jump the test makes: it never reads earlier than the
    # tokens' nbf (whole seconds, rounded down), as a clock sampled once before issuing them could.
    skew = [0.0]
    verifier = TokenVerifier(
        issuer.keys(), issuer=ISSUER, audience=AUDIENCE, clock=lambda: time.time() + skew[0], cache_size=2
    )
    checks = []
    check_signature = verifier._check_signature

    async def counting(token: str):  # noqa: ANN202
        checks.append(token)
        return await check_signature(token)

    verifier._check_signature = counting  # type: ignore[method-assign]
    token = issuer.access(ttl=60)
    for _ in range(5):
        assert (await verifier.verify(token)).sub
    assert len(checks) == 1
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(InvalidToken):  # another string is another cache key: its signature is checked
        await verifier.verify(forged)
    for _ in range(3):
        await verifier.verify(issuer.access(ttl=60))
    assert len(verifier._verified) <= 2
    skew[0] += 61
    with pytest.raises(InvalidToken, match="expired"):
        await verifier.verify(token)


async def test_a_token_stops_with_its_key_even_when_verified_before(issuer: TestIssuer) -> None:
    """A leaked key withdrawn (rotated, its file removed, gone from the JWKS): what it signed stops, the
    tokens already seen and cached included."""
    keys = issuer.keys()
    verifier = TokenVerifier(keys, issuer=ISSUER, audience=AUDIENCE)
    gateway = GatewayAuth(verifier, RevocationSet())
    token = issuer.access()
    assert (await verifier.verify(token)).kid == issuer.kid
    assert (await gateway.authenticate(f"Bearer {token}".encode())).sub
    keys.replace({"keys": [TestIssuer("next-key").jwk()]})
    with pytest.raises(InvalidToken, match="key withdrawn"):
        await verifier.verify(token)
    with pytest.raises(InvalidToken, match="key withdrawn"):
        await gateway.authenticate(f"Bearer {token}".encode())


async def test_a_lifetime_auth_never_gives_is_refused(issuer: TestIssuer, verifier: TokenVerifier) -> None:
    """With a leaked key, a token forged to last a month is still refused: auth gives at most a day."""
    assert (await verifier.verify(issuer.access(ttl=86_400))).sub
    with pytest.raises(InvalidToken, match="lifetime too long"):
        await verifier.verify(issuer.access(ttl=30 * 86_400))
    service = TokenVerifier(issuer.keys(), issuer=ISSUER, audience="inventory", token_use="service")
    assert (await service.verify(issuer.service(caller="orders", audience="inventory", ttl=3600))).sub
    with pytest.raises(InvalidToken, match="lifetime too long"):
        await service.verify(issuer.service(caller="orders", audience="inventory", ttl=3601))


@pytest.mark.parametrize("token", ["", "a.b", "not-a-jwt", "x" * 5000, "eyJhbGciOiJFZERTQSJ9.e30"])
async def test_garbage_is_refused(verifier: TokenVerifier, token: str) -> None:
    with pytest.raises(InvalidToken):
        await verifier.verify(token)


async def test_remote_jwks_refetches_unknown_kids_at_most_every_few_seconds(issuer: TestIssuer) -> None:
    calls = []
    rotated = TestIssuer(kid="test-key-2")
    documents = [issuer.jwks(), {"keys": [issuer.jwk(), rotated.jwk()]}]

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        return httpx.Response(200, json=documents[min(len(calls) - 1, 1)])

    now = [1000.0]
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://auth") as client:
        jwks = RemoteJWKS("/.well-known/jwks.json", HttpxTransport(client), min_refetch_seconds=5, clock=lambda: now[0])
        verifier = TokenVerifier(jwks, issuer=ISSUER, audience=AUDIENCE)
        await verifier.verify(issuer.access())
        assert len(calls) == 1
        for _ in range(20):  # forged kids inside the window cost nothing
            with pytest.raises(InvalidToken):
                await verifier.verify(issuer.sign(issuer.access_claims(), headers={"kid": "forged"}))
        assert len(calls) == 1
        now[0] += 6  # a rotated key becomes known after the window
        assert (await verifier.verify(rotated.access(sub="u-2"))).sub == "u-2"
        assert len(calls) == 2


async def test_remote_jwks_keeps_working_while_auth_is_down(issuer: TestIssuer) -> None:
    up = [True]

    def handler(request: httpx.Request) -> httpx.Response:
        if not up[0]:
            raise httpx.ConnectError("down")
        return httpx.Response(200, json=issuer.jwks())

    now = [0.0]
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        jwks = RemoteJWKS("http://auth/jwks", HttpxTransport(client), refresh_seconds=10, clock=lambda: now[0])
        verifier = TokenVerifier(jwks, issuer=ISSUER, audience=AUDIENCE)
        await verifier.verify(issuer.access())
        up[0] = False
        now[0] += 100  # stale, and the refresh fails: the cached key still verifies
        await verifier.verify(issuer.access())


async def test_a_hung_auth_never_holds_up_a_token_verified_before(issuer: TestIssuer) -> None:
    """The key check of a cached token reads the keys known now; a stale list is refreshed in the background.
    Once the refresh says the key is gone, the token stops."""
    fetches: list[asyncio.Event] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if fetches:  # every fetch after the first hangs until the test lets it answer
            fetches[-1].set()
            await released.wait()
            return httpx.Response(200, json={"keys": [TestIssuer("next-key").jwk()]})
        fetches.append(asyncio.Event())
        return httpx.Response(200, json=issuer.jwks())

    released = asyncio.Event()
    now = [0.0]
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        jwks = RemoteJWKS("http://auth/jwks", HttpxTransport(client), refresh_seconds=10, clock=lambda: now[0])
        verifier = TokenVerifier(jwks, issuer=ISSUER, audience=AUDIENCE)
        gateway = GatewayAuth(verifier, RevocationSet())
        token = issuer.access()
        await gateway.authenticate(f"Bearer {token}".encode())
        now[0] += 100  # stale: the next check starts a refresh, which hangs
        for _ in range(50):  # served from the keys known now, none waits for the hung fetch
            assert (await asyncio.wait_for(gateway.authenticate(f"Bearer {token}".encode()), 5)).sub
            assert (await asyncio.wait_for(verifier.verify(token), 5)).sub
        await asyncio.wait_for(fetches[-1].wait(), 5)  # one refresh in flight, not one per request
        released.set()
        while jwks.is_published(issuer.kid):  # the refresh lands: the key is gone
            await asyncio.sleep(0)
        # Concurrent requests with the withdrawn key's token: each a refusal, never a KeyError (a 500).
        results = await asyncio.gather(
            *(gateway.authenticate(f"Bearer {token}".encode()) for _ in range(3)),
            *(verifier.verify(token) for _ in range(3)),
            return_exceptions=True,
        )
        assert all(isinstance(r, InvalidToken) for r in results), results
