"""Token checks, revocation, client identity, rate limits and CORS at the gateway (real HTTP)."""

from __future__ import annotations

import base64
import json
import time

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from tests.conftest import assert_problem, assert_security_headers, free_port
from tests.gateway.conftest import running_gateway
from tests.support.servers import echoed_headers
from tests.support.tokens import AUDIENCE, ISSUER, TestIssuer, bearer

PROTECTED = "/api/v1/orders"
PUBLIC = "/api/v1/products"


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def hs256(claims: dict, secret: bytes, kid: str) -> str:
    """An HS256 token made by hand: the key-confusion attack that libraries refuse to produce."""
    import hashlib
    import hmac

    signing_input = f"{_b64({'alg': 'HS256', 'typ': 'at+jwt', 'kid': kid})}.{_b64(claims)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


def assert_401(response: httpx.Response, *, rejected: bool = True) -> None:
    """A 401 whose challenge says (RFC 6750) whether a token was sent and refused: refresh or sign in again."""
    body = assert_problem(response, 401)
    challenge = response.headers["www-authenticate"]
    if rejected:
        assert challenge == f'Bearer realm="comptoir", error="invalid_token", error_description="{body["detail"]}"'
    else:
        assert challenge == 'Bearer realm="comptoir"'


def test_valid_token_is_forwarded_with_the_original_header(gateway, issuer) -> None:  # noqa: ANN001
    token = issuer.access(role="customer")
    response = httpx.get(gateway[0] + PROTECTED, headers=bearer(token))
    assert response.status_code == 200
    assert echoed_headers(response.json())["authorization"] == f"Bearer {token}"


def test_protected_route_without_token_is_401(gateway) -> None:  # noqa: ANN001
    assert_401(httpx.get(gateway[0] + PROTECTED), rejected=False)
    assert_401(httpx.post(gateway[0] + "/api/v1/auth/logout", json={}), rejected=False)


def test_public_routes_need_no_token(gateway) -> None:  # noqa: ANN001
    assert httpx.get(gateway[0] + PUBLIC).status_code == 200
    assert httpx.post(gateway[0] + "/api/v1/auth/login", json={}).status_code == 201
    assert httpx.get(gateway[0] + "/api/v1/auth/.well-known/jwks.json").status_code == 200


def forged_tokens(issuer: TestIssuer) -> dict[str, str]:
    claims = issuer.access_claims(role="admin")
    public = issuer.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pem = issuer.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    now = int(time.time())
    return {
        "alg none": f"{_b64({'alg': 'none', 'typ': 'at+jwt', 'kid': issuer.kid})}.{_b64(claims)}.",
        "hs256 with public key": hs256(claims, public, issuer.kid),
        "hs256 with pem": hs256(claims, pem, issuer.kid),
        "forged kid": issuer.sign(claims, headers={"kid": "../../../../dev/null"}),
        "sql kid": issuer.sign(claims, headers={"kid": "x' OR '1'='1"}),
        "other key": TestIssuer(kid=issuer.kid).access(role="admin"),
        "jku": issuer.sign(claims, headers={"jku": "https://evil.example/jwks.json"}),
        "embedded jwk": issuer.sign(claims, headers={"jwk": issuer.jwk()}),
        "x5u": issuer.sign(claims, headers={"x5u": "https://evil.example/cert.pem"}),
        "expired": issuer.sign(claims | {"exp": now - 5}),
        "not yet valid": issuer.sign(claims | {"nbf": now + 300, "iat": now + 300}),
        "wrong audience": issuer.sign(claims | {"aud": "urn:another-api"}),
        "wrong issuer": issuer.sign(claims | {"iss": "urn:evil"}),
        "refresh as access": issuer.sign(claims | {"token_use": "refresh"}, typ="rt+jwt"),
        "service as access": issuer.service(caller="orders", audience=AUDIENCE),
        "garbage": "not.a.token",
        "truncated": issuer.access()[:-10],
    }


@pytest.mark.parametrize("case", list(forged_tokens(TestIssuer())))
def test_forged_and_wrong_tokens_are_401_everywhere(gateway, issuer, echo, case: str) -> None:  # noqa: ANN001
    token = forged_tokens(issuer)[case]
    upstream, _ = echo
    before = len(upstream.hits)
    assert_401(httpx.get(gateway[0] + PROTECTED, headers=bearer(token)))
    assert_401(httpx.get(gateway[0] + PUBLIC, headers=bearer(token)))  # present but invalid: 401 even on public
    assert len(upstream.hits) == before


