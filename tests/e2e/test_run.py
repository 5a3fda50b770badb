"""``comptoir run`` end to end: real processes, real HTTP, real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import psutil
import pytest

from comptoir.embedded import SUPERUSER, libpq_url
from tests.e2e.harness import PROCESSES, new_system, processes_using

pytestmark = pytest.mark.e2e

SECRET_PASSWORD = "Sup3r-Secret-Pa55phrase"
SECRET_TOKEN = "opaque-bearer-7d1f0c2b9e4a"


async def insert_product(data_dir: Path, sku: str) -> None:
    creds = json.loads((data_dir / "secrets" / "postgres.json").read_text())
    conn = await asyncpg.connect(libpq_url(SUPERUSER, creds["superuser_password"], data_dir / "pg"))
    try:
        await conn.execute(
            "INSERT INTO inventory.products (id, sku, name, price_xaf, on_hand) VALUES ($1, $2, 'Savon', 500, 3)",
            uuid.uuid4(),
            sku,
        )
    finally:
        await conn.close()


def test_run_serves_restarts_stops_cleanly_and_keeps_data(tmp_path: Path) -> None:
    system = new_system(tmp_path)
    system.start()
    try:
        gateway = system.url()
        # Every process answers directly, and the gateway sees all of them.
        for process in PROCESSES:
            assert httpx.get(system.url(process) + "/healthz").json()["service"] == process
            assert httpx.get(system.url(process) + "/readyz").status_code == 200
        health = httpx.get(gateway + "/api/v1/health")
        assert health.status_code == 200
        assert health.json()["processes"] == dict.fromkeys(PROCESSES, "ok")

        # A real request through the gateway to a service.
        catalogue = httpx.get(gateway + "/api/v1/products")
        assert catalogue.status_code == 200
        assert catalogue.json() == {"items": [], "next_cursor": None}
        assert catalogue.headers["x-content-type-options"] == "nosniff"
        # Headers scored like the Mozilla Observatory on every kind of answer, nothing internal reachable.
        live = subprocess.run(
            [sys.executable, "-m", "comptoir.cli", "check", "--live", gateway, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert live.returncode == 0, live.stdout + live.stderr
        assert json.loads(live.stdout)["grade"] == "A+"
        schema = httpx.get(gateway + "/api/v1/openapi.json")
        assert schema.status_code == 200
        assert "/api/v1/products" in schema.json()["paths"]

        # Secrets in a query string, a header and a body never reach the logs, though the request does.
        request_id = "e2e-secret-probe-0001"
        response = httpx.post(
            gateway + f"/api/v1/products?password={SECRET_PASSWORD}&token={SECRET_TOKEN}",
            json={"password": SECRET_PASSWORD},
            headers={"Authorization": f"Bearer {SECRET_TOKEN}", "X-Request-ID": request_id},
        )
        assert response.headers["x-request-id"] == request_id
        asyncio.run(insert_product(system.data_dir, "KEPT-001"))

        # A crashed service is restarted by the supervisor.
        victim = system.child("auth")
        victim.kill()
        victim.wait(10)
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(system.url("auth") + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, system.logs()[-2000:]
            time.sleep(0.2)
        assert system.child("auth").pid != victim.pid
        children = system.children()
    finally:
        code = system.stop()

    assert code == 0
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert processes_using(system.data_dir) == []
    logs = system.logs()
    assert request_id in logs  # the probe request was logged ...
    assert SECRET_PASSWORD not in logs
    assert SECRET_TOKEN not in logs
    assert "auth exited with status" in logs

    # A second start finds the data of the first.
    system.start()
    try:
        skus = [p["sku"] for p in httpx.get(system.url() + "/api/v1/products").json()["items"]]
        assert skus == ["KEPT-001"]
    finally:
        assert system.stop() == 0
    assert processes_using(system.data_dir) == []
