"""The gateway's short cache of public answers: what it keeps, for how long, and what it never keeps."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pydantic
import pytest

from gateway.config import GatewaySettings
from tests.conftest import assert_security_headers
from tests.gateway.conftest import running_gateway
from tests.support.servers import request_body, serve
from tests.support.tokens import TestIssuer, bearer


class Catalogue:
    """A stand-in inventory: one product whose price the test changes behind the gateway's back."""

    def __init__(self) -> None:
        self.price = 1000
        self.hits: list[tuple[str, str, bool]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if await request_body(scope, receive, send) is None:
            return
        signed_in = any(k == b"authorization" for k, _ in scope["headers"])
        self.hits.append((scope["method"], scope["path"], signed_in))
        if scope["method"] == "PATCH" and scope["query_string"] == b"as=customer":  # refused: nothing changes
            await send(
                {"type": "http.response.start", "status": 403, "headers": [(b"content-type", b"application/json")]}
            )
            await send({"type": "http.response.body", "body": b"{}"})
            return
        if scope["method"] == "PATCH":
            self.price += 1
        body = json.dumps({"path": scope["path"], "query": scope["query_string"].decode(), "price": self.price})
        if scope["path"].endswith("/secret"):
            cache = b"no-store"
        elif signed_in:
            cache = b"private, no-cache"
        else:
            cache = b"public, max-age=1"
        headers = [
            (b"content-type", b"application/json"),
            (b"cache-control", cache),
            (b"vary", b"Authorization"),
            (b"etag", f'"v{self.price}"'.encode()),
        ]
        if dict(scope["headers"]).get(b"if-none-match") == f'"v{self.price}"'.encode():
            await send({"type": "http.response.start", "status": 304, "headers": headers[1:]})
            await send({"type": "http.response.body", "body": b""})
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body.encode()})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def shop(issuer: TestIssuer) -> Iterator[tuple[str, Catalogue, Clock]]:
    upstream = Catalogue()
    clock = Clock()
    with serve(upstream) as server, running_gateway(server.url, issuer, public_cache_seconds=0.5) as (url, app):
        assert app.pipeline.cache is not None
        app.pipeline.cache.clock = clock
        yield url, upstream, clock


PRODUCT = "/api/v1/products/8d3c2a55-2f7c-4d1e-9d8e-3b2b6f0c1a11"


def test_an_anonymous_read_is_served_once_from_the_upstream_then_from_the_cache(shop) -> None:  # noqa: ANN001
    url, upstream, clock = shop
    first = httpx.get(url + PRODUCT)
    clock.now += 0.2
    second = httpx.get(url + PRODUCT)
    assert first.json() == second.json()
    assert len(upstream.hits) == 1
    assert second.headers["age"] == "0"
    assert second.headers["cache-control"] == "public, max-age=1"
    # Per-exchange headers are the gateway's own for each answer, never replayed from the stored one.
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    assert "ratelimit-remaining" in second.headers
    assert_security_headers(second)


def test_the_query_is_part_of_the_key(shop) -> None:  # noqa: ANN001
    url, upstream, _ = shop
    a = httpx.get(url + "/api/v1/products?q=savon")
    b = httpx.get(url + "/api/v1/products?q=riz")
    assert (a.json()["query"], b.json()["query"]) == ("q=savon", "q=riz")
    httpx.get(url + "/api/v1/products?q=savon")
    assert len(upstream.hits) == 2


def test_a_change_behind_the_gateway_shows_once_the_entry_expires(shop) -> None:  # noqa: ANN001
    url, upstream, clock = shop
    assert httpx.get(url + PRODUCT).json()["price"] == 1000
    upstream.price = 1500  # an order took stock, or another replica changed the price
    clock.now += 0.49
    assert httpx.get(url + PRODUCT).json()["price"] == 1000
    clock.now += 0.01
    assert httpx.get(url + PRODUCT).json()["price"] == 1500


def test_the_lifetime_can_never_exceed_one_second() -> None:
    with pytest.raises(pydantic.ValidationError):
        GatewaySettings(environment="test", public_cache_seconds=1.5)


