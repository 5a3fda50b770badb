"""make bench-login: a login storm next to catalogue readers, against the PBKDF2 bound of this machine.

One run of the whole system (``comptoir run`` on the embedded database, production hashing cost). First
the bound: how many PBKDF2-SHA256 hashes per second this machine computes at the configured rounds with one
thread per core and nothing else running. Then ``BENCH_LOGIN_CLIENTS`` clients log in over and over (each
as its own registered user) through the gateway while ``BENCH_READERS`` clients read the public catalogue,
for ``BENCH_SECONDS``. Printed: logins/s against the bound, login latency, catalogue reads/s and p99, and the
auth process's own ``/healthz`` p99 during the storm (a hash on auth's event loop would show there first).

The gateway's rate limits are off for the run (one user logging in a hundred times a minute would be
throttled, rightly): the point is what the hashing pool and the event loops do under the storm.
Environment: ``BENCH_SECONDS`` (default 20), ``BENCH_LOGIN_CLIENTS`` (32), ``BENCH_READERS`` (32).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp

from bench.results import record
from bench.system import comptoir_run

SECONDS = float(os.environ.get("BENCH_SECONDS", "20"))
LOGIN_CLIENTS = int(os.environ.get("BENCH_LOGIN_CLIENTS", "32"))
READERS = int(os.environ.get("BENCH_READERS", "32"))
ROUNDS = int(os.environ.get("AUTH_PBKDF2_ROUNDS", "600000"))
TERMS_VERSION = os.environ.get("AUTH_TERMS_VERSION", "2026-12-01")


def pbkdf2_bound(seconds: float = 6.0) -> float:
    """Hashes per second with one thread per core (hashlib releases the GIL while it hashes)."""
    workers = os.cpu_count() or 2
    salt = secrets.token_bytes(16)
    stop = time.perf_counter() + seconds

    def spin() -> int:
        done = 0
        while time.perf_counter() < stop:
            hashlib.pbkdf2_hmac("sha256", b"correct horse battery staple", salt, ROUNDS)
            done += 1
        return done

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        total = sum(pool.map(lambda _: spin(), range(workers)))
    return total / (time.perf_counter() - started)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def register(session: aiohttp.ClientSession, base: str, index: int) -> tuple[str, str]:
    email = f"storm-{index}-{secrets.token_hex(4)}@example.cm"
    password = f"storm password {secrets.token_hex(8)}"
    body = {
        "email": email,
        "password": password,
        "full_name": f"Storm {index}",
        "accept_terms": True,
        "terms_version": TERMS_VERSION,
    }
    async with session.post(f"{base}/api/v1/auth/register", json=body) as response:
        if response.status != 201:
            raise SystemExit(f"register answered {response.status}: {await response.text()}")
    return email, password


async def storm(ports: dict[str, int]) -> dict[str, Any]:
    base = f"http://127.0.0.1:{ports['gateway']}"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        users = [await register(session, base, i) for i in range(LOGIN_CLIENTS)]
        login_times: list[float] = []
        read_times: list[float] = []
        probe_times: list[float] = []
        failures = {"login": 0, "read": 0}
        refused: Counter[int] = Counter()
        stop = time.perf_counter() + SECONDS

        async def login(email: str, password: str) -> None:
            # Like an app: the device token of the first login is sent with every later one (a known
            # device is throttled on its own counter, not on the address that 32 clients share here).
            device: str | None = None
            while time.perf_counter() < stop:
                started = time.perf_counter()
                body = {"email": email, "password": password} | ({"device_token": device} if device else {})
                async with session.post(f"{base}/api/v1/auth/login", json=body) as response:
                    answer = await response.read()
                    if response.status == 200:
                        login_times.append(time.perf_counter() - started)
                        device = json.loads(answer).get("device_token") or device
                    else:
                        failures["login"] += 1
                        refused[response.status] += 1

        async def read() -> None:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                async with session.get(f"{base}/api/v1/products?limit=20") as response:
                    await response.read()
                    if response.status == 200:
                        read_times.append(time.perf_counter() - started)
                    else:
                        failures["read"] += 1

        async def probe() -> None:
            # auth's own liveness answer: it waits only for auth's event loop, never for a hash.
            while time.perf_counter() < stop:
                started = time.perf_counter()
                async with session.get(f"http://127.0.0.1:{ports['auth']}/healthz") as response:
                    await response.read()
                probe_times.append(time.perf_counter() - started)
                await asyncio.sleep(0.05)

        started = time.perf_counter()
        await asyncio.gather(*(login(*user) for user in users), *(read() for _ in range(READERS)), probe())
        elapsed = time.perf_counter() - started
    return {
        "logins_per_s": len(login_times) / elapsed,
        "login_p50_ms": percentile(login_times, 0.5) * 1000,
        "login_p99_ms": percentile(login_times, 0.99) * 1000,
        "reads_per_s": len(read_times) / elapsed,
        "read_p50_ms": percentile(read_times, 0.5) * 1000,
        "read_p99_ms": percentile(read_times, 0.99) * 1000,
        "auth_healthz_p99_ms": percentile(probe_times, 0.99) * 1000,
        "login_failures": failures["login"],
        "read_failures": failures["read"],
        "refused": dict(refused),
    }


def main() -> None:
    bound = pbkdf2_bound()
    work = Path(tempfile.mkdtemp(prefix="comptoir-bench-login-"))
    settings = {"GATEWAY_RATE_LIMITS_ENABLED": "false", "AUTH_PBKDF2_ROUNDS": str(ROUNDS)}
    with comptoir_run(work, **settings) as (ports, _env):
        figures = asyncio.run(storm(ports))
    ratio = figures["logins_per_s"] / bound
    if figures["refused"]:
        print(f"logins refused, by status: {figures['refused']}")
    print(
        f"\n{LOGIN_CLIENTS} clients logging in, {READERS} reading the catalogue, {SECONDS:.0f} s through the gateway;"
        f" PBKDF2-SHA256 at {ROUNDS:,} rounds; one run\n"
    )
    print(
        "| PBKDF2 bound (hashes/s) | logins/s | vs bound | login p50 / p99 ms | catalogue reads/s |"
        " catalogue p50 / p99 ms | auth /healthz p99 ms | non-2xx (login / read) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {bound:.2f} | {figures['logins_per_s']:.2f} | {ratio:.0%} | {figures['login_p50_ms']:,.0f} /"
        f" {figures['login_p99_ms']:,.0f} | {figures['reads_per_s']:,.0f} | {figures['read_p50_ms']:.1f} /"
        f" {figures['read_p99_ms']:.1f} | {figures['auth_healthz_p99_ms']:.1f} |"
        f" {figures['login_failures']:.0f} / {figures['read_failures']:.0f} |"
    )
    record("logins/s vs the PBKDF2 bound (login storm)", ratio * 100, 80, "%")
    record("catalogue p99 during the login storm", figures["read_p99_ms"], 50, "ms", higher_is_better=False)


if __name__ == "__main__":
    main()
