"""Staff manage products and stock; every change is in the ledger and the audit outbox."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from prometheus_client import REGISTRY

from common.audit import DENIALS, DenialBudget
from tests.conftest import DatabaseFixture, assert_problem
from tests.inventory.support import Tokens, create_product, stock_row

PRODUCTS = "/api/v1/products"


async def outbox_events(database: DatabaseFixture, action: str | None = None) -> list[dict[str, object]]:
    admin = await database.admin()
    try:
        rows = await admin.fetch("SELECT payload FROM inventory.outbox ORDER BY occurred_at")
    finally:
        await admin.close()
    events = [json.loads(r["payload"]) if isinstance(r["payload"], str) else dict(r["payload"]) for r in rows]
    return [e for e in events if action is None or e["action"] == action]


async def test_staff_creates_a_product_with_initial_stock(client: httpx.AsyncClient, tokens: Tokens, database) -> None:
    body = {
        "sku": "RIZ-25KG",
        "name": "Riz parfumé <b>25 kg</b>",
        "description": "Sac de riz\nOrigine: Thaïlande",
        "price_xaf": 18500,
        "initial_stock": 40,
    }
    response = await client.post(PRODUCTS, json=body, headers=tokens.staff() | {"User-Agent": "backoffice/1.0"})
    assert response.status_code == 201, response.text
    product = response.json()
    assert product["sku"] == "RIZ-25KG"
    assert product["name"] == "Riz parfumé <b>25 kg</b>"  # stored and returned exactly, JSON-escaped
    assert product["description"] == "Sac de riz\nOrigine: Thaïlande"
    assert product["price_xaf"] == 18500
    assert product["available"] == 40
    assert product["is_active"] is True
    assert product["image_urls"] == []
    assert response.headers["content-type"] == "application/json"

    stock = await client.get(f"{PRODUCTS}/{product['id']}/stock", headers=tokens.staff())
    assert stock.json() == {"product_id": product["id"], "on_hand": 40, "reserved": 0, "available": 40}
    ledger = await client.get(f"{PRODUCTS}/{product['id']}/stock-movements", headers=tokens.staff())
    assert [(m["kind"], m["delta_on_hand"]) for m in ledger.json()["items"]] == [("receive", 40)]

    [event] = await outbox_events(database, "inventory.product.created")
    assert event["actor_id"] == tokens.staff_id
    assert event["actor_role"] == "staff"
    assert event["resource_id"] == product["id"]
    assert event["user_agent"] == "backoffice/1.0"
    assert event["ip"] == "203.0.113.7"
    assert event["request_id"] == response.headers["x-request-id"]
    assert event["new_values"]["price_xaf"] == 18500


async def test_duplicate_sku_is_409_ignoring_case(client: httpx.AsyncClient, tokens: Tokens) -> None:
    await create_product(client, tokens, sku="HUILE-1L")
    for sku in ("HUILE-1L", "huile-1l"):
        response = await client.post(
            PRODUCTS, json={"sku": sku, "name": "Huile", "price_xaf": 1200}, headers=tokens.staff()
        )
        assert_problem(response, 409)


@pytest.mark.parametrize("price", [-1, 1.5, "100", 2**63, True, 10**12 + 1, None, 1e3, "1e3"])
async def test_bad_prices_are_422(client: httpx.AsyncClient, tokens: Tokens, price: object) -> None:
    body = {"sku": "PRICE-1", "name": "Test", "price_xaf": price}
    body_problem = assert_problem(await client.post(PRODUCTS, json=body, headers=tokens.staff()), 422)
    assert body_problem["errors"]


@pytest.mark.parametrize("price", [0, 1, 10**12])
async def test_price_bounds_are_accepted(client: httpx.AsyncClient, tokens: Tokens, price: int) -> None:
    product = await create_product(client, tokens, price=price, stock=0)
    assert product["price_xaf"] == price


@pytest.mark.parametrize(
    "fields",
    [
        {"sku": ""},
        {"sku": "x" * 65},
        {"sku": "../etc/passwd"},
        {"sku": "a b"},
        {"name": ""},
        {"name": "   "},
        {"name": "x" * 201},
        {"name": "null\x00byte"},
        {"name": "line\nbreak"},
        {"name": "bidi\u202eoverride\u0007"},
        {"description": "d" * 5001},
        {"description": "nul \x00"},
        {"initial_stock": -1},
        {"initial_stock": 1.5},
        {"initial_stock": "5"},
        {"initial_stock": 10**9 + 1},
        {"price_xaf": 100, "currency": "EUR"},
        {"id": str(uuid.uuid4())},
    ],
)
async def test_invalid_product_fields_are_422(client: httpx.AsyncClient, tokens: Tokens, fields: dict) -> None:
    body = {"sku": "OK-1", "name": "Produit", "price_xaf": 100} | fields
    assert_problem(await client.post(PRODUCTS, json=body, headers=tokens.staff()), 422)


async def test_lone_surrogates_are_refused(client: httpx.AsyncClient, tokens: Tokens) -> None:
    raw = b'{"sku": "SURR-1", "name": "bad \\ud800 text", "price_xaf": 1}'
    response = await client.post(PRODUCTS, content=raw, headers=tokens.staff() | {"content-type": "application/json"})
    assert response.status_code in (400, 422)


async def test_longest_texts_round_trip(client: httpx.AsyncClient, tokens: Tokens) -> None:
    name, description = "é" * 200, "<script>alert(1)</script>\n" + "d" * 4970
    product = await create_product(client, tokens, name=name, description=description)
    fetched = (await client.get(f"{PRODUCTS}/{product['id']}")).json()
    assert fetched["name"] == name
    assert fetched["description"] == description


async def test_patch_changes_only_what_is_sent(client: httpx.AsyncClient, tokens: Tokens, database) -> None:
    product = await create_product(client, tokens, price=1000)
    response = await client.patch(
        f"{PRODUCTS}/{product['id']}", json={"price_xaf": 1250, "name": "Savon noir"}, headers=tokens.staff()
    )
    assert response.status_code == 200, response.text
    updated = response.json()
    assert (updated["price_xaf"], updated["name"], updated["sku"]) == (1250, "Savon noir", product["sku"])
    assert updated["description"] == product["description"]
    assert updated["updated_at"] >= product["updated_at"]
    [event] = await outbox_events(database, "inventory.product.updated")
    assert event["old_values"] == {"price_xaf": 1000, "name": "Savon de Marseille"}
    assert event["new_values"] == {"price_xaf": 1250, "name": "Savon noir"}


@pytest.mark.parametrize(
    "body",
    [
        {"price_xaf": -1},
        {"price_xaf": "100"},
        {"price_xaf": 2.5},
        {"price_xaf": None},
        {"name": None},
        {"is_active": "false"},
        {"is_active": 0},
        {"sku": "NEW-SKU"},
        {"on_hand": 1000},
        {"available": 1000},
    ],
)
async def test_patch_rejects_bad_fields(client: httpx.AsyncClient, tokens: Tokens, body: dict) -> None:
    product = await create_product(client, tokens)
    assert_problem(await client.patch(f"{PRODUCTS}/{product['id']}", json=body, headers=tokens.staff()), 422)


async def test_patch_unknown_product_is_404(client: httpx.AsyncClient, tokens: Tokens) -> None:
    response = await client.patch(f"{PRODUCTS}/{uuid.uuid4()}", json={"price_xaf": 5}, headers=tokens.staff())
    assert_problem(response, 404)


async def test_inactive_products_are_for_staff_only(client: httpx.AsyncClient, tokens: Tokens) -> None:
    visible = await create_product(client, tokens, name="Visible")
    hidden = await create_product(client, tokens, name="Hidden")
    response = await client.patch(f"{PRODUCTS}/{hidden['id']}", json={"is_active": False}, headers=tokens.staff())
    assert response.json()["is_active"] is False

    for headers, cache in (({}, "public, max-age=1"), (tokens.customer(), "private, no-cache")):
        listing = await client.get(PRODUCTS, headers=headers)
        assert [p["id"] for p in listing.json()["items"]] == [visible["id"]]
        assert listing.headers["cache-control"] == cache
        assert_problem(await client.get(f"{PRODUCTS}/{hidden['id']}", headers=headers), 404)

    staff_listing = await client.get(PRODUCTS, headers=tokens.staff())
    assert {p["id"] for p in staff_listing.json()["items"]} == {visible["id"], hidden["id"]}
    assert staff_listing.headers["cache-control"] == "no-store"
    assert "Authorization" in staff_listing.headers["vary"]
    one = await client.get(f"{PRODUCTS}/{hidden['id']}", headers=tokens.staff())
    assert one.status_code == 200
    assert one.headers["cache-control"] == "no-store"


async def test_a_bad_token_on_a_public_read_is_401(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get(PRODUCTS, headers={"Authorization": "Bearer not-a-jwt"}), 401)


async def test_control_characters_in_search_are_422(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get(PRODUCTS, params={"q": "sav\x00on"}), 422)


async def test_stock_adjustments(client: httpx.AsyncClient, tokens: Tokens, database) -> None:
    product = await create_product(client, tokens, stock=5)
    url = f"{PRODUCTS}/{product['id']}/stock-adjustments"
    response = await client.post(url, json={"delta": 7, "reason": "delivery from supplier"}, headers=tokens.staff())
    assert response.status_code == 200, response.text
    assert response.json() == {"product_id": product["id"], "on_hand": 12, "reserved": 0, "available": 12}
    response = await client.post(url, json={"delta": -12, "reason": "water damage"}, headers=tokens.staff())
    assert response.json()["on_hand"] == 0
    assert_problem(await client.post(url, json={"delta": -1, "reason": "lost"}, headers=tokens.staff()), 409)

    ledger = (await client.get(f"{PRODUCTS}/{product['id']}/stock-movements", headers=tokens.staff())).json()
    assert [(m["kind"], m["delta_on_hand"], m["reason"]) for m in ledger["items"]] == [
        ("adjust", -12, "water damage"),
        ("adjust", 7, "delivery from supplier"),
        ("receive", 5, "initial stock"),
    ]
    events = await outbox_events(database, "inventory.stock.adjusted")
    assert [e["new_values"]["on_hand"] for e in events] == [12, 0]
    assert events[0]["old_values"] == {"on_hand": 5}


async def test_adjustment_cannot_take_on_hand_below_reserved(
    client: httpx.AsyncClient, tokens: Tokens, database
) -> None:
    product = await create_product(client, tokens, stock=10)
    reserve = await client.put(
        f"/internal/reservations/{uuid.uuid4()}",
        json={"items": [{"product_id": product["id"], "quantity": 6}]},
        headers=tokens.service("orders", "inventory"),
    )
    assert reserve.status_code == 201, reserve.text
    url = f"{PRODUCTS}/{product['id']}/stock-adjustments"
    body = assert_problem(await client.post(url, json={"delta": -5, "reason": "count"}, headers=tokens.staff()), 409)
    assert (body["on_hand"], body["reserved"]) == (10, 6)
    ok = await client.post(url, json={"delta": -4, "reason": "count"}, headers=tokens.staff())
    assert ok.json() == {"product_id": product["id"], "on_hand": 6, "reserved": 6, "available": 0}
    row = await stock_row(database, product["id"])
    assert (row["on_hand"], row["reserved"]) == (6, 6)


@pytest.mark.parametrize("delta", [0, 1.5, "3", True, 2**63, -(2**63), 10**9 + 1, None])
async def test_bad_deltas_are_422(client: httpx.AsyncClient, tokens: Tokens, delta: object) -> None:
    product = await create_product(client, tokens)
    url = f"{PRODUCTS}/{product['id']}/stock-adjustments"
    assert_problem(await client.post(url, json={"delta": delta, "reason": "x"}, headers=tokens.staff()), 422)


@pytest.mark.parametrize("reason", [None, "", "  ", "r" * 501, "a\x00b"])
async def test_adjustments_need_a_reason(client: httpx.AsyncClient, tokens: Tokens, reason: object) -> None:
    product = await create_product(client, tokens)
    url = f"{PRODUCTS}/{product['id']}/stock-adjustments"
    body = {"delta": 1} if reason is None else {"delta": 1, "reason": reason}
    assert_problem(await client.post(url, json=body, headers=tokens.staff()), 422)


async def test_adjusting_a_missing_product_is_404(client: httpx.AsyncClient, tokens: Tokens) -> None:
    url = f"{PRODUCTS}/{uuid.uuid4()}/stock-adjustments"
    assert_problem(await client.post(url, json={"delta": 1, "reason": "x"}, headers=tokens.staff()), 404)
    assert_problem(await client.get(f"{PRODUCTS}/{uuid.uuid4()}/stock", headers=tokens.staff()), 404)


STAFF_ROUTES = [
    ("POST", PRODUCTS, {"sku": "X-1", "name": "x", "price_xaf": 1}),
    ("PATCH", PRODUCTS + "/{id}", {"price_xaf": 1}),
    ("GET", PRODUCTS + "/{id}/stock", None),
    ("GET", PRODUCTS + "/{id}/stock-movements", None),
    ("POST", PRODUCTS + "/{id}/stock-adjustments", {"delta": 1, "reason": "x"}),
]


@pytest.mark.parametrize(("method", "path", "body"), STAFF_ROUTES)
async def test_staff_routes_refuse_customers_and_anonymous(
    client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture, method: str, path: str, body: dict | None
) -> None:
    product = await create_product(client, tokens, stock=3)
    url = path.format(id=product["id"])
    assert_problem(await client.request(method, url, json=body), 401)
    customer = str(uuid.uuid4())
    assert_problem(await client.request(method, url, json=body, headers=tokens.customer(customer)), 403)
    # The refusal is in the audit trail (seed: every sensitive operation logged, suspicious activity seen).
    denied = [e for e in await outbox_events(database, "inventory.access.denied") if e["actor_id"] == customer]
    assert [(e["outcome"], e["resource_id"], e["new_values"]) for e in denied] == [
        ("denied", f"{method} {path.replace('{id}', '{product_id}')}", {"required_role": "staff", "role": "customer"})
    ]
    service = tokens.service("orders", "inventory")
    assert_problem(await client.request(method, url, json=body, headers=service), 401)
    expired = {"Authorization": "Bearer " + tokens.issuer.access(role="staff", ttl=-10)}
    assert_problem(await client.request(method, url, json=body, headers=expired), 401)
    assert (await stock_row_after(client, tokens, product["id"])) == 3


async def test_one_callers_refusals_fill_the_audit_trail_only_up_to_its_share(
    client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture
) -> None:
    """The trail is insert-only: a customer hammering a staff route (1,000 requests an hour get past the
    gateway) leaves 20 events an hour, and the rest is counted."""
    customer, other = str(uuid.uuid4()), str(uuid.uuid4())
    before = REGISTRY.get_sample_value("comptoir_access_denials_unrecorded_total", {"service": "inventory"}) or 0
    for _ in range(25):
        assert_problem(await client.post(PRODUCTS, json={}, headers=tokens.customer(customer)), 403)
    assert_problem(await client.post(PRODUCTS, json={}, headers=tokens.customer(other)), 403)
    denied = await outbox_events(database, "inventory.access.denied")
    assert [e["actor_id"] for e in denied].count(customer) == DENIALS.per_hour == 20
    assert [e["actor_id"] for e in denied].count(other) == 1  # another caller has its own share
    after = REGISTRY.get_sample_value("comptoir_access_denials_unrecorded_total", {"service": "inventory"})
    assert after == before + 5


def test_the_denial_budget_renews_every_hour() -> None:
    now = [0.0]
    budget = DenialBudget(per_hour=2, clock=lambda: now[0])
    assert [budget.allows("a") for _ in range(3)] == [True, True, False]
    assert budget.allows("b")
    now[0] += 3600
    assert budget.allows("a")


async def stock_row_after(client: httpx.AsyncClient, tokens: Tokens, product_id: str) -> int:
    return int((await client.get(f"{PRODUCTS}/{product_id}/stock", headers=tokens.staff())).json()["on_hand"])


async def test_admin_can_do_what_staff_can(client: httpx.AsyncClient, tokens: Tokens) -> None:
    response = await client.post(PRODUCTS, json={"sku": "ADM-1", "name": "x", "price_xaf": 1}, headers=tokens.admin())
    assert response.status_code == 201


async def test_a_price_change_changes_the_etag(client: httpx.AsyncClient, tokens: Tokens) -> None:
    product = await create_product(client, tokens, price=900)
    path = f"{PRODUCTS}/{product['id']}"
    before = (await client.get(path)).headers["etag"]
    assert (await client.get(path, headers={"If-None-Match": before})).status_code == 304
    changed = await client.patch(path, json={"price_xaf": 901}, headers=tokens.staff())
    assert changed.status_code == 200
    after = await client.get(path, headers={"If-None-Match": before})
    assert after.status_code == 200, "a stale validator must not get 304"
    assert after.json()["price_xaf"] == 901
    assert after.headers["etag"] != before
