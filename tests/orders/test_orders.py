"""Placing orders, the state machine, object-level access, expiry and the audit trail."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from tests.conftest import assert_problem
from tests.orders.conftest import System
from tests.support.cursors import FORGED_TIME_CURSORS

ORDERS = "/api/v1/orders"


async def order_events(system: System) -> list[dict]:
    admin = await system.database.admin()
    try:
        rows = await admin.fetch("SELECT payload FROM orders.outbox ORDER BY occurred_at")
    finally:
        await admin.close()
    return [json.loads(r["payload"]) if isinstance(r["payload"], str) else dict(r["payload"]) for r in rows]


async def order_rows(system: System) -> int:
    admin = await system.database.admin()
    try:
        return int(await admin.fetchval("SELECT count(*) FROM orders.orders"))
    finally:
        await admin.close()


async def test_an_order_takes_names_and_prices_from_inventory(system: System) -> None:
    soap = await system.product(stock=10, price=750, name="Savon")
    rice = await system.product(stock=5, price=18500, name="Riz 25 kg")
    user = str(uuid.uuid4())
    response = await system.place(
        [(soap["id"], 3), (rice["id"], 2)], customer=system.tokens.customer(user) | {"User-Agent": "shop-app/2.1"}
    )
    assert response.status_code == 201, response.text
    order = response.json()
    assert order["user_id"] == user
    assert order["status"] == "pending"
    assert order["items"] == [
        {
            "product_id": soap["id"],
            "sku": soap["sku"],
            "name": "Savon",
            "quantity": 3,
            "unit_price_xaf": 750,
            "line_total_xaf": 2250,
        },
        {
            "product_id": rice["id"],
            "sku": rice["sku"],
            "name": "Riz 25 kg",
            "quantity": 2,
            "unit_price_xaf": 18500,
            "line_total_xaf": 37000,
        },
    ]
    assert order["total_xaf"] == 39250
    assert order["expires_at"] is not None
    assert response.headers["cache-control"] == "no-store"
    assert await system.stock(soap["id"]) == {"on_hand": 10, "reserved": 3, "available": 7}

    # A later price change does not touch the order.
    await system.inventory.patch(f"/api/v1/products/{soap['id']}", json={"price_xaf": 1}, headers=system.tokens.staff())
    again = await system.orders.get(f"{ORDERS}/{order['id']}", headers=system.tokens.customer(user))
    assert again.json()["total_xaf"] == 39250

    [event] = [e for e in await order_events(system) if e["action"] == "orders.order.created"]
    assert event["actor_id"] == user
    assert event["actor_role"] == "customer"
    assert event["resource_id"] == order["id"]
    assert event["new_values"]["status"] == "pending"
    assert event["user_agent"] == "shop-app/2.1"
    assert event["ip"] == "203.0.113.7"
    assert event["request_id"] == response.headers["x-request-id"]


async def test_clients_cannot_send_prices(system: System) -> None:
    product = await system.product(price=5000)
    body = {"items": [{"product_id": product["id"], "quantity": 1, "unit_price_xaf": 1}], "total_xaf": 1}
    headers = system.tokens.customer() | {"Idempotency-Key": "k-1"}
    assert_problem(await system.orders.post(ORDERS, json=body, headers=headers), 422)
    assert await order_rows(system) == 0


async def test_the_idempotency_key_is_required(system: System) -> None:
    product = await system.product()
    body = {"items": [{"product_id": product["id"], "quantity": 1}]}
    assert_problem(await system.orders.post(ORDERS, json=body, headers=system.tokens.customer()), 400)
    for bad in ("", "   ", "x" * 256, "clé".encode(), "has space", "tab\there"):
        headers = system.tokens.customer() | {"Idempotency-Key": bad}
        assert_problem(await system.orders.post(ORDERS, json=body, headers=headers), 400)
    assert await system.stock(product["id"]) == {"on_hand": 10, "reserved": 0, "available": 10}


async def test_same_key_and_body_is_the_same_order(system: System) -> None:
    product = await system.product(stock=10)
    customer = system.tokens.customer()
    first = await system.place([(product["id"], 2)], customer=customer, key="order-123")
    again = await system.place([(product["id"], 2)], customer=customer, key="order-123")
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert await system.stock(product["id"]) == {"on_hand": 10, "reserved": 2, "available": 8}
    assert await order_rows(system) == 1


async def test_same_key_with_another_body_is_422(system: System) -> None:
    product = await system.product(stock=10)
    customer = system.tokens.customer()
    await system.place([(product["id"], 2)], customer=customer, key="order-123")
    body = assert_problem(await system.place([(product["id"], 3)], customer=customer, key="order-123"), 422)
    assert body["errors"] == [{"loc": ["header", "Idempotency-Key"], "msg": body["detail"]}]
    assert await system.stock(product["id"]) == {"on_hand": 10, "reserved": 2, "available": 8}


async def test_keys_belong_to_one_customer(system: System) -> None:
    product = await system.product(stock=10)
    mine = await system.place([(product["id"], 1)], key="shared-key")
    theirs = await system.place([(product["id"], 1)], key="shared-key")
    assert mine.status_code == theirs.status_code == 201
    assert mine.json()["id"] != theirs.json()["id"]


async def test_insufficient_stock_is_409_and_nothing_stays_reserved(system: System) -> None:
    soap = await system.product(stock=10)
    rice = await system.product(stock=1)
    customer = system.tokens.customer()
    response = await system.place([(soap["id"], 2), (rice["id"], 3)], customer=customer, key="k")
    body = assert_problem(response, 409)
    assert body["short_items"] == [{"product_id": rice["id"], "requested": 3, "available": 1, "withdrawn": False}]
    assert await system.stock(soap["id"]) == {"on_hand": 10, "reserved": 0, "available": 10}
    assert await order_rows(system) == 0
    # The key was not used up: after a restock the same request succeeds.
    await system.inventory.post(
        f"/api/v1/products/{rice['id']}/stock-adjustments",
        json={"delta": 5, "reason": "restock"},
        headers=system.tokens.staff(),
    )
    assert (await system.place([(soap["id"], 2), (rice["id"], 3)], customer=customer, key="k")).status_code == 201


async def test_unknown_and_inactive_products(system: System) -> None:
    product = await system.product(stock=5)
    body = assert_problem(await system.place([(product["id"], 1), (str(uuid.uuid4()), 1)]), 422)
    assert body["errors"][0]["loc"] == ["body", "items", 1, "product_id"]
    await system.inventory.patch(
        f"/api/v1/products/{product['id']}", json={"is_active": False}, headers=system.tokens.staff()
    )
    withdrawn = assert_problem(await system.place([(product["id"], 1)]), 409)
    assert withdrawn["short_items"] == [
        {"product_id": product["id"], "requested": 1, "available": 0, "withdrawn": True}
    ]
    assert await order_rows(system) == 0


@pytest.mark.parametrize("quantity", [0, -1, 1.5, "100", 2**63, True, 10_001, None, 1e2])
async def test_bad_quantities_are_422(system: System, quantity: object) -> None:
    product = await system.product()
    body = {"items": [{"product_id": product["id"], "quantity": quantity}]}
    headers = system.tokens.customer() | {"Idempotency-Key": str(uuid.uuid4())}
    assert_problem(await system.orders.post(ORDERS, json=body, headers=headers), 422)


@pytest.mark.parametrize("lines", [0, 101])
async def test_line_count_is_bounded(system: System, lines: int) -> None:
    body = {"items": [{"product_id": str(uuid.uuid4()), "quantity": 1} for _ in range(lines)]}
    headers = system.tokens.customer() | {"Idempotency-Key": str(uuid.uuid4())}
    assert_problem(await system.orders.post(ORDERS, json=body, headers=headers), 422)


async def test_duplicate_product_lines_are_rejected(system: System) -> None:
    product = await system.product()
    body = assert_problem(await system.place([(product["id"], 1), (product["id"], 2)]), 422)
    # Where and why, without echoing the input.
    assert body["errors"] == [
        {"loc": ["body", "items"], "msg": "line 1 repeats the product of line 0: send one line with the total quantity"}
    ]
    assert product["id"] not in json.dumps(body)
    assert await system.stock(product["id"]) == {"on_hand": 10, "reserved": 0, "available": 10}


async def test_huge_orders_cannot_overflow(system: System) -> None:
    """100 lines of 10,000 units at 10^12 XAF: 10^18 XAF, exact, still inside a BIGINT."""
    products = await asyncio.gather(*(system.product(stock=10_000, price=10**12) for _ in range(100)))
    response = await system.place([(p["id"], 10_000) for p in products])
    assert response.status_code == 201, response.text
    order = response.json()
    assert order["total_xaf"] == 10**18
    assert isinstance(order["total_xaf"], int)
    assert all(line["line_total_xaf"] == 10**16 for line in order["items"])


async def test_the_state_machine_moves_stock(system: System) -> None:
    product = await system.product(stock=10)
    order = (await system.place([(product["id"], 4)])).json()
    staff = system.tokens.staff()
    url = f"{ORDERS}/{order['id']}"

    confirmed = await system.orders.post(url + "/confirm", headers=staff)
    assert confirmed.status_code == 200, confirmed.text
    assert confirmed.json()["status"] == "confirmed"
    assert confirmed.json()["expires_at"] is None
    assert await system.stock(product["id"]) == {"on_hand": 6, "reserved": 0, "available": 6}
    shipped = await system.orders.post(url + "/ship", headers=staff)
    assert shipped.json()["status"] == "shipped"
    delivered = await system.orders.post(url + "/deliver", headers=staff)
    assert delivered.json()["status"] == "delivered"
    for action in ("confirm", "ship", "deliver", "cancel"):
        body = assert_problem(await system.orders.post(f"{url}/{action}", headers=staff), 409)
        assert body["order_status"] == "delivered"
    assert await system.stock(product["id"]) == {"on_hand": 6, "reserved": 0, "available": 6}

    events = [e for e in await order_events(system) if e["resource_id"] == order["id"]]
    assert [(e["action"], e["old_values"], e["new_values"]["status"]) for e in events] == [
        ("orders.order.created", None, "pending"),
        ("orders.order.confirmed", {"status": "pending"}, "confirmed"),
        ("orders.order.shipped", {"status": "confirmed"}, "shipped"),
        ("orders.order.delivered", {"status": "shipped"}, "delivered"),
    ]
    assert {e["actor_role"] for e in events[1:]} == {"staff"}
    assert {e["actor_id"] for e in events[1:]} == {system.tokens.staff_id}
    # Every change carries where it came from: the request's id, the client's IP and user agent.
    assert [e["request_id"] for e in events[1:]] == [r.headers["x-request-id"] for r in (confirmed, shipped, delivered)]
    assert {(e["ip"], e["user_agent"]) for e in events} == {("203.0.113.7", system.orders.headers["user-agent"])}


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ([], {"confirm", "cancel"}),
        (["confirm"], {"ship", "cancel"}),
        (["confirm", "ship"], {"deliver"}),
        (["cancel"], set()),
        (["confirm", "cancel"], set()),
    ],
)
async def test_disallowed_transitions_are_409(system: System, path: list[str], allowed: set[str]) -> None:
    product = await system.product(stock=10)
    order = (await system.place([(product["id"], 1)])).json()
    url = f"{ORDERS}/{order['id']}"
    for step in path:
        assert (await system.orders.post(f"{url}/{step}", headers=system.tokens.staff())).status_code == 200
    for action in {"confirm", "ship", "deliver", "cancel"} - allowed:
        assert_problem(await system.orders.post(f"{url}/{action}", headers=system.tokens.staff()), 409)


async def test_cancel_releases_held_and_committed_stock(system: System) -> None:
    product = await system.product(stock=10)
    customer = system.tokens.customer()
    pending = (await system.place([(product["id"], 3)], customer=customer)).json()
    confirmed = (await system.place([(product["id"], 4)], customer=customer)).json()
    await system.orders.post(f"{ORDERS}/{confirmed['id']}/confirm", headers=system.tokens.staff())
    assert await system.stock(product["id"]) == {"on_hand": 6, "reserved": 3, "available": 3}

    first = await system.orders.post(f"{ORDERS}/{pending['id']}/cancel", headers=customer)
    assert first.json()["status"] == "cancelled"
    assert await system.stock(product["id"]) == {"on_hand": 6, "reserved": 0, "available": 6}
    cancelled = await system.orders.post(f"{ORDERS}/{confirmed['id']}/cancel", headers=customer)
    assert cancelled.json()["status"] == "cancelled"
    assert await system.stock(product["id"]) == {"on_hand": 10, "reserved": 0, "available": 10}
    events = [e for e in await order_events(system) if e["action"] == "orders.order.cancelled"]
    assert [e["old_values"]["status"] for e in events] == ["pending", "confirmed"]
    assert {e["actor_role"] for e in events} == {"customer"}
    assert [e["request_id"] for e in events] == [first.headers["x-request-id"], cancelled.headers["x-request-id"]]
    assert {(e["ip"], e["user_agent"]) for e in events} == {("203.0.113.7", system.orders.headers["user-agent"])}


async def test_customers_see_and_cancel_only_their_own_orders(system: System) -> None:
    product = await system.product(stock=10)
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    order = (await system.place([(product["id"], 1)], customer=system.tokens.customer(alice))).json()
    await system.place([(product["id"], 1)], customer=system.tokens.customer(bob))
    as_bob = system.tokens.customer(bob)

    missing = assert_problem(await system.orders.get(f"{ORDERS}/{uuid.uuid4()}", headers=as_bob), 404)
    other = assert_problem(await system.orders.get(f"{ORDERS}/{order['id']}", headers=as_bob), 404)
    assert (missing["type"], missing["detail"]) == (other["type"], other["detail"])
    assert_problem(await system.orders.post(f"{ORDERS}/{order['id']}/cancel", headers=as_bob), 404)
    listing = (await system.orders.get(ORDERS, headers=as_bob)).json()
    assert {o["user_id"] for o in listing["items"]} == {bob}
    assert_problem(await system.orders.get(ORDERS, params={"user_id": alice}, headers=as_bob), 403)
    denied = [e for e in await order_events(system) if e["action"] == "orders.access.denied"]
    assert [(e["actor_id"], e["resource_id"], e["outcome"]) for e in denied] == [(bob, "GET /api/v1/orders", "denied")]

    staff_listing = (await system.orders.get(ORDERS, headers=system.tokens.staff())).json()
    assert {o["user_id"] for o in staff_listing["items"]} == {alice, bob}
    only_alice = await system.orders.get(ORDERS, params={"user_id": alice}, headers=system.tokens.staff())
    assert [o["id"] for o in only_alice.json()["items"]] == [order["id"]]
    assert (await system.orders.get(f"{ORDERS}/{order['id']}", headers=system.tokens.staff())).status_code == 200
    assert (
        await system.orders.get(f"{ORDERS}/{order['id']}", headers=system.tokens.customer(alice))
    ).status_code == 200


@pytest.mark.parametrize("action", ["confirm", "ship", "deliver"])
async def test_fulfilment_is_for_staff(system: System, action: str) -> None:
    product = await system.product(stock=10)
    owner = system.tokens.customer()
    order = (await system.place([(product["id"], 1)], customer=owner)).json()
    url = f"{ORDERS}/{order['id']}/{action}"
    assert_problem(await system.orders.post(url), 401)
    assert_problem(await system.orders.post(url, headers=owner), 403)
    assert_problem(await system.orders.post(url, headers=system.tokens.service("inventory", "orders")), 401)


async def test_orders_need_a_user(system: System) -> None:
    assert_problem(await system.orders.get(ORDERS), 401)
    assert_problem(await system.orders.post(ORDERS, json={"items": []}, headers={"Idempotency-Key": "k"}), 401)
    service = system.tokens.service("auth", "orders")
    assert_problem(await system.orders.get(ORDERS, headers=service), 401)
    # Two credentials are one too many, in either order, even if both are good.
    mine = system.tokens.customer()["Authorization"]
    for pair in ([mine, "Bearer junk"], ["Bearer junk", mine], [mine, mine]):
        twice = await system.orders.get(ORDERS, headers=[("Authorization", value) for value in pair])
        assert assert_problem(twice, 401)["detail"] == "Send one Authorization header, not several."
    assert (await system.orders.get(ORDERS, headers={"Authorization": mine})).status_code == 200


async def test_listing_pages_and_filters(system: System) -> None:
    product = await system.product(stock=100)
    customer = system.tokens.customer()
    ids = [(await system.place([(product["id"], 1)], customer=customer)).json()["id"] for _ in range(5)]
    await system.orders.post(f"{ORDERS}/{ids[0]}/cancel", headers=customer)
    seen, cursor = [], None
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        body = (await system.orders.get(ORDERS, params=params, headers=customer)).json()
        seen += [o["id"] for o in body["items"]]
        cursor = body["next_cursor"]
        if not cursor:
            break
    assert seen == ids[::-1]
    cancelled = await system.orders.get(ORDERS, params={"status": "cancelled"}, headers=customer)
    assert [o["id"] for o in cancelled.json()["items"]] == [ids[0]]
    assert_problem(await system.orders.get(ORDERS, params={"status": "placing"}, headers=customer), 422)
    assert_problem(await system.orders.get(ORDERS, params={"cursor": "bogus"}, headers=customer), 400)
    for forged in FORGED_TIME_CURSORS:
        assert_problem(await system.orders.get(ORDERS, params={"cursor": forged}, headers=customer), 400)


async def test_pending_orders_expire_and_release_stock(system: System) -> None:
    product = await system.product(stock=10)
    customer = system.tokens.customer()
    order = (await system.place([(product["id"], 6)], customer=customer)).json()
    system.clock.advance(14 * 60)
    assert (await system.sweep())["expired"] == 0
    system.clock.advance(60)
    assert (await system.sweep())["expired"] == 1
    expired = (await system.orders.get(f"{ORDERS}/{order['id']}", headers=customer)).json()
    assert expired["status"] == "expired"
    assert await system.stock(product["id"]) == {"on_hand": 10, "reserved": 0, "available": 10}
    assert_problem(await system.orders.post(f"{ORDERS}/{order['id']}/confirm", headers=system.tokens.staff()), 409)
    [event] = [e for e in await order_events(system) if e["action"] == "orders.order.expired"]
    assert (event["actor_role"], event["old_values"], event["new_values"]) == (
        "system",
        {"status": "pending"},
        {"status": "expired"},
    )


async def test_confirming_an_overdue_order_expires_it(system: System) -> None:
    product = await system.product(stock=10)
    order = (await system.place([(product["id"], 6)])).json()
    system.clock.advance(15 * 60 + 1)
    body = assert_problem(
        await system.orders.post(f"{ORDERS}/{order['id']}/confirm", headers=system.tokens.staff()), 409
    )
    assert "expired" in str(body["detail"])
    fetched = await system.orders.get(f"{ORDERS}/{order['id']}", headers=system.tokens.staff())
    assert fetched.json()["status"] == "expired"
    assert await system.stock(product["id"]) == {"on_hand": 10, "reserved": 0, "available": 10}


async def test_a_reservation_expired_at_inventory_cannot_be_confirmed(system: System) -> None:
    """Inventory's sweeper got there first (clocks differ): confirm is refused and the order expires."""
    product = await system.product(stock=10)
    order = (await system.place([(product["id"], 6)])).json()
    admin = await system.database.admin()
    try:
        await admin.execute(
            "UPDATE orders.orders SET expires_at = expires_at + interval '1 hour' WHERE id = $1", uuid.UUID(order["id"])
        )
    finally:
        await admin.close()
    system.clock.advance(15 * 60 + 1)
    assert await system.inventory_app.state.inventory.sweeper.run_once() == 1
    assert_problem(await system.orders.post(f"{ORDERS}/{order['id']}/confirm", headers=system.tokens.staff()), 409)
    fetched = await system.orders.get(f"{ORDERS}/{order['id']}", headers=system.tokens.staff())
    assert fetched.json()["status"] == "expired"
    assert await system.stock(product["id"]) == {"on_hand": 10, "reserved": 0, "available": 10}


