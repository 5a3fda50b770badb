"""Start ``comptoir run`` as a real subprocess on free ports and talk to it over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil

from comptoir.embedded import SUPERUSER, libpq_url
from comptoir.provision import to_asyncpg_dsn
from tests.conftest import free_port
from tests.inventory.support import LEDGER_SQL

PROCESSES = ["gateway", "auth", "inventory", "orders", "audit"]


@dataclass
class RunningSystem:
    data_dir: Path
    log_path: Path
    ports: dict[str, int]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    _log: object = field(default=None, repr=False)

    def url(self, process: str = "gateway") -> str:
        return f"http://127.0.0.1:{self.ports[process]}"

    def start(self, timeout: float = 120.0) -> None:
        log = self.log_path.open("ab")
        self._log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "comptoir.cli", "run"], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 60.0, processes: list[str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        for process in processes or PROCESSES:
            while True:
                assert self.proc is not None
                assert self.proc.poll() is None, self.logs()[-3000:]
                try:
                    if httpx.get(self.url(process) + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"{process} not healthy in {timeout}s\n{self.logs()[-3000:]}"
                time.sleep(0.2)

    def children(self) -> list[psutil.Process]:
        assert self.proc is not None
        return psutil.Process(self.proc.pid).children(recursive=True)

    def child(self, process: str) -> psutil.Process:
        for child in self.children():
            cmd = child.cmdline()
            if "comptoir.serve" in cmd and process in cmd:
                return child
        raise LookupError(process)

    def stop(self, timeout: float = 40.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()  # type: ignore[attr-defined]

    def logs(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def admin_url(self) -> str:
        """The embedded server's superuser, as an asyncpg DSN."""
        creds = json.loads((self.data_dir / "secrets" / "postgres.json").read_text())
        return to_asyncpg_dsn(libpq_url(SUPERUSER, creds["superuser_password"], self.data_dir / "pg"))

    def ledger_breaks(self) -> list[dict[str, Any]]:
        """Products whose stock disagrees with the movement ledger or the held reservations (none, always)."""

        async def query() -> list[dict[str, Any]]:
            conn = await asyncpg.connect(self.admin_url())
            try:
                return [dict(row) for row in await conn.fetch(LEDGER_SQL)]
            finally:
                await conn.close()

        return asyncio.run(query())


def new_system(tmp_path: Path) -> RunningSystem:
    ports = {process: free_port() for process in PROCESSES}
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env.update(
        {
            "DATA_DIR": str(tmp_path / "data"),
            "ENVIRONMENT": "development",
            "LOG_LEVEL": "INFO",
            **{f"{process.upper()}_PORT": str(port) for process, port in ports.items()},
            "RESTART_BACKOFF_MAX_SECONDS": "2",
        }
    )
    return RunningSystem(data_dir=tmp_path / "data", log_path=tmp_path / "run.log", ports=ports, env=env)


def processes_using(path: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and str(path) in " ".join(proc.info["cmdline"] or ()):
                found.append(proc)
        except psutil.Error:
            continue
    return found