@pytest.mark.parametrize(
    "header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer a b", "bearer", "Token abc", "Bearer eyJ.eyJ.sig"]
)
def test_malformed_authorization_is_401(gateway, header: str) -> None:  # noqa: ANN001
    # RFC 6750 §3.1: another scheme is no bearer token, so the challenge carries no error code.
    assert_401(
        httpx.get(gateway[0] + PROTECTED, headers={"Authorization": header}),
        rejected=header.split(" ")[0].lower() == "bearer",
    )


@pytest.mark.parametrize("path", [PROTECTED, PUBLIC])
def test_several_authorization_headers_are_401_whatever_their_order(gateway, issuer, path: str) -> None:  # noqa: ANN001
    """Which of two credentials would count is a guess the service behind might make differently."""
    valid = f"Bearer {issuer.access(role='customer')}"
    for pair in ([valid, "Bearer junk"], ["Bearer junk", valid], [valid, valid]):
        response = httpx.get(gateway[0] + path, headers=[("Authorization", value) for value in pair])
        assert_401(response)
        assert response.json()["detail"] == "Send one Authorization header, not several."
    assert httpx.get(gateway[0] + path, headers={"Authorization": valid}).status_code == 200


def test_revoked_session_is_refused(gateway, issuer) -> None:  # noqa: ANN001
    url, app = gateway
    token = issuer.access(sid="session-to-revoke")
    assert httpx.get(url + PROTECTED, headers=bearer(token)).status_code == 200  # now cached as verified
    app.state.revocations.add("session-to-revoke", time.time() + 3600)
    assert_401(httpx.get(url + PROTECTED, headers=bearer(token)))


def test_verified_tokens_are_cached_until_they_expire(gateway, issuer) -> None:  # noqa: ANN001
    url, app = gateway
    token = issuer.access(ttl=3600)
    httpx.get(url + PROTECTED, headers=bearer(token))
    assert token in app.pipeline.auth._cache


def test_spoofed_forwarded_for_does_not_dodge_limits(echo, issuer) -> None:  # noqa: ANN001
    with running_gateway(echo[1].url, issuer, anonymous_rate_limit="3/hour") as (url, _):
        codes = [
            httpx.get(url + PUBLIC, headers={"X-Forwarded-For": f"10.0.0.{i}", "X-Real-IP": f"10.0.0.{i}"}).status_code
            for i in range(5)
        ]
        assert codes == [200, 200, 200, 429, 429]


