"""Routing, /internal blocking, header hygiene, streaming, limits on size and time, upstream failures."""

from __future__ import annotations

import http.client
import json
import socket
import time

import httpx
import pytest

from gateway.server import GatewayHttpProtocol
from tests.conftest import assert_problem, assert_security_headers, free_port
from tests.gateway.conftest import running_gateway
from tests.support.servers import echoed_headers, raw_request
from tests.support.tokens import bearer


def test_prefixes_reach_their_upstream(gateway, echo) -> None:  # noqa: ANN001
    url, _ = gateway
    for path in ("/api/v1/products", "/api/v1/auth/login", "/api/v1/products/abc/images/def"):
        method = "POST" if path.endswith("login") else "GET"
        response = httpx.request(method, url + path + "?q=savon&limit=2", json={} if method == "POST" else None)
        assert response.status_code in (200, 201)
        assert response.json()["path"] == path
        assert response.json()["query"] == "q=savon&limit=2"


@pytest.mark.parametrize(
    "path", ["/api/v2/products", "/api/v1/unknown", "/api/v1/productsx", "/nothing", "/internal/token"]
)
def test_unknown_paths_are_404_problems(gateway, path: str) -> None:  # noqa: ANN001
    # One wording for every 404, whichever part of the gateway answers it.
    assert assert_problem(httpx.get(gateway[0] + path), 404)["detail"] == "No such resource."


