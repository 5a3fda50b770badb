"""``comptoir run``: the database, the migrations, then five uvicorn processes under supervision.

A crashed child is restarted with exponential backoff; SIGTERM/SIGINT stop every child and then the
embedded PostgreSQL, so nothing is left running. A child that fails to start several times in a row
with the same error (a refused configuration, a port in use) is not restarted for ever: the supervisor
stops everything and prints that error, which names what to fix. The banner with the addresses and
"ready" is printed once every process answers its ``/healthz``.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from comptoir.clients import ClientSecretsMismatch, OperatorSecrets, client_env
from comptoir.config import PROCESSES, SERVICES, RunSettings
from comptoir.embedded import EmbeddedPostgres
from comptoir.provision import ServiceRole, migrate, redact_url, revisions, upgrades

STABLE_AFTER_SECONDS = 30.0
STOP_GRACE_SECONDS = 15.0
# A child that exits this many times in a row, each time before it was stable and with the same exit
# status and last line of error output, will not get better by itself.
MAX_IDENTICAL_START_FAILURES = 3
HEALTH_TIMEOUT_SECONDS = 1.0
LOCK_FILE = "run.lock"


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
    healthy: bool = False
    # The last lines the child wrote to stderr (still passed through to ours as they come).
    stderr_tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=20))
    # (exit status, last error line) of the latest start failures, and how many in a row were identical.
    last_failure: tuple[int, str] | None = None
    identical_failures: int = 0
    _reader: threading.Thread | None = None

    def start(self) -> None:
        self.stderr_tail.clear()
        self.proc = subprocess.Popen(self.argv, env=self.env, stderr=subprocess.PIPE)
        self.started_at = time.monotonic()
        self.healthy = False
        self._reader = threading.Thread(target=self._pass_stderr, args=(self.proc,), daemon=True)
        self._reader.start()

    def _pass_stderr(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.stderr is None:  # started with stderr=PIPE, so never; typed narrowing
            return
        for raw in proc.stderr:
            text = raw.decode(errors="replace")
            sys.stderr.write(text)
            sys.stderr.flush()
            line = text.strip()
            if line:
                self.stderr_tail.append(line)

    def reason(self) -> str:
        """The child's last error line (waits for the rest of its output once it has exited)."""
        if self._reader is not None:
            self._reader.join(timeout=2)
        return self.stderr_tail[-1] if self.stderr_tail else "no error output"


def hold_data_dir(data_dir: Path) -> IO[str] | str:
    """An exclusive lock on ``DATA_DIR`` for as long as the returned file stays open (the kernel lets go
    when the process ends, however it ends), or the holder's description when another run has it."""
    handle = (data_dir / LOCK_FILE).open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
            handle.close()
            raise
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        return f"pid {holder}" if holder.isdigit() else "another process"
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def ports_in_use(settings: RunSettings) -> list[str]:
    """Each child's port that cannot be bound on ``BIND_HOST`` right now, named by its setting, and why
    (bound as uvicorn binds: IPv6 for an address with a colon, else IPv4, with SO_REUSEADDR)."""
    host = settings.bind_host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    refused = []
    for process in PROCESSES:
        port = settings.port_of(process)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no obstacle
            try:
                probe.bind((host, port))
            except socket.gaierror:
                return [f"BIND_HOST {host!r} is not an address of this machine's (it does not resolve)"]
            except OSError as exc:
                why = "in use by another program" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
                refused.append(f"{port} ({process.upper()}_PORT): {why}")
    return refused


def child_env(settings: RunSettings, roles: list[ServiceRole]) -> dict[str, str]:
    env = dict(os.environ)
    env["DATA_DIR"] = str(settings.data_dir.resolve())
    env["ENVIRONMENT"] = settings.environment.value
    for role in roles:
        env[f"{role.service.upper()}_DATABASE_URL"] = role.url
    for process in PROCESSES[1:]:
        env[f"GATEWAY_{process.upper()}_URL"] = settings.url_of(process)
    # Service-to-service peers (they default to the standard ports; the chosen ports win here).
    for peer in AUTH_PEERS:
        env[f"AUTH_{peer.upper()}_URL"] = settings.url_of(peer)
    env["ORDERS_INVENTORY_URL"] = settings.url_of("inventory")
    env["AUTH_INTERNAL_URL"] = settings.url_of("auth")
    env["AUDIT_INTERNAL_URL"] = settings.url_of("audit")
    env.update(client_env(settings.data_dir, OperatorSecrets().as_env()))
    return env


