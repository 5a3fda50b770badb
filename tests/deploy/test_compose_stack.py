"""The compose stack without Docker: the five processes started as plain processes from exactly the
command lines and environments docker-compose.yml gives them (rendered with the production example),
against a real PostgreSQL that speaks TLS (sslmode=verify-full, certificate made here) and a real Redis,
then a shop flow through the gateway.

What is mapped, and only that: compose's host names (postgres, redis, auth ...) to 127.0.0.1 and their
fixed ports to free ones, each container's /data volume and CA mount to temporary paths, and the
gateway's fixed address on the backend network, 172.30.0.10 (as the services see it), to loopback.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest

from tests.conftest import free_port
from tests.deploy.compose_render import render, service_environment
from tests.deploy.test_compose import APP_SERVICES, COMPOSE_FILE, PORTS, production_dotenv
from tests.support.accounts import CONSENT
from tests.support.redis import redis_server
from tests.support.tls_postgres import Postgres, tls_postgres

pytestmark = pytest.mark.e2e

ADMIN_EMAIL = "owner@shop.example.com"
ADMIN_PASSWORD = "Correct-Horse-Battery-Staple-9"  # noqa: S105 - a test account's password
CONTAINER_CA = "/etc/comptoir/postgres-ca/ca.crt"


@pytest.fixture(scope="module")
def dotenv() -> dict[str, str]:
    return production_dotenv() | {"BOOTSTRAP_ADMIN_EMAIL": ADMIN_EMAIL, "BOOTSTRAP_ADMIN_PASSWORD": ADMIN_PASSWORD}


@pytest.fixture(scope="module")
def postgres(dotenv: dict[str, str]) -> Iterator[Postgres]:
    """PostgreSQL as the compose file configures it: superuser postgres, database comptoir, TLS on."""
    with tls_postgres("postgres", dotenv["POSTGRES_PASSWORD"], "comptoir") as server:
        yield server


@dataclass
class Stack:
    gateway: str
    host: str
    procs: dict[str, subprocess.Popen[bytes]]
    logs: dict[str, Path]
    rendered: dict[str, Any]
    environment: Callable[[str], dict[str, str]]
    work: Path


def localise(value: str, ports: dict[str, int]) -> str:
    """Compose's service addresses -> loopback with this test's ports."""
    for name, (default, port) in ports.items():
        value = re.sub(rf"(?<=[@/]){name}:{default}(?=[/?]|$)", f"127.0.0.1:{port}", value)
    return value


@pytest.fixture(scope="module")
def stack(dotenv: dict[str, str], postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("compose-stack")
    rendered = render(COMPOSE_FILE, dotenv)["services"]
    with redis_server(work) as (redis_url, _):
        redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        ports = {name: free_port() for name in APP_SERVICES}
        mapping = {name: (PORTS[name], ports[name]) for name in APP_SERVICES}
        mapping |= {"postgres": (5432, postgres.port), "redis": (6379, redis_port)}

        def environment(service: str) -> dict[str, str]:
            env = {k: localise(v, mapping) for k, v in service_environment(rendered[service]).items()}
            assert env["ENVIRONMENT"] == "production"
            env["DATA_DIR"] = str(work / service)  # the container's /data volume
            if env.get("PGSSLROOTCERT") == CONTAINER_CA:
                env["PGSSLROOTCERT"] = str(postgres.ca)  # the CA mount
            for key, value in env.items():
                if key.endswith("_GATEWAY_NETWORKS") and value == "172.30.0.10/32":
                    env[key] = "127.0.0.1/32"  # the backend network, where the gateway's connections come from
                if key == "TRUSTED_PROXIES" and value == "172.31.0.1/32":
                    env[key] = "127.0.0.1/32"  # the TLS-terminating proxy on the host, played by this test
                if value.startswith("/audit-data/"):
                    env[key] = str(work / "audit") + value.removeprefix("/audit-data")  # audit's volume, mounted
            if service == "audit":
                env["AUDIT_CHECKPOINT_INTERVAL_SECONDS"] = "1"  # a signed checkpoint soon, for the deploy check
            return env | {"PATH": os.environ.get("PATH", ""), "HOME": str(work)}

        migrate = rendered["migrate"]["command"]
        assert migrate == ["comptoir", "migrate"]
        done = subprocess.run(
            [str(Path(sys.executable).with_name("comptoir")), *migrate[1:]],
            env=environment("migrate"),
            cwd=work,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        procs: dict[str, subprocess.Popen[bytes]] = {}
        logs: dict[str, Path] = {}
        try:
            for name in ["auth", "inventory", "orders", "audit", "gateway"]:
                command = list(rendered[name]["command"])
                assert command[:3] == ["python", "-m", "comptoir.serve"]
                command[0] = sys.executable
                command[command.index("--host") + 1] = "127.0.0.1"
                command[command.index("--port") + 1] = str(ports[name])
                logs[name] = work / f"{name}.log"
                with logs[name].open("wb") as log:
                    procs[name] = subprocess.Popen(
                        command, env=environment(name), cwd=work, stdout=log, stderr=subprocess.STDOUT
                    )
            for name in APP_SERVICES:
                wait_healthy(f"http://127.0.0.1:{ports[name]}", procs[name], logs[name])
            host = dotenv["ALLOWED_HOSTS"].split(",")[0]
            yield Stack(f"http://127.0.0.1:{ports['gateway']}", host, procs, logs, rendered, environment, work)
        finally:
            for proc in procs.values():
                proc.terminate()
            for proc in procs.values():
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} not ready\n" + log.read_text(errors="replace")[-3000:]
        time.sleep(0.2)


def test_the_rendered_stack_serves_a_shop_over_tls_to_postgres(stack: Stack) -> None:
    # As the TLS-terminating proxy sends them: a request it did not receive over HTTPS is not served.
    plain = httpx.get(stack.gateway + "/api/v1/products?limit=1", headers={"Host": stack.host}, timeout=30)
    assert (plain.status_code, plain.headers["location"]) == (308, f"https://{stack.host}/api/v1/products?limit=1")
    login = {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
    refused = httpx.post(stack.gateway + "/api/v1/auth/login", json=login, headers={"Host": stack.host}, timeout=30)
    assert refused.status_code == 403, refused.text
    assert refused.json()["type"] == "urn:comptoir:problem:https-required"
    headers = {"Host": stack.host, "X-Forwarded-Proto": "https"}
    with httpx.Client(base_url=stack.gateway, headers=headers, timeout=30) as client:
        health = client.get("/api/v1/health")
        assert health.status_code == 200, health.text
        assert health.headers["strict-transport-security"].startswith("max-age=31536000")

        # Production requires a second factor for admins: the first login enrols the authenticator app.
        challenge = client.post("/api/v1/auth/login", json={"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})
        assert challenge.status_code == 401, challenge.text
        assert challenge.json()["type"].endswith("mfa-required"), challenge.text
        secret = challenge.json()["enrolment"]["secret"]
        login = client.post(
            "/api/v1/auth/login/mfa",
            json={"mfa_token": challenge.json()["mfa_token"], "code": pyotp.TOTP(secret).now()},
        )
        assert login.status_code == 200, login.text
        admin = {"Authorization": f"Bearer {login.json()['access_token']}"}
        sku = f"SAVON-{uuid.uuid4().hex[:6]}"
        product = client.post(
            "/api/v1/products",
            json={"sku": sku, "name": "Savon de Marseille", "price_xaf": 750, "initial_stock": 5},
            headers=admin,
        )
        assert product.status_code == 201, product.text

        email = f"awa-{uuid.uuid4().hex[:6]}@boutique.cm"
        password = "correct horse battery staple"
        assert (
            client.post(
                "/api/v1/auth/register",
                json={"email": email, "password": password} | CONSENT,
            ).status_code
            == 201
        )
        customer = client.post("/api/v1/auth/login", json={"email": email, "password": password})
        assert customer.status_code == 200, customer.text
        buyer = {"Authorization": f"Bearer {customer.json()['access_token']}"}
        order = client.post(
            "/api/v1/orders",
            json={"items": [{"product_id": product.json()["id"], "quantity": 2}]},
            headers=buyer | {"Idempotency-Key": str(uuid.uuid4())},
        )
        assert order.status_code == 201, order.text
        assert order.json()["total_xaf"] == 1500

        # Every process reached its own database role over TLS: the audit trail holds the order's event.
        deadline = time.monotonic() + 30
        while True:
            events = client.get("/api/v1/audit/events?action=orders.order.created", headers=admin)
            assert events.status_code == 200, events.text
            if events.json()["items"]:
                break
            assert time.monotonic() < deadline, "the order's audit event never arrived"
            time.sleep(0.2)
        verify = client.get("/api/v1/audit/verify", headers=admin)
        assert verify.json()["ok"] is True


def test_the_check_tool_passes_the_deploy_check_against_the_rendered_stack(stack: Stack) -> None:
    """`docker compose run --rm check` as the operations guide says: every check of every process, and the
    database checks as the superuser over TLS, pass on a stack set up from the production example (run in
    one application container instead, the others' secrets are missing and it fails)."""
    command = stack.rendered["check"]["command"]
    assert command == ["comptoir", "check", "--deploy"]

    def run_check(container: str) -> tuple[int, list[dict[str, Any]]]:
        done = subprocess.run(
            [str(Path(sys.executable).with_name("comptoir")), *command[1:], "--json"],
            env=stack.environment(container),
            cwd=stack.work,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return done.returncode, json.loads(done.stdout)["checks"]

    # A signed checkpoint exists (audit signs the head every second here): the check must verify it with
    # audit's own key and log, read from audit's volume, not call it "signed by a key not trusted here".
    log = stack.work / "audit" / "audit" / "checkpoints.jsonl"
    deadline = time.monotonic() + 60
    while not (log.exists() and log.read_text().strip()):
        assert time.monotonic() < deadline, "audit signed no checkpoint"
        time.sleep(0.2)
    status, checks = run_check("check")
    assert {item["id"] for item in checks} >= {"CMP-W002", "CMP-W024", "CMP-D001", "CMP-D003", "CMP-D007"}
    (chain,) = [item for item in checks if item["id"] == "CMP-D004"]
    assert chain["status"] == "PASS"
    assert "not trusted" not in json.dumps(chain)
    assert [item["id"] for item in checks if item["status"] == "FAIL"] == []
    assert status == 0
    status, checks = run_check("auth")
    assert status == 1
    assert "CMP-W002" in [item["id"] for item in checks if item["status"] == "FAIL"]
