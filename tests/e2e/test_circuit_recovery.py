"""The gateway's circuit breaker with real processes: inventory hangs until its circuit opens; while it is
half-open a client sends ``POST /api/v1/products`` and goes away mid-body; inventory resumes; the catalogue
must come back (it used to stay 503 for ever: the vanished client held the half-open slot)."""

from __future__ import annotations

import signal
import socket
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import new_system
from tests.support.accounts import CONSENT

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery staple 42"


def customer_token(gateway: str) -> str:
    email = f"breaker-{uuid.uuid4().hex[:8]}@boutique.cm"
    assert (
        httpx.post(
            gateway + "/api/v1/auth/register",
            json={"email": email, "password": PASSWORD} | CONSENT,
        ).status_code
        == 201
    )
    login = httpx.post(gateway + "/api/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert login.status_code == 200
    return str(login.json()["access_token"])


def post_and_vanish_mid_body(port: int, token: str) -> None:
    """Announce 1000 bytes of JSON, send 10, and close the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            (
                "POST /api/v1/products HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                '{"sku": "A'
            ).encode()
        )


def test_the_catalogue_recovers_after_a_client_vanished_mid_body_during_half_open(tmp_path: Path) -> None:
    system = new_system(tmp_path)
    system.env.update(
        {
            "AUTH_PBKDF2_ROUNDS": "1000",
            # The settings an operator would use, made short: 2 failures open it for 2 s; 1 s per request.
            "GATEWAY_CIRCUIT_FAILURE_THRESHOLD": "2",
            "GATEWAY_CIRCUIT_OPEN_SECONDS": "2",
            "GATEWAY_UPSTREAM_DEADLINE_SECONDS": "1",
            # Every catalogue read must reach inventory, not the gateway's short cache of public pages.
            "GATEWAY_PUBLIC_CACHE_SECONDS": "0",
        }
    )
    system.start()
    gateway = system.url()
    try:
        token = customer_token(gateway)
        assert httpx.get(gateway + "/api/v1/products").status_code == 200
        inventory = system.child("inventory")
        inventory.send_signal(signal.SIGSTOP)  # connections are accepted, nothing answers
        try:
            for _ in range(2):
                slow = httpx.get(gateway + "/api/v1/products", timeout=10)
                assert slow.status_code == 504  # the deadline, not the 15 s default, ends the wait
            refused = httpx.get(gateway + "/api/v1/products", timeout=10)
            assert refused.status_code == 503  # open: answered at once
            assert refused.elapsed.total_seconds() < 0.5
            wait = int(refused.headers["retry-after"])
            assert 1 <= wait <= 2
            time.sleep(wait)  # the pause the gateway announced: it is half-open now (Retry-After is rounded up)
            post_and_vanish_mid_body(system.ports["gateway"], token)
        finally:
            inventory.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 15
        while (status := httpx.get(gateway + "/api/v1/products", timeout=10).status_code) != 200:
            assert status == 503, status
            assert time.monotonic() < deadline, "the circuit never closed again"
            time.sleep(0.2)
        for _ in range(5):
            assert httpx.get(gateway + "/api/v1/products", timeout=10).status_code == 200
    finally:
        assert system.stop() == 0
