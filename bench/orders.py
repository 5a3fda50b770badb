"""make bench-orders: orders per second through the gateway on one hot SKU, next to pgbench's single-row
``UPDATE ... SET qty = qty - 1`` on the same PostgreSQL, the oversell count, and catalogue reads per
second through the gateway vs directly.

One run on this machine: an embedded PostgreSQL (``comptoir migrate``), inventory, orders and the gateway
as real uvicorn processes. A small in-thread server stands in for the auth service (JWKS and service
tokens from a throwaway Ed25519 key) and for the audit service's event intake, so the benchmark needs
nothing else running. Environment: ``BENCH_SECONDS`` (default 10), ``BENCH_BUYERS`` (default 32).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import aiohttp
import asyncpg
import jwt
import uvloop
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

from bench.results import record
from bench.system import cpu_seconds, free_port, postgres_cpu_seconds
from common.http import PooledTransport, TransportError
from comptoir.config import RunSettings
from comptoir.embedded import EmbeddedPostgres
from comptoir.provision import migrate, to_asyncpg_dsn

SECONDS = float(os.environ.get("BENCH_SECONDS", "10"))
BUYERS = int(os.environ.get("BENCH_BUYERS", "32"))
CROWD = int(os.environ.get("BENCH_CROWD", str(2 * BUYERS)))  # a flash sale: more buyers at once
SELL_OUT_STOCK = 200


class Issuer:
    def __init__(self) -> None:
        self.key = Ed25519PrivateKey.generate()

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(OKPAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [jwk | {"kid": "bench", "alg": "EdDSA", "use": "sig"}]}

    def access(self, role: str = "customer") -> str:
        now = int(time.time())
        claims = {
            "iss": "urn:comptoir:auth",
            "aud": "urn:comptoir:api",
            "sub": str(uuid.uuid4()),
            "role": role,
            "sid": str(uuid.uuid4()),
            "jti": str(uuid.uuid4()),
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "token_use": "access",
        }
        return jwt.encode(claims, self.key, algorithm="EdDSA", headers={"kid": "bench", "typ": "at+jwt"})

    def service(self, caller: str, audience: str) -> str:
        now = int(time.time())
        claims = {
            "iss": "urn:comptoir:auth",
            "aud": audience,
            "sub": caller,
            "jti": str(uuid.uuid4()),
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "token_use": "service",
        }
        return jwt.encode(claims, self.key, algorithm="EdDSA", headers={"kid": "bench", "typ": "service+jwt"})


def stand_in_for_auth_and_audit(issuer: Issuer) -> ThreadingHTTPServer:
    def reply(handler: BaseHTTPRequestHandler, body: bytes) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.startswith("/internal/revocations"):
                reply(self, b'{"items": [], "has_more": false}')
            else:
                reply(self, json.dumps(issuer.jwks()).encode())

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            if self.path == "/internal/token":
                token = issuer.service(body["client_id"], body["audience"])
                reply(self, json.dumps({"access_token": token, "token_type": "bearer", "expires_in": 600}).encode())
            else:  # /internal/events: the services' audit outbox relays
                reply(self, b"{}")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text(errors="replace")[-3000:])
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as answer:  # noqa: S310 - our own loopback URL
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not healthy\n" + log.read_text(errors="replace")[-3000:])
        time.sleep(0.1)


def pgbench(admin_url: str, work: Path, seconds: float, clients: int) -> float:
    """tps of a single-row `UPDATE stock SET qty = qty - 1` with ``clients`` connections."""
    parts = urlsplit(admin_url)
    socket_dir = parse_qs(parts.query)["host"][0]

    async def prepare() -> None:
        conn = await asyncpg.connect(to_asyncpg_dsn(admin_url))
        try:
            await conn.execute("CREATE SCHEMA IF NOT EXISTS bench")
            await conn.execute("CREATE TABLE IF NOT EXISTS bench.stock (id int PRIMARY KEY, qty bigint NOT NULL)")
            await conn.execute(
                "INSERT INTO bench.stock VALUES (1, 1000000000000) ON CONFLICT (id) DO UPDATE SET qty = 1000000000000"
            )
        finally:
            await conn.close()

    asyncio.run(prepare())
    script = work / "hot-row.sql"
    script.write_text("UPDATE bench.stock SET qty = qty - 1 WHERE id = 1;\n")
    # The pgbench bundled with the embedded server matches its version; the system's is the fallback.
    bundled = list(Path(sys.prefix).glob("lib/*/site-packages/pgserver/pginstall/bin/pgbench"))
    binary = str(bundled[0]) if bundled else shutil.which("pgbench") or "pgbench"
    out = subprocess.run(
        [
            binary,
            "-n",
            "-c",
            str(clients),
            "-j",
            "2",
            "-T",
            str(int(seconds)),
            "-f",
            str(script),
            "-h",
            socket_dir,
            "-U",
            unquote(parts.username or "postgres"),
            parts.path.lstrip("/"),
        ],
        env={**os.environ, "PGPASSWORD": unquote(parts.password or "")},
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    found = re.search(r"tps = ([\d.]+) \(without initial connection time\)", out) or re.search(r"tps = ([\d.]+)", out)
    assert found, out
    return float(found.group(1))


Request = Callable[[PooledTransport, int], Awaitable[int]]


@dataclass(frozen=True)
class Measured:
    tps: float  # pgbench's, with as many clients as buyers
    orders_per_second: float
    others: dict[int, int]  # answers other than 201, by status
    cost: dict[str, float]  # ms of CPU per order, by process
    batch_mean: dict[str, float]


async def hammer(
    base: str, request: Request, *, seconds: float, workers: int, stop_after_409s: int = 0
) -> tuple[Counter[int], float]:
    """``workers`` loops sending requests to ``base`` until the time is up (or each saw ``stop_after_409s``
    409s in a row). The client is the services' own keep-alive one (``common.http.PooledTransport``), as in
    bench-login: a third of aiohttp's CPU a request, which the measured processes share the cores with."""
    statuses: Counter[int] = Counter()
    client = PooledTransport(base, max_connections=workers, timeout=30.0)
    try:
        deadline = time.monotonic() + seconds
        started = time.monotonic()

        async def worker(index: int) -> None:
            refused = 0
            while time.monotonic() < deadline:
                try:
                    status = await request(client, index)
                except TransportError:
                    status = 0  # the connection failed: counted, never as an order
                statuses[status] += 1
                refused = refused + 1 if status == 409 else 0
                if stop_after_409s and refused >= stop_after_409s:
                    return

        await asyncio.gather(*(worker(i) for i in range(workers)))
        elapsed = time.monotonic() - started
    finally:
        await client.aclose()
    return statuses, elapsed