@pytest.mark.parametrize(
    "path",
    [
        b"/api/v1/auth/internal/token",
        b"/api/v1/products/internal",
        b"/api/v1/products/INTERNAL/reserve",
        b"/api/v1/products/%69nternal/reserve",
        b"/api/v1/products/..%2F..%2Finternal%2Freserve",
        b"/api/v1/products/%2e%2e/%2e%2e/internal/reserve",
        b"/api/v1/products/../../internal/reserve",
        b"/api/v1/products/./internal",
        b"/api/v1/products//internal",
        b"/api/v1/products%2Finternal",
        b"/api/v1/products/%252e%252e/internal",
        b"/api/v1/products\\..\\internal",
        b"/internal/reserve",
        b"//internal/reserve",
    ],
)
def test_internal_is_never_forwarded_however_spelled(gateway, echo, path: bytes) -> None:  # noqa: ANN001
    url, _ = gateway
    port = int(url.rsplit(":", 1)[1])
    upstream, _ = echo
    before = len(upstream.hits)
    answer = raw_request(port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status = answer.split(b" ", 2)[1]
    assert status in (b"404", b"400"), answer[:200]
    assert len(upstream.hits) == before, "the upstream was reached"


def test_gateway_owned_and_hop_by_hop_headers_are_stripped(gateway) -> None:  # noqa: ANN001
    response = httpx.get(
        gateway[0] + "/api/v1/products",
        headers={
            "X-Forwarded-For": "6.6.6.6",
            "X-Forwarded-Host": "evil.example",
            "X-Real-IP": "6.6.6.6",
            "X-User-Id": "admin",
            "X-User-Role": "admin",
            "Forwarded": "for=6.6.6.6",
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "1",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "TE": "trailers",
            "User-Agent": "shop-app/1.0",
        },
    )
    seen = echoed_headers(response.json())
    for name in (
        "x-forwarded-host",
        "x-real-ip",
        "x-user-id",
        "x-user-role",
        "forwarded",
        "x-secret-hop",
        "proxy-authorization",
        "te",
    ):
        assert name not in seen, name
    assert seen["x-forwarded-for"] == "127.0.0.1"  # the socket peer, not what the client claimed
    assert seen["user-agent"] == "shop-app/1.0"
    assert seen["x-request-id"] == response.headers["x-request-id"]
    # and on the way back: the upstream's hop-by-hop, Connection-listed and Server headers are gone
    assert "x-upstream-hop" not in response.headers
    assert "keep-alive" not in response.headers
    assert "server" not in response.headers
    assert_security_headers(response)


def test_each_forwarded_request_carries_the_gateways_deadline_never_the_clients(gateway) -> None:  # noqa: ANN001
    url, app = gateway
    before = time.time()
    response = httpx.get(url + "/api/v1/products", headers={"X-Comptoir-Deadline": "1"})
    after = time.time()
    (sent,) = [value for name, value in response.json()["headers"] if name == "x-comptoir-deadline"]
    deadline = float(sent)
    budget = app.state.settings.upstream_deadline_seconds
    assert before + budget - 0.01 <= deadline <= after + budget + 0.01


def test_client_request_id_is_forwarded(gateway) -> None:  # noqa: ANN001
    response = httpx.get(gateway[0] + "/api/v1/products", headers={"X-Request-ID": "shop-app-req-000123"})
    assert echoed_headers(response.json())["x-request-id"] == "shop-app-req-000123"


def test_large_responses_stream(gateway) -> None:  # noqa: ANN001
    with httpx.stream("GET", gateway[0] + "/api/v1/products/x/images/stream") as response:
        assert response.status_code == 200
        total = sum(len(chunk) for chunk in response.iter_bytes())
    assert total == 48 * 65536


def test_clients_that_never_read_their_answers_hold_no_upstream_connection(echo, issuer) -> None:  # noqa: ANN001
    """Pipelined GETs of large pages from clients that never read: once their sockets are full, each such
    connection used to keep one of the upstream's pooled connections for as long as it lasted."""
    upstream, server = echo
    settings = {"upstream_pool_size": 2, "upstream_connect_timeout_seconds": 1}
    with running_gateway(server.url, issuer, **settings) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        hogs = []
        for _ in range(3):
            hog = socket.socket()
            hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            hog.connect(("127.0.0.1", port))
            hog.sendall(b"GET /api/v1/products/page HTTP/1.1\r\nHost: x\r\n\r\n" * 60)
            hogs.append(hog)
        try:
            # Until the gateway has stopped asking for more pages: every hog's socket is full.
            seen, deadline = -1, time.monotonic() + 30
            while seen != len(upstream.hits) and time.monotonic() < deadline:
                seen = len(upstream.hits)
                time.sleep(0.5)
            assert seen < 3 * 60, "the hogs were not held up"
            response = httpx.get(url + "/api/v1/products", timeout=10)
            assert response.status_code == 200, response.text
        finally:
            for hog in hogs:
                hog.close()


class Impatient(GatewayHttpProtocol):
    header_timeout = 0.5
    body_idle_timeout = 0.5
    body_timeout = 1.5


def closed_by_the_gateway(sock: socket.socket) -> bytes:
    """What the gateway sent before it closed the connection (the test's own limit: 10 s)."""
    sock.settimeout(10)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


GET = b"GET /api/v1/products HTTP/1.1\r\nHost: x\r\n\r\n"
LOGIN_HEAD = b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize(
    "sent",
    [
        b"",  # connects and says nothing
        b"GET /api/v1/products HTTP/1.1\r\nHost: x\r\n",  # headers never finished
        LOGIN_HEAD + b"Content-Length: 100\r\n\r\n{",  # a body that stops
        b"\r\n",  # after an answered request: a blank line (uvicorn's keep-alive timer stops), then nothing
    ],
)
def test_a_client_that_trickles_its_request_is_disconnected(echo, issuer, sent: bytes) -> None:  # noqa: ANN001
    upstream, server = echo
    before = len(upstream.hits)
    with running_gateway(server.url, issuer, protocol=Impatient) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as slow:
            if sent == b"\r\n":
                slow.sendall(GET)
                assert slow.recv(65536).startswith(b"HTTP/1.1 200")
            slow.sendall(sent)
            assert closed_by_the_gateway(slow) == b""
        # A prompt client on a kept-alive connection is not hurried between its requests.
        with socket.create_connection(("127.0.0.1", port)) as prompt:
            for _ in range(2):
                prompt.sendall(GET)
                assert prompt.recv(65536).startswith(b"HTTP/1.1 200")
    assert len(upstream.hits) == before + 2 + (sent == b"\r\n")


def test_a_body_that_never_stops_for_long_is_still_cut_at_its_total_deadline(echo, issuer) -> None:  # noqa: ANN001
    with running_gateway(echo[1].url, issuer, protocol=Impatient) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.sendall(LOGIN_HEAD + b"Content-Length: 1000\r\n\r\n")
            started, cut = time.monotonic(), False
            for _ in range(100):  # a byte every 0.2 s: never a pause of 0.5 s, 20 s in all
                try:
                    slow.sendall(b" ")
                except (BrokenPipeError, ConnectionResetError):  # the gateway has closed the connection
                    cut = True
                    break
                time.sleep(0.2)
            assert cut
            assert time.monotonic() - started < 10


def test_a_pipelined_request_is_not_cut_while_the_gateway_is_not_reading_it(echo, issuer) -> None:  # noqa: ANN001
    """Behind a slow answer (3 s), a pipelined upload's body fills the gateway's buffer and the gateway stops
    reading until its turn: the rest of the body waiting in the socket is not late, and neither answer is
    cut (the first version of the body deadline closed the connection at its first pause)."""
    body = b'{"note": "' + b"a" * 600_000 + b'"}'
    with running_gateway(echo[1].url, issuer, protocol=Impatient) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(
                b"GET /api/v1/products/slow HTTP/1.1\r\nHost: x\r\n\r\n"
                + LOGIN_HEAD
                + b"Content-Length: %d\r\n\r\n" % len(body)
                + body
            )
            client.settimeout(10)
            received = b""
            while received.count(b"HTTP/1.1 ") < 2:
                chunk = client.recv(65536)
                assert chunk, f"closed after {received[:300]!r}"
                received += chunk
    assert received.startswith(b"HTTP/1.1 200")
    assert b"HTTP/1.1 201" in received


def test_oversized_json_is_413_before_reaching_the_upstream(gateway, echo) -> None:  # noqa: ANN001
    upstream, _ = echo
    before = len(upstream.hits)
    big = b'{"name": "' + b"x" * (1024 * 1024 + 10) + b'"}'
    response = httpx.post(
        gateway[0] + "/api/v1/auth/register", content=big, headers={"content-type": "application/json"}
    )
    assert_problem(response, 413)

    def chunks():  # noqa: ANN202 - chunked, no Content-Length
        for _ in range(20):
            yield b" " * 65536

    chunked = httpx.post(
        gateway[0] + "/api/v1/auth/register", content=chunks(), headers={"content-type": "application/json"}
    )
    assert_problem(chunked, 413)
    assert len(upstream.hits) == before


def test_image_uploads_get_the_larger_limit(gateway, issuer) -> None:  # noqa: ANN001
    url, _ = gateway
    staff = bearer(issuer.access(role="staff"))
    image = {"file": ("p.png", b"x" * (3 * 1024 * 1024), "image/png")}
    assert httpx.post(url + "/api/v1/products/abc/images", files=image, headers=staff).status_code == 201
    too_big = {"file": ("p.png", b"x" * (5 * 1024 * 1024 + 100 * 1024), "image/png")}
    assert_problem(httpx.post(url + "/api/v1/products/abc/images", files=too_big, headers=staff), 413)
    # JSON routes keep the 1 MiB limit even with a multipart body
    assert_problem(httpx.post(url + "/api/v1/orders", files=image, headers=staff), 413)


def test_upstream_down_is_503_and_the_circuit_opens(issuer) -> None:  # noqa: ANN001
    dead = f"http://127.0.0.1:{free_port()}"
    with running_gateway(dead, issuer, circuit_failure_threshold=2, circuit_open_seconds=60) as (url, app):
        for _ in range(2):
            assert_problem(httpx.get(url + "/api/v1/products"), 503)
        assert app.proxy.circuits["inventory"].is_open
        response = httpx.get(url + "/api/v1/products")
        assert_problem(response, 503)


def test_slow_upstream_is_504_within_the_deadline(echo, issuer) -> None:  # noqa: ANN001
    with running_gateway(echo[1].url, issuer, upstream_deadline_seconds=0.5) as (url, _):
        response = httpx.get(url + "/api/v1/products/slow", timeout=5)
        assert_problem(response, 504)
        assert response.elapsed.total_seconds() < 2.5


def test_allowed_hosts_refuse_other_host_headers(echo, issuer) -> None:  # noqa: ANN001
    with running_gateway(echo[1].url, issuer, allowed_hosts="api.shop.example, .shop.example") as (url, _):
        assert httpx.get(url + "/api/v1/products", headers={"Host": "api.shop.example"}).status_code == 200
        assert httpx.get(url + "/api/v1/products", headers={"Host": "eu.shop.example:443"}).status_code == 200
        for host in ("evil.example", "shop.example.evil.tld", "api.shop.example.evil"):
            assert_problem(httpx.get(url + "/api/v1/products", headers={"Host": host}), 400)
        assert httpx.get(url + "/healthz", headers={"Host": "10.0.0.7:8000"}).status_code == 200  # probes
        assert httpx.get(url + "/metrics", headers={"Host": "10.0.0.7:8000"}).status_code == 200  # scrapes


def test_image_uploads_are_413_when_chunked_past_the_limit(gateway, echo, issuer) -> None:  # noqa: ANN001
    upstream, _ = echo
    before = len(upstream.hits)

    def chunks():  # noqa: ANN202 - chunked, no Content-Length
        yield b"--b\r\nContent-Disposition: form-data; name=file; filename=p.png\r\nContent-Type: image/png\r\n\r\n"
        for _ in range(100):
            yield b"x" * 65536  # 6.25 MiB in all

    staff = bearer(issuer.access(role="staff")) | {"content-type": "multipart/form-data; boundary=b"}
    assert_problem(httpx.post(gateway[0] + "/api/v1/products/abc/images", content=chunks(), headers=staff), 413)
    assert len(upstream.hits) == before


def _raw_upload(url: str, token: str, length: int) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(
        (
            "POST /api/v1/products/abc/images HTTP/1.1\r\n"
            f"Host: {host}\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {length}\r\n\r\n"
        ).encode()
    )
    return sock


def test_an_upload_cannot_outgrow_its_declared_length(gateway, echo, issuer) -> None:  # noqa: ANN001
    """Over real HTTP/1.1: a declared length above the limit is refused before any body byte is read; bytes sent
    beyond a declared length are never part of that body (they are a new, malformed request)."""
    upstream, _ = echo
    token = issuer.access(role="staff")
    with _raw_upload(gateway[0], token, 6 * 1024 * 1024) as sock:
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        assert answer.status == 413
        assert answer.getheader("content-type") == "application/problem+json"

    before = len(upstream.hits)
    with _raw_upload(gateway[0], token, 1000) as sock:
        sock.sendall(b"x" * 1000)
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        assert answer.status == 201
        assert json.loads(answer.read())["body_length"] == 1000  # the upstream got the declared bytes only
        try:
            sock.sendall(b"y" * (2 * 1024 * 1024))  # the "rest of the upload"
            garbage = http.client.HTTPResponse(sock)
            garbage.begin()
            assert garbage.status == 400
        except (ConnectionError, http.client.RemoteDisconnected):
            pass  # or the connection is simply closed
    assert len(upstream.hits) == before + 1


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/api/v1/auth/login", "POST"),
        ("TRACE", "/api/v1/auth/login", "POST"),
        ("GET", "/api/v1/auth/logout", "POST"),
        ("DELETE", "/api/v1/products", "GET, HEAD, POST"),
        ("TRACE", "/api/v1/products/0b6c3a52-0000-4000-8000-000000000000", "GET, HEAD, PATCH"),
        ("OPTIONS", "/api/v1/orders", "GET, HEAD, POST"),
        ("POST", "/api/v1/auth/me", "GET, HEAD, PATCH, DELETE"),
        ("PATCH", "/api/v1/audit/events", "GET, HEAD"),
        ("QUERY", "/api/v1/orders/abc/cancel", "POST"),
    ],
)
def test_a_method_the_path_lacks_is_405_with_a_true_allow_before_authentication(
    gateway,  # noqa: ANN001
    echo,  # noqa: ANN001
    method: str,
    path: str,
    allow: str,
) -> None:
    url, _ = gateway
    upstream, _ = echo
    before = len(upstream.hits)
    response = httpx.request(method, url + path)  # no token, and none needed to learn this
    assert_problem(response, 405)
    assert response.headers["allow"] == allow
    assert "www-authenticate" not in response.headers
    assert len(upstream.hits) == before, "the upstream was reached"
    # The same with a forged token: the answer does not depend on who asks.
    forged = httpx.request(method, url + path, headers={"Authorization": "Bearer not.a.token"})
    assert forged.status_code == 405
    assert forged.headers["allow"] == allow


