"""The supervisor of `comptoir run`: it says "ready" only once every process is healthy, and it gives up,
saying why, on a process that keeps failing to start the same way.

The children are real processes: small HTTP servers (tests/comptoir/fake_process.py) whose /healthz
answers 200 only once a file exists, or processes that refuse to start like a real one does.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from comptoir.config import PROCESSES, RunSettings
from comptoir.supervisor import MAX_IDENTICAL_START_FAILURES, Child, Supervisor, child_env, hold_data_dir
from tests.conftest import free_port

FAKE = Path(__file__).with_name("fake_process.py")


class Recorder:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.changed = threading.Condition()

    def __call__(self, line: str) -> None:
        with self.changed:
            self.lines.append(line)
            self.changed.notify_all()

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: any(text in line for line in self.lines), timeout), self.lines


def settings(tmp_path: Path) -> RunSettings:
    ports = {f"{process}_port": free_port() for process in PROCESSES}
    return RunSettings(data_dir=tmp_path, restart_backoff_max_seconds=0.5, **ports)  # type: ignore[arg-type]


@pytest.fixture
def running() -> Iterator[list[Supervisor]]:
    supervisors: list[Supervisor] = []
    yield supervisors
    for supervisor in supervisors:
        supervisor.stopping = True
        supervisor._stop_children()


def start(supervisor: Supervisor) -> threading.Thread:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(supervisor._supervise()), daemon=True)
    thread.result = result  # type: ignore[attr-defined]
    thread.start()
    return thread


def test_ready_is_announced_only_once_every_process_is_healthy(tmp_path: Path, running: list[Supervisor]) -> None:
    s = settings(tmp_path)
    out = Recorder()
    supervisor = Supervisor(s, out=out)
    running.append(supervisor)
    late = tmp_path / "audit-may-answer"
    supervisor.children = [
        Child(
            name=process,
            argv=[
                sys.executable,
                str(FAKE),
                "serve",
                str(s.port_of(process)),
                *([str(late)] if process == "audit" else []),
            ],
            env=dict(os.environ),
        )
        for process in PROCESSES
    ]
    thread = start(supervisor)
    # Four processes answer; audit listens but is not healthy yet.
    for process in PROCESSES:
        url = f"http://127.0.0.1:{s.port_of(process)}/healthz"
        deadline = time.monotonic() + 30
        while True:
            try:
                status = httpx.get(url, timeout=1).status_code
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, process
                time.sleep(0.05)
        assert status == (503 if process == "audit" else 200), process
    # The supervisor has polled at least once after that (the audit child was asked and said no).
    out_before = list(out.lines)
    assert not any(line.startswith("ready") for line in out_before), out_before
    assert not supervisor.ready
    late.write_text("ok")
    out.wait_for("ready: ")
    ready_line = next(line for line in out.lines if line.startswith("ready: "))
    assert f"http://127.0.0.1:{s.gateway_port}/api/v1/" in ready_line
    # The addresses come with the banner, not before.
    assert all(f"http://127.0.0.1:{s.port_of(p)}" in "\n".join(out.lines) for p in PROCESSES)
    assert out.lines.index(ready_line) == len(out.lines) - 1
    supervisor.stopping = True
    thread.join(30)
    assert not thread.is_alive()


def test_identical_start_failures_stop_the_supervisor_with_the_reason(
    tmp_path: Path, running: list[Supervisor]
) -> None:
    s = settings(tmp_path)
    out = Recorder()
    supervisor = Supervisor(s, out=out)
    running.append(supervisor)
    supervisor.children = [
        Child(name="gateway", argv=[sys.executable, str(FAKE), "serve", str(s.gateway_port)], env=dict(os.environ)),
        Child(name="auth", argv=[sys.executable, str(FAKE), "refuse", "CMP-W010"], env=dict(os.environ)),
    ]
    thread = start(supervisor)
    thread.join(60)
    assert not thread.is_alive(), out.lines
    assert thread.result == [1]  # type: ignore[attr-defined]
    restarts = [line for line in out.lines if line.startswith("auth exited with status 2")]
    assert len(restarts) == MAX_IDENTICAL_START_FAILURES - 1
    verdict = out.lines[-1]
    assert verdict.startswith(f"auth failed to start {MAX_IDENTICAL_START_FAILURES} times in a row")
    assert "CMP-W010" in verdict
    assert "TLS_TERMINATING_PROXY" in verdict
    assert not any(line.startswith("ready") for line in out.lines)


def test_a_process_whose_start_up_fails_is_stopped_with_its_error_not_no_error_output(
    tmp_path: Path, running: list[Supervisor]
) -> None:
    """A real process whose lifespan fails (here: no database URL): uvicorn logs that only as JSON on
    stdout, yet the supervisor's verdict names the error."""
    s = settings(tmp_path)
    out = Recorder()
    supervisor = Supervisor(s, out=out)
    running.append(supervisor)
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env |= {"DATA_DIR": str(tmp_path / "data"), "ENVIRONMENT": "development"}
    argv = [sys.executable, "-m", "comptoir.serve", "audit", "--port", str(s.audit_port)]
    supervisor.children = [Child(name="audit", argv=argv, env=env)]
    thread = start(supervisor)
    thread.join(120)
    assert not thread.is_alive(), out.lines
    assert thread.result == [1]  # type: ignore[attr-defined]
    verdict = out.lines[-1]
    assert verdict.startswith(f"audit failed to start {MAX_IDENTICAL_START_FAILURES} times in a row"), verdict
    assert verdict.endswith(
        "Its error: comptoir audit: could not start: ValueError: no database URL configured for comptoir-audit"
    ), verdict