def test_a_write_through_the_gateway_drops_the_prefix_at_once(shop, issuer) -> None:  # noqa: ANN001
    url, upstream, _ = shop
    assert httpx.get(url + PRODUCT).json()["price"] == 1000
    staff = bearer(issuer.access(role="staff"))
    assert httpx.patch(url + PRODUCT, json={"price_xaf": 1001}, headers=staff).status_code == 200
    assert httpx.get(url + PRODUCT).json()["price"] == 1001
    assert [hit[0] for hit in upstream.hits] == ["GET", "PATCH", "GET"]


def test_a_refused_write_changes_nothing_and_drops_nothing(shop, issuer) -> None:  # noqa: ANN001
    """Otherwise any customer could empty the catalogue's cache with writes it may not make, as often as its
    limit allows, and send every anonymous reader to inventory."""
    url, upstream, _ = shop
    assert httpx.get(url + PRODUCT).json()["price"] == 1000
    customer = bearer(issuer.access(role="customer"))
    assert httpx.patch(url + PRODUCT + "?as=customer", json={"price_xaf": 1}, headers=customer).status_code == 403
    assert httpx.get(url + PRODUCT).json()["price"] == 1000
    assert [hit[0] for hit in upstream.hits] == ["GET", "PATCH"]  # the read came from the cache


def test_a_client_holding_the_current_page_gets_304_from_the_cache(shop) -> None:  # noqa: ANN001
    url, upstream, _ = shop
    etag = httpx.get(url + PRODUCT).headers["etag"]
    again = httpx.get(url + PRODUCT, headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag
    assert httpx.get(url + PRODUCT, headers={"If-None-Match": '"v1"'}).status_code == 200
    assert len(upstream.hits) == 1


def test_a_304_from_the_upstream_is_relayed_without_a_length_of_its_own(shop, issuer) -> None:  # noqa: ANN001
    """RFC 9110 §8.6: a 304's Content-Length, if any, is the 200's; a cache in front could store a 0."""
    url, _, _ = shop
    signed_in = bearer(issuer.access())  # never from the gateway's cache: the upstream answers the 304
    etag = httpx.get(url + PRODUCT, headers=signed_in).headers["etag"]
    again = httpx.get(url + PRODUCT, headers=signed_in | {"If-None-Match": etag})
    assert again.status_code == 304
    assert "content-length" not in again.headers


def test_signed_in_requests_are_never_served_from_nor_stored_in_the_cache(shop, issuer) -> None:  # noqa: ANN001
    url, upstream, _ = shop
    customer = bearer(issuer.access())
    httpx.get(url + PRODUCT)  # an anonymous entry exists
    signed_in = httpx.get(url + PRODUCT, headers=customer)
    assert signed_in.headers["cache-control"] == "private, no-cache"
    assert upstream.hits[-1] == ("GET", PRODUCT, True)
    other = PRODUCT[:-1] + "2"
    httpx.get(url + other, headers=customer)
    httpx.get(url + other)
    assert upstream.hits[-1] == ("GET", other, False), "a signed-in answer was stored for everyone"
    with_cookie = httpx.get(url + PRODUCT, headers={"Cookie": "session=abc"})
    assert upstream.hits[-1] == ("GET", PRODUCT, False)
    assert with_cookie.status_code == 200


def test_answers_not_marked_public_are_never_stored(shop) -> None:  # noqa: ANN001
    url, upstream, _ = shop
    httpx.get(url + "/api/v1/products/secret")
    httpx.get(url + "/api/v1/products/secret")
    assert len(upstream.hits) == 2


def test_the_cache_can_be_turned_off(issuer: TestIssuer) -> None:
    upstream = Catalogue()
    with serve(upstream) as server, running_gateway(server.url, issuer, public_cache_seconds=0) as (url, app):
        assert app.pipeline.cache is None
        httpx.get(url + PRODUCT)
        httpx.get(url + PRODUCT)
    assert len(upstream.hits) == 2
