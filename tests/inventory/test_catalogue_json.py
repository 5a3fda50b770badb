"""The catalogue's read path builds its JSON from the rows, without the ORM or a model per product: its bytes must
be exactly what the ProductRead schema says, for every kind of row, and its ETag must follow every change."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from common.pagination import Page
from services.inventory.schemas import ProductFields, ProductRead
from tests.conftest import DatabaseFixture, assert_problem
from tests.inventory.support import Tokens, create_product

PRODUCTS = "/api/v1/products"
SCHEMA_PAGE = Page[ProductRead]


def schema_bytes_of_page(body: bytes) -> bytes:
    """The page as the schema serializes it: parsed and validated (extra fields forbidden), dumped again."""
    return SCHEMA_PAGE.model_validate_json(body).model_dump_json().encode()


def schema_bytes_of_product(body: bytes) -> bytes:
    return ProductRead.model_validate_json(body).model_dump_json().encode()


async def add_images(database: DatabaseFixture, product_id: str, count: int) -> list[str]:
    """``count`` image rows, uploaded one second apart, oldest first; returns their ids in upload order."""
    admin = await database.admin()
    try:
        ids = [uuid.uuid4() for _ in range(count)]
        await admin.executemany(
            "INSERT INTO inventory.product_images (id, product_id, storage_key, content_type, size, width, height,"
            " sha256, created_at) VALUES ($1, $2, $3, 'image/png', 10, 1, 1, $4, now() - make_interval(secs => $5))",
            [
                (image_id, uuid.UUID(product_id), uuid.uuid4().hex + ".png", "0" * 64, count - n)
                for n, image_id in enumerate(ids)
            ],
        )
    finally:
        await admin.close()
    return [str(i) for i in ids]


def test_the_row_fields_are_the_schema_fields_in_order() -> None:
    assert list(ProductFields.__annotations__) == list(ProductRead.model_fields)


async def test_every_answer_is_byte_for_byte_what_the_schema_serializes(
    client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture
) -> None:
    tricky = await create_product(
        client,
        tokens,
        name='Savon "noir" à l\'huile – 250 g ✓',
        description='Ligne 1\nLigne 2\tavec tab, \\ barre, "guillemets", <b>, émoji 🧼, \u2028 séparateur',
        price=10**12,
        stock=0,
    )
    plain = await create_product(client, tokens, price=0, stock=3)
    images = await add_images(database, tricky["id"], 3)

    page = await client.get(PRODUCTS)
    assert page.status_code == 200
    assert page.headers["content-type"] == "application/json"
    assert page.content == schema_bytes_of_page(page.content)
    items = page.json()["items"]
    assert [item["id"] for item in items] == [plain["id"], tricky["id"]]  # newest first
    by_id = {item["id"]: item for item in items}
    assert by_id[tricky["id"]]["image_urls"] == [f"{PRODUCTS}/{tricky['id']}/images/{i}" for i in images]
    assert by_id[plain["id"]]["image_urls"] == []
    assert by_id[tricky["id"]]["price_xaf"] == 10**12
    assert by_id[tricky["id"]]["description"] == tricky["description"]
    # The answer to a write (built by the ORM and the model) and the read path agree on every field.
    assert by_id[plain["id"]] == plain

    for product_id in (tricky["id"], plain["id"]):
        one = await client.get(f"{PRODUCTS}/{product_id}")
        assert one.status_code == 200
        assert one.content == schema_bytes_of_product(one.content)
        assert one.json() == by_id[product_id]


async def test_search_cursor_and_staff_pages_follow_the_schema(client: httpx.AsyncClient, tokens: Tokens) -> None:
    made = [await create_product(client, tokens, name=f"Riz {n}", stock=n) for n in range(5)]
    hidden = await create_product(client, tokens, name="Riz retiré")
    await client.patch(f"{PRODUCTS}/{hidden['id']}", json={"is_active": False}, headers=tokens.staff())

    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"q": "riz", "limit": 2} | ({"cursor": cursor} if cursor else {})
        answer = await client.get(PRODUCTS, params=params)
        assert answer.content == schema_bytes_of_page(answer.content)
        seen += answer.json()["items"]
        cursor = answer.json()["next_cursor"]
        if cursor is None:
            break
    assert [item["id"] for item in seen] == [p["id"] for p in reversed(made)]

    staff = await client.get(PRODUCTS, params={"q": "RETIRÉ"}, headers=tokens.staff())
    assert staff.content == schema_bytes_of_page(staff.content)
    assert [(item["id"], item["is_active"]) for item in staff.json()["items"]] == [(hidden["id"], False)]
    assert staff.headers["cache-control"] == "no-store"
    one = await client.get(f"{PRODUCTS}/{hidden['id']}", headers=tokens.staff())
    assert one.status_code == 200
    assert one.content == schema_bytes_of_product(one.content)
    assert one.headers["cache-control"] == "no-store"
    assert_problem(await client.get(f"{PRODUCTS}/{hidden['id']}", headers=tokens.customer()), 404)
    assert (await client.get(PRODUCTS, params={"q": "retiré"})).json()["items"] == []


@pytest.mark.parametrize("who", ["anonymous", "customer", "staff"])
async def test_a_price_or_stock_change_changes_the_body_and_the_etag(
    client: httpx.AsyncClient, tokens: Tokens, who: str
) -> None:
    headers = {"anonymous": {}, "customer": tokens.customer(), "staff": tokens.staff()}[who]
    product = await create_product(client, tokens, price=1500, stock=10)
    paths = (PRODUCTS, f"{PRODUCTS}/{product['id']}")

    async def validators() -> dict[str, str]:
        tags = {}
        for path in paths:
            answer = await client.get(path, headers=headers)
            assert answer.status_code == 200
            tags[path] = answer.headers["etag"]
            again = await client.get(path, headers=headers | {"If-None-Match": tags[path]})
            assert again.status_code == 304, "the same bytes, the same validator"
            assert again.content == b""
            assert again.headers["cache-control"] == answer.headers["cache-control"]
            assert "content-type" not in again.headers
        return tags

    first = await validators()
    changed = await client.patch(f"{PRODUCTS}/{product['id']}", json={"price_xaf": 1750}, headers=tokens.staff())
    assert changed.status_code == 200
    after_price = await validators()
    adjusted = await client.post(
        f"{PRODUCTS}/{product['id']}/stock-adjustments", json={"delta": -4, "reason": "casse"}, headers=tokens.staff()
    )
    assert adjusted.status_code == 200
    after_stock = await validators()
    reserved = await client.put(
        f"/internal/reservations/{uuid.uuid4()}",
        json={"items": [{"product_id": product["id"], "quantity": 1}]},
        headers=tokens.service("orders", "inventory"),
    )
    assert reserved.status_code == 201
    after_order = await validators()
    for path in paths:
        tags = [first[path], after_price[path], after_stock[path], after_order[path]]
        assert len(set(tags)) == 4, f"every change is a new validator: {tags}"
        stale = await client.get(path, headers=headers | {"If-None-Match": first[path]})
        assert stale.status_code == 200
    one = (await client.get(paths[1], headers=headers)).json()
    assert (one["price_xaf"], one["available"]) == (1750, 5)
    listed = (await client.get(paths[0], headers=headers)).json()["items"]
    assert [(p["price_xaf"], p["available"]) for p in listed] == [(1750, 5)]


async def test_cache_control_by_role(client: httpx.AsyncClient, tokens: Tokens) -> None:
    product = await create_product(client, tokens)
    expected = {"anonymous": "public, max-age=1", "customer": "private, no-cache", "staff": "no-store"}
    for who, headers in (("anonymous", {}), ("customer", tokens.customer()), ("staff", tokens.staff())):
        for path in (PRODUCTS, f"{PRODUCTS}/{product['id']}"):
            answer = await client.get(path, headers=headers)
            assert answer.headers["cache-control"] == expected[who], (who, path)
            assert answer.headers["vary"] == "Authorization"


async def test_other_json_answers_under_the_catalogue_still_get_a_validator(
    client: httpx.AsyncClient, tokens: Tokens
) -> None:
    product = await create_product(client, tokens, stock=7)
    path = f"{PRODUCTS}/{product['id']}/stock"
    answer = await client.get(path, headers=tokens.staff())
    assert answer.json()["on_hand"] == 7
    etag = answer.headers["etag"]
    assert etag.startswith('"')
    assert (await client.get(path, headers=tokens.staff() | {"If-None-Match": etag})).status_code == 304


async def test_bad_reads_are_still_the_same_problems(client: httpx.AsyncClient, tokens: Tokens) -> None:
    assert_problem(await client.get(f"{PRODUCTS}/{uuid.uuid4()}"), 404)
    assert_problem(await client.get(PRODUCTS, params={"cursor": "not-a-cursor"}), 400)
    body = assert_problem(await client.get(PRODUCTS, params={"limit": 0}), 422)
    assert body["errors"]
    assert_problem(await client.get(PRODUCTS, headers={"Authorization": "Bearer nope"}), 401)
