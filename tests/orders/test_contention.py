"""Correctness under contention: concurrent HTTP requests through orders and inventory on real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid

from tests.inventory.support import assert_ledger_invariant
from tests.orders.conftest import System

ORDERS = "/api/v1/orders"


async def test_fifty_buyers_for_the_last_ten_units(system: System) -> None:
    product = await system.product(stock=10, price=2500)
    samples: list[int] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            samples.append((await system.stock(product["id"]))["available"])
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    responses = await asyncio.gather(*(system.place([(product["id"], 1)]) for _ in range(50)))
    done.set()
    await watcher
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] * 10 + [409] * 40, [r.text for r in responses if r.status_code not in (201, 409)][:3]
    # (Never negative is the CHECK constraints' job and cannot be seen failing here.) What can: nothing is
    # ever given back during a sell-out, so a refused order never held stock, even for a moment.
    assert samples
    assert samples == sorted(samples, reverse=True), samples
    assert await system.stock(product["id"]) == {"on_hand": 10, "reserved": 10, "available": 0}

    # Confirming all ten sells exactly ten units.
    sold = [r.json()["id"] for r in responses if r.status_code == 201]
    staff = system.tokens.staff()
    confirms = await asyncio.gather(*(system.orders.post(f"{ORDERS}/{oid}/confirm", headers=staff) for oid in sold))
    assert {c.status_code for c in confirms} == {200}
    assert await system.stock(product["id"]) == {"on_hand": 0, "reserved": 0, "available": 0}
    await assert_ledger_invariant(system.database)


async def test_opposite_orders_over_two_products_never_deadlock(system: System) -> None:
    a = await system.product(stock=1000)
    b = await system.product(stock=1000)
    for _ in range(3):
        responses = await asyncio.gather(
            *(system.place([(a["id"], 1), (b["id"], 2)]) for _ in range(10)),
            *(system.place([(b["id"], 2), (a["id"], 1)]) for _ in range(10)),
        )
        assert [r.status_code for r in responses] == [201] * 20, [r.text for r in responses if r.status_code != 201]
    assert (await system.stock(a["id"]))["reserved"] == 60
    assert (await system.stock(b["id"]))["reserved"] == 120


async def test_concurrent_retries_with_one_key_make_one_order(system: System) -> None:
    product = await system.product(stock=100)
    customer = system.tokens.customer()
    responses = await asyncio.gather(
        *(system.place([(product["id"], 3)], customer=customer, key="retry-me") for _ in range(12))
    )
    assert {r.status_code for r in responses} == {201}, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert sum(1 for r in responses if "idempotent-replayed" not in r.headers) == 1
    assert await system.stock(product["id"]) == {"on_hand": 100, "reserved": 3, "available": 97}


async def test_concurrent_staff_and_customer_actions_stay_consistent(system: System) -> None:
    product = await system.product(stock=100)
    customer = system.tokens.customer()
    staff = system.tokens.staff()
    orders = [(await system.place([(product["id"], 2)], customer=customer)).json()["id"] for _ in range(8)]
    actions = []
    for order_id in orders:
        actions += [
            system.orders.post(f"{ORDERS}/{order_id}/confirm", headers=staff),
            system.orders.post(f"{ORDERS}/{order_id}/cancel", headers=customer),
            system.orders.post(f"{ORDERS}/{order_id}/confirm", headers=staff),
        ]
    results = await asyncio.gather(*actions)
    assert {r.status_code for r in results} <= {200, 409}, [r.text for r in results if r.status_code >= 500]
    final = {oid: (await system.orders.get(f"{ORDERS}/{oid}", headers=staff)).json()["status"] for oid in orders}
    confirmed = sum(1 for s in final.values() if s == "confirmed")
    assert set(final.values()) <= {"confirmed", "cancelled"}
    assert await system.stock(product["id"]) == {
        "on_hand": 100 - 2 * confirmed,
        "reserved": 0,
        "available": 100 - 2 * confirmed,
    }


async def test_the_same_order_cannot_be_placed_twice_by_racing_a_different_body(system: System) -> None:
    product = await system.product(stock=100)
    customer = system.tokens.customer()
    key = str(uuid.uuid4())
    responses = await asyncio.gather(
        *(system.place([(product["id"], 1 + i % 2)], customer=customer, key=key) for i in range(8))
    )
    created = {r.json()["id"] for r in responses if r.status_code == 201}
    assert len(created) == 1
    assert {r.status_code for r in responses} <= {201, 422}
    assert (await system.stock(product["id"]))["reserved"] in (1, 2)


async def test_twins_in_one_claim_batch_make_one_order(system: System) -> None:
    """Retries that arrive together share one claim statement: the first twin takes the key, the rest wait."""
    from services.orders.repository import Claim

    service = system.orders_app.state.orders.service
    user, now = uuid.uuid4(), system.clock()
    claims = [Claim(uuid.uuid4(), user, "same", "h", uuid.uuid4(), uuid.uuid4(), now, "{}") for _ in range(3)]
    other = Claim(uuid.uuid4(), uuid.uuid4(), "same", "h", uuid.uuid4(), uuid.uuid4(), now, "{}")
    assert await service.placement._claim_batch([*claims, other]) == [True, False, False, True]
    assert await service.placement._claim_batch(claims[1:]) == [False, False]


async def test_claim_batches_sharing_keys_in_opposite_orders_do_not_deadlock(system: System) -> None:
    """Two retried batches over the same keys wait for each other in key order, never in a cycle."""
    from services.orders.repository import Claim

    service = system.orders_app.state.orders.service
    user, now = uuid.uuid4(), system.clock()

    def claims() -> list[Claim]:
        return [Claim(uuid.uuid4(), user, f"k{n:05}", "h", uuid.uuid4(), uuid.uuid4(), now, "{}") for n in range(2000)]

    forward, backward = claims(), claims()[::-1]
    first, second = await asyncio.gather(
        service.placement._claim_batch(forward), service.placement._claim_batch(backward)
    )
    assert sum(first) + sum(second) == 2000  # each key claimed once, by one of the two


async def test_an_order_the_database_refuses_fails_alone_in_its_batch(system: System) -> None:
    from sqlalchemy.exc import DBAPIError

    from services.orders.repository import Claim

    service = system.orders_app.state.orders.service
    now = system.clock()

    def claim(key: str) -> Claim:
        return Claim(uuid.uuid4(), uuid.uuid4(), key, "h", uuid.uuid4(), uuid.uuid4(), now, "{}")

    # A key longer than its column (the API refuses it first): the statement carrying it is refused whole,
    # and sent again one order at a time.
    results = await asyncio.gather(
        *(service.placement.claims.submit(claim(k)) for k in ("a", "b", "x" * 300, "c")), return_exceptions=True
    )
    assert results[:2] == [True, True]
    assert results[3] is True
    assert isinstance(results[2], DBAPIError)
