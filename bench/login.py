"""make bench-login: a login storm next to catalogue readers, against the PBKDF2 bound of this machine.

One run of the whole system (``comptoir run`` on the embedded database, production hashing cost). First the
bound: how many PBKDF2-SHA256 hashes per second this machine computes at the configured rounds with one
thread per core and nothing else running (measured again after the storms; the higher figure is kept). Then
``BENCH_LOGIN_CLIENTS`` clients log in over and over (each as its own registered user) through the gateway
while ``BENCH_READERS`` clients read the public catalogue, for ``BENCH_SECONDS``. Printed: logins/s against
the bound, login latency, catalogue reads/s and p99, and the auth process's own ``/healthz`` p99 during the
storm (a hash on auth's event loop would show there first). Then where the CPU went: each process (auth's
``pbkdf2`` threads apart), this run's PostgreSQL and the benchmark's own client, in cores, and the hashing
CPU per login against a hash's CPU in the bound. The client shares the two cores with the system it measures
(a shop's clients do not), so the logins are also set against the bound on the cores the client left.

The storm runs twice. First the readers are paced, as a shop's readers are: each reads every
``BENCH_READ_INTERVAL_MS`` (default 50, so 32 readers ask for 640 pages/s, a busy shop). Then they read flat
out, each sending its next request the moment the last one is answered: on two cores the readers and their
client then take what the hashes would have had, so that run shows the catalogue's latency under the
heaviest reading, not the login bound.

The gateway's rate limits are off for the run (one user logging in a hundred times a minute would be
throttled, rightly): the point is what the hashing pool and the event loops do under the storm.
Environment: ``BENCH_SECONDS`` (default 20, each run), ``BENCH_LOGIN_CLIENTS`` (32), ``BENCH_READERS`` (32),
``BENCH_READ_INTERVAL_MS`` (50).
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
import uvloop

from bench.results import record
from bench.system import comptoir_run, cpu_seconds, postgres_cpu_seconds, service_pids, thread_cpu_seconds
from common.http import PooledTransport, TransportError

SECONDS = float(os.environ.get("BENCH_SECONDS", "20"))
LOGIN_CLIENTS = int(os.environ.get("BENCH_LOGIN_CLIENTS", "32"))
READERS = int(os.environ.get("BENCH_READERS", "32"))
READ_INTERVAL = float(os.environ.get("BENCH_READ_INTERVAL_MS", "50")) / 1000
ROUNDS = int(os.environ.get("AUTH_PBKDF2_ROUNDS", "600000"))
TERMS_VERSION = os.environ.get("AUTH_TERMS_VERSION", "2026-12-01")


CORES = os.cpu_count() or 2


def pbkdf2_bound(seconds: float = 6.0) -> tuple[float, float]:
    """Hashes per second with one thread per core (hashlib releases the GIL while it hashes), and the CPU
    seconds one hash takes."""
    workers = CORES
    salt = secrets.token_bytes(16)
    stop = time.perf_counter() + seconds

    def spin() -> int:
        done = 0
        while time.perf_counter() < stop:
            hashlib.pbkdf2_hmac("sha256", b"correct horse battery staple", salt, ROUNDS)
            done += 1
        return done

    started, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(workers) as pool:
        total = sum(pool.map(lambda _: spin(), range(workers)))
    return total / (time.perf_counter() - started), (time.process_time() - cpu) / total


class CpuMeter:
    """Where the CPU went during a storm: each process of the system, auth's hashing threads apart, this
    benchmark's PostgreSQL and the benchmark's own client (in cores: CPU seconds per second)."""

    def __init__(self, ports: dict[str, int], pgdata: Path) -> None:
        self.pids = service_pids(ports)
        self.pgdata = pgdata

    def read(self) -> dict[str, float]:
        spent = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        spent["auth hashing"] = thread_cpu_seconds(self.pids["auth"], "pbkdf2")
        spent["auth"] -= spent["auth hashing"]
        spent["postgres"] = postgres_cpu_seconds(self.pgdata)
        spent["bench client"] = cpu_seconds(os.getpid())
        return spent


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


async def storms(ports: dict[str, int], meter: CpuMeter) -> list[dict[str, Any]]:
    """The paced storm, then the flat-out one, with the same users (and their devices)."""
    base = f"http://127.0.0.1:{ports['gateway']}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        users = [await register(session, base, i) for i in range(LOGIN_CLIENTS)]
        # Each user has signed in on their device before (apps keep the device token they were given):
        # 32 first logins at once from this one address would be throttled as a crowd from one IP.
        devices: dict[str, str] = {}
        for email, password in users:
            body = {"email": email, "password": password}
            async with session.post(f"{base}/api/v1/auth/login", json=body) as response:
                devices[email] = str((await response.json())["device_token"])
        return [await storm(session, ports, meter, users, devices, interval) for interval in (READ_INTERVAL, 0.0)]


async def storm(
    session: aiohttp.ClientSession,
    ports: dict[str, int],
    meter: CpuMeter,
    users: list[tuple[str, str]],
    devices: dict[str, str],
    read_interval: float,
) -> dict[str, Any]:
    base = f"http://127.0.0.1:{ports['gateway']}"
    login_times: list[float] = []
    read_times: list[float] = []
    probe_times: list[float] = []
    failures = {"login": 0, "read": 0}
    refused: Counter[int | str] = Counter()
    stop = time.perf_counter() + SECONDS

    async def login(email: str, password: str) -> None:
        # Like an app: the device token of the first login is sent with every later one (a known
        # device is throttled on its own counter, not on the address that 32 clients share here).
        while time.perf_counter() < stop:
            started = time.perf_counter()
            device = devices.get(email)
            body = {"email": email, "password": password} | ({"device_token": device} if device else {})
            try:
                async with session.post(f"{base}/api/v1/auth/login", json=body) as response:
                    answer = await response.read()
            except aiohttp.ClientError:  # a keep-alive connection closed by the server as the request left
                failures["login"] += 1
                refused["disconnected"] += 1
                continue
            if response.status == 200:
                login_times.append(time.perf_counter() - started)
                if token := json.loads(answer).get("device_token"):
                    devices[email] = str(token)
            else:
                failures["login"] += 1
                refused[response.status] += 1
                # Like an app: a refusal that says when to come back is retried then, not at once.
                await asyncio.sleep(float(response.headers.get("Retry-After", "0")))

    async def read(index: int) -> None:
        due = time.perf_counter() + read_interval * index / READERS  # paced readers start spread out
        while time.perf_counter() < stop:
            if read_interval:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                due += read_interval
            started = time.perf_counter()
            try:
                answer = await readers.request("GET", "/api/v1/products?limit=20")
            except TransportError:
                failures["read"] += 1
                continue
            if answer.status == 200:
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

    # Readers use the services' own keep-alive client: the benchmark's client shares the machine with the
    # system it measures, and aiohttp spent about 400 µs of CPU a read, taken from the hashes.
    readers = PooledTransport(base, max_connections=READERS)
    started, cpu_before = time.perf_counter(), meter.read()
    try:
        await asyncio.gather(*(login(*user) for user in users), *(read(i) for i in range(READERS)), probe())
    finally:
        await readers.aclose()
    elapsed, cpu_after = time.perf_counter() - started, meter.read()
    return {
        "cores": {name: (cpu_after[name] - cpu_before[name]) / elapsed for name in cpu_after},
        "read_interval_ms": read_interval * 1000,
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


def hash_cpu_per_login(figures: dict[str, Any]) -> float:
    """CPU seconds the hashing threads spent per successful login during a storm."""
    return float(figures["cores"]["auth hashing"]) / max(float(figures["logins_per_s"]), 1e-9)


def rate_during(figures: dict[str, Any]) -> float:
    """The hashes/s the whole machine could have computed during the storm itself: every core at the CPU a
    hash took then. This VM's speed moves by a third within a minute, so a bound measured before or after
    the storm can flatter or wrong the logins; this one is measured in the same seconds as they are."""
    return CORES / max(hash_cpu_per_login(figures), 1e-9)


def main() -> None:
    before = pbkdf2_bound()
    work = Path(tempfile.mkdtemp(prefix="comptoir-bench-login-"))
    settings = {"GATEWAY_RATE_LIMITS_ENABLED": "false", "AUTH_PBKDF2_ROUNDS": str(ROUNDS)}
    with comptoir_run(work, **settings) as (ports, _env):
        runs = uvloop.run(storms(ports, CpuMeter(ports, work / "pg")))  # the client costs the machine less
    after = pbkdf2_bound()
    # This VM's speed moves within minutes: the bound is measured before and after the storms, and the
    # faster of the two is the one the logins are held against.
    bound, cpu_per_hash = max(before, after)
    print(
        f"\n{LOGIN_CLIENTS} clients logging in, {READERS} reading the catalogue, {SECONDS:.0f} s a run through the"
        f" gateway; PBKDF2-SHA256 at {ROUNDS:,} rounds, bound {bound:.2f} hashes/s ({cpu_per_hash * 1000:.0f} ms"
        f" of CPU a hash; measured before and after the storms: {before[0]:.2f} and {after[0]:.2f}, the higher"
        " kept); one run each\n"
    )
    print(
        "| readers | logins/s | vs bound | vs bound on the cores the client left | login p50 / p99 ms |"
        " catalogue reads/s |"
        " catalogue p50 / p99 ms | auth /healthz p99 ms | non-2xx (login / read) | refused by status |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for figures in runs:
        paced = figures["read_interval_ms"]
        readers = f"each every {paced:.0f} ms" if paced else "flat out"
        print(
            f"| {readers} | {figures['logins_per_s']:.2f} | {figures['logins_per_s'] / bound:.0%} |"
            f" {figures['logins_per_s'] / (bound * (1 - figures['cores']['bench client'] / CORES)):.0%} |"
            f" {figures['login_p50_ms']:,.0f} / {figures['login_p99_ms']:,.0f} | {figures['reads_per_s']:,.0f} |"
            f" {figures['read_p50_ms']:.1f} / {figures['read_p99_ms']:.1f} | {figures['auth_healthz_p99_ms']:.1f} |"
            f" {figures['login_failures']:.0f} / {figures['read_failures']:.0f} | {figures['refused'] or '-'} |"
        )
        label = f"readers each every {paced:.0f} ms" if paced else "readers flat out"
        record(f"logins/s vs the PBKDF2 bound (login storm, {label})", figures["logins_per_s"] / bound * 100, 80, "%")
        record(
            f"logins/s vs the hashes/s the machine had during that storm (cores / hash CPU; {label})",
            figures["logins_per_s"] / rate_during(figures) * 100,
            80,
            "%",
        )
        record(
            f"catalogue p99 during the login storm ({label})",
            figures["read_p99_ms"],
            50,
            "ms",
            higher_is_better=False,
        )
    names = list(runs[0]["cores"])
    print("\nWhere the CPU went during each storm (cores: CPU seconds per second), and what a login's hash cost:\n")
    print(
        f"| readers | {' | '.join(names)} | total | hash CPU per login, ms (bound: {cpu_per_hash * 1000:.0f}) |"
        " the machine's hashes/s then (cores / hash CPU) | logins vs that |"
    )
    print("|---|" + "---|" * (len(names) + 4))
    for figures in runs:
        cores, paced = figures["cores"], figures["read_interval_ms"]
        print(
            f"| {f'each every {paced:.0f} ms' if paced else 'flat out'} |"
            f" {' | '.join(f'{cores[name]:.2f}' for name in names)} | {sum(cores.values()):.2f} |"
            f" {hash_cpu_per_login(figures) * 1000:.0f} | {rate_during(figures):.2f} |"
            f" {figures['logins_per_s'] / rate_during(figures):.0%} |"
        )


if __name__ == "__main__":
    main()
