"""Schemathesis against the gateway's public OpenAPI document, real services behind it, as customer, staff and admin.

Every check is on (`--checks all`: no server error; status codes, response schemas, headers and content
types as documented; schema-invalid data refused and schema-valid data accepted; unsupported methods
get 405 with `Allow`; missing auth and required headers refused; ...). Each role fuzzes every operation
as itself, and runs the coverage phase (boundary values, every unsupported method, missing parameters)
on the operations it is allowed to use, so that each operation's coverage runs once, as a caller who
gets past authorisation. Bounded here (FUZZ_MAX_EXAMPLES, default 3 per operation); `make fuzz` runs
every phase, the stateful one too, on every operation for every role, long.

Operations that end the fuzzer's own session (logout, password change, session delete, erasure, reset,
role changes) are left out: each has its own tests. The rate limits are raised through their settings,
so that the fuzzer's own volume is not what it measures, and so is the throttle on one IP's failed logins
(every role's login comes from the fuzzer's address).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import RunningSystem, new_system
from tests.support.accounts import CONSENT

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery staple 42"
ADMIN_EMAIL = "owner@boutique.cm"
ADMIN_PASSWORD = "purple gorilla mango tractor 77"
SESSION_ENDING = r"/logout|/me/password|/sessions/|/password-reset/confirm|/admin/users/"
LONG = os.environ.get("FUZZ_LONG") == "1"

_CURSOR_PATHS = ("products", "products/[^/]+/stock-movements", "orders", "audit/(events|checkpoints|alerts)")
CURSOR_LISTS = "^GET /api/v1/(" + "|".join((*_CURSOR_PATHS, "auth/admin/users")) + ")$"
# The reads that answer If-None-Match (besides the lists above); backslashes doubled for TOML.
CONDITIONAL_READS = r"^GET /api/v1/products/\\{product_id\\}(/stock|/images/\\{image_id\\})?$"

# Where a schema-valid request may still be refused, because the rule cannot be written in JSON Schema;
# everywhere else a schema-valid request must be accepted (2xx, or 401/403/404/409/429 by default).
POSITIVE_EXCEPTIONS = """
# An opaque cursor is one the server made: any other string of the right alphabet is a 400. A list whose
# If-None-Match names its current ETag (or is `*`) is a 304, as documented.
[[operations]]
include-name-regex = "CURSOR_LISTS"
checks.positive_data_acceptance.expected-statuses = ["2xx", "304", "400", "401", "403", "404", "409", "429"]

# A conditional read whose If-None-Match names the current ETag (or is `*`) is a 304, as documented.
[[operations]]
include-name-regex = "CONDITIONAL_READS"
checks.positive_data_acceptance.expected-statuses = ["2xx", "304", "400", "401", "403", "404", "409", "429"]

# A phone number must be a real one (libphonenumber), a new password must pass the policy (not a common or
# repetitive password, not the e-mail's name), the account must have a phone before a code is sent to it.
[[operations]]
include-name-regex = "^(POST /api/v1/auth/register|PATCH /api/v1/auth/me|POST /api/v1/auth/otp/request)$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"]

# A wrong code is a 400 (API.md).
[[operations]]
include-name = "POST /api/v1/auth/otp/verify"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]

# A wrong code from the authenticator app, or a wrong password, is a 400 (like a wrong OTP code).
[[operations]]
include-name-regex = "^POST /api/v1/auth/mfa/(totp/confirm|totp/disable|recovery-codes)$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429"]

# Only the terms version in force (AUTH_TERMS_VERSION, a setting) can be accepted: any other is a 422.
[[operations]]
include-name = "PATCH /api/v1/auth/me/consent"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"]

