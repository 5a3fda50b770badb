"""Public catalogue reads on the real database: active products only, search, keyset pagination."""

from __future__ import annotations

import uuid

import pytest

from services.inventory.config import Settings
from services.inventory.main import create_app
from tests.conftest import DatabaseFixture, assert_problem, running
from tests.support.cursors import FORGED_TIME_CURSORS

# The rows below are written straight into the table, without ledger movements.
LEDGER_CHECK = False


@pytest.fixture
async def catalogue(database: DatabaseFixture):  # noqa: ANN201
    admin = await database.admin()
    try:
        await admin.execute("TRUNCATE inventory.products CASCADE")
        rows = [(uuid.uuid4(), f"SKU-{i:03d}", f"Savon {i}", 100 * i, i != 3, 10 + i, i, float(i)) for i in range(1, 8)]
        rows.append((uuid.uuid4(), "RIZ-50KG", "Riz parfumé 50% <b>bio</b>", 25000, True, 5, 0, 0.0))
        await admin.executemany(
            "INSERT INTO inventory.products (id, sku, name, price_xaf, is_active, on_hand, reserved, created_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, now() - make_interval(secs => $8))",
            rows,
        )
        yield rows
    finally:
        await admin.execute("TRUNCATE inventory.products CASCADE")
        await admin.close()


@pytest.fixture
async def client(database: DatabaseFixture):  # noqa: ANN201
    async with running(create_app(Settings(database_url=database.url("inventory"), environment="test"))) as c:
        yield c


async def test_list_shows_active_products_with_available_stock(client, catalogue) -> None:  # noqa: ANN001
    response = await client.get("/api/v1/products")
    assert response.status_code == 200
    body = response.json()
    skus = [item["sku"] for item in body["items"]]
    assert "SKU-003" not in skus
    assert len(skus) == 7
    first = next(item for item in body["items"] if item["sku"] == "SKU-002")
    assert first["available"] == 12 - 2
    assert first["price_xaf"] == 200
    assert isinstance(first["price_xaf"], int)
    assert set(first) == {
        "id",
        "sku",
        "name",
        "description",
        "price_xaf",
        "is_active",
        "available",
        "image_urls",
        "created_at",
        "updated_at",
    }
    assert body["next_cursor"] is None


async def test_text_is_returned_exactly_as_stored(client, catalogue) -> None:  # noqa: ANN001
    body = (await client.get("/api/v1/products", params={"q": "riz"})).json()
    assert [item["name"] for item in body["items"]] == ["Riz parfumé 50% <b>bio</b>"]
    assert response_is_json(await client.get("/api/v1/products", params={"q": "riz"}))


def response_is_json(response) -> bool:  # noqa: ANN001
    return response.headers["content-type"] == "application/json"


async def test_search_treats_wildcards_literally(client, catalogue) -> None:  # noqa: ANN001
    assert [i["sku"] for i in (await client.get("/api/v1/products", params={"q": "50%"})).json()["items"]] == [
        "RIZ-50KG"
    ]
    assert (await client.get("/api/v1/products", params={"q": "_"})).json()["items"] == []
    assert len((await client.get("/api/v1/products", params={"q": "sku-00"})).json()["items"]) == 6


async def test_pages_walk_every_active_product_once(client, catalogue) -> None:  # noqa: ANN001
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        body = (await client.get("/api/v1/products", params=params)).json()
        seen += [item["sku"] for item in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 7


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 201}, {"limit": "ten"}])
async def test_bad_limits_are_422(client, params) -> None:  # noqa: ANN001
    assert_problem(await client.get("/api/v1/products", params=params), 422)


@pytest.mark.parametrize("cursor", ["not-a-cursor", "W10", "WyJ4IiwieSJd", "%%%", *FORGED_TIME_CURSORS])
async def test_forged_cursors_are_400(client, cursor) -> None:  # noqa: ANN001
    assert_problem(await client.get("/api/v1/products", params={"cursor": cursor}), 400)


async def test_get_one_product(client, catalogue) -> None:  # noqa: ANN001
    product_id = catalogue[0][0]
    response = await client.get(f"/api/v1/products/{product_id}")
    assert response.status_code == 200
    assert response.json()["sku"] == "SKU-001"
    assert response.headers["cache-control"] == "public, max-age=1"


async def test_catalogue_answers_carry_a_strong_etag_and_revalidate_with_304(client, catalogue) -> None:  # noqa: ANN001
    product_id = catalogue[0][0]
    for path in (f"/api/v1/products/{product_id}", "/api/v1/products?limit=2"):
        first = await client.get(path)
        etag = first.headers["etag"]
        assert etag.startswith('"'), f"a strong validator, not a weak one: {etag}"
        assert (await client.get(path)).headers["etag"] == etag, "the same content has the same validator"
        again = await client.get(path, headers={"If-None-Match": f'"other", {etag}'})
        assert again.status_code == 304
        assert again.content == b""
        assert again.headers["etag"] == etag
        assert again.headers["cache-control"] == "public, max-age=1"
        assert (await client.get(path, headers={"If-None-Match": '"stale"'})).status_code == 200
        # If-None-Match compares weakly (RFC 9110 §13.1.2): a weak copy of the tag names it too, and so does
        # a tag on a second If-None-Match line.
        assert (await client.get(path, headers={"If-None-Match": f"W/{etag}"})).status_code == 304
        lines = [("If-None-Match", '"stale"'), ("If-None-Match", etag)]
        assert (await client.get(path, headers=lines)).status_code == 304
        assert (await client.get(path, headers={"If-None-Match": f'W/{etag[:-2]}"'})).status_code == 200


async def test_inactive_or_missing_product_is_404(client, catalogue) -> None:  # noqa: ANN001
    inactive = catalogue[2][0]
    assert_problem(await client.get(f"/api/v1/products/{inactive}"), 404)
    assert_problem(await client.get(f"/api/v1/products/{uuid.uuid4()}"), 404)
    assert_problem(await client.get("/api/v1/products/not-a-uuid"), 422)


async def test_search_matches_names_and_skus_ignoring_case(client, catalogue) -> None:  # noqa: ANN001
    async def found(q: str) -> list[str]:
        body = (await client.get("/api/v1/products", params={"q": q})).json()
        return sorted(item["sku"] for item in body["items"])

    assert await found("PARFUMÉ") == ["RIZ-50KG"]  # in the name only, other case
    assert await found("savon 7") == ["SKU-007"]  # in the name only
    assert await found("riz-50kg") == ["RIZ-50KG"]  # the sku, other case
    assert await found("Sku-00") == ["SKU-001", "SKU-002", "SKU-004", "SKU-005", "SKU-006", "SKU-007"]
