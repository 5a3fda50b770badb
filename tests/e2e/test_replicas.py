"""Two gateway replicas with REDIS_URL share rate limits and both refuse revoked sessions within 1 s."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.e2e.harness import new_system
from tests.support.accounts import CONSENT
from tests.support.redis import redis_server

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery staple 42"


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "second gateway exited"
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_two_gateways_share_limits_and_revocations(tmp_path: Path) -> None:
    with redis_server(tmp_path) as (redis_url, _):
        system = new_system(tmp_path)
        system.env |= {
            "REDIS_URL": redis_url,
            "GATEWAY_REPLICAS": "2",
            "AUTH_PBKDF2_ROUNDS": "1000",
            "GATEWAY_ANONYMOUS_RATE_LIMIT": "6/hour",
        }
        system.start()
        second = None
        try:
            # The second replica gets exactly the environment the supervisor gave the first one.
            env = system.child("gateway").environ()
            port = free_port()
            second = subprocess.Popen(
                [sys.executable, "-m", "comptoir.serve", "gateway", "--port", str(port)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            one, two = system.url(), f"http://127.0.0.1:{port}"
            wait_healthy(two, second)

            email = f"replica-{uuid.uuid4().hex[:8]}@boutique.cm"
            assert (
                httpx.post(
                    one + "/api/v1/auth/register",
                    json={"email": email, "password": PASSWORD} | CONSENT,
                ).status_code
                == 201
            )
            pair = httpx.post(
                two + "/api/v1/auth/login",
                json={"email": email, "password": PASSWORD},
            ).json()
            token_headers = {"Authorization": f"Bearer {pair['access_token']}"}

            # Two anonymous requests spent, one on each replica: four remain of the shared six.
            codes = [httpx.get(url + "/api/v1/products").status_code for url in (one, two) * 4]
            assert codes == [200] * 4 + [429] * 4

            for url in (one, two):
                assert httpx.get(url + "/api/v1/auth/me", headers=token_headers).status_code == 200
            assert httpx.post(one + "/api/v1/auth/logout", json={}, headers=token_headers).status_code == 204
            started = time.monotonic()
            refused = {one: None, two: None}
            while None in refused.values():
                for url in (one, two):
                    if (
                        refused[url] is None
                        and httpx.get(url + "/api/v1/products", headers=token_headers).status_code == 401
                    ):
                        refused[url] = time.monotonic() - started
                assert time.monotonic() - started < 5
                time.sleep(0.02)
            assert max(refused.values()) <= 1.0, refused
        finally:
            if second is not None:
                second.terminate()
                second.wait(15)
            assert system.stop() == 0
