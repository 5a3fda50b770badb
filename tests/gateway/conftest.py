from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from gateway.config import GatewaySettings
from gateway.main import GatewayApp, create_app
from gateway.server import GatewayHttpProtocol
from tests.support.servers import Echo, ThreadedServer, serve
from tests.support.tokens import TestIssuer


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer()


@pytest.fixture(scope="module")
def echo() -> Iterator[tuple[Echo, ThreadedServer]]:
    upstream = Echo()
    with serve(upstream) as server:
        yield upstream, server


@contextmanager
def running_gateway(
    upstream_url: str,
    issuer: TestIssuer,
    *,
    protocol: Any = GatewayHttpProtocol,
    enforce_checks: bool = True,
    **overrides: Any,
) -> Iterator[tuple[str, GatewayApp]]:
    values: dict[str, Any] = {
        "environment": "test",
        "auth_url": upstream_url,
        "inventory_url": upstream_url,
        "orders_url": upstream_url,
        "audit_url": upstream_url,
        "anonymous_rate_limit": "10000/minute",
        "authenticated_rate_limit": "10000/minute",
        "route_rate_limits": "",
    } | overrides
    app = create_app(GatewaySettings(**values), key_source=issuer.keys(), enforce_checks=enforce_checks)
    with serve(app, http=protocol) as server:  # the protocol comptoir.serve runs the gateway on
        yield server.url, app


@pytest.fixture(scope="module")
def gateway(echo: tuple[Echo, ThreadedServer], issuer: TestIssuer) -> Iterator[tuple[str, GatewayApp]]:
    with running_gateway(echo[1].url, issuer) as running:
        yield running
