"""With REDIS_URL, gateway replicas share their limits; what happens when Redis is gone is a setting."""

from __future__ import annotations

from pathlib import Path

import httpx

from gateway.health import FRESH_SECONDS, HealthCache
from tests.conftest import assert_problem
from tests.gateway.conftest import running_gateway
from tests.support.redis import redis_server

PUBLIC = "/api/v1/products"
LOGIN = "/api/v1/auth/login"


def test_two_gateways_share_one_limit(tmp_path: Path, echo, issuer) -> None:  # noqa: ANN001
    with (
        redis_server(tmp_path) as (redis_url, _),
        running_gateway(echo[1].url, issuer, redis_url=redis_url, anonymous_rate_limit="4/hour") as (one, _),
        running_gateway(echo[1].url, issuer, redis_url=redis_url, anonymous_rate_limit="4/hour") as (two, _),
    ):
        codes = [httpx.get(url + PUBLIC).status_code for url in (one, two, one, two, one, two)]
        assert codes == [200, 200, 200, 200, 429, 429]
        assert httpx.get(one + "/readyz").json()["advisories"]["rate_limit_storage"] is True


def test_redis_down_fails_closed_for_auth_routes_by_default(tmp_path: Path, echo, issuer) -> None:  # noqa: ANN001
    with (
        redis_server(tmp_path) as (redis_url, proc),
        running_gateway(echo[1].url, issuer, redis_url=redis_url) as (url, app),
    ):
        now = [0.0]
        app.health_cache = HealthCache(clock=lambda: now[0])
        assert httpx.get(url + PUBLIC).status_code == 200
        assert httpx.get(url + "/api/v1/health").json()["processes"]["gateway"] == "ok"
        proc.terminate()
        proc.wait(5)
        now[0] += FRESH_SECONDS
        # The system's health says so (a monitor sees it before the first refused login does).
        health = httpx.get(url + "/api/v1/health")
        assert (health.status_code, health.json()["status"]) == (503, "degraded")
        assert health.json()["processes"]["gateway"] == "failing"
        refused = httpx.post(url + LOGIN, json={})
        assert_problem(refused, 503)
        assert refused.headers["retry-after"] == "5"
        assert httpx.get(url + PUBLIC).status_code == 200  # the catalogue stays up
        ready = httpx.get(url + "/readyz")  # reported, but the replica stays in rotation
        assert ready.status_code == 200
        assert ready.json()["advisories"]["rate_limit_storage"] is False


def test_redis_down_fail_modes_are_settings(tmp_path: Path, echo, issuer) -> None:  # noqa: ANN001
    with redis_server(tmp_path) as (redis_url, proc):
        proc.terminate()
        proc.wait(5)
        with running_gateway(echo[1].url, issuer, redis_url=redis_url, rate_limit_storage_failure="closed") as (url, _):
            assert_problem(httpx.get(url + PUBLIC), 503)
        with running_gateway(echo[1].url, issuer, redis_url=redis_url, rate_limit_storage_failure="open") as (url, _):
            assert httpx.post(url + LOGIN, json={}).status_code == 201