def test_forwarded_for_is_believed_from_trusted_proxies_only(echo, issuer) -> None:  # noqa: ANN001
    with running_gateway(
        echo[1].url, issuer, trusted_proxies="127.0.0.1/32, 10.0.0.0/8", anonymous_rate_limit="2/hour"
    ) as (url, _):
        seen = echoed_headers(
            httpx.get(url + PUBLIC, headers={"X-Forwarded-For": "6.6.6.6, 198.51.100.9, 10.1.2.3"}).json()
        )
        assert seen["x-forwarded-for"] == "198.51.100.9"  # right-most untrusted hop
        # A proxy that adds its own line after the client's: the lines are one list, read from the right.
        lines = [("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "198.51.100.7, 10.1.2.3")]
        assert echoed_headers(httpx.get(url + PUBLIC, headers=lines).json())["x-forwarded-for"] == "198.51.100.7"
        # each real client has its own bucket behind the proxy
        for client in ("198.51.100.1", "198.51.100.2"):
            codes = [httpx.get(url + PUBLIC, headers={"X-Forwarded-For": client}).status_code for _ in range(3)]
            assert codes == [200, 200, 429]
        # An IPv6 client is its /64 (one subscriber's): a new address in it is not a new bucket.
        clients = ("2001:db8:5:6::1", "2001:db8:5:6:ffff::2", "2001:db8:5:6::3", "2001:db8:5:7::1")
        codes = [httpx.get(url + PUBLIC, headers={"X-Forwarded-For": c}).status_code for c in clients]
        assert codes == [200, 200, 429, 200]


def test_rate_limit_headers_and_429(echo, issuer) -> None:  # noqa: ANN001
    with running_gateway(echo[1].url, issuer, anonymous_rate_limit="2/hour") as (url, _):
        first = httpx.get(url + PUBLIC)
        assert first.headers["ratelimit-limit"] == "2"
        assert first.headers["ratelimit-remaining"] == "1"
        assert 0 < int(first.headers["ratelimit-reset"]) <= 3600
        httpx.get(url + PUBLIC)
        limited = httpx.get(url + PUBLIC)
        assert_problem(limited, 429)
        assert 0 < int(limited.headers["retry-after"]) <= 3600
        assert limited.headers["ratelimit-remaining"] == "0"


def test_authenticated_limits_are_per_user(echo, issuer) -> None:  # noqa: ANN001
    with running_gateway(echo[1].url, issuer, authenticated_rate_limit="2/hour", anonymous_rate_limit="1/hour") as (
        url,
        _,
    ):
        alice, bob = bearer(issuer.access(sub="alice")), bearer(issuer.access(sub="bob"))
        assert [httpx.get(url + PROTECTED, headers=alice).status_code for _ in range(3)] == [200, 200, 429]
        assert httpx.get(url + PROTECTED, headers=bob).status_code == 200
        assert httpx.get(url + PROTECTED, headers=bob).headers["ratelimit-limit"] == "2"


def test_route_limits_are_tighter_and_configurable(echo, issuer) -> None:  # noqa: ANN001
    with running_gateway(
        echo[1].url, issuer, route_rate_limits="POST /api/v1/auth/login=2/minute; POST /api/v1/auth/register=1/hour"
    ) as (url, _):
        assert [httpx.post(url + "/api/v1/auth/login", json={}).status_code for _ in range(3)] == [201, 201, 429]
        assert [httpx.post(url + "/api/v1/auth/register", json={}).status_code for _ in range(2)] == [201, 429]
        assert httpx.get(url + PUBLIC).status_code == 200  # other routes unaffected


def test_a_token_does_not_lift_a_public_routes_limit_on_its_address(echo, issuer) -> None:  # noqa: ANN001
    """Login, register and the reset routes are limited per address: keyed by the caller's user, each account
    an address opened bought it a fresh allowance. Routes only users reach stay limited per user."""
    limits = "POST /api/v1/auth/register=2/hour; POST /api/v1/auth/otp/request=1/hour"
    with running_gateway(echo[1].url, issuer, route_rate_limits=limits) as (url, _):
        alice, bob = bearer(issuer.access(sub="alice")), bearer(issuer.access(sub="bob"))
        register = url + "/api/v1/auth/register"
        assert [httpx.post(register, json={}).status_code for _ in range(2)] == [201, 201]
        for token in (alice, bob):
            limited = httpx.post(register, json={}, headers=token)
            assert_problem(limited, 429)
        assert httpx.post(register, json={}, headers={"X-Forwarded-For": "192.0.2.9"}).status_code == 429  # untrusted
        otp = url + "/api/v1/auth/otp/request"
        assert [httpx.post(otp, json={}, headers=alice).status_code for _ in range(2)] == [201, 429]
        assert httpx.post(otp, json={}, headers=bob).status_code == 201


ALLOWED = "https://shop.example.com"


@pytest.fixture(scope="module")
def cors_gateway(echo, issuer):  # noqa: ANN001, ANN201
    with running_gateway(echo[1].url, issuer, cors_allowed_origins=f"{ALLOWED},https://admin.example.com") as running:
        yield running[0]


def test_cors_allows_listed_origins_with_credentials(cors_gateway: str) -> None:
    response = httpx.get(cors_gateway + PUBLIC, headers={"Origin": ALLOWED})
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert response.headers["access-control-allow-credentials"] == "true"
    assert "Origin" in response.headers["vary"]


def test_an_allowed_origin_can_read_every_answer_refusals_and_the_gateways_own_included(cors_gateway: str) -> None:
    """Without the CORS headers a browser hands the page a network error instead of the documented problem."""
    origin = {"Origin": ALLOWED}
    answers = {
        "too large": httpx.post(
            cors_gateway + "/api/v1/auth/register",
            content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
            headers=origin | {"content-type": "application/json"},
        ),
        "not json": httpx.post(
            cors_gateway + "/api/v1/auth/login", content=b"x", headers=origin | {"content-type": "text/plain"}
        ),
        "no such path": httpx.get(cors_gateway + "/api/v1/product", headers=origin),
        "health": httpx.get(cors_gateway + "/api/v1/health", headers=origin),
        "openapi": httpx.get(cors_gateway + "/api/v1/openapi.json", headers=origin),
    }
    assert [answers[k].status_code for k in ("too large", "not json", "no such path")] == [413, 415, 404]
    for name, answer in answers.items():
        assert answer.headers.get("access-control-allow-origin") == ALLOWED, name
        assert answer.headers["access-control-allow-credentials"] == "true", name
        assert "Origin" in answer.headers["vary"], name
        assert "Retry-After" in answer.headers["access-control-expose-headers"], name
    foreign = httpx.get(cors_gateway + "/api/v1/product", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in foreign.headers


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "null",
        "https://shop.example.com.evil.tld",
        "http://shop.example.com",
        "https://evilshop.example.com",
        "https://shop.example.com:8443",
        "*",
    ],
)
def test_cors_never_reflects_other_origins(cors_gateway: str, origin: str) -> None:
    response = httpx.get(cors_gateway + PUBLIC, headers={"Origin": origin})
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-credentials" not in response.headers
    preflight = httpx.options(
        cors_gateway + PROTECTED, headers={"Origin": origin, "Access-Control-Request-Method": "POST"}
    )
    assert_problem(preflight, 403)
    assert "access-control-allow-origin" not in preflight.headers


def test_cors_preflight_is_answered_by_the_gateway(cors_gateway: str, echo) -> None:  # noqa: ANN001
    upstream, _ = echo
    before = len(upstream.hits)
    response = httpx.options(
        cors_gateway + PROTECTED,
        headers={
            "Origin": ALLOWED,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
        },
    )
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "idempotency-key" in response.headers["access-control-allow-headers"]
    assert len(upstream.hits) == before
    odd = httpx.options(
        cors_gateway + PROTECTED,
        headers={
            "Origin": ALLOWED,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-user-role",
        },
    )
    assert_problem(odd, 403)


@pytest.mark.parametrize("value", ["*", "null", "https://*.example.com", "shop.example.com", "https://a.example/path"])
def test_cors_configuration_must_be_explicit(value: str) -> None:
    from pydantic import ValidationError

    from gateway.config import GatewaySettings

    with pytest.raises(ValidationError):
        GatewaySettings(cors_allowed_origins=value)


def test_security_headers_on_gateway_errors(gateway, echo, issuer) -> None:  # noqa: ANN001
    url, _ = gateway
    for response in (
        httpx.get(url + PROTECTED),  # 401
        httpx.get(url + "/api/v1/nope"),  # 404
        httpx.post(
            url + "/api/v1/auth/login", content=b"x" * (2 * 1024 * 1024), headers={"content-type": "application/json"}
        ),
    ):
        assert_security_headers(response)
    with running_gateway(echo[1].url, issuer, anonymous_rate_limit="1/hour") as (limited, _):
        httpx.get(limited + PUBLIC)
        assert_security_headers(httpx.get(limited + PUBLIC))  # 429


def test_issuer_constants_match_the_gateway_defaults() -> None:
    from gateway.config import GatewaySettings

    settings = GatewaySettings()
    assert (settings.token_issuer, settings.token_audience) == (ISSUER, AUDIENCE)


def test_security_events_are_recorded_without_secrets(gateway, issuer, echo) -> None:  # noqa: ANN001
    url, app = gateway
    events = app.state.security_events
    events.queue.clear()
    forged = TestIssuer(kid=issuer.kid).access(role="admin")
    httpx.get(url + PROTECTED, headers={**bearer(forged), "User-Agent": "probe/1"})
    port = int(url.rsplit(":", 1)[1])
    from tests.support.servers import raw_request

    raw_request(port, b"GET /api/v1/products/..%2Finternal HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    actions = [e["action"] for e in events.queue]
    assert actions == ["gateway.token.rejected", "gateway.path.blocked"]
    rejected = events.queue[0]
    assert rejected["ip"] == "127.0.0.1"
    assert rejected["user_agent"] == "probe/1"
    assert rejected["outcome"] == "denied"
    assert forged not in json.dumps(list(events.queue))


def test_refusals_are_recorded_up_to_the_addresss_own_limit_and_answered_as_before_past_it(
    echo,  # noqa: ANN001
    issuer,  # noqa: ANN001
) -> None:
    """Rejected tokens and blocked probes are answered before rate limiting; each was also an audit event, so one
    address put thousands of events a second into the chain. Their events now count in a bucket of their own per
    address; past it they are answered the same (a client whose token expired must still see its 401) and the
    address's own limit is untouched."""
    from prometheus_client import REGISTRY

    from tests.support.servers import raw_request

    def unrecorded(action: str) -> float:
        value = REGISTRY.get_sample_value("comptoir_gateway_security_events_unrecorded_total", {"action": action})
        return value or 0.0

    probe = b"GET /api/v1/products/..%2Finternal HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with running_gateway(echo[1].url, issuer, anonymous_rate_limit="3/hour") as (url, app):
        events = app.state.security_events
        events.queue.clear()
        port = int(url.rsplit(":", 1)[1])
        before = unrecorded("gateway.token.rejected"), unrecorded("gateway.path.blocked")
        answers = [httpx.get(url + PROTECTED, headers=bearer(f"junk{i}")) for i in range(8)]
        assert [a.status_code for a in answers] == [401] * 8
        assert all("invalid_token" in a.headers["www-authenticate"] for a in answers)
        assert b" 404 " in raw_request(port, probe).split(b"\r\n", 1)[0]
        several = httpx.get(url + PUBLIC, headers=[("Authorization", "Bearer a"), ("Authorization", "Bearer b")])
        assert several.status_code == 401
        assert [e["action"] for e in events.queue] == ["gateway.token.rejected"] * 3
        assert unrecorded("gateway.token.rejected") == before[0] + 6
        assert unrecorded("gateway.path.blocked") == before[1] + 1
        # The address's own budget is whole: its anonymous requests (a sign-in) are served.
        assert [httpx.get(url + PUBLIC).status_code for _ in range(4)] == [200, 200, 200, 429]


def test_security_event_queue_is_bounded(gateway) -> None:  # noqa: ANN001
    _, app = gateway
    events = app.state.security_events
    events.queue.clear()
    capacity, events.capacity = events.capacity, 5
    try:
        for _ in range(12):
            events.record({"method": "GET", "path": "/x", "headers": []}, "gateway.token.rejected")
        assert len(events.queue) == 5
    finally:
        events.capacity = capacity
        events.queue.clear()


def test_the_gateways_own_headers_reach_proxied_answers_and_its_failures_once(echo, issuer) -> None:  # noqa: ANN001
    """CORS, Vary and RateLimit headers are added to the upstream's answer as it is forwarded, and to the
    gateway's own answer when the upstream cannot be reached: each exactly once, with the security headers."""
    closed = f"http://127.0.0.1:{free_port()}"
    with running_gateway(echo[1].url, issuer, cors_allowed_origins=ALLOWED, orders_url=closed) as (url, _):
        token = bearer(issuer.access(role="customer"))
        for path, status in ((PUBLIC, 200), (PROTECTED, 503)):
            response = httpx.get(url + path, headers={"Origin": ALLOWED, **token})
            assert response.status_code == status
            for name in ("access-control-allow-origin", "ratelimit-limit", "ratelimit-remaining", "vary"):
                assert len(response.headers.get_list(name)) == 1, (path, name)
            assert response.headers["access-control-allow-origin"] == ALLOWED
            assert response.headers["ratelimit-limit"] == "10000"
            assert response.headers["vary"] == "Origin"
            assert_security_headers(response)
        assert response.headers["retry-after"] == "1"


def test_the_access_log_names_the_client_the_proxy_forwarded(
    echo,
    issuer,
    capfd: pytest.CaptureFixture[str],  # noqa: ANN001
) -> None:
    """Behind a trusted proxy every line would otherwise name the proxy: useless in an incident."""
    with running_gateway(echo[1].url, issuer, trusted_proxies="127.0.0.1/32", log_level="INFO") as (url, _):
        capfd.readouterr()
        # Served, unknown, probing /internal, and the gateway's own endpoint: every line names the client.
        paths = [PUBLIC, "/api/v1/nothing-here", "/api/v1/auth/internal/token", "/api/v1/openapi.json"]
        for path in paths:
            httpx.get(url + path, headers={"X-Forwarded-For": "198.51.100.23"})
        out, deadline = "", time.monotonic() + 10
        while f'"path": "{paths[-1]}"' not in out and time.monotonic() < deadline:  # written just after the answer
            out += capfd.readouterr().out
            time.sleep(0.01)
        lines = [json.loads(line) for line in out.splitlines() if '"http.request"' in line]
    assert {line["path"]: line["client"] for line in lines} == dict.fromkeys(paths, "198.51.100.23")
