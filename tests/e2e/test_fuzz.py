"""Schemathesis against the gateway's aggregated OpenAPI, real services behind it, as a customer and as an admin.

Bounded here (FUZZ_MAX_EXAMPLES, default 10 per operation); `make fuzz` runs it long. Operations that end
the fuzzer's own session (logout, password change, session delete, erasure) are left out of the run:
each has its own tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import new_system

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery staple 42"
ADMIN_EMAIL = "owner@boutique.cm"
ADMIN_PASSWORD = "purple gorilla mango tractor 77"
CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance,negative_data_rejection,ignored_auth"
SESSION_ENDING = r"/logout|/me/password|/sessions/|/password-reset/confirm|/admin/users/"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    running = new_system(Path(tmp_path_factory.mktemp("fuzz")))
    running.env |= {
        "AUTH_PBKDF2_ROUNDS": "1000",
        "GATEWAY_ANONYMOUS_RATE_LIMIT": "1000000/hour",
        "GATEWAY_AUTHENTICATED_RATE_LIMIT": "1000000/hour",
        "GATEWAY_ROUTE_RATE_LIMITS": "",
        "LOG_LEVEL": "WARNING",
        "BOOTSTRAP_ADMIN_EMAIL": ADMIN_EMAIL,
        "BOOTSTRAP_ADMIN_PASSWORD": ADMIN_PASSWORD,
    }
    running.start()
    try:
        yield running
    finally:
        assert running.stop() == 0


def login(gateway: str, email: str, password: str) -> str:
    response = httpx.post(gateway + "/api/v1/auth/login", json={"email": email, "password": password})
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def fuzz(gateway: str, token: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    examples = os.environ.get("FUZZ_MAX_EXAMPLES", "10")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{gateway}/api/v1/openapi.json",
            "--url",
            gateway,
            "-H",
            f"Authorization: Bearer {token}",
            "--checks",
            CHECKS,
            "--max-examples",
            examples,
            "--request-timeout",
            "15",
            "--generation-deterministic",
            "--exclude-path-regex",
            SESSION_ENDING,
            "--exclude-method",
            "DELETE",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=tmp_path,
    )


@pytest.mark.parametrize("who", ["customer", "admin"])
def test_no_schema_violation_and_no_server_error(system, who: str, tmp_path: Path) -> None:  # noqa: ANN001
    gateway = system.url()
    if who == "customer":
        email = f"fuzz-{uuid.uuid4().hex[:8]}@boutique.cm"
        assert (
            httpx.post(
                gateway + "/api/v1/auth/register",
                json={"email": email, "password": PASSWORD, "accept_terms": True, "terms_version": "2026-12-01"},
            ).status_code
            == 201
        )
        token = login(gateway, email, PASSWORD)
    else:
        token = login(gateway, ADMIN_EMAIL, ADMIN_PASSWORD)
    result = fuzz(gateway, token, tmp_path)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    assert "generated" in result.stdout
    assert httpx.get(gateway + "/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200, (
        "the fuzzer's session ended during the run: the results above are not meaningful"
    )
    assert system.ledger_breaks() == []  # whatever the fuzzer bought, adjusted or cancelled
