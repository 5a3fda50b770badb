"""The saga with real processes: inventory and orders as uvicorn subprocesses talking real HTTP.

A small in-thread HTTP server stands in for the auth service until it lands: it serves the test
issuer's JWKS (so both services verify tokens exactly as in production), issues service tokens on
``/internal/token`` and answers an empty revocation feed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import DatabaseFixture, free_port
from tests.inventory.support import Tokens
from tests.support.tokens import TestIssuer

pytestmark = pytest.mark.e2e


class _Server:
    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _reply(handler: BaseHTTPRequestHandler, status: int, body: bytes, content_type: str = "application/json") -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def stub_auth(issuer: TestIssuer, events: list[dict[str, Any]]) -> _Server:
    """Also stands in for the audit service's ``POST /internal/events`` (the services' outbox relays)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/.well-known/jwks.json":
                _reply(self, 200, json.dumps(issuer.jwks()).encode())
            elif self.path.startswith("/internal/revocations"):
                _reply(self, 200, b'{"items": [], "has_more": false}')
            else:
                _reply(self, 404, b"{}")

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/internal/events":
                events.extend(body["events"])
                _reply(self, 200, b"{}")
                return
            if self.path != "/internal/token":
                _reply(self, 404, b"{}")
                return
            token = issuer.service(caller=body["client_id"], audience=body["audience"])
            _reply(self, 200, json.dumps({"access_token": token, "token_type": "bearer", "expires_in": 300}).encode())

    return _Server(Handler)


@dataclass
class HangingProxy:
    """Forwards to inventory. While ``hang`` is set, a call whose path ends with ``hang_on`` is held: it
    reaches inventory (unless ``forward`` is off) but its answer never returns; ``held`` is set then."""

    target: str
    hang_on: str = "/internal/reservations/batch"
    forward: bool = True
    hang: threading.Event = field(default_factory=threading.Event)
    held: threading.Event = field(default_factory=threading.Event)
    gate: threading.Event = field(default_factory=threading.Event)

    def server(self) -> _Server:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
                hold = self.path.endswith(proxy.hang_on) and proxy.hang.is_set()
                answer = None
                if proxy.forward or not hold:
                    try:
                        answer = httpx.request(self.command, proxy.target + self.path, content=body, headers=headers)
                    except httpx.HTTPError:
                        _reply(self, 502, b"{}")
                        return
                if hold:
                    proxy.held.set()
                    proxy.gate.wait(30)
                    return  # the connection closes without an answer
                assert answer is not None
                _reply(self, answer.status_code, answer.content, answer.headers.get("content-type", "application/json"))

            do_GET = do_POST = do_PUT = _forward  # noqa: N815

        return _Server(Handler)