def test_methods_a_path_has_still_go_through_authentication(gateway) -> None:  # noqa: ANN001
    url, _ = gateway
    assert_problem(httpx.get(url + "/api/v1/auth/me"), 401)
    assert_problem(httpx.post(url + "/api/v1/orders/abc/cancel"), 401)


def test_a_path_no_operation_has_is_404_before_authentication(gateway, echo) -> None:  # noqa: ANN001
    """A typo or a trailing slash under a public prefix: 404, to anyone, without reaching the upstream (the
    API reference lists every path, so this reveals nothing)."""
    url, _ = gateway
    upstream, _ = echo
    before = len(upstream.hits)
    for method, path in [
        ("TRACE", "/api/v1/products/a/b/c/d"),
        ("GET", "/api/v1/products/"),
        ("GET", "/api/v1/products/abc/def"),
        ("GET", "/api/v1/auth/nope"),
        ("POST", "/api/v1/orders/abc/refund"),
    ]:
        for headers in ({}, {"Authorization": "Bearer not.a.token"}):
            response = httpx.request(method, url + path, headers=headers)
            assert_problem(response, 404)
            assert "www-authenticate" not in response.headers
    assert len(upstream.hits) == before, "the upstream was reached"


def test_remembered_path_answers_depend_on_the_raw_path_and_the_method_too() -> None:
    """The per-path answers the pipeline remembers: the same decoded path with another raw spelling is
    judged on its own, and long paths (never remembered) get the same answers."""
    from gateway.methods import allowed_methods
    from gateway.routes import is_forbidden_path

    for _ in range(2):  # the second round is answered from what the first remembered
        assert is_forbidden_path("/api/v1/products/x", b"/api/v1/products/x") is False
        assert is_forbidden_path("/api/v1/products/x", b"/api/v1/products/%78") is True
        assert is_forbidden_path("/api/v1/internal/x", b"/api/v1/internal/x") is True
        assert is_forbidden_path("/api/v1/products/x", None) is False
        long_path = "/api/v1/products/" + "a" * 300
        assert is_forbidden_path(long_path, long_path.encode()) is False
        assert is_forbidden_path(long_path + "/../internal", None) is True
        products = allowed_methods("/api/v1/products")
        assert products is not None
        assert products[0] == {"GET", "HEAD", "POST"}
        assert allowed_methods(long_path) == allowed_methods("/api/v1/products/a")
        assert allowed_methods("/api/v1/products/" + "a" * 300 + "/nope") is None