def stand_in_environment(work: Path, stub_url: str, inventory_database_url: str) -> dict[str, str]:
    """Environment for services run against the stand-in auth and audit, inventory's database role set."""
    return {
        **{k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")},
        "DATA_DIR": str(work),
        "ENVIRONMENT": "development",
        "LOG_LEVEL": "WARNING",
        "AUTH_INTERNAL_URL": stub_url,
        "AUDIT_INTERNAL_URL": stub_url,
        "INVENTORY_DATABASE_URL": inventory_database_url,
        "INVENTORY_CLIENT_SECRET": "bench",
    }


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="comptoir-bench-orders-"))
    embedded = EmbeddedPostgres(work)
    procs: list[subprocess.Popen[bytes]] = []
    stub: ThreadingHTTPServer | None = None
    try:
        admin_url = embedded.start()
        roles = {r.service: r.url for r in migrate(RunSettings(data_dir=work, database_url=admin_url), admin_url)}
        issuer = Issuer()
        stub = stand_in_for_auth_and_audit(issuer)
        stub_url = f"http://127.0.0.1:{stub.server_address[1]}"
        ports = {"inventory": free_port(), "orders": free_port(), "gateway": free_port()}
        url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        env = stand_in_environment(work, stub_url, roles["inventory"]) | {
            "ORDERS_DATABASE_URL": roles["orders"],
            "ORDERS_INVENTORY_URL": url["inventory"],
            "ORDERS_CLIENT_SECRET": "bench",
            "GATEWAY_CLIENT_SECRET": "",
            "GATEWAY_INVENTORY_URL": url["inventory"],
            "GATEWAY_ORDERS_URL": url["orders"],
            "GATEWAY_RATE_LIMITS_ENABLED": "false",
        }
        for name in ("inventory", "orders", "gateway"):
            log = work / f"{name}.log"
            with log.open("wb") as handle:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "comptoir.serve", name, "--port", str(ports[name])],
                    env=env,
                    cwd=work,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                )
            procs.append(proc)
            wait_healthy(url[name], proc, log)
        uvloop.run(  # the client costs the machine less on uvloop, as the services run
            run(
                issuer,
                url,
                admin_url,
                work,
                dict(zip(("inventory", "orders", "gateway"), procs, strict=True)),
                embedded.pgdata,
            )
        )
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if stub is not None:
            stub.shutdown()
        embedded.stop()
        shutil.rmtree(work, ignore_errors=True)