GDPR = "/internal/users/{user}/{action}"


async def test_gdpr_export_and_erasure(system: System) -> None:
    product = await system.product(stock=10)
    user = str(uuid.uuid4())
    customer = system.tokens.customer(user)
    first = (await system.place([(product["id"], 1)], customer=customer, key="a")).json()
    second = (await system.place([(product["id"], 2)], customer=customer, key="b")).json()
    await system.place([(product["id"], 1)])
    auth = system.tokens.service("auth", "orders")

    export = await system.orders.get(GDPR.format(user=user, action="export"), headers=auth)
    assert export.status_code == 200
    assert export.json()["user_id"] == user
    assert {o["id"] for o in export.json()["orders"]} == {first["id"], second["id"]}
    assert export.headers["cache-control"] == "no-store"

    erased = await system.orders.post(GDPR.format(user=user, action="erase"), headers=auth)
    assert erased.json() == {"orders_anonymised": 2}
    assert (await system.orders.get(GDPR.format(user=user, action="export"), headers=auth)).json()["orders"] == []
    assert (await system.orders.get(ORDERS, headers=customer)).json()["items"] == []
    kept = await system.orders.get(f"{ORDERS}/{first['id']}", headers=system.tokens.staff())
    assert kept.status_code == 200
    assert kept.json()["user_id"] != user
    assert kept.json()["total_xaf"] == first["total_xaf"]
    again = await system.orders.post(GDPR.format(user=user, action="erase"), headers=auth)
    assert again.json() == {"orders_anonymised": 0}
    admin = await system.database.admin()
    try:
        dump = "".join(str(dict(r)) for r in await admin.fetch("SELECT * FROM orders.orders"))
        outbox = "".join(
            str(dict(r))
            for r in await admin.fetch(
                "SELECT payload FROM orders.outbox WHERE payload->>'action' = 'orders.user.anonymised'"
            )
        )
    finally:
        await admin.close()
    assert user not in dump
    assert user not in outbox
    # The customer's keys are gone with them: re-using one now starts a new order.
    assert (await system.place([(product["id"], 1)], customer=customer, key="a")).json()["id"] != first["id"]


@pytest.mark.parametrize("action", ["export", "erase"])
async def test_gdpr_endpoints_accept_only_the_auth_service(system: System, action: str) -> None:
    url = GDPR.format(user=uuid.uuid4(), action=action)
    method = "GET" if action == "export" else "POST"
    assert_problem(await system.orders.request(method, url), 401)
    assert_problem(await system.orders.request(method, url, headers=system.tokens.admin()), 401)
    assert_problem(await system.orders.request(method, url, headers=system.tokens.service("inventory", "orders")), 403)
    assert_problem(await system.orders.request(method, url, headers=system.tokens.service("auth", "inventory")), 401)
    assert (
        await system.orders.request(method, url, headers=system.tokens.service("auth", "orders"))
    ).status_code == 200
