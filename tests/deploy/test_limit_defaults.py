"""Rate-limit defaults: the seed's values in production (asserted here, so that a change is deliberate),
high enough for local fuzzing in development, and an explicit setting always wins."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest

from gateway.config import DEFAULT_ROUTE_LIMITS, GatewaySettings

PRODUCTION_ROUTE_LIMITS = {
    "POST /api/v1/auth/login": "10/minute",
    "POST /api/v1/auth/login/mfa": "10/minute",
    "POST /api/v1/auth/register": "10/hour",
    "POST /api/v1/auth/token/refresh": "120/hour",
    "POST /api/v1/auth/otp/request": "5/hour",
    "POST /api/v1/auth/otp/verify": "20/hour",
    "POST /api/v1/auth/password-reset/request": "5/hour",
    "POST /api/v1/auth/password-reset/confirm": "10/hour",
}


def route_limits(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(";") if part)


def settings(environment: str, **env: str) -> GatewaySettings:
    with mock.patch.dict(os.environ, {"ENVIRONMENT": environment, **env}, clear=True):
        return GatewaySettings()


def per_hour(limit: str) -> float:
    count, _, period = limit.partition("/")
    return int(count) * {"second": 3600, "minute": 60, "hour": 1, "day": 1 / 24}[period]


@pytest.fixture(autouse=True)
def no_env_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("environment", ["production", "test"])
def test_production_and_test_keep_the_seed_limits(environment: str) -> None:
    s = settings(environment)
    assert s.anonymous_rate_limit == "100/hour"
    assert s.authenticated_rate_limit == "1000/hour"
    assert route_limits(s.route_rate_limits) == PRODUCTION_ROUTE_LIMITS
    assert s.route_rate_limits == DEFAULT_ROUTE_LIMITS


def test_development_limits_allow_a_local_fuzzing_run() -> None:
    s = settings("development")
    # make fuzz sends a few thousand requests per hour from one address, most of them anonymous.
    assert per_hour(s.anonymous_rate_limit) >= 10_000
    assert per_hour(s.authenticated_rate_limit) >= 10_000
    development = route_limits(s.route_rate_limits)
    assert set(development) == set(PRODUCTION_ROUTE_LIMITS)
    for route, limit in development.items():
        assert per_hour(limit) >= 100 * per_hour(PRODUCTION_ROUTE_LIMITS[route]) or per_hour(limit) >= 10_000, route


def test_an_explicit_limit_wins_in_development() -> None:
    s = settings("development", GATEWAY_ANONYMOUS_RATE_LIMIT="50/hour")
    assert s.anonymous_rate_limit == "50/hour"
    assert per_hour(s.authenticated_rate_limit) >= 10_000