async def batch_totals(orders_url: str) -> dict[str, tuple[float, float]]:
    """Orders' batch-size histograms (sum, count) by batch kind, from its /metrics."""
    async with aiohttp.ClientSession() as session, session.get(orders_url + "/metrics") as answer:
        text = await answer.text()
    totals: dict[str, list[float]] = {}
    for part, kind, value in re.findall(r'^comptoir_orders_batch_size_(sum|count)\{batch="(\w+)"\} (\S+)$', text, re.M):
        totals.setdefault(kind, [0.0, 0.0])[0 if part == "sum" else 1] = float(value)
    return {kind: (pair[0], pair[1]) for kind, pair in totals.items()}


async def run(
    issuer: Issuer,
    url: dict[str, str],
    admin_url: str,
    work: Path,
    procs: dict[str, subprocess.Popen[bytes]],
    pgdata: Path,
) -> None:
    gateway = url["gateway"]
    staff = {"Authorization": f"Bearer {issuer.access('staff')}"}
    buyers = [{"Authorization": f"Bearer {issuer.access()}"} for _ in range(max(BUYERS, CROWD))]

    async def new_product(stock: int) -> str:
        async with aiohttp.ClientSession() as session:
            body = {"sku": f"HOT-{uuid.uuid4().hex[:8]}", "name": "Hot SKU", "price_xaf": 1500, "initial_stock": stock}
            async with session.post(gateway + "/api/v1/products", json=body, headers=staff) as answer:
                assert answer.status == 201, await answer.text()
                return str((await answer.json())["id"])

    def buy(product_id: str) -> Request:
        payload = json.dumps({"items": [{"product_id": product_id, "quantity": 1}]}).encode()

        async def request(client: PooledTransport, index: int) -> int:
            headers = buyers[index] | {"Idempotency-Key": str(uuid.uuid4())}
            answer = await client.request("POST", "/api/v1/orders", json_bytes=payload, headers=headers)
            return answer.status

        return request

    async def read(client: PooledTransport, _index: int) -> int:
        answer = await client.request("GET", "/api/v1/products?limit=20")
        return answer.status

    async def measure(workers: int) -> Measured:
        """pgbench with ``workers`` clients, then as many buyers ordering one hot SKU for the same time."""
        tps = await asyncio.to_thread(pgbench, admin_url, work, SECONDS, workers)
        hot = await new_product(10_000_000)
        before = {name: cpu_seconds(proc.pid) for name, proc in procs.items()}
        before["postgres"], before["bench"] = postgres_cpu_seconds(pgdata), cpu_seconds(os.getpid())
        batches_before = await batch_totals(url["orders"])
        statuses, elapsed = await hammer(gateway, buy(hot), seconds=SECONDS, workers=workers)
        after = {name: cpu_seconds(proc.pid) for name, proc in procs.items()}
        after["postgres"], after["bench"] = postgres_cpu_seconds(pgdata), cpu_seconds(os.getpid())
        batches_after = await batch_totals(url["orders"])
        batch_mean = {}
        for kind in ("claim", "reserve", "placed"):
            total0, count0 = batches_before.get(kind, (0.0, 0.0))
            total1, count1 = batches_after.get(kind, (0.0, 0.0))
            batch_mean[kind] = (total1 - total0) / max(count1 - count0, 1)
        return Measured(
            tps=tps,
            orders_per_second=statuses[201] / elapsed,
            others={status: n for status, n in statuses.items() if status != 201},
            cost={name: (after[name] - before[name]) * 1000 / max(statuses[201], 1) for name in after},
            batch_mean=batch_mean,
        )

    await hammer(gateway, buy(await new_product(10_000_000)), seconds=2, workers=CROWD)  # warm-up: pools, caches
    usual, crowd = await measure(BUYERS), await measure(CROWD)
    best_tps = max(usual.tps, crowd.tps)

    scarce = await new_product(SELL_OUT_STOCK)
    sold_out, _ = await hammer(gateway, buy(scarce), seconds=30, workers=BUYERS, stop_after_409s=5)
    conn = await asyncpg.connect(to_asyncpg_dsn(admin_url))
    try:
        on_hand, reserved = await conn.fetchrow(
            "SELECT on_hand, reserved FROM inventory.products WHERE id = $1", uuid.UUID(scarce)
        )
        placed = await conn.fetchval(
            "SELECT count(*) FROM orders.order_items i JOIN orders.orders o ON o.id = i.order_id"
            " WHERE i.product_id = $1 AND o.status = 'pending'",
            uuid.UUID(scarce),
        )
        ledger_breaks = await conn.fetchval(
            "SELECT count(*) FROM inventory.products p LEFT JOIN (SELECT product_id, sum(delta_on_hand) AS oh,"
            " sum(delta_reserved) AS r FROM inventory.stock_movements GROUP BY product_id) m ON m.product_id = p.id"
            " WHERE p.on_hand <> coalesce(m.oh, 0) OR p.reserved <> coalesce(m.r, 0)"
        )
    finally:
        await conn.close()
    oversold = max(0, sold_out[201] - SELL_OUT_STOCK) + max(0, reserved - on_hand) + max(0, placed - SELL_OUT_STOCK)

    reads: dict[str, float] = {}
    for name, base in (("gateway", gateway), ("direct", url["inventory"])):
        got, took = await hammer(base, read, seconds=SECONDS / 2, workers=BUYERS)
        reads[name] = got[200] / took

    print(f"\none run, {SECONDS:.0f} s per measurement; {BUYERS} and {CROWD} concurrent clients\n")
    print(f"| measurement | {BUYERS} clients | {CROWD} clients |")
    print("|---|---|---|")
    rows: list[tuple[str, Callable[[Measured], str]]] = [
        ("pgbench: one hot row, `qty = qty - 1` per transaction (tps)", lambda m: f"{m.tps:,.0f}"),
        ("orders/s through the gateway, one hot SKU", lambda m: f"{m.orders_per_second:,.0f}"),
        ("ratio to pgbench with as many clients", lambda m: f"{m.orders_per_second / m.tps:.0%}"),
        ("ratio to pgbench's best of both (goal >= 50 %)", lambda m: f"{m.orders_per_second / best_tps:.0%}"),
        ("non-201 answers while buying", lambda m: f"{sum(m.others.values())} {m.others or ''}"),
        (
            "CPU per order: gateway / orders / inventory / PostgreSQL / bench client and stand-ins (ms)",
            lambda m: " / ".join(f"{m.cost[n]:.2f}" for n in ("gateway", "orders", "inventory", "postgres", "bench")),
        ),
        (
            "orders per batch (mean): key claims / reserve calls to inventory / placement records",
            lambda m: " / ".join(f"{m.batch_mean[k]:.1f}" for k in ("claim", "reserve", "placed")),
        ),
    ]
    for label, show in rows:
        print(f"| {label} | {show(usual)} | {show(crowd)} |")
    print()
    print("| measurement | result |")
    print("|---|---|")
    print(
        f"| sell-out of {SELL_OUT_STOCK} units: sold / refused (409) / oversold | "
        f"{sold_out[201]} / {sold_out[409]} / {oversold} |"
    )
    print(f"| stock ledger breaks (on_hand or reserved != sum of movements) | {ledger_breaks} |")
    print(f"| catalogue reads/s through the gateway | {reads['gateway']:,.0f} |")
    print(f"| catalogue reads/s directly from inventory | {reads['direct']:,.0f} |")
    print(f"| gateway / direct | {reads['gateway'] / reads['direct']:.0%} |")
    record(
        f"orders/s vs pgbench's hot-row tps, {BUYERS} clients each", usual.orders_per_second / usual.tps * 100, 50, "%"
    )
    record(
        f"orders/s with {CROWD} buyers vs pgbench's best hot-row tps ({BUYERS} or {CROWD} clients)",
        crowd.orders_per_second / best_tps * 100,
        50,
        "%",
    )
    record(
        f"CPU per order, all processes and the client, {BUYERS} clients",
        sum(usual.cost.values()),
        1.2,
        "ms",
        higher_is_better=False,
    )
    record("oversold units + stock ledger breaks", oversold + ledger_breaks, 0, "", higher_is_better=False)
    record("anonymous catalogue reads/s through the gateway", reads["gateway"], 5000, "/s")
    if oversold or ledger_breaks:
        raise SystemExit("OVERSOLD: the stock invariant was broken")


if __name__ == "__main__":
    main()