@dataclass
class Process:
    name: str
    port: int
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "comptoir.serve", self.name, "--port", str(self.port)],
                env=self.env,
                cwd=self.log.parent,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log.read_text(errors="replace")[-3000:]
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{self.name} not healthy\n" + self.log.read_text()[-3000:]
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def base_env(database: DatabaseFixture, tmp_path: Path, auth_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env.update(
        {
            "ENVIRONMENT": "test",
            "DATA_DIR": str(tmp_path / "data"),
            "LOG_LEVEL": "WARNING",
            "AUTH_INTERNAL_URL": auth_url,
            "AUDIT_INTERNAL_URL": auth_url,
            "INVENTORY_CLIENT_SECRET": "stub-auth-accepts-any-secret",
            "INVENTORY_DATABASE_URL": database.url("inventory"),
            "ORDERS_DATABASE_URL": database.url("orders"),
            "ORDERS_CLIENT_SECRET": "stub-auth-accepts-any-secret",
            "ORDERS_INVENTORY_ATTEMPTS": "2",
            "ORDERS_INVENTORY_TIMEOUT_SECONDS": "3",
            "ORDERS_PLACING_TIMEOUT_SECONDS": "2",
            "ORDERS_SWEEP_INTERVAL_SECONDS": "0.3",
        }
    )
    return env


@pytest.fixture
def events() -> list[dict[str, Any]]:
    return []


@pytest.fixture
def auth(tokens: Tokens, events: list[dict[str, Any]]) -> Iterator[_Server]:
    with stub_auth(tokens.issuer, events) as server:
        yield server


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.stop(signal.SIGKILL)


def place(orders_url: str, tokens: Tokens, product_id: str, quantity: int, key: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(
        orders_url + "/api/v1/orders",
        json={"items": [{"product_id": product_id, "quantity": quantity}]},
        headers=tokens.customer() | {"Idempotency-Key": key},
        timeout=kwargs.get("timeout", 20),
    )


def new_product(inventory_url: str, tokens: Tokens, stock: int) -> str:
    response = httpx.post(
        inventory_url + "/api/v1/products",
        json={"sku": f"E2E-{uuid.uuid4().hex[:8]}", "name": "Savon", "price_xaf": 900, "initial_stock": stock},
        headers=tokens.staff(),
        timeout=10,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def db_state(database: DatabaseFixture, product_id: str) -> tuple[int, int, int]:
    admin = await database.admin()
    try:
        reserved = await admin.fetchval("SELECT reserved FROM inventory.products WHERE id = $1", uuid.UUID(product_id))
        orders = await admin.fetchval("SELECT count(*) FROM orders.orders WHERE status <> 'placing'")
        placing = await admin.fetchval("SELECT count(*) FROM orders.orders WHERE status = 'placing'")
    finally:
        await admin.close()
    return int(reserved), int(orders), int(placing)


async def test_inventory_down_means_503_and_nothing_reserved(
    database: DatabaseFixture,
    tmp_path: Path,
    tokens: Tokens,
    auth: _Server,
    processes: list[Process],
    events: list[dict[str, Any]],
) -> None:
    env = base_env(database, tmp_path, auth.url)
    inventory = Process("inventory", free_port(), env, tmp_path / "inventory.log")
    orders = Process("orders", free_port(), env | {"ORDERS_INVENTORY_URL": inventory.url}, tmp_path / "orders.log")
    processes += [inventory, orders]
    inventory.start()
    orders.start()

    product = new_product(inventory.url, tokens, stock=5)
    first = place(orders.url, tokens, product, 2, "first")
    assert first.status_code == 201, first.text + orders.log.read_text()[-2000:]
    assert first.json()["items"][0]["unit_price_xaf"] == 900

    inventory.stop()
    started = time.monotonic()
    down = place(orders.url, tokens, product, 1, "second")
    assert down.status_code == 503, down.text
    assert down.headers["content-type"].startswith("application/problem+json")
    assert time.monotonic() - started < 10
    assert await db_state(database, product) == (2, 1, 0)

    inventory.start()
    again = place(orders.url, tokens, product, 1, "second")
    assert again.status_code == 201, again.text
    assert await db_state(database, product) == (3, 2, 0)

    # Both services' outbox relays delivered their audit events.
    def delivered() -> set[tuple[str, str]]:
        return {(e["action"], e["resource_id"]) for e in list(events)}

    wanted = {
        ("inventory.product.created", product),
        ("orders.order.created", first.json()["id"]),
        ("orders.order.created", again.json()["id"]),
    }
    deadline = time.monotonic() + 15
    while not wanted <= delivered():
        assert time.monotonic() < deadline, delivered()
        time.sleep(0.1)


async def test_orders_killed_between_reserve_and_record_is_reconciled_on_restart(
    database: DatabaseFixture, tmp_path: Path, tokens: Tokens, auth: _Server, processes: list[Process]
) -> None:
    env = base_env(database, tmp_path, auth.url)
    inventory = Process("inventory", free_port(), env, tmp_path / "inventory.log")
    processes.append(inventory)
    inventory.start()
    proxy = HangingProxy(inventory.url)
    with proxy.server() as link:
        # No placing timeout to fall back on: the restarted process knows the placement's owner is gone because
        # PostgreSQL dropped the dead process's lock (services.orders.liveness).
        late = {"ORDERS_INVENTORY_URL": link.url, "ORDERS_PLACING_TIMEOUT_SECONDS": "3600"}
        orders = Process("orders", free_port(), env | late, tmp_path / "orders.log")
        processes.append(orders)
        orders.start()
        product = new_product(inventory.url, tokens, stock=5)

        proxy.hang.set()
        outcome: dict[str, Any] = {}

        def attempt() -> None:
            try:
                outcome["response"] = place(orders.url, tokens, product, 2, "doomed", timeout=30)
            except httpx.HTTPError as exc:
                outcome["error"] = exc

        client = threading.Thread(target=attempt)
        client.start()
        assert proxy.held.wait(20), orders.log.read_text()[-2000:]
        assert await db_state(database, product) == (2, 0, 1)  # held at inventory, not yet an order

        orders.stop(signal.SIGKILL)  # the crash
        client.join(30)
        assert "error" in outcome  # the client never got an order
        proxy.hang.clear()
        proxy.gate.set()

        orders.start()  # the reconciliation on start releases the orphaned hold
        deadline = time.monotonic() + 20
        while await db_state(database, product) != (0, 0, 0):
            assert time.monotonic() < deadline, (await db_state(database, product), orders.log.read_text()[-2000:])
            time.sleep(0.2)

        retry = place(orders.url, tokens, product, 2, "doomed")
        assert retry.status_code == 201, retry.text
        assert await db_state(database, product) == (2, 1, 0)


@pytest.mark.parametrize("inventory_committed", [True, False], ids=["answer-lost", "never-arrived"])
async def test_orders_killed_during_a_confirmation_finishes_it_on_restart(
    database: DatabaseFixture,
    tmp_path: Path,
    tokens: Tokens,
    auth: _Server,
    processes: list[Process],
    inventory_committed: bool,
) -> None:
    # No staleness to fall back on: the restarted process finishes the confirmation because PostgreSQL dropped
    # the dead process's lock (services.orders.liveness).
    env = base_env(database, tmp_path, auth.url) | {"ORDERS_STALE_ACTION_SECONDS": "3600"}
    inventory = Process("inventory", free_port(), env, tmp_path / "inventory.log")
    processes.append(inventory)
    inventory.start()
    proxy = HangingProxy(inventory.url, hang_on="/commit", forward=inventory_committed)
    with proxy.server() as link:
        orders = Process("orders", free_port(), env | {"ORDERS_INVENTORY_URL": link.url}, tmp_path / "orders.log")
        processes.append(orders)
        orders.start()
        product = new_product(inventory.url, tokens, stock=5)
        order = place(orders.url, tokens, product, 2, "to-confirm")
        assert order.status_code == 201, order.text
        order_id = order.json()["id"]

        proxy.hang.set()
        outcome: dict[str, Any] = {}

        def confirm() -> None:
            try:
                outcome["response"] = httpx.post(
                    orders.url + f"/api/v1/orders/{order_id}/confirm", headers=tokens.staff(), timeout=30
                )
            except httpx.HTTPError as exc:
                outcome["error"] = exc

        client = threading.Thread(target=confirm)
        client.start()
        assert proxy.held.wait(20), orders.log.read_text()[-2000:]
        orders.stop(signal.SIGKILL)  # the crash, with the commit owed
        client.join(30)
        assert "error" in outcome
        proxy.hang.clear()
        proxy.gate.set()

        orders.start()  # the sweeper takes over the dead process's confirmation and finishes it
        admin = await database.admin()
        try:
            deadline = time.monotonic() + 20
            while True:
                row = await admin.fetchrow(
                    "SELECT o.status, o.stock, o.stock_action, p.on_hand, p.reserved FROM orders.orders o,"
                    " inventory.products p WHERE o.id = $1 AND p.id = $2",
                    uuid.UUID(order_id),
                    uuid.UUID(product),
                )
                if tuple(row) == ("confirmed", "committed", None, 3, 0):
                    break
                assert time.monotonic() < deadline, (dict(row), orders.log.read_text()[-2000:])
                time.sleep(0.2)
            commits = await admin.fetchval(
                "SELECT count(*) FROM inventory.stock_movements WHERE product_id = $1 AND kind = 'commit'",
                uuid.UUID(product),
            )
            assert commits == 1  # taken from on-hand once
        finally:
            await admin.close()
        shown = httpx.get(orders.url + f"/api/v1/orders/{order_id}", headers=tokens.staff(), timeout=10)
        assert shown.json()["status"] == "confirmed"
