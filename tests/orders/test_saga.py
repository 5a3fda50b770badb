"""The orders <-> inventory saga when the network or a process fails: no order without stock, no stock
held forever, and every interrupted step finished or undone by the reconciliation."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx

from services.orders.liveness import LOCK_CLASS
from tests.conftest import assert_problem
from tests.orders.conftest import System

ORDERS = "/api/v1/orders"


class FlakyTransport(httpx.AsyncBaseTransport):
    """The network between orders and inventory: it can be down, lose answers, or hold requests."""

    def __init__(self) -> None:
        self.inner: httpx.AsyncBaseTransport | None = None
        self.down = False
        self.lose: dict[str, int] = {}  # call kind -> how many answers to lose after inventory acted
        self.fail: dict[str, int] = {}  # call kind -> how many requests never reach inventory
        self.hold_before: dict[str, asyncio.Event] = {}
        self.hold_after: dict[str, asyncio.Event] = {}
        self.arrived: dict[str, asyncio.Event] = {}
        self.calls: list[str] = []
        self.batches: list[int] = []  # how many reservations each reserve call carried

    @staticmethod
    def kind(request: httpx.Request) -> str:
        """reserve (a batch of them), commit or release."""
        path = request.url.path
        return "reserve" if path.endswith("/batch") else path.rsplit("/", 1)[-1]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        kind = self.kind(request)
        self.calls.append(kind)
        if kind == "reserve":
            self.batches.append(len(json.loads(await request.aread())["reservations"]))
        if self.down:
            raise httpx.ConnectError("inventory is down", request=request)
        if self.fail.get(kind):
            self.fail[kind] -= 1
            raise httpx.ConnectError("inventory is unreachable", request=request)
        if kind in self.arrived:
            self.arrived[kind].set()
        if kind in self.hold_before:
            await self.hold_before.pop(kind).wait()
        assert self.inner is not None
        response = await self.inner.handle_async_request(request)
        await response.aread()
        if kind in self.hold_after:
            await self.hold_after.pop(kind).wait()
        if self.lose.get(kind):
            self.lose[kind] -= 1
            raise httpx.ReadTimeout("the answer was lost", request=request)
        return response


async def start_flaky(start_system: Callable[..., Any], **overrides: Any) -> tuple[Any, FlakyTransport]:
    transport = FlakyTransport()
    context = start_system(inventory_transport=transport, orders_overrides=overrides or None)
    return context, transport


async def rows(system: System, sql: str = "SELECT * FROM orders.orders") -> list[dict[str, Any]]:
    admin = await system.database.admin()
    try:
        return [dict(r) for r in await admin.fetch(sql)]
    finally:
        await admin.close()


async def test_a_hung_inventory_is_a_503_within_the_budget_not_a_wait_past_the_gateways_deadline(
    start_system: Callable[..., Any],
) -> None:
    """Each try may wait its whole timeout (5 s, 3 tries): all of them together stop at the budget."""
    context, net = await start_flaky(start_system, inventory_budget_seconds=0.5)
    async with context as system:
        net.inner = httpx.ASGITransport(app=system.inventory_app)
        product = await system.product(stock=5)
        # Inventory takes the calls and never answers: the reserve, and the release of what it may hold.
        net.hold_before["reserve"] = asyncio.Event()
        net.hold_before["release"] = asyncio.Event()
        started = time.monotonic()
        response = await system.place([(product["id"], 2)], customer=system.tokens.customer(), key="k-hung")
        assert time.monotonic() - started < 5
        assert_problem(response, 503)
        assert response.headers["retry-after"] == "2"
        assert await system.stock(product["id"]) == {"on_hand": 5, "reserved": 0, "available": 5}


async def test_inventory_down_means_503_and_no_order(start_system: Callable[..., Any]) -> None:
    context, net = await start_flaky(start_system)
    async with context as system:
        net.inner = httpx.ASGITransport(app=system.inventory_app)
        product = await system.product(stock=5)
        customer = system.tokens.customer()
        net.down = True
        started = time.monotonic()
        response = await system.place([(product["id"], 2)], customer=customer, key="k-1")
        assert time.monotonic() - started < 5
        assert_problem(response, 503)
        assert response.headers["retry-after"]
        assert await rows(system) == []
        assert await system.stock(product["id"]) == {"on_hand": 5, "reserved": 0, "available": 5}
        net.down = False
        assert (await system.place([(product["id"], 2)], customer=customer, key="k-1")).status_code == 201


async def test_a_lost_reserve_answer_is_retried_without_holding_twice(start_system: Callable[..., Any]) -> None:
    context, net = await start_flaky(start_system)
    async with context as system:
        net.inner = httpx.ASGITransport(app=system.inventory_app)
        product = await system.product(stock=5)
        net.lose["reserve"] = 1
        response = await system.place([(product["id"], 2)])
        assert response.status_code == 201, response.text
        assert net.calls.count("reserve") == 2
        assert await system.stock(product["id"]) == {"on_hand": 5, "reserved": 2, "available": 3}


async def one_out_and_more_waiting(
    system: System, net: FlakyTransport, product_id: str, later: int
) -> tuple[asyncio.Task[httpx.Response], list[asyncio.Task[httpx.Response]], asyncio.Event]:
    """One order's reserve call held on its way to inventory, and ``later`` orders waiting for it to come
    back; the held call goes on when the returned gate is set."""
    gate = net.hold_before["reserve"] = asyncio.Event()
    arrived = net.arrived["reserve"] = asyncio.Event()
    first = asyncio.create_task(system.place([(product_id, 1)]))
    await arrived.wait()
    others = [asyncio.create_task(system.place([(product_id, 1)])) for _ in range(later)]
    reserves = system.orders_app.state.orders.inventory.reserves
    deadline = time.monotonic() + 10
    while reserves.waiting < later:  # a state to reach, not a race: each order queues on its first steps
        assert time.monotonic() < deadline, reserves.waiting
        await asyncio.sleep(0.01)
    return first, others, gate


async def test_reserves_that_arrive_while_a_call_is_out_go_together(start_system: Callable[..., Any]) -> None:
    context, net = await start_flaky(start_system, reserve_batches_in_flight=1)
    async with context as system:
        net.inner = httpx.ASGITransport(app=system.inventory_app)
        product = await system.product(stock=4, price=700)
        first, others, gate = await one_out_and_more_waiting(system, net, product["id"], 5)
        gate.set()
        responses = await asyncio.gather(first, *others)
        assert net.batches == [1, 5]
        # Served in arrival order from what was left: three of the five got the last three units.
        assert sorted(r.status_code for r in responses) == [201] * 4 + [409] * 2
        for response in responses:
            if response.status_code == 201:
                assert response.json()["total_xaf"] == 700
            else:
                assert response.json()["short_items"] == [
                    {"product_id": product["id"], "requested": 1, "available": 0, "withdrawn": False}
                ]
        assert await system.stock(product["id"]) == {"on_hand": 4, "reserved": 4, "available": 0}
        assert len(await rows(system)) == 4


async def test_a_failed_batch_fails_every_order_in_it(start_system: Callable[..., Any]) -> None:
    context, net = await start_flaky(start_system, reserve_batches_in_flight=1, inventory_attempts=1)
    async with context as system:
        net.inner = httpx.ASGITransport(app=system.inventory_app)
        product = await system.product(stock=10)
        first, others, gate = await one_out_and_more_waiting(system, net, product["id"], 3)
        net.fail["reserve"] = 1  # the second call, carrying the three, never reaches inventory
        gate.set()
        responses = await asyncio.gather(first, *others)
        assert [r.status_code for r in responses] == [201, 503, 503, 503]
        assert net.batches == [1, 3]
        assert await system.stock(product["id"]) == {"on_hand": 10, "reserved": 1, "available": 9}
        assert len(await rows(system)) == 1


async def test_every_reserve_answer_lost_releases_the_hold(start_system: Callable[..., Any]) -> None:
    context, net = await start_flaky(start_system)
    async with context as system:
        net.inner = httpx.ASGITransport(app=system.inventory_app)
        product = await system.product(stock=5)
        net.lose["reserve"] = 3
        assert_problem(await system.place([(product["id"], 2)]), 503)
        assert "release" in net.calls
        assert await rows(system) == []
        assert await system.stock(product["id"]) == {"on_hand": 5, "reserved": 0, "available": 5}


async def test_a_hold_whose_release_also_failed_expires_at_inventory(start_system: Callable[..., Any]) -> None:
    context, net = await start_flaky(start_system)
    async with context as system:
        net.inner = httpx.ASGITransport(app=system.inventory_app)
        product = await system.product(stock=5)
        net.lose["reserve"] = 3
        net.fail["release"] = 3
        assert_problem(await system.place([(product["id"], 2)]), 503)
        assert await rows(system) == []
        assert (await system.stock(product["id"]))["reserved"] == 2  # held, but not forever:
        system.clock.advance(15 * 60)
        assert await system.inventory_app.state.inventory.sweeper.run_once() == 1
        assert await system.stock(product["id"]) == {"on_hand": 5, "reserved": 0, "available": 5}


async def test_cancel_while_inventory_is_down_releases_later(start_system: Callable[..., Any]) -> None:
    context, net = await start_flaky(start_system)
    async with context as system:
        net.inner = httpx.ASGITransport(app=system.inventory_app)
        product = await system.product(stock=5)
        customer = system.tokens.customer()
        order = (await system.place([(product["id"], 2)], customer=customer)).json()
        net.down = True
        cancelled = await system.orders.post(f"{ORDERS}/{order['id']}/cancel", headers=customer)
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"
        assert (await system.stock(product["id"]))["reserved"] == 2
        assert (await system.sweep())["releases"] == 0
        net.down = False
        assert (await system.sweep())["releases"] == 1
        assert await system.stock(product["id"]) == {"on_hand": 5, "reserved": 0, "available": 5}
        [row] = await rows(system)
        assert (row["stock"], row["stock_action"]) == ("released", None)


async def test_confirm_while_inventory_is_down_is_503_and_can_be_retried(start_system: Callable[..., Any]) -> None:
    context, net = await start_flaky(start_system)
    async with context as system:
        net.inner = httpx.ASGITransport(app=system.inventory_app)
        product = await system.product(stock=5)
        order = (await system.place([(product["id"], 2)])).json()
        url = f"{ORDERS}/{order['id']}/confirm"
        net.down = True
        assert_problem(await system.orders.post(url, headers=system.tokens.staff()), 503)
        assert (await system.orders.get(f"{ORDERS}/{order['id']}", headers=system.tokens.staff())).json()[
            "status"
        ] == "pending"
        net.down = False
        assert (await system.orders.post(url, headers=system.tokens.staff())).json()["status"] == "confirmed"
        assert await system.stock(product["id"]) == {"on_hand": 3, "reserved": 0, "available": 3}


async def test_a_lost_commit_answer_never_takes_stock_twice(start_system: Callable[..., Any]) -> None:
    context, net = await start_flaky(start_system)
    async with context as system:
        net.inner = httpx.ASGITransport(app=system.inventory_app)
        product = await system.product(stock=5)
        first = (await system.place([(product["id"], 2)])).json()
        second = (await system.place([(product["id"], 1)])).json()
        staff = system.tokens.staff()
        net.lose["commit"] = 6  # every attempt of both confirmations commits at inventory, then loses the answer
        assert_problem(await system.orders.post(f"{ORDERS}/{first['id']}/confirm", headers=staff), 503)
        assert_problem(await system.orders.post(f"{ORDERS}/{second['id']}/confirm", headers=staff), 503)
        assert await system.stock(product["id"]) == {"on_hand": 2, "reserved": 0, "available": 2}
        # Retrying the confirmation commits nothing more; cancelling returns the committed units.
        assert (await system.orders.post(f"{ORDERS}/{first['id']}/confirm", headers=staff)).status_code == 200
        assert (await system.orders.post(f"{ORDERS}/{second['id']}/cancel", headers=staff)).status_code == 200
        assert await system.stock(product["id"]) == {"on_hand": 3, "reserved": 0, "available": 3}


async def test_orphaned_placements_are_released_by_the_reconciliation(system: System) -> None:
    """Orders crashed after inventory reserved and before the order was recorded."""
    product = await system.product(stock=5)
    reservation_id, order_id = await reserved_at_inventory(system, product["id"], 3), uuid.uuid4()
    await insert_placing(system, order_id, reservation_id, age_seconds=30)
    assert (await system.sweep())["orphans"] == 0  # a placement may take a while: not orphaned yet
    system.clock.advance(31)
    assert (await system.sweep())["orphans"] == 1
    assert await rows(system) == []
    assert await system.stock(product["id"]) == {"on_hand": 5, "reserved": 0, "available": 5}


async def reserved_at_inventory(system: System, product_id: str, quantity: int) -> uuid.UUID:
    """A reservation made at inventory as orders makes it, before any order row says so (a crash's leftover)."""
    reservation_id = uuid.uuid4()
    reserved = await system.inventory.put(
        f"/internal/reservations/{reservation_id}",
        json={"items": [{"product_id": product_id, "quantity": quantity}]},
        headers=system.tokens.service("orders", "inventory"),
    )
    assert reserved.status_code == 201
    return reservation_id


async def insert_placing(
    system: System, order_id: uuid.UUID, reservation_id: uuid.UUID, *, age_seconds: float, owner: int | None = None
) -> None:
    admin = await system.database.admin()
    try:
        await admin.execute(
            "INSERT INTO orders.orders (id, user_id, status, idempotency_key, request_hash, reservation_id,"
            " stock, stock_action, stock_action_id, stock_action_since, owner)"
            " VALUES ($1, $2, 'placing', 'crashed', $3, $4, 'reserving', 'reserve', $5, $6, $7)",
            order_id,
            uuid.uuid4(),
            "0" * 64,
            reservation_id,
            uuid.uuid4(),
            system.clock.now - timedelta(seconds=age_seconds),
            owner,
        )
    finally:
        await admin.close()


async def test_a_placement_is_released_as_soon_as_no_process_holds_its_owners_lock(system: System) -> None:
    """Its process died (PostgreSQL dropped the lock with the connection): no placing timeout to wait for. While
    a process holds the lock, the placement is its own, however long it takes."""
    product = await system.product(stock=5)
    reservation_id, order_id = await reserved_at_inventory(system, product["id"], 3), uuid.uuid4()
    await insert_placing(system, order_id, reservation_id, age_seconds=0, owner=4242)
    holder = await system.database.admin()  # a live process holding that number
    try:
        assert await holder.fetchval("SELECT pg_try_advisory_lock($1, $2)", LOCK_CLASS, 4242)
        assert (await system.sweep())["orphans"] == 0
        assert await system.stock(product["id"]) == {"on_hand": 5, "reserved": 3, "available": 2}
    finally:
        await holder.close()  # the process dies: its connection, and the lock, are gone
    # Found gone once: a live process that lost its lock's connection gets a pass's time to take it again.
    assert (await system.sweep())["orphans"] == 0
    assert (await system.sweep())["orphans"] == 1
    assert await rows(system) == []
    assert await system.stock(product["id"]) == {"on_hand": 5, "reserved": 0, "available": 5}


async def test_a_slow_placement_taken_over_by_the_reconciliation_is_fenced(start_system: Callable[..., Any]) -> None:
    """The reserve arrives after the sweeper released the orphan: the id is fenced, nothing is held."""
    context, net = await start_flaky(start_system)
    async with context as system:
        net.inner = httpx.ASGITransport(app=system.inventory_app)
        product = await system.product(stock=5)
        gate = asyncio.Event()
        net.hold_before["reserve"] = gate
        net.arrived["reserve"] = asyncio.Event()
        placing = asyncio.create_task(system.place([(product["id"], 2)]))
        await net.arrived["reserve"].wait()
        [row] = await rows(system)
        assert row["owner"] is not None  # this live process's lock: not taken over before the timeout
        assert (await system.sweep())["orphans"] == 0
        system.clock.advance(61)
        assert (await system.sweep())["orphans"] == 1
        gate.set()
        assert_problem(await placing, 503)
        assert await rows(system) == []
        assert await system.stock(product["id"]) == {"on_hand": 5, "reserved": 0, "available": 5}


async def test_a_slow_answer_after_the_takeover_is_not_recorded(start_system: Callable[..., Any]) -> None:
    """Inventory reserved, the answer was slow, the sweeper released it meanwhile: no order, nothing held."""
    context, net = await start_flaky(start_system)
    async with context as system:
        net.inner = httpx.ASGITransport(app=system.inventory_app)
        product = await system.product(stock=5)
        gate = asyncio.Event()
        net.hold_after["reserve"] = gate
        placing = asyncio.create_task(system.place([(product["id"], 2)]))
        while (await system.stock(product["id"]))["reserved"] == 0:
            await asyncio.sleep(0.01)
        system.clock.advance(61)
        assert (await system.sweep())["orphans"] == 1
        gate.set()
        assert_problem(await placing, 503)
        assert await rows(system) == []
        assert await system.stock(product["id"]) == {"on_hand": 5, "reserved": 0, "available": 5}


async def test_an_interrupted_confirmation_is_finished_with_its_actor(system: System) -> None:
    """Orders crashed after inventory committed and before the order said so."""
    product = await system.product(stock=5)
    order = (await system.place([(product["id"], 2)])).json()
    [row] = await rows(system)
    committed = await system.inventory.post(
        f"/internal/reservations/{row['reservation_id']}/commit", headers=system.tokens.service("orders", "inventory")
    )
    assert committed.status_code == 200
    context = {"actor_id": "staff-42", "actor_role": "staff", "context": {"ip": "198.51.100.9", "request_id": "r-123"}}
    admin = await system.database.admin()
    try:
        await admin.execute(
            "UPDATE orders.orders SET stock_action = 'commit', stock_action_id = $2, stock_action_since = $3,"
            " stock_action_context = $4::jsonb WHERE id = $1",
            uuid.UUID(order["id"]),
            uuid.uuid4(),
            system.clock.now,
            json.dumps(context),
        )
    finally:
        await admin.close()
    assert (await system.sweep())["confirmations"] == 0
    system.clock.advance(61)
    assert (await system.sweep())["confirmations"] == 1
    fetched = (await system.orders.get(f"{ORDERS}/{order['id']}", headers=system.tokens.staff())).json()
    assert fetched["status"] == "confirmed"
    assert await system.stock(product["id"]) == {"on_hand": 3, "reserved": 0, "available": 3}
    events = await rows(system, "SELECT payload FROM orders.outbox WHERE payload->>'action' = 'orders.order.confirmed'")
    [payload] = [json.loads(e["payload"]) if isinstance(e["payload"], str) else e["payload"] for e in events]
    assert (payload["actor_id"], payload["ip"], payload["request_id"]) == ("staff-42", "198.51.100.9", "r-123")


async def test_a_confirmation_is_finished_as_soon_as_no_process_holds_its_owners_lock(system: System) -> None:
    product = await system.product(stock=5)
    order = (await system.place([(product["id"], 2)])).json()
    holder = await system.database.admin()  # the process confirming it, alive
    try:
        assert await holder.fetchval("SELECT pg_try_advisory_lock($1, $2)", LOCK_CLASS, 777)
        await holder.execute(
            "UPDATE orders.orders SET stock_action = 'commit', stock_action_id = $2, stock_action_since = $3,"
            " owner = 777 WHERE id = $1",
            uuid.UUID(order["id"]),
            uuid.uuid4(),
            system.clock.now,
        )
        assert (await system.sweep())["confirmations"] == 0  # its own process is still at it
    finally:
        await holder.close()  # the process dies
    assert (await system.sweep())["confirmations"] == 0  # gone once: not yet
    assert (await system.sweep())["confirmations"] == 1
    fetched = (await system.orders.get(f"{ORDERS}/{order['id']}", headers=system.tokens.staff())).json()
    assert fetched["status"] == "confirmed"
    assert await system.stock(product["id"]) == {"on_hand": 3, "reserved": 0, "available": 3}
    [row] = await rows(system)
    assert row["owner"] is None  # the action is done: no process owns anything of it


async def test_reconciliation_runs_when_orders_starts(system: System) -> None:
    from services.orders.main import create_app
    from tests.conftest import running
    from tests.inventory.support import IssuerServiceTokens
    from tests.orders.conftest import orders_settings

    product = await system.product(stock=5)
    reservation_id = uuid.uuid4()
    await system.inventory.put(
        f"/internal/reservations/{reservation_id}",
        json={"items": [{"product_id": product["id"], "quantity": 3}]},
        headers=system.tokens.service("orders", "inventory"),
    )
    await insert_placing(system, uuid.uuid4(), reservation_id, age_seconds=120)
    settings = orders_settings(
        system.database, system.orders_app.state.service.settings.data_dir.parent, sweep_interval_seconds=0.1
    )
    restarted = create_app(
        settings,
        key_source=system.tokens.issuer.keys(),
        clock=system.clock,
        inventory_transport=httpx.ASGITransport(app=system.inventory_app),
    )
    async with running(restarted):
        restarted.state.service.service_tokens = IssuerServiceTokens(system.tokens.issuer, "orders")
        # The reconciliation releases the stock, then settles the order's row: wait for both (checking the
        # row the moment the stock was free raced the second step).
        deadline = time.monotonic() + 10
        while (await system.stock(product["id"]))["reserved"] or await rows(system):
            assert time.monotonic() < deadline, "the start-up reconciliation did not release the orphan"
            await asyncio.sleep(0.05)
    assert await rows(system) == []


async def test_a_retry_while_the_first_attempt_is_in_flight_gets_the_same_order(
    start_system: Callable[..., Any],
) -> None:
    context, net = await start_flaky(start_system)
    async with context as system:
        net.inner = httpx.ASGITransport(app=system.inventory_app)
        product = await system.product(stock=5)
        customer = system.tokens.customer()
        gate = asyncio.Event()
        net.hold_before["reserve"] = gate
        net.arrived["reserve"] = asyncio.Event()
        first = asyncio.create_task(system.place([(product["id"], 2)], customer=customer, key="in-flight"))
        await net.arrived["reserve"].wait()
        # Watch the retry's claims of the key (the real ones, passed through): each refusal means it found
        # the first attempt still running and went back to waiting for it.
        claims = system.orders_app.state.orders.service.placement.claims
        claim, refusals, refused_twice = claims.submit, [], asyncio.Event()

        async def watched(item: Any) -> bool:
            taken: bool = await claim(item)
            refusals.append(taken)
            if refusals.count(False) == 2:
                refused_twice.set()
            return taken

        claims.submit = watched
        retry = asyncio.create_task(system.place([(product["id"], 2)], customer=customer, key="in-flight"))
        await refused_twice.wait()
        assert not retry.done()  # it waits for the first attempt instead of placing a second order
        gate.set()
        one, two = await first, await retry
        assert one.status_code == two.status_code == 201
        assert one.json()["id"] == two.json()["id"]
        assert two.headers["idempotent-replayed"] == "true"
        assert net.calls.count("reserve") == 1
        assert await system.stock(product["id"]) == {"on_hand": 5, "reserved": 2, "available": 3}


async def test_a_retry_gives_up_waiting_with_409_and_retry_after(start_system: Callable[..., Any]) -> None:
    context, net = await start_flaky(start_system, idempotency_wait_seconds=0.3)
    async with context as system:
        net.inner = httpx.ASGITransport(app=system.inventory_app)
        product = await system.product(stock=5)
        customer = system.tokens.customer()
        gate = asyncio.Event()
        net.hold_before["reserve"] = gate
        net.arrived["reserve"] = asyncio.Event()
        first = asyncio.create_task(system.place([(product["id"], 2)], customer=customer, key="slow"))
        await net.arrived["reserve"].wait()
        busy = await system.place([(product["id"], 2)], customer=customer, key="slow")
        assert_problem(busy, 409)
        assert busy.headers["retry-after"] == "1"
        gate.set()
        assert (await first).status_code == 201
