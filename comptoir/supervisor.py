"""``comptoir run``: the database, the migrations, then five uvicorn processes under supervision.

A crashed child is restarted with exponential backoff; SIGTERM/SIGINT stop every child and then the
embedded PostgreSQL, so nothing is left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType

from comptoir.clients import client_env
from comptoir.config import PROCESSES, RunSettings
from comptoir.embedded import EmbeddedPostgres
from comptoir.provision import ServiceRole, migrate, redact_url

STABLE_AFTER_SECONDS = 30.0
STOP_GRACE_SECONDS = 15.0


def say(message: str) -> None:
    print(f"comptoir: {message}", flush=True)


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    failures: int = 0
    started_at: float = 0.0
    next_start: float = 0.0
    restarts: int = field(default=0)

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, env=self.env)
        self.started_at = time.monotonic()


def child_env(settings: RunSettings, roles: list[ServiceRole]) -> dict[str, str]:
    env = dict(os.environ)
    env["DATA_DIR"] = str(settings.data_dir.resolve())
    env["ENVIRONMENT"] = settings.environment.value
    for role in roles:
        env[f"{role.service.upper()}_DATABASE_URL"] = role.url
    for process in PROCESSES[1:]:
        env[f"GATEWAY_{process.upper()}_URL"] = f"http://{settings.connect_host}:{settings.port_of(process)}"

    def url(process: str) -> str:
        return f"http://{settings.connect_host}:{settings.port_of(process)}"

    # Service-to-service peers (they default to the standard ports; the chosen ports win here).
    env["AUTH_ORDERS_URL"] = url("orders")
    env["AUTH_AUDIT_URL"] = url("audit")
    env["AUTH_INVENTORY_URL"] = url("inventory")
    env["ORDERS_INVENTORY_URL"] = url("inventory")
    env["AUTH_INTERNAL_URL"] = f"http://{settings.connect_host}:{settings.auth_port}"
    env["AUDIT_INTERNAL_URL"] = f"http://{settings.connect_host}:{settings.audit_port}"
    env.update(client_env(settings.data_dir))
    return env


def build_children(settings: RunSettings, roles: list[ServiceRole]) -> list[Child]:
    env = child_env(settings, roles)
    return [
        Child(
            name=process,
            argv=[
                sys.executable,
                "-m",
                "comptoir.serve",
                process,
                "--host",
                settings.bind_host,
                "--port",
                str(settings.port_of(process)),
            ],
            env=env,
        )
        for process in PROCESSES
    ]


class Supervisor:
    def __init__(self, settings: RunSettings) -> None:
        self.settings = settings
        self.stopping = False
        self.children: list[Child] = []
        self.embedded: EmbeddedPostgres | None = None

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self.stopping:
            say(f"received {signal.Signals(signum).name}, stopping")
        self.stopping = True

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        settings = self.settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            if settings.database_url:
                admin_url = settings.database_url
                say(f"database: {redact_url(admin_url)}")
            else:
                self.embedded = EmbeddedPostgres(settings.data_dir)
                admin_url = self.embedded.start()
                say(f"embedded PostgreSQL: data in {self.embedded.pgdata}, socket in {self.embedded.socket_dir}")
            roles = migrate(settings, admin_url)
            say("schemas, roles and migrations are up to date: " + ", ".join(r.service for r in roles))
            self.children = build_children(settings, roles)
            self._print_summary()
            return self._supervise()
        finally:
            self._stop_children()
            if self.embedded is not None:
                self.embedded.stop()
                say("embedded PostgreSQL stopped")

    def _print_summary(self) -> None:
        s = self.settings
        say(f"data directory: {s.data_dir.resolve()}  (environment: {s.environment.value})")
        for child in self.children:
            say(f"  {child.name:<10} http://{s.connect_host}:{s.port_of(child.name)}")
        say(f"client apps use the gateway: http://{s.connect_host}:{s.gateway_port}/api/v1/")
        say(f"development messages (SMS, e-mail): {s.data_dir.resolve() / 'messages.jsonl'}")

    def _supervise(self) -> int:
        backoff_max = self.settings.restart_backoff_max_seconds
        while not self.stopping:
            now = time.monotonic()
            for child in self.children:
                if child.proc is None:
                    if now >= child.next_start:
                        child.start()
                        if child.restarts:
                            say(f"{child.name} restarted (attempt {child.restarts})")
                    continue
                code = child.proc.poll()
                if code is None:
                    if child.failures and now - child.started_at > STABLE_AFTER_SECONDS:
                        child.failures = 0
                    continue
                if self.stopping:
                    break
                delay = min(backoff_max, 0.5 * 2**child.failures)
                child.failures += 1
                child.restarts += 1
                child.proc = None
                child.next_start = now + delay
                say(f"{child.name} exited with status {code}; restarting in {delay:.1f}s")
            time.sleep(0.2)
        return 0

    def _stop_children(self) -> None:
        running = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for proc in running:
            proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if running:
            say("all processes stopped")