def test_in_production_behind_a_tls_proxy_only_what_it_received_over_https_is_served(echo, issuer) -> None:  # noqa: ANN001
    """SECURE_SSL_REDIRECT: a read the proxy received over plain HTTP is sent to its HTTPS address, anything
    else refused; a client cannot claim HTTPS past the proxy; probes (by address, inside) stay plain."""
    production = {"environment": "production", "tls_terminating_proxy": True, "enforce_checks": False}
    with running_gateway(echo[1].url, issuer, trusted_proxies="127.0.0.1/32", **production) as (url, _):
        https, http = {"X-Forwarded-Proto": "https"}, {"X-Forwarded-Proto": "http"}
        assert httpx.get(url + "/api/v1/products?q=riz", headers=https).status_code == 200
        assert httpx.get(url + "/api/v1/products", headers={"X-Forwarded-Proto": "http, https"}).status_code == 200
        for headers in ({}, http, {"X-Forwarded-Proto": "https, http"}):
            moved = httpx.get(url + "/api/v1/products?q=riz", headers=headers | {"Host": "api.shop.example"})
            assert moved.status_code == 308
            assert moved.headers["location"] == "https://api.shop.example/api/v1/products?q=riz"
            assert_security_headers(moved)
        ported = httpx.get(url + "/api/v1/products", headers=http | {"Host": "api.shop.example:8080"})
        assert ported.headers["location"] == "https://api.shop.example/api/v1/products"  # HTTPS has its own port
        refused = assert_problem(httpx.post(url + "/api/v1/auth/login", json={}, headers=http), 403)
        assert refused["type"] == "urn:comptoir:problem:https-required"
        assert httpx.post(url + "/api/v1/auth/login", json={}, headers=https).status_code == 201
        assert httpx.get(url + "/healthz").status_code == 200
        assert httpx.get(url + "/metrics").status_code == 200  # Prometheus, on the gateway's own port
        for forwarded in (https, {"X-Forwarded-For": "198.51.100.4"}, {"Forwarded": "for=198.51.100.4"}):
            assert_problem(httpx.get(url + "/metrics", headers=forwarded), 404)  # a client, through the proxy
    with running_gateway(echo[1].url, issuer, trusted_proxies="192.0.2.1/32", **production) as (url, _):
        # Not from the proxy: a client saying HTTPS itself is not believed.
        assert httpx.get(url + "/api/v1/products", headers={"X-Forwarded-Proto": "https"}).status_code == 308
    with running_gateway(echo[1].url, issuer, trusted_proxies="127.0.0.1/32", tls_terminating_proxy=True) as (url, _):
        assert httpx.get(url + "/api/v1/products").status_code == 200  # outside production: served
