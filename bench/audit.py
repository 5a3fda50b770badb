"""make bench-audit: audit events per second from the services' outboxes to a verified chain.

`comptoir run` on free ports (embedded PostgreSQL); N events are committed into the outboxes of auth,
inventory and orders at once (as the services' own transactions would); the clock runs until the audit
service has chained all of them. Delivery lag = recorded_at - occurred_at per event. Then the chain is
verified with `comptoir audit verify`.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from bench.results import record
from bench.system import comptoir_run
from comptoir.embedded import SUPERUSER, libpq_url

EVENTS_PER_SERVICE = int(os.environ.get("BENCH_AUDIT_EVENTS", "3000"))
EMITTERS = ("auth", "inventory", "orders")


def payload(service: str) -> dict[str, object]:
    return {
        "id": str(uuid.uuid4()),
        "occurred_at": datetime.now(UTC).isoformat(),
        "service": service,
        "action": f"{service}.bench.happened",
        "actor_id": str(uuid.uuid4()),
        "actor_role": "customer",
        "ip": "198.51.100.7",
        "user_agent": "bench/1",
        "method": "POST",
        "path": f"/api/v1/{service}/bench",
        "request_id": str(uuid.uuid4()),
        "resource_type": "bench",
        "resource_id": str(uuid.uuid4()),
        "old_values": None,
        "new_values": {"n": 1},
        "outcome": "success",
    }


async def emit(url: str) -> float:
    conn = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        async with conn.transaction():
            for service in EMITTERS:
                rows = [
                    (uuid.UUID(str(p["id"])), datetime.now(UTC), json.dumps(p))
                    for p in (payload(service) for _ in range(EVENTS_PER_SERVICE))
                ]
                await conn.executemany(
                    f"INSERT INTO {service}.outbox (id, occurred_at, payload) VALUES ($1, $2, $3::jsonb)",  # noqa: S608
                    rows,
                )
        return started
    finally:
        await conn.close()


async def chained(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM audit.events WHERE action LIKE '%.bench.happened'"))
    finally:
        await conn.close()


async def lags(url: str) -> list[float]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT extract(epoch FROM recorded_at - occurred_at) AS lag FROM audit.events"
            " WHERE action LIKE '%.bench.happened'"
        )
        return sorted(float(r["lag"]) for r in rows)
    finally:
        await conn.close()


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="comptoir-bench-audit-"))
    with comptoir_run(work) as (_ports, env):
        creds = json.loads((work / "secrets" / "postgres.json").read_text())
        url = libpq_url(SUPERUSER, creds["superuser_password"], work / "pg")
        total = EVENTS_PER_SERVICE * len(EMITTERS)
        started = asyncio.run(emit(url))
        while asyncio.run(chained(url)) < total:
            if time.perf_counter() - started > 600:
                raise SystemExit("events were not delivered within 10 minutes")
            time.sleep(0.1)
        elapsed = time.perf_counter() - started
        lag = asyncio.run(lags(url))
        verify_started = time.perf_counter()
        verdict = subprocess.run(
            [sys.executable, "-m", "comptoir.cli", "audit", "verify"],
            env=env | {"DATABASE_URL": url},
            capture_output=True,
            text=True,
            check=False,
        )
        verify_seconds = time.perf_counter() - verify_started
        ok = json.loads(verdict.stdout)["ok"] if verdict.returncode in (0, 1) and verdict.stdout else False

        def pct(q: float) -> float:
            return lag[min(len(lag) - 1, int(q * len(lag)))]

        print(f"\n{total} events from {len(EMITTERS)} services' outboxes to the audit chain, one run\n")
        print("| events | seconds | events/s | lag p50 s | lag p99 s | chain verifies | verify s |")
        print("|---|---|---|---|---|---|---|")
        print(
            f"| {total} | {elapsed:.2f} | {total / elapsed:,.0f} | {pct(0.5):.2f} | {pct(0.99):.2f} | "
            f"{'yes' if ok else 'NO'} | {verify_seconds:.1f} |"
        )
        record("audit events/s into the chain", total / elapsed, 2000, "/s")


if __name__ == "__main__":
    main()
