"""make bench-audit: audit events per second from the services' outboxes to a verified chain.

`comptoir run` on free ports (embedded PostgreSQL); N events are committed into the outboxes of auth,
inventory and orders at once (as the services' own transactions would); the clock runs until the audit
service has chained all of them. Delivery lag = recorded_at - occurred_at per event. The CPU each process
spent meanwhile (user + system time from /proc: audit, the three emitting services whose relays deliver,
every PostgreSQL process) is divided by the events, to see where an event's cost goes. This is done
``BENCH_AUDIT_ROUNDS`` times (3) on the same system, then the chain is verified with `comptoir audit verify`.
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
from bench.system import comptoir_run, cpu_seconds, postgres_cpu_seconds, service_pids
from comptoir.embedded import SUPERUSER, libpq_url

EVENTS_PER_SERVICE = int(os.environ.get("BENCH_AUDIT_EVENTS", "3000"))
ROUNDS = int(os.environ.get("BENCH_AUDIT_ROUNDS", "3"))
EMITTERS = ("auth", "inventory", "orders")
MEASURED = ("audit", *EMITTERS)


def cpu_snapshot(pids: dict[str, int], pgdata: Path) -> dict[str, float]:
    snapshot = {name: cpu_seconds(pid) for name, pid in pids.items()}
    snapshot["postgres"] = postgres_cpu_seconds(pgdata)
    return snapshot


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


def one_round(url: str, pids: dict[str, int], pgdata: Path, chained_before: int) -> tuple[float, dict[str, float]]:
    """Emit the events, wait until all are chained: (seconds, CPU seconds per process)."""
    total = EVENTS_PER_SERVICE * len(EMITTERS)
    started = asyncio.run(emit(url))
    cpu_before = cpu_snapshot(pids, pgdata)  # after the emitting transaction: its own cost is not the relays'
    while asyncio.run(chained(url)) < chained_before + total:
        if time.perf_counter() - started > 600:
            raise SystemExit("events were not delivered within 10 minutes")
        time.sleep(0.05)
    elapsed = time.perf_counter() - started
    cpu_after = cpu_snapshot(pids, pgdata)
    return elapsed, {name: cpu_after[name] - cpu_before[name] for name in cpu_before}


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="comptoir-bench-audit-"))
    with comptoir_run(work) as (ports, env):
        creds = json.loads((work / "secrets" / "postgres.json").read_text())
        url = libpq_url(SUPERUSER, creds["superuser_password"], work / "pg")
        pids = service_pids(ports)
        pgdata = work / "pg"
        total = EVENTS_PER_SERVICE * len(EMITTERS)
        rounds = []
        for number in range(ROUNDS):
            rounds.append(one_round(url, pids, pgdata, number * total))
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

        columns = [*MEASURED, "postgres"]
        print(f"\n{total} events from {len(EMITTERS)} services' outboxes to the audit chain, {ROUNDS} rounds\n")
        print("| round | seconds | events/s | " + " | ".join(f"{name} µs/event" for name in columns) + " | total µs |")
        print("|---" * (len(columns) + 4) + "|")
        for number, (elapsed, cpu) in enumerate(rounds, 1):
            per_event = [cpu.get(name, 0.0) / total * 1e6 for name in columns]
            print(
                f"| {number} | {elapsed:.2f} | {total / elapsed:,.0f} | "
                + " | ".join(f"{value:,.0f}" for value in per_event)
                + f" | {sum(per_event):,.0f} |"
            )
        best = max(total / elapsed for elapsed, _cpu in rounds)
        median = sorted(total / elapsed for elapsed, _cpu in rounds)[len(rounds) // 2]
        print(
            f"\nmedian {median:,.0f} events/s (best {best:,.0f}); lag p50 {pct(0.5):.2f} s, p99 {pct(0.99):.2f} s; "
            f"chain verifies: {'yes' if ok else 'NO'} ({verify_seconds:.1f} s)"
        )
        record("audit events/s into the chain", median, 2000, "/s")


if __name__ == "__main__":
    main()
