"""Internal reservations: all or nothing, idempotent, expiring, and correct under real contention."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import datetime, timedelta

import httpx
import pytest

from tests.conftest import DatabaseFixture, assert_problem
from tests.inventory.support import FakeClock, Tokens, assert_ledger_invariant, create_product, stock_row

RESERVATIONS = "/internal/reservations"


def orders(tokens: Tokens) -> dict[str, str]:
    return tokens.service("orders", "inventory")


async def reserve(
    client: httpx.AsyncClient, tokens: Tokens, items: list[tuple[str, int]], reservation_id: str | None = None
) -> httpx.Response:
    rid = reservation_id or str(uuid.uuid4())
    body = {"items": [{"product_id": pid, "quantity": qty} for pid, qty in items]}
    return await client.put(f"{RESERVATIONS}/{rid}", json=body, headers=orders(tokens))


async def test_reserve_holds_every_item_with_prices_from_the_catalogue(
    client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture, clock: FakeClock
) -> None:
    soap = await create_product(client, tokens, stock=5, price=750, name="Savon")
    rice = await create_product(client, tokens, stock=3, price=18500, name="Riz")
    rid = str(uuid.uuid4())
    response = await reserve(client, tokens, [(soap["id"], 2), (rice["id"], 3)], rid)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["reservation_id"] == rid
    assert body["status"] == "held"
    assert [(i["sku"], i["name"], i["quantity"], i["unit_price_xaf"]) for i in body["items"]] == [
        (soap["sku"], "Savon", 2, 750),
        (rice["sku"], "Riz", 3, 18500),
    ]
    # The injected clock plus the default 15-minute lifetime (not the calendar date: that test failed
    # whenever it ran in the quarter hour before midnight).
    assert datetime.fromisoformat(body["expires_at"]) == clock.now + timedelta(seconds=900)
    assert tuple(await stock_row(database, soap["id"])) == (5, 2, 3)
    assert tuple(await stock_row(database, rice["id"])) == (3, 3, 0)
    public = (await client.get(f"/api/v1/products/{rice['id']}")).json()
    assert public["available"] == 0


async def test_reserve_is_all_or_nothing(client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture) -> None:
    soap = await create_product(client, tokens, stock=5)
    rice = await create_product(client, tokens, stock=1)
    response = await reserve(client, tokens, [(soap["id"], 2), (rice["id"], 2)])
    body = assert_problem(response, 409)
    assert body["short_items"] == [{"product_id": rice["id"], "requested": 2, "available": 1, "withdrawn": False}]
    assert tuple(await stock_row(database, soap["id"])) == (5, 0, 5)
    assert tuple(await stock_row(database, rice["id"])) == (1, 0, 1)


async def test_inactive_products_cannot_be_reserved(client: httpx.AsyncClient, tokens: Tokens) -> None:
    product = await create_product(client, tokens, stock=5)
    await client.patch(f"/api/v1/products/{product['id']}", json={"is_active": False}, headers=tokens.staff())
    body = assert_problem(await reserve(client, tokens, [(product["id"], 1)]), 409)
    # Told apart from sold out: it will not come back in stock.
    assert body["short_items"] == [{"product_id": product["id"], "requested": 1, "available": 0, "withdrawn": True}]


async def test_unknown_products_are_422_and_the_id_stays_usable(client: httpx.AsyncClient, tokens: Tokens) -> None:
    product = await create_product(client, tokens, stock=5)
    rid = str(uuid.uuid4())
    missing = str(uuid.uuid4())
    body = assert_problem(await reserve(client, tokens, [(product["id"], 1), (missing, 1)], rid), 422)
    assert body["product_ids"] == [missing]
    assert (await reserve(client, tokens, [(product["id"], 1)], rid)).status_code == 201


@pytest.mark.parametrize(
    "items",
    [
        [],
        [{"product_id": "P", "quantity": 0}],
        [{"product_id": "P", "quantity": -1}],
        [{"product_id": "P", "quantity": 1.5}],
        [{"product_id": "P", "quantity": "1"}],
        [{"product_id": "P", "quantity": True}],
        [{"product_id": "P", "quantity": 10_001}],
        [{"product_id": "P", "quantity": 2**63}],
        [{"product_id": "P", "quantity": 1}, {"product_id": "P", "quantity": 1}],
        [{"product_id": "not-a-uuid", "quantity": 1}],
    ],
)
async def test_malformed_reservations_are_422(client: httpx.AsyncClient, tokens: Tokens, items: list) -> None:
    product = await create_product(client, tokens, stock=5)
    body = {"items": [item | {"product_id": product["id"]} if item["product_id"] == "P" else item for item in items]}
    response = await client.put(f"{RESERVATIONS}/{uuid.uuid4()}", json=body, headers=orders(tokens))
    assert_problem(response, 422)


async def test_repeating_a_reserve_returns_the_first_result(
    client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture
) -> None:
    product = await create_product(client, tokens, stock=5)
    rid = str(uuid.uuid4())
    first = await reserve(client, tokens, [(product["id"], 2)], rid)
    again = await reserve(client, tokens, [(product["id"], 2)], rid)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json() == again.json()
    assert tuple(await stock_row(database, product["id"])) == (5, 2, 3)
    assert_problem(await reserve(client, tokens, [(product["id"], 3)], rid), 422)


async def test_a_rejected_reserve_is_replayed_as_rejected(
    client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture
) -> None:
    product = await create_product(client, tokens, stock=1)
    rid = str(uuid.uuid4())
    first = assert_problem(await reserve(client, tokens, [(product["id"], 2)], rid), 409)
    await client.post(
        f"/api/v1/products/{product['id']}/stock-adjustments",
        json={"delta": 10, "reason": "restock"},
        headers=tokens.staff(),
    )
    again = assert_problem(await reserve(client, tokens, [(product["id"], 2)], rid), 409)
    assert again["short_items"] == first["short_items"]
    assert tuple(await stock_row(database, product["id"])) == (11, 0, 11)


async def test_commit_takes_units_from_on_hand_once(
    client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture
) -> None:
    product = await create_product(client, tokens, stock=5)
    rid = str(uuid.uuid4())
    await reserve(client, tokens, [(product["id"], 2)], rid)
    first = await client.post(f"{RESERVATIONS}/{rid}/commit", headers=orders(tokens))
    again = await client.post(f"{RESERVATIONS}/{rid}/commit", headers=orders(tokens))
    assert first.status_code == again.status_code == 200
    assert first.json()["status"] == again.json()["status"] == "committed"
    assert tuple(await stock_row(database, product["id"])) == (3, 0, 3)
    assert (await client.get(f"{RESERVATIONS}/{rid}", headers=orders(tokens))).json()["status"] == "committed"


async def test_release_frees_a_hold_once(client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture) -> None:
    product = await create_product(client, tokens, stock=5)
    rid = str(uuid.uuid4())
    await reserve(client, tokens, [(product["id"], 4)], rid)
    for _ in range(3):
        response = await client.post(f"{RESERVATIONS}/{rid}/release", headers=orders(tokens))
        assert response.status_code == 200
        assert response.json()["status"] == "released"
    assert tuple(await stock_row(database, product["id"])) == (5, 0, 5)
    assert_problem(await client.post(f"{RESERVATIONS}/{rid}/commit", headers=orders(tokens)), 409)


async def test_releasing_a_committed_reservation_returns_units_on_hand(
    client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture
) -> None:
    product = await create_product(client, tokens, stock=5)
    rid = str(uuid.uuid4())
    await reserve(client, tokens, [(product["id"], 4)], rid)
    await client.post(f"{RESERVATIONS}/{rid}/commit", headers=orders(tokens))
    assert tuple(await stock_row(database, product["id"])) == (1, 0, 1)
    for _ in range(2):
        await client.post(f"{RESERVATIONS}/{rid}/release", headers=orders(tokens))
    assert tuple(await stock_row(database, product["id"])) == (5, 0, 5)
    kinds = [
        m["kind"]
        for m in (await client.get(f"/api/v1/products/{product['id']}/stock-movements", headers=tokens.staff())).json()[
            "items"
        ]
    ]
    assert kinds == ["release", "commit", "reserve", "receive"]


async def test_a_release_before_the_reserve_fences_the_id(
    client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture
) -> None:
    """A reserve retry overtaken by its release (lost response, then compensation) must not hold stock."""
    product = await create_product(client, tokens, stock=5)
    rid = str(uuid.uuid4())
    released = await client.post(f"{RESERVATIONS}/{rid}/release", headers=orders(tokens))
    assert released.json() == {"reservation_id": rid, "status": "released", "expires_at": None, "items": []}
    assert_problem(await reserve(client, tokens, [(product["id"], 1)], rid), 409)
    assert tuple(await stock_row(database, product["id"])) == (5, 0, 5)


async def test_unknown_reservations_are_404(client: httpx.AsyncClient, tokens: Tokens) -> None:
    assert_problem(await client.post(f"{RESERVATIONS}/{uuid.uuid4()}/commit", headers=orders(tokens)), 404)
    assert_problem(await client.get(f"{RESERVATIONS}/{uuid.uuid4()}", headers=orders(tokens)), 404)


async def test_reservations_expire_and_the_sweeper_releases_them(
    client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture, clock: FakeClock
) -> None:
    product = await create_product(client, tokens, stock=5)
    old, fresh = str(uuid.uuid4()), str(uuid.uuid4())
    await reserve(client, tokens, [(product["id"], 2)], old)
    clock.advance(10 * 60)
    await reserve(client, tokens, [(product["id"], 1)], fresh)
    sweeper = client.app.state.inventory.sweeper  # type: ignore[attr-defined]
    assert await sweeper.run_once() == 0
    clock.advance(5 * 60 + 1)  # the first is 15 min old, the second 5
    assert_problem(await client.post(f"{RESERVATIONS}/{old}/commit", headers=orders(tokens)), 409)
    assert await sweeper.run_once() == 1
    assert (await client.get(f"{RESERVATIONS}/{old}", headers=orders(tokens))).json()["status"] == "expired"
    assert tuple(await stock_row(database, product["id"])) == (5, 1, 4)
    assert (await client.post(f"{RESERVATIONS}/{old}/release", headers=orders(tokens))).json()["status"] == "expired"
    assert (await client.post(f"{RESERVATIONS}/{fresh}/commit", headers=orders(tokens))).status_code == 200
    assert tuple(await stock_row(database, product["id"])) == (4, 0, 4)


async def test_the_sweeper_runs_in_the_background(
    inventory_settings, issuer, clock: FakeClock, tokens: Tokens, database: DatabaseFixture
) -> None:
    from services.inventory.main import create_app
    from tests.conftest import running

    settings = inventory_settings.model_copy(update={"sweep_interval_seconds": 0.05})
    async with running(create_app(settings, key_source=issuer.keys(), clock=clock)) as client:
        product = await create_product(client, tokens, stock=5)
        await reserve(client, tokens, [(product["id"], 5)])
        clock.advance(15 * 60)
        deadline = time.monotonic() + 5
        while (await stock_row(database, product["id"]))["reserved"]:
            assert time.monotonic() < deadline, "the sweeper did not release the expired reservation"
            await asyncio.sleep(0.05)


async def test_internal_endpoints_accept_only_the_orders_service(client: httpx.AsyncClient, tokens: Tokens) -> None:
    product = await create_product(client, tokens, stock=5)
    url = f"{RESERVATIONS}/{uuid.uuid4()}"
    body = {"items": [{"product_id": product["id"], "quantity": 1}]}
    assert_problem(await client.put(url, json=body), 401)
    assert_problem(await client.put(url, json=body, headers=tokens.staff()), 401)
    assert_problem(await client.put(url, json=body, headers=tokens.admin()), 401)
    assert_problem(await client.put(url, json=body, headers=tokens.service("auth", "inventory")), 403)
    assert_problem(await client.put(url, json=body, headers=tokens.service("orders", "orders")), 401)
    assert_problem(await client.post(url + "/release", headers=tokens.service("gateway", "inventory")), 403)
    assert_problem(await client.post(url + "/commit", headers=tokens.customer()), 401)
    assert (await client.put(url, json=body, headers=orders(tokens))).status_code == 201


async def test_a_held_row_lock_means_503_not_a_hang(
    client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture
) -> None:
    product = await create_product(client, tokens, stock=5)
    admin = await database.admin()
    try:
        async with admin.transaction():
            await admin.execute("SELECT 1 FROM inventory.products WHERE id = $1 FOR UPDATE", uuid.UUID(product["id"]))
            started = time.monotonic()
            response = await reserve(client, tokens, [(product["id"], 1)])
            assert time.monotonic() - started < 5
        body = assert_problem(response, 503)
        assert response.headers["retry-after"] == "1"
        assert "SELECT" not in str(body["detail"])
    finally:
        await admin.close()
    assert tuple(await stock_row(database, product["id"])) == (5, 0, 5)


# Correctness under contention: real concurrent requests, real PostgreSQL row locks.


async def test_fifty_buyers_for_the_last_ten_units(
    client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture
) -> None:
    product = await create_product(client, tokens, stock=10)
    responses = await asyncio.gather(*(reserve(client, tokens, [(product["id"], 1)]) for _ in range(50)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] * 10 + [409] * 40, statuses
    assert tuple(await stock_row(database, product["id"])) == (10, 10, 0)
    await assert_ledger_invariant(database)


async def test_opposite_orders_over_two_products_never_deadlock(
    client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture
) -> None:
    a = await create_product(client, tokens, stock=1000)
    b = await create_product(client, tokens, stock=1000)

    async def pair() -> list[httpx.Response]:
        first = reserve(client, tokens, [(a["id"], 1), (b["id"], 1)])
        second = reserve(client, tokens, [(b["id"], 1), (a["id"], 1)])
        return list(await asyncio.gather(first, second))

    rounds = await asyncio.gather(*(pair() for _ in range(20)))
    statuses = [r.status_code for pair_ in rounds for r in pair_]
    assert statuses == [201] * 40, [r.text for pair_ in rounds for r in pair_ if r.status_code != 201][:3]
    assert (await stock_row(database, a["id"]))["reserved"] == 40
    assert (await stock_row(database, b["id"]))["reserved"] == 40


async def test_concurrent_repeats_of_one_reservation_hold_once(
    client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture
) -> None:
    product = await create_product(client, tokens, stock=10)
    rid = str(uuid.uuid4())
    responses = await asyncio.gather(*(reserve(client, tokens, [(product["id"], 3)], rid) for _ in range(10)))
    assert sorted(r.status_code for r in responses) == [200] * 9 + [201]
    assert len({r.text for r in responses}) == 1
    commits = await asyncio.gather(
        *(client.post(f"{RESERVATIONS}/{rid}/commit", headers=orders(tokens)) for _ in range(5)),
        *(client.post(f"{RESERVATIONS}/{rid}/release", headers=orders(tokens)) for _ in range(5)),
    )
    assert all(r.status_code in (200, 409) for r in commits)
    # Whichever came first, the hold ends released and the units are back: each step moved stock once.
    assert tuple(await stock_row(database, product["id"])) == (10, 0, 10)
    ledger = await client.get(f"/api/v1/products/{product['id']}/stock-movements", headers=tokens.staff())
    kinds = [m["kind"] for m in ledger.json()["items"]]
    assert kinds.count("reserve") == 1
    assert kinds.count("release") == 1
    assert kinds.count("commit") <= 1


# Batches: what orders sends when reservations arrive faster than one call at a time.


def ask(items: list[tuple[str, int]], reservation_id: str | None = None) -> dict[str, object]:
    return {
        "reservation_id": reservation_id or str(uuid.uuid4()),
        "items": [{"product_id": pid, "quantity": qty} for pid, qty in items],
    }


async def reserve_batch(client: httpx.AsyncClient, tokens: Tokens, asks: list[dict[str, object]]) -> list[dict]:
    response = await client.post(f"{RESERVATIONS}/batch", json={"reservations": asks}, headers=orders(tokens))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["reservation_id"] for r in results] == [a["reservation_id"] for a in asks]
    return list(results)


async def test_a_batch_serves_its_reservations_in_order_each_all_or_nothing(
    client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture
) -> None:
    soap = await create_product(client, tokens, stock=3, price=750, name="Savon")
    rice = await create_product(client, tokens, stock=10, price=18500, name="Riz")
    asks = [
        ask([(soap["id"], 2), (rice["id"], 1)]),
        ask([(soap["id"], 2)]),  # one soap left: refused, and its rice-free hold takes nothing
        ask([(rice["id"], 4), (soap["id"], 1)]),
        ask([(soap["id"], 1), (rice["id"], 1)]),  # no soap left: the rice stays too
    ]
    results = await reserve_batch(client, tokens, asks)
    assert [r["status"] for r in results] == [201, 409, 201, 409]
    assert results[1]["body"]["short_items"] == [
        {"product_id": soap["id"], "requested": 2, "available": 1, "withdrawn": False}
    ]
    assert results[1]["body"]["type"] == "urn:comptoir:problem:insufficient-stock"
    assert results[3]["body"]["short_items"] == [
        {"product_id": soap["id"], "requested": 1, "available": 0, "withdrawn": False}
    ]
    held = results[2]["body"]
    assert held["status"] == "held"
    assert [(i["name"], i["quantity"], i["unit_price_xaf"]) for i in held["items"]] == [
        ("Riz", 4, 18500),
        ("Savon", 1, 750),
    ]
    assert tuple(await stock_row(database, soap["id"])) == (3, 3, 0)
    assert tuple(await stock_row(database, rice["id"])) == (10, 5, 5)
    await assert_ledger_invariant(database)
    # Each is the reservation the single call would have made (and would replay).
    for result, asked in zip(results, asks, strict=True):
        items = [(i["product_id"], i["quantity"]) for i in asked["items"]]  # type: ignore[attr-defined]
        again = await reserve(client, tokens, items, str(asked["reservation_id"]))
        assert again.status_code == (200 if result["status"] == 201 else 409)
        if result["status"] == 201:
            assert again.json() == result["body"]


async def test_a_batch_replays_known_ids_and_refuses_reused_ones(
    client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture
) -> None:
    product = await create_product(client, tokens, stock=10)
    known = str(uuid.uuid4())
    first = await reserve(client, tokens, [(product["id"], 2)], known)
    twin = str(uuid.uuid4())
    results = await reserve_batch(
        client,
        tokens,
        [
            ask([(product["id"], 2)], known),  # asked before: the first result
            ask([(product["id"], 3)], known),  # the same id with other items
            ask([(product["id"], 1)], twin),
            ask([(product["id"], 1)], twin),  # twice in one batch: held once
        ],
    )
    assert [r["status"] for r in results] == [200, 422, 201, 200]
    assert results[0]["body"] == first.json()
    assert results[1]["body"]["type"] == "urn:comptoir:problem:reservation-mismatch"
    assert results[3]["body"] == results[2]["body"]
    assert tuple(await stock_row(database, product["id"])) == (10, 3, 7)
    await assert_ledger_invariant(database)


async def test_unknown_products_in_a_batch_refuse_only_their_reservation(
    client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture
) -> None:
    product = await create_product(client, tokens, stock=5)
    missing = str(uuid.uuid4())
    rid = str(uuid.uuid4())
    results = await reserve_batch(
        client,
        tokens,
        [ask([(product["id"], 1), (missing, 1)], rid), ask([(product["id"], 1)]), ask([(missing, 2)], rid)],
    )
    assert [r["status"] for r in results] == [422, 201, 422]
    assert results[0]["body"]["product_ids"] == [missing]
    assert results[2]["body"]["product_ids"] == [missing]
    assert tuple(await stock_row(database, product["id"])) == (5, 1, 4)
    # The id was never held: it can still be used.
    assert (await reserve(client, tokens, [(product["id"], 1)], rid)).status_code == 201


@pytest.mark.parametrize(
    "body",
    [
        {"reservations": []},
        {"reservations": [{"items": [{"product_id": "P", "quantity": 1}]}]},
        {"reservations": [{"reservation_id": "R", "items": []}]},
        {"reservations": [{"reservation_id": "R", "items": [{"product_id": "P", "quantity": 0}]}]},
        {"reservations": [{"reservation_id": "R", "items": [{"product_id": "P", "quantity": 1}] * 2}]},
        {"reservations": [{"reservation_id": "R", "items": [{"product_id": "P", "quantity": 1}]}] * 101},
        {"reservations": "R"},
    ],
)
async def test_malformed_batches_are_422_and_change_nothing(
    client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture, body: dict
) -> None:
    product = await create_product(client, tokens, stock=5)
    text = json.dumps(body).replace('"P"', json.dumps(product["id"])).replace('"R"', json.dumps(str(uuid.uuid4())))
    response = await client.post(
        f"{RESERVATIONS}/batch", content=text, headers=orders(tokens) | {"Content-Type": "application/json"}
    )
    assert_problem(response, 422)
    assert tuple(await stock_row(database, product["id"])) == (5, 0, 5)


async def test_batches_accept_only_the_orders_service(client: httpx.AsyncClient, tokens: Tokens) -> None:
    product = await create_product(client, tokens, stock=5)
    body = {"reservations": [ask([(product["id"], 1)])]}
    url = f"{RESERVATIONS}/batch"
    assert_problem(await client.post(url, json=body), 401)
    assert_problem(await client.post(url, json=body, headers=tokens.staff()), 401)
    assert_problem(await client.post(url, json=body, headers=tokens.service("gateway", "inventory")), 403)
    assert (await client.post(url, json=body, headers=orders(tokens))).status_code == 200


async def test_a_batch_is_checked_body_syntax_then_caller_then_fields(
    client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture
) -> None:
    """A valid batch is served without FastAPI's per-request work (``common.fastpath``), any other by
    FastAPI: either way the checks come in FastAPI's order and nothing changes before they pass."""
    product = await create_product(client, tokens, stock=5)
    url = f"{RESERVATIONS}/batch"
    json_body = {"Content-Type": "application/json"}
    not_json = b'{"reservations": ['
    invalid = json.dumps({"reservations": [ask([(product["id"], 0)])]}).encode()
    valid = json.dumps({"reservations": [ask([(product["id"], 1)])]}).encode()
    for headers in ({}, tokens.service("gateway", "inventory"), orders(tokens)):
        assert_problem(await client.post(url, content=not_json, headers=json_body | headers), 400)
    for body in (invalid, valid):
        assert_problem(await client.post(url, content=body, headers=json_body), 401)
        assert_problem(await client.post(url, content=body, headers=json_body | tokens.staff()), 401)
        gateway = tokens.service("gateway", "inventory")
        assert_problem(await client.post(url, content=body, headers=json_body | gateway), 403)
    admin = await database.admin()
    try:  # a caller the endpoint does not take is refused on either path, and recorded on both
        denied = await admin.fetch(
            "SELECT payload->>'resource_id' AS route, payload->'new_values'->>'caller' AS caller FROM inventory.outbox"
            " WHERE payload->>'action' = 'inventory.internal.denied'"
        )
    finally:
        await admin.close()
    assert [(r["route"], r["caller"]) for r in denied] == [("POST /internal/reservations/batch", "gateway")] * 2
    problem = assert_problem(await client.post(url, content=invalid, headers=json_body | orders(tokens)), 422)
    errors = problem["errors"]
    assert isinstance(errors, list)
    assert [error["loc"] for error in errors] == [["body", "reservations", 0, "items", 0, "quantity"]]
    assert tuple(await stock_row(database, product["id"])) == (5, 0, 5)
    answer = await client.post(url, content=valid, headers=json_body | orders(tokens))
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert [result["status"] for result in answer.json()["results"]] == [201]
    assert tuple(await stock_row(database, product["id"])) == (5, 1, 4)