def test_different_failures_keep_restarting(tmp_path: Path, running: list[Supervisor]) -> None:
    """A crash that changes (here: a counter in the message) is not a configuration the operator must fix."""
    s = settings(tmp_path)
    out = Recorder()
    supervisor = Supervisor(s, out=out)
    running.append(supervisor)
    counter = tmp_path / "counter"
    supervisor.children = [
        Child(name="orders", argv=[sys.executable, str(FAKE), "crash", str(counter)], env=dict(os.environ)),
    ]
    thread = start(supervisor)
    out.wait_for(f"restarted (attempt {MAX_IDENTICAL_START_FAILURES + 1})")
    assert not any("failed to start" in line for line in out.lines)
    supervisor.stopping = True
    thread.join(30)


def test_comptoir_run_in_production_from_the_env_example_stops_and_names_the_checks(tmp_path: Path) -> None:
    """The issue's case: .env says production on a checkout; `comptoir run` must stop, saying why."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env |= {"ENVIRONMENT": "production", "DATA_DIR": str(tmp_path / "data"), "RESTART_BACKOFF_MAX_SECONDS": "0.5"}
    env |= {f"{process.upper()}_PORT": str(free_port()) for process in PROCESSES}
    result = subprocess.run(
        [sys.executable, "-m", "comptoir.cli", "run"], env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    verdict = result.stdout.strip().splitlines()
    line = next((item for item in verdict if "times in a row" in item), result.stdout + result.stderr[-3000:])
    assert "refusing to start" in line
    assert "CMP-W010" in line
    assert "Traceback" not in result.stderr


def comptoir_run(data_dir: Path, ports: dict[str, int], **settings: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("DATABASE_URL")}
    env |= {"DATA_DIR": str(data_dir)} | {f"{process.upper()}_PORT": str(port) for process, port in ports.items()}
    env |= settings
    return subprocess.run(
        [sys.executable, "-m", "comptoir.cli", "run"], env=env, capture_output=True, text=True, timeout=60
    )


def test_a_second_run_on_a_data_dir_in_use_is_refused_before_it_touches_anything(tmp_path: Path) -> None:
    """The DATA_DIR lock of a run (held here, as a first `comptoir run` holds it): a second run used to join
    the first one's database, start children that failed on its ports, and then stop its PostgreSQL."""
    data = tmp_path / "data"
    data.mkdir()
    lock = hold_data_dir(data)
    assert not isinstance(lock, str)
    with lock:
        result = comptoir_run(data, {process: free_port() for process in PROCESSES})
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stdout.strip().splitlines()
    assert f"{data} (DATA_DIR) is in use by another `comptoir run` (pid {os.getpid()})" in line
    assert not (data / "pg").exists()
    assert "Traceback" not in result.stderr