# The services auth calls (the GDPR export and erasure, retention's anonymisation).
AUTH_PEERS = ("orders", "audit", "inventory")


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
    def __init__(self, settings: RunSettings, out: Callable[[str], None] = say) -> None:
        self.settings = settings
        self.say = out
        self.stopping = False
        self.children: list[Child] = []
        self.embedded: EmbeddedPostgres | None = None
        self.ready = False

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if not self.stopping:
            self.say(f"received {signal.Signals(signum).name}, stopping")
        self.stopping = True

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        settings = self.settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        lock = hold_data_dir(settings.data_dir)
        if isinstance(lock, str):
            self.say(
                f"{settings.data_dir.resolve()} (DATA_DIR) is in use by another `comptoir run` ({lock}): stop that "
                "one first, or give this one its own DATA_DIR"
            )
            return 2
        with lock:
            try:
                client_env(settings.data_dir, OperatorSecrets().as_env())
            except ClientSecretsMismatch as exc:
                self.say(str(exc))
                return 2
            refused = ports_in_use(settings)
            if refused:
                self.say(
                    f"cannot listen on {settings.bind_host} (BIND_HOST): {'; '.join(refused)}; free the port, or set "
                    "the named setting to another port (or BIND_HOST to an address of this machine)"
                )
                return 2
            return self._run(settings)

    def _run(self, settings: RunSettings) -> int:
        try:
            if settings.database_url:
                admin_url = settings.database_url
                say(f"database: {redact_url(admin_url)}")
            else:
                self.embedded = EmbeddedPostgres(settings.data_dir)
                admin_url = self.embedded.start()
                say(f"embedded PostgreSQL: data in {self.embedded.pgdata}, socket in {self.embedded.socket_dir}")
            before = revisions(admin_url, SERVICES)
            roles = migrate(settings, admin_url)
            say("schemas, roles and migrations are up to date; " + upgrades(before, revisions(admin_url, SERVICES)))
            self.children = build_children(settings, roles)
            self.say("starting " + ", ".join(c.name for c in self.children) + "; waiting until each answers /healthz")
            return self._supervise()
        finally:
            self._stop_children()
            if self.embedded is not None:
                self.embedded.stop()
                self.say("embedded PostgreSQL stopped")

    def _print_summary(self) -> None:
        s = self.settings
        self.say(f"data directory: {s.data_dir.resolve()}  (environment: {s.environment.value})")
        for child in self.children:
            self.say(f"  {child.name:<10} http://{s.connect_host}:{s.port_of(child.name)}")
        if s.message_sender == "jsonl":
            self.say(f"development messages (SMS, e-mail): {s.data_dir.resolve() / 'messages.jsonl'}")
        # With ALLOWED_HOSTS the gateway answers only those names (".x" stands for the names under x).
        hosts = sorted((h.strip().lower() for h in s.allowed_hosts.split(",") if h.strip()), key=lambda h: h[0] == ".")
        host = ""
        if hosts:
            name = hosts[0] if not hosts[0].startswith(".") else f"a name ending in {hosts[0]}"
            host = f" (with Host: {name}, as ALLOWED_HOSTS says)"
        self.say(f"ready: client apps use the gateway at http://{s.connect_host}:{s.gateway_port}/api/v1/{host}")

    def _answers_health(self, child: Child) -> bool:
        url = f"http://{self.settings.connect_host}:{self.settings.port_of(child.name)}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_SECONDS) as response:  # noqa: S310 - http to our own child
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _check_ready(self) -> None:
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None and not child.healthy:
                child.healthy = self._answers_health(child)
        if all(child.healthy for child in self.children):
            self.ready = True
            self._print_summary()

    def _on_exit(self, child: Child, code: int, now: float) -> int | None:
        """Schedule the restart of a child that exited; an exit status for the supervisor when it must give up."""
        backoff_max = self.settings.restart_backoff_max_seconds
        stable = now - child.started_at > STABLE_AFTER_SECONDS
        reason = child.reason()
        if stable:
            child.last_failure, child.identical_failures = None, 0
        elif child.last_failure == (code, reason):
            child.identical_failures += 1
        else:
            child.last_failure, child.identical_failures = (code, reason), 1
        if child.identical_failures >= MAX_IDENTICAL_START_FAILURES:
            self.say(
                f"{child.name} failed to start {child.identical_failures} times in a row with status {code} and "
                f"the same error; stopping instead of restarting it again. Its error: {reason}"
            )
            return 1
        delay = min(backoff_max, 0.5 * 2**child.failures)
        child.failures += 1
        child.restarts += 1
        child.proc = None
        child.healthy = False
        child.next_start = now + delay
        self.say(f"{child.name} exited with status {code}; restarting in {delay:.1f}s")
        return None

    def _supervise(self) -> int:
        while not self.stopping:
            now = time.monotonic()
            for child in self.children:
                if child.proc is None:
                    if now >= child.next_start:
                        child.start()
                        if child.restarts:
                            self.say(f"{child.name} restarted (attempt {child.restarts})")
                    continue
                code = child.proc.poll()
                if code is None:
                    if child.failures and now - child.started_at > STABLE_AFTER_SECONDS:
                        child.failures = 0
                    continue
                if self.stopping:
                    break
                give_up = self._on_exit(child, code, now)
                if give_up is not None:
                    return give_up
            if not self.ready and not self.stopping:
                self._check_ready()
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
            self.say("all processes stopped")