async def test_concurrent_batches_for_the_last_units_never_oversell(
    client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture
) -> None:
    product = await create_product(client, tokens, stock=10)
    batches = await asyncio.gather(
        *(reserve_batch(client, tokens, [ask([(product["id"], 1)]) for _ in range(5)]) for _ in range(10))
    )
    statuses = sorted(r["status"] for results in batches for r in results)
    assert statuses == [201] * 10 + [409] * 40, statuses
    assert tuple(await stock_row(database, product["id"])) == (10, 10, 0)
    await assert_ledger_invariant(database)


async def test_a_retried_batch_racing_the_first_holds_each_reservation_once(
    client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture
) -> None:
    product = await create_product(client, tokens, stock=100)
    asks = [ask([(product["id"], 1)]) for _ in range(20)]
    first, retry, backwards = await asyncio.gather(
        reserve_batch(client, tokens, asks),
        reserve_batch(client, tokens, asks),
        reserve_batch(client, tokens, asks[::-1]),
    )
    for n, asked in enumerate(asks):
        answers = [first[n], retry[n], backwards[len(asks) - 1 - n]]
        assert sorted(a["status"] for a in answers) == [200, 200, 201], answers
        assert answers[0]["body"] == answers[1]["body"] == answers[2]["body"]
        assert answers[0]["reservation_id"] == asked["reservation_id"]
    assert tuple(await stock_row(database, product["id"])) == (100, 20, 80)
    await assert_ledger_invariant(database)
