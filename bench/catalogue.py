"""python -m bench.catalogue: CPU per catalogue read in the inventory process, the uncached path.

One inventory process (``comptoir.serve``) on an embedded PostgreSQL holding a realistic catalogue
(``BENCH_PRODUCTS`` products, default 200, each with a description and one to three images); no gateway,
so no answer comes from a cache. Each kind of read is sent ``BENCH_READS`` times (default 2,000) by 8
concurrent clients, ``BENCH_ROUNDS`` times (default 3), and the inventory process's user + system CPU
(``/proc``) is divided by the number of answers. That figure, unlike requests per second, hardly moves
when other work shares the machine.

``BENCH_PROFILE=FILE`` runs the inventory process under cProfile and writes its profile to FILE at the end
(the CPU figures are then those of the profiled process, only for finding where the time goes).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import aiohttp
import asyncpg

from bench.orders import Issuer, stand_in_environment, stand_in_for_auth_and_audit, wait_healthy
from bench.results import record
from bench.system import cpu_seconds, free_port, postgres_cpu_seconds
from comptoir.config import RunSettings
from comptoir.embedded import EmbeddedPostgres
from comptoir.provision import migrate, to_asyncpg_dsn

PRODUCTS = int(os.environ.get("BENCH_PRODUCTS", "200"))
READS = int(os.environ.get("BENCH_READS", "2000"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CLIENTS = 8
PROFILE = os.environ.get("BENCH_PROFILE", "")
# BENCH_PYSPY=FILE: py-spy (when installed) samples the inventory process while it is measured, into FILE
# in collapsed-stack format (for a flame graph, or grep).
PYSPY = os.environ.get("BENCH_PYSPY", "")
ONLY = os.environ.get("BENCH_ONLY", "")  # only the reads whose name contains this

DESCRIPTION = (
    "Savon artisanal à l'huile d'olive et de palme, saponifié à froid au Cameroun. Sans parfum ajouté, "
    "convient aux peaux sensibles. Pain de 250 g, emballage papier recyclé. Conserver au sec."
)

_PROFILED = """
import cProfile, sys, time
from comptoir.serve import main
profile = cProfile.Profile(time.process_time)
profile.enable()
try:
    main(sys.argv[1:])
except KeyboardInterrupt:
    pass
finally:
    profile.disable()
    profile.dump_stats({out!r})