def test_a_run_whose_port_another_program_holds_is_refused_naming_the_setting(tmp_path: Path) -> None:
    """Another program on the gateway's port used to answer the supervisor's /healthz, so "ready" was printed
    while every child failed to bind; and the lock is let go when a run ends, so the next one may start."""
    ports = {process: free_port() for process in PROCESSES}
    with socket.create_server(("127.0.0.1", ports["gateway"])):
        result = comptoir_run(tmp_path / "data", ports)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stdout.strip().splitlines()
    assert f"cannot listen on 127.0.0.1 (BIND_HOST): {ports['gateway']} (GATEWAY_PORT): in use by another" in line
    assert "ready" not in result.stdout
    assert not (tmp_path / "data" / "pg").exists()
    assert not isinstance(hold_data_dir(tmp_path / "data"), str)


def test_a_bind_host_that_is_not_this_machines_is_refused_naming_it(tmp_path: Path) -> None:
    """192.0.2.1 (documentation range) is no address of this machine: one line naming BIND_HOST and each
    port, not a bare "Cannot assign requested address"."""
    ports = {process: free_port() for process in PROCESSES}
    result = comptoir_run(tmp_path / "data", ports, BIND_HOST="192.0.2.1")
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stdout.strip().splitlines()
    assert "cannot listen on 192.0.2.1 (BIND_HOST)" in line
    assert f"{ports['auth']} (AUTH_PORT)" in line
    assert not (tmp_path / "data" / "pg").exists()


def test_the_operators_client_secrets_win_over_generated_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`comptoir check --deploy` judges the secrets the environment and .env set: `comptoir run` must start the
    processes with those, not with the ones it generated under DATA_DIR/secrets."""
    for name in list(os.environ):
        if name.endswith("_CLIENT_SECRET") or name == "AUTH_SERVICE_CLIENTS":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    settings = RunSettings(data_dir=tmp_path / "data")
    generated = child_env(settings, [])
    (tmp_path / ".env").write_text("ORDERS_CLIENT_SECRET=the-operators-orders-secret-from-dotenv\n")
    monkeypatch.setenv("AUDIT_CLIENT_SECRET", "the-operators-own-audit-secret")
    mixed = child_env(settings, [])
    assert mixed["ORDERS_CLIENT_SECRET"] == "the-operators-orders-secret-from-dotenv"  # `comptoir secrets >> .env`
    assert mixed["AUDIT_CLIENT_SECRET"] == "the-operators-own-audit-secret"
    assert mixed["GATEWAY_CLIENT_SECRET"] == generated["GATEWAY_CLIENT_SECRET"]  # not set: the generated one
    digests = json.loads(mixed["AUTH_SERVICE_CLIENTS"])  # auth checks the secrets really in use
    assert digests["orders"] == hashlib.sha256(b"the-operators-orders-secret-from-dotenv").hexdigest()
    assert digests["gateway"] == hashlib.sha256(generated["GATEWAY_CLIENT_SECRET"].encode()).hexdigest()
    # The operator's digests are used when they match the secrets in use...
    monkeypatch.setenv("AUTH_SERVICE_CLIENTS", mixed["AUTH_SERVICE_CLIENTS"])
    assert child_env(settings, [])["AUTH_SERVICE_CLIENTS"] == mixed["AUTH_SERVICE_CLIENTS"]
    # ...and refused when they do not: a service would silently get no service tokens.
    monkeypatch.setenv("AUTH_SERVICE_CLIENTS", '{"orders": "ab"}')
    lines: list[str] = []
    assert Supervisor(settings, out=lines.append).run() == 2
    assert lines[-1].startswith("AUTH_SERVICE_CLIENTS does not hold the digest of the client secret gateway, auth")


def test_the_ready_lines_say_what_is_true_of_these_settings(tmp_path: Path) -> None:
    lines: list[str] = []
    Supervisor(RunSettings(data_dir=tmp_path), out=lines.append)._print_summary()
    assert any("messages.jsonl" in line for line in lines)
    assert lines[-1].endswith(":8000/api/v1/")
    lines.clear()
    production = RunSettings(
        data_dir=tmp_path, message_sender="webhook", allowed_hosts=".shop.example, api.shop.example"
    )
    Supervisor(production, out=lines.append)._print_summary()
    assert not any("messages.jsonl" in line for line in lines)  # the messages go to the webhook
    assert lines[-1].endswith("/api/v1/ (with Host: api.shop.example, as ALLOWED_HOSTS says)")  # else 400 Unknown Host
    lines.clear()
    Supervisor(RunSettings(data_dir=tmp_path, allowed_hosts=".shop.example"), out=lines.append)._print_summary()
    assert lines[-1].endswith("(with Host: a name ending in .shop.example, as ALLOWED_HOSTS says)")