# Products that do not exist are a 422 (API.md); the bytes must decode as a JPEG, PNG or WebP image.
[[operations]]
include-name-regex = "^(POST /api/v1/orders|POST /api/v1/products/\\\\{product_id\\\\}/images)$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "415", "422", "429"]
"""


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    running = new_system(Path(tmp_path_factory.mktemp("fuzz")))
    running.env |= {
        "AUTH_PBKDF2_ROUNDS": "1000",
        "GATEWAY_ANONYMOUS_RATE_LIMIT": "1000000/hour",
        "GATEWAY_AUTHENTICATED_RATE_LIMIT": "1000000/hour",
        "GATEWAY_ROUTE_RATE_LIMITS": "",
        # The fuzzer's wrong logins all come from 127.0.0.1, as the next role's own login does.
        "AUTH_LOGIN_IP_DELAY_AFTER_FAILURES": "10000",
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


def user_token(system: RunningSystem, role: str) -> str:
    gateway = system.url()
    if role == "admin":
        return login(gateway, ADMIN_EMAIL, ADMIN_PASSWORD)
    email = f"fuzz-{role}-{uuid.uuid4().hex[:8]}@boutique.cm"
    created = httpx.post(
        gateway + "/api/v1/auth/register",
        json={"email": email, "password": PASSWORD} | CONSENT,
    )
    assert created.status_code == 201, created.text
    if role == "staff":
        admin = {"Authorization": f"Bearer {login(gateway, ADMIN_EMAIL, ADMIN_PASSWORD)}"}
        promoted = httpx.patch(
            f"{gateway}/api/v1/auth/admin/users/{created.json()['id']}", json={"role": "staff"}, headers=admin
        )
        assert promoted.status_code == 200, promoted.text
    return login(gateway, email, PASSWORD)


# The operations whose coverage phase each role runs (customer: its own account and orders).
COVERAGE = {
    "customer": r"^/api/v1/(health|orders.*|auth/(?!admin/).*)$",
    "staff": r"^/api/v1/products.*$",
    "admin": r"^/api/v1/(audit/.*|auth/admin/.*)$",
}


def fuzz(
    gateway: str, token: str, tmp_path: Path, phases: str, only: str | None = None
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        POSITIVE_EXCEPTIONS.replace("CURSOR_LISTS", CURSOR_LISTS).replace("CONDITIONAL_READS", CONDITIONAL_READS),
        encoding="utf-8",
    )
    examples = os.environ.get("FUZZ_MAX_EXAMPLES", "3")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "--config-file",
            str(config),
            "run",
            f"{gateway}/api/v1/openapi.json",
            "--url",
            gateway,
            "-H",
            f"Authorization: Bearer {token}",
            "--checks",
            "all",
            "--phases",
            phases,
            "--max-examples",
            examples,
            # One worker: with several threads, Hypothesis' lambda descriptions (ast.parse) can trip
            # CPython 3.11's "AST constructor recursion depth mismatch" inside the fuzzer itself.
            "--workers",
            "1",
            "--request-timeout",
            "15",
            "--generation-deterministic",
            "--exclude-path-regex",
            SESSION_ENDING,
            "--exclude-name",
            "DELETE /api/v1/auth/me",
            "--no-color",
            *(["--include-path-regex", only] if only else []),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=tmp_path,
    )


@pytest.mark.parametrize("role", ["customer", "staff", "admin"])
def test_every_check_passes(system: RunningSystem, role: str, tmp_path: Path) -> None:
    gateway = system.url()
    token = user_token(system, role)
    if LONG:
        runs = [("examples,coverage,fuzzing,stateful", None)]
    else:
        runs = [("fuzzing", None), ("coverage", COVERAGE[role])]
    for index, (phases, only) in enumerate(runs):
        workdir = tmp_path / str(index)
        workdir.mkdir()
        result = fuzz(gateway, token, workdir, phases, only)
        report = result.stdout[-8000:] + result.stderr[-2000:]
        assert result.returncode == 0, report
        tested = re.search(r"Tested: (\d+)", result.stdout)
        assert tested is not None, report
        assert int(tested.group(1)) >= (30 if only is None else 5), report  # none silently filtered out
    assert httpx.get(gateway + "/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"}).status_code == 200, (
        "the fuzzer's session ended during the run: the results above are not meaningful"
    )
    assert system.ledger_breaks() == []  # whatever the fuzzer bought, adjusted or cancelled


def test_every_get_answers_head_with_its_head_and_no_body(system: RunningSystem) -> None:
    """HEAD is what the 405s' Allow headers promise on every GET path: through the gateway and each real
    service behind it, the same status and headers as the GET, and no body; a path without GET is a 405."""
    gateway = system.url()
    customer = {"Authorization": f"Bearer {user_token(system, 'customer')}"}
    for path, headers in [
        ("/api/v1/products", {}),
        ("/api/v1/auth/me", customer),
        ("/api/v1/orders", customer),
        ("/api/v1/audit/events", customer),  # not an admin: the same 403 either way
        ("/api/v1/orders", {}),  # the same 401 either way
    ]:
        got = httpx.get(gateway + path, headers=headers)
        head = httpx.head(gateway + path, headers=headers)
        assert head.status_code == got.status_code, (path, head.status_code, got.status_code)
        assert head.content == b""
        assert head.headers["content-type"] == got.headers["content-type"]
        assert head.headers["content-length"] == str(len(got.content)), path
    refused = httpx.head(gateway + "/api/v1/auth/login")
    assert (refused.status_code, refused.headers["allow"]) == (405, "POST")
    options = httpx.options(gateway + "/api/v1/orders")
    assert (options.status_code, options.headers["allow"]) == (405, "GET, HEAD, POST")
