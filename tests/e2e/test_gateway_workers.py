"""A gateway of several worker processes is one gateway: limits count across workers, revocation reaches all.

Which worker takes a connection is the kernel's choice. The tests make it theirs: a worker that is stopped
(SIGSTOP) accepts nothing, so every new connection goes to the other one.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from tests.e2e.harness import RunningSystem, new_system
from tests.support.accounts import CONSENT
from tests.support.redis import redis_server

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery staple 42"
LIMIT = 12


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSystem]:
    work = Path(tmp_path_factory.mktemp("workers"))
    with redis_server(work) as (redis_url, _):
        running = new_system(work)
        running.env |= {
            "GATEWAY_WORKERS": "2",
            "REDIS_URL": redis_url,
            # A tight limit on one route, so that the other requests of these tests are not counted in it.
            "GATEWAY_ROUTE_RATE_LIMITS": f"GET /api/v1/products={LIMIT}/hour",
            "GATEWAY_PUBLIC_CACHE_SECONDS": "0",
            "AUTH_PBKDF2_ROUNDS": "1000",  # a cost setting, lowered through the setting users have
        }
        running.start()
        try:
            yield running
        finally:
            assert running.stop() == 0


def workers(system: RunningSystem) -> list[psutil.Process]:
    found = [p for p in system.child("gateway").children() if "spawn_main" in " ".join(p.cmdline())]
    assert len(found) == 2, [p.cmdline() for p in found]
    return found


@contextmanager
def only(worker: psutil.Process, others: list[psutil.Process]) -> Iterator[None]:
    """Every new connection meanwhile is taken by ``worker``: the others are stopped."""
    stopped = [p for p in others if p.pid != worker.pid]
    for proc in stopped:
        proc.suspend()
    try:
        yield
    finally:
        for proc in stopped:
            proc.resume()


def get(url: str, **kwargs: object) -> httpx.Response:
    # A new connection each time (no keep-alive), so the kernel picks a worker for every request.
    with httpx.Client(headers={"Connection": "close"}, timeout=10) as client:
        return client.get(url, **kwargs)  # type: ignore[arg-type]


def test_a_limit_counts_across_workers(system: RunningSystem) -> None:
    first, second = workers(system)
    url = system.url() + "/api/v1/products"
    statuses = []
    with only(first, [first, second]):
        statuses += [get(url).status_code for _ in range(LIMIT // 2 + 2)]
    with only(second, [first, second]):
        statuses += [get(url).status_code for _ in range(LIMIT // 2 + 2)]
    assert statuses.count(200) == LIMIT, statuses
    assert statuses.count(429) == 4, statuses
    assert statuses[: LIMIT // 2 + 2].count(429) == 0, "the first worker alone never reached the limit"


def test_a_logout_through_one_worker_is_enforced_by_the_other(system: RunningSystem) -> None:
    first, second = workers(system)
    gateway = system.url()
    email = f"workers-{uuid.uuid4().hex[:10]}@boutique.cm"
    with httpx.Client(base_url=gateway, headers={"Connection": "close"}) as client:
        assert (
            client.post(
                "/api/v1/auth/register",
                json={"email": email, "password": PASSWORD} | CONSENT,
            ).status_code
            == 201
        )
        pair = client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD}).json()
    bearer = {"Authorization": f"Bearer {pair['access_token']}"}
    with only(second, [first, second]):
        assert get(gateway + "/api/v1/auth/me", headers=bearer).status_code == 200  # its token cache holds it
    with only(first, [first, second]):
        with httpx.Client(headers={"Connection": "close"}) as client:
            assert client.post(gateway + "/api/v1/auth/logout", json={}, headers=bearer).status_code == 204
        started = time.monotonic()
    with only(second, [first, second]):
        while get(gateway + "/api/v1/products", headers=bearer).status_code != 401:
            assert time.monotonic() - started < 5, "the second worker still accepts the token after 5 s"
            time.sleep(0.02)
        assert time.monotonic() - started <= 1.0 + 0.5, "revocation reached the second worker too late"
