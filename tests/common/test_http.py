"""PooledTransport, the production client for service-to-service hot paths, against a real server."""

from __future__ import annotations

import json

import httpx
import pytest

from common.http import HttpxTransport, PooledTransport, TransportError
from tests.conftest import free_port
from tests.support.servers import Echo, serve


@pytest.fixture(scope="module")
def echo_url() -> object:
    with serve(Echo()) as server:
        yield server.url


async def test_json_goes_out_and_the_whole_answer_comes_back_on_one_kept_alive_connection(echo_url: str) -> None:
    transport = PooledTransport(echo_url + "/prefix", timeout=5, connect_timeout=2, max_connections=4)
    try:
        for n in range(3):
            answer = await transport.request(
                "POST", f"/internal/thing/{n}", json={"n": n, "text": "é"}, headers={"X-Request-ID": "r-1"}
            )
            assert answer.status == 201
            seen = answer.json()
            assert seen["path"] == f"/prefix/internal/thing/{n}"
            assert seen["body_length"] == len(json.dumps({"n": n, "text": "é"}, separators=(",", ":")).encode())
            headers = dict(seen["headers"])
            assert headers["content-type"] == "application/json"
            assert headers["x-request-id"] == "r-1"
            assert headers["user-agent"] == "comptoir-internal"
        assert transport.pool.open == 1  # reused, not reopened
        streamed = await transport.request("GET", "/stream")  # 3 MiB, read whole
        assert streamed.status == 200
        assert len(streamed.body) == 48 * 65536
    finally:
        await transport.aclose()


async def test_failures_are_transport_errors(echo_url: str) -> None:
    down = PooledTransport(f"http://127.0.0.1:{free_port()}", timeout=1, connect_timeout=1)
    try:
        with pytest.raises(TransportError):
            await down.request("GET", "/anything")
    finally:
        await down.aclose()
    slow = PooledTransport(echo_url, timeout=0.2, connect_timeout=1)
    try:
        with pytest.raises(TransportError):
            await slow.request("GET", "/slow")  # answers after 3 s
    finally:
        await slow.aclose()


def test_only_http_urls() -> None:
    with pytest.raises(ValueError, match="http"):
        PooledTransport("ftp://inventory")


async def test_a_body_that_is_json_already_goes_out_as_it_is(echo_url: str) -> None:
    transport = PooledTransport(echo_url, timeout=5, connect_timeout=2)
    body = '{"events":[{"a": 1, "b": "é"}]}'.encode()
    try:
        answer = await transport.request("POST", "/internal/events", json_bytes=body, headers={"X-Request-ID": "r-2"})
        seen = answer.json()
        assert seen["body_length"] == len(body)
        assert dict(seen["headers"])["content-type"] == "application/json"
    finally:
        await transport.aclose()


async def test_the_httpx_transport_sends_a_body_that_is_json_already_as_it_is() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    transport = HttpxTransport(httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://peer"))
    try:
        answer = await transport.request("POST", "/internal/events", json_bytes=b'{"events":[]}', headers={"A": "b"})
    finally:
        await transport.aclose()
    assert answer.status == 204
    assert seen[0].content == b'{"events":[]}'
    assert seen[0].headers["content-type"] == "application/json"
    assert seen[0].headers["a"] == "b"
