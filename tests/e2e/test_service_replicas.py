"""Two replicas of each service against one database (real processes): relays never deliver an event
twice, sweepers never release a reservation twice, and a key rotation reaches every auth replica."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx
import jwt
import pytest

from comptoir.embedded import SUPERUSER, libpq_url
from services.auth.keys import KEY_FILE
from tests.conftest import free_port
from tests.e2e.harness import new_system
from tests.support.accounts import CONSENT

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery staple 42"
ADMIN = ("owner@boutique.cm", "purple gorilla mango tractor 77")
EMITTERS = ("auth", "inventory", "orders")


def admin_url(data_dir: Path) -> str:
    creds = json.loads((data_dir / "secrets" / "postgres.json").read_text())
    return libpq_url(SUPERUSER, creds["superuser_password"], data_dir / "pg")


async def fill_outboxes(url: str, per_service: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            for service in EMITTERS:
                rows = []
                for _ in range(per_service):
                    event_id = uuid.uuid4()
                    now = datetime.now(UTC)
                    payload = {
                        "id": str(event_id),
                        "occurred_at": now.isoformat(),
                        "service": service,
                        "action": f"{service}.replica.test",
                        "outcome": "success",
                    }
                    rows.append((event_id, now, json.dumps(payload)))
                await conn.executemany(
                    f"INSERT INTO {service}.outbox (id, occurred_at, payload) VALUES ($1, $2, $3::jsonb)", rows
                )
    finally:
        await conn.close()


async def pending_and_stored(url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(url)
    try:
        pending = 0
        for service in EMITTERS:
            pending += await conn.fetchval(f"SELECT count(*) FROM {service}.outbox WHERE delivered_at IS NULL")
        stored = await conn.fetchval("SELECT count(*) FROM audit.events WHERE action LIKE '%.replica.test'")
        return int(pending), int(stored)
    finally:
        await conn.close()


def wait_until(predicate, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_two_replicas_of_each_service_share_one_database_safely(tmp_path: Path) -> None:
    system = new_system(tmp_path)
    system.env |= {
        "AUTH_PBKDF2_ROUNDS": "1000",
        "AUTH_KEY_SCAN_INTERVAL_SECONDS": "0.5",
        "AUTH_KEY_ACTIVATION_DELAY_SECONDS": "1",
        "INVENTORY_RESERVATION_TTL_SECONDS": "10",
        "INVENTORY_SWEEP_INTERVAL_SECONDS": "0.3",
        "ORDERS_SWEEP_INTERVAL_SECONDS": "0.3",
        "BOOTSTRAP_ADMIN_EMAIL": ADMIN[0],
        "BOOTSTRAP_ADMIN_PASSWORD": ADMIN[1],
    }
    system.start()
    replicas: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    try:
        for process in ("auth", "inventory", "orders"):
            port = free_port()
            proc = subprocess.Popen(
                [sys.executable, "-m", "comptoir.serve", process, "--port", str(port)],
                env=system.child(process).environ(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            replicas[process] = (proc, f"http://127.0.0.1:{port}")
        for process, (_, url) in replicas.items():
            wait_until(lambda url=url: _healthy(url), 60, f"second {process} replica did not start")
        url = admin_url(system.data_dir)

        # Relays: both replicas of each emitter drain one outbox; nothing is delivered twice.
        asyncio.run(fill_outboxes(url, 500))
        wait_until(lambda: asyncio.run(pending_and_stored(url)) == (0, 1500), 120, "events not all delivered once")
        metrics = httpx.get(system.url("audit") + "/metrics").text
        duplicates = sum(
            float(v) for v in re.findall(r"^comptoir_audit_events_duplicate_total\{[^}]*\} (\S+)$", metrics, re.M)
        )
        assert duplicates == 0

        # Sweepers: three unconfirmed orders expire; each reservation is released exactly once.
        gateway = system.url()
        admin = _login(gateway, *ADMIN)
        product = httpx.post(
            gateway + "/api/v1/products",
            headers=admin,
            json={"sku": "REPL-1", "name": "Savon", "price_xaf": 500, "initial_stock": 5},
        )
        assert product.status_code == 201, product.text
        product_id = product.json()["id"]
        email = f"buyer-{uuid.uuid4().hex[:8]}@boutique.cm"
        assert (
            httpx.post(
                gateway + "/api/v1/auth/register",
                json={"email": email, "password": PASSWORD} | CONSENT,
            ).status_code
            == 201
        )
        buyer = _login(gateway, email, PASSWORD)
        for _ in range(3):
            order = httpx.post(
                gateway + "/api/v1/orders",
                json={"items": [{"product_id": product_id, "quantity": 1}]},
                headers=buyer | {"Idempotency-Key": str(uuid.uuid4())},
            )
            assert order.status_code == 201, order.text
        assert httpx.get(gateway + f"/api/v1/products/{product_id}/stock", headers=admin).json()["reserved"] == 3

        def all_expired() -> bool:
            orders = httpx.get(gateway + "/api/v1/orders", headers=buyer).json()["items"]
            return all(o["status"] == "expired" for o in orders) and len(orders) == 3

        wait_until(all_expired, 60, "orders did not expire")
        stock = httpx.get(gateway + f"/api/v1/products/{product_id}/stock", headers=admin).json()
        assert (stock["on_hand"], stock["reserved"], stock["available"]) == (5, 0, 5)
        movements = httpx.get(gateway + f"/api/v1/products/{product_id}/stock-movements?limit=200", headers=admin)
        kinds = [m["kind"] for m in movements.json()["items"]]
        assert kinds.count("reserve") == 3
        assert kinds.count("release") == 3

        # Key rotation: both auth replicas publish the new key, and tokens it signs pass the gateway.
        before = {k["kid"] for k in httpx.get(system.url("auth") + "/.well-known/jwks.json").json()["keys"]}
        rotated = subprocess.run(
            [sys.executable, "-m", "comptoir.cli", "keys", "rotate"],
            env=system.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert rotated.returncode == 0, rotated.stderr
        for auth_url in (system.url("auth"), replicas["auth"][1]):
            wait_until(lambda auth_url=auth_url: len(_kids(auth_url) - before) == 1, 10, "rotation not picked up")
        new_kid = (_kids(system.url("auth")) - before).pop()
        # Both replicas hold the new key; it signs from the start time in its file name on (the rotation's
        # activation delay, 1 s here): wait for that instant itself rather than for a guessed duration.
        starts_at = max(float(m.group(1)) for m in map(KEY_FILE.match, _key_files(system.data_dir)) if m)
        wait_until(lambda: time.time() >= starts_at, 10, "the new key's start time never came")
        token = _login(gateway, email, PASSWORD)["Authorization"].split()[1]

        assert jwt.get_unverified_header(token)["kid"] == new_kid
        assert httpx.get(gateway + "/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert httpx.get(gateway + "/api/v1/orders", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    finally:
        for proc, _ in replicas.values():
            proc.terminate()
            proc.wait(15)
        assert system.stop() == 0


def _key_files(data_dir: Path) -> list[str]:
    return [path.name for path in (data_dir / "keys").iterdir()]


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _kids(url: str) -> set[str]:
    return {k["kid"] for k in httpx.get(url + "/.well-known/jwks.json").json()["keys"]}


def _login(gateway: str, email: str, password: str) -> dict[str, str]:
    response = httpx.post(gateway + "/api/v1/auth/login", json={"email": email, "password": password})
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}