"""


async def seed(admin_url: str) -> list[uuid.UUID]:
    """``PRODUCTS`` active products with stock, prices, descriptions and 1-3 images each; returns their ids."""
    conn = await asyncpg.connect(to_asyncpg_dsn(admin_url))
    try:
        ids = [uuid.uuid4() for _ in range(PRODUCTS)]
        await conn.executemany(
            "INSERT INTO inventory.products (id, sku, name, description, price_xaf, is_active, on_hand, reserved,"
            " created_at, updated_at) VALUES ($1, $2, $3, $4, $5, true, $6, $7,"
            " now() - make_interval(secs => $8), now() - make_interval(secs => $8))",
            [
                (
                    pid,
                    f"SAV-{i:05d}",
                    f"Savon de Marseille n°{i} – 250 g",
                    DESCRIPTION,
                    1500 + 25 * i,
                    100 + i,
                    i % 7,
                    i,
                )
                for i, pid in enumerate(ids)
            ],
        )
        await conn.executemany(
            "INSERT INTO inventory.product_images (id, product_id, storage_key, content_type, size, width, height,"
            " sha256) VALUES ($1, $2, $3, 'image/jpeg', 48213, 800, 600, $4)",
            [
                (uuid.uuid4(), pid, secrets.token_hex(16) + ".jpg", secrets.token_hex(32))
                for i, pid in enumerate(ids)
                for _ in range(1 + i % 3)
            ],
        )
        await conn.execute("ANALYZE inventory.products; ANALYZE inventory.product_images")
    finally:
        await conn.close()
    return ids


async def reads(base: str, path: str, headers: dict[str, str], count: int) -> Counter[int]:
    statuses: Counter[int] = Counter()
    todo = iter(range(count))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS)) as session:

        async def client() -> None:
            for _ in todo:
                async with session.get(base + path, headers=headers) as answer:
                    await answer.read()
                    statuses[answer.status] += 1

        await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return statuses


async def etag_of(base: str, path: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(base + path) as answer:
        return answer.headers["ETag"]


async def measure(
    base: str, pid: int, pgdata: Path, ids: list[uuid.UUID], issuer: Issuer
) -> dict[str, tuple[list[float], list[float]]]:
    customer = {"Authorization": f"Bearer {issuer.access()}"}
    one = f"/api/v1/products/{ids[PRODUCTS // 2]}"
    kinds: dict[str, tuple[str, dict[str, str], int]] = {
        "list, anonymous, default page (50)": ("/api/v1/products", {}, 200),
        "list, anonymous, limit=20 (bench-orders' read)": ("/api/v1/products?limit=20", {}, 200),
        "list, signed-in customer, default page": ("/api/v1/products", customer, 200),
        "list, anonymous, If-None-Match -> 304": (
            "/api/v1/products",
            {"If-None-Match": await etag_of(base, "/api/v1/products")},
            304,
        ),
        "one product, anonymous": (one, {}, 200),
        "one product, signed-in customer": (one, customer, 200),
    }
    kinds = {name: kind for name, kind in kinds.items() if ONLY in name}
    for path, headers, _ in kinds.values():  # warm-up: pools, caches, first-call paths
        await reads(base, path, headers, 200)
    results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in kinds}
    spy = None
    if PYSPY:
        spy = subprocess.Popen(
            [shutil.which("py-spy") or "py-spy", "record", "-p", str(pid), "-f", "raw", "-r", "500", "-o", PYSPY],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await asyncio.sleep(1)
    for _ in range(ROUNDS):
        for name, (path, headers, status) in kinds.items():
            before, postgres_before = cpu_seconds(pid), postgres_cpu_seconds(pgdata)
            got = await reads(base, path, headers, READS)
            spent, postgres_spent = cpu_seconds(pid) - before, postgres_cpu_seconds(pgdata) - postgres_before
            if got[status] != READS:
                raise SystemExit(f"{name}: expected {READS} x {status}, got {dict(got)}")
            results[name][0].append(spent * 1e6 / READS)
            results[name][1].append(postgres_spent * 1e6 / READS)
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(30)
    return results


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="comptoir-bench-catalogue-"))
    embedded = EmbeddedPostgres(work)
    proc: subprocess.Popen[bytes] | None = None
    stub = None
    try:
        admin_url = embedded.start()
        roles = {r.service: r.url for r in migrate(RunSettings(data_dir=work, database_url=admin_url), admin_url)}
        ids = asyncio.run(seed(admin_url))
        issuer = Issuer()
        stub = stand_in_for_auth_and_audit(issuer)
        stub_url = f"http://127.0.0.1:{stub.server_address[1]}"
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = stand_in_environment(work, stub_url, roles["inventory"])
        # CPU time, not wall time: the profile must not count the time the process waits for the others.
        profiler = ["-c", _PROFILED.format(out=str(Path(PROFILE).resolve()))] if PROFILE else []
        log = work / "inventory.log"
        with log.open("wb") as handle:
            proc = subprocess.Popen(
                [sys.executable, *(profiler or ["-m", "comptoir.serve"]), "inventory", "--port", str(port)],
                env=env,
                cwd=work,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
        wait_healthy(base, proc, log)
        results = asyncio.run(measure(base, proc.pid, embedded.pgdata, ids, issuer))
    finally:
        if proc is not None:
            # uvicorn re-raises the signal it stopped on: SIGINT ends as KeyboardInterrupt, after which
            # cProfile still writes its file (it would not after SIGTERM).
            proc.send_signal(signal.SIGINT if PROFILE else signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if stub is not None:
            stub.shutdown()
        embedded.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\ninventory CPU per read (µs), {PRODUCTS} products, {READS} reads x {ROUNDS} rounds, {CLIENTS} clients\n")
    print("| read | inventory, each round (µs) | inventory, median (µs) | PostgreSQL, median (µs) |")
    print("|---|---|---|---|")
    for name, (values, postgres) in results.items():
        rounds = " / ".join(f"{v:,.0f}" for v in values)
        print(f"| {name} | {rounds} | {statistics.median(values):,.0f} | {statistics.median(postgres):,.0f} |")
    if "list, anonymous, default page (50)" in results:
        # Goal: half of what the page cost before the read path was rewritten (4.0 ms on 2026-12-07, this VM).
        record(
            "inventory CPU per uncached catalogue page (50 products)",
            statistics.median(results["list, anonymous, default page (50)"][0]) / 1000,
            2.0,
            "ms",
            higher_is_better=False,
        )


if __name__ == "__main__":
    main()
