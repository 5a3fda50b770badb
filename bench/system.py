"""What the benchmarks share: free loopback ports, and the whole system started with ``comptoir run``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

PROCESSES = ("gateway", "auth", "inventory", "orders", "audit")


def service_pids(ports: dict[str, int]) -> dict[str, int]:
    """The pid of each process that ``comptoir run`` started on ``ports`` (found by its command line)."""
    found: dict[str, int] = {}
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "comptoir.serve" in argv and "--port" in argv:
            name, port = argv[argv.index("comptoir.serve") + 1], argv[argv.index("--port") + 1]
            if ports.get(name) == int(port):
                found[name] = int(cmdline.parent.name)
    return found


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User + system CPU time of a process (Linux /proc); with ``children``, also that of its exited,
    reaped children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds(pgdata: Path) -> float:
    """CPU of this benchmark's PostgreSQL only: its postmaster, its live backends and the ended ones (the
    postmaster's reaped children), not that of other servers on the machine (other test runs)."""
    postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
    total = cpu_seconds(postmaster, children=True)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if parent == postmaster:
                total += cpu_seconds(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return total


def thread_cpu_seconds(pid: int, prefix: str) -> float:
    """User + system CPU time of the threads of ``pid`` whose name starts with ``prefix``."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().startswith(prefix):
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
        except OSError:  # the thread ended
            continue
    return total / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def comptoir_run(data_dir: Path, **settings: str) -> Iterator[tuple[dict[str, int], dict[str, str]]]:
    """``comptoir run`` on the embedded database in ``data_dir``, on free ports, with ``settings`` added to
    the environment; yields (ports, environment) once every process answers /healthz, stops it after."""
    ports = {process: free_port() for process in PROCESSES}
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env |= {"DATA_DIR": str(data_dir), "LOG_LEVEL": "WARNING", **settings}
    env |= {f"{process.upper()}_PORT": str(port) for process, port in ports.items()}
    run = subprocess.Popen(
        [sys.executable, "-m", "comptoir.cli", "run"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        for port in ports.values():
            while True:
                if run.poll() is not None:
                    raise SystemExit("comptoir run exited before it was healthy")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the system did not start")
                time.sleep(0.2)
        yield ports, env
    finally:
        run.send_signal(signal.SIGTERM)
        run.wait(60)
