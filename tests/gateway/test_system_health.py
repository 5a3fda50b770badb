"""``GET /api/v1/health`` through a real gateway: a service counts as healthy when it is ready (its
``/readyz``), not merely alive, so a service whose database refuses it shows, as does one that is down."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.conftest import free_port
from tests.gateway.conftest import running_gateway
from tests.support.servers import serve
from tests.support.tokens import TestIssuer


async def _alive_without_database(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A service process that is up (/healthz 200) while its database refuses it (/readyz 503)."""
    if scope["type"] != "http":
        return
    status = 200 if scope["path"] == "/healthz" else 503
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})


async def _ready(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"status":"ok"}'})


def test_a_service_alive_but_not_ready_or_down_makes_the_system_degraded(issuer: TestIssuer) -> None:
    with serve(_ready) as ready, serve(_alive_without_database) as refused:
        nobody = f"http://127.0.0.1:{free_port()}"
        with running_gateway(ready.url, issuer, auth_url=refused.url, orders_url=nobody) as (url, _app):
            health = httpx.get(url + "/api/v1/health")
            assert health.status_code == 503
            assert health.json() == {
                "status": "degraded",
                "processes": {
                    "gateway": "ok",
                    "auth": "failing",
                    "inventory": "ok",
                    "orders": "unreachable",
                    "audit": "ok",
                },
            }
        with running_gateway(ready.url, issuer) as (url, _app):
            health = httpx.get(url + "/api/v1/health")
            assert health.status_code == 200
            assert health.json()["status"] == "ok"


def test_one_round_of_probes_answers_every_health_request_for_a_second(issuer: TestIssuer) -> None:
    """The path is public and not rate limited: a flood of health requests must not become a flood of calls to
    every service and its database."""
    probes: list[str] = []

    async def counted(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/readyz":
            probes.append(scope["path"])
        await _ready(scope, receive, send)

    now = [1000.0]
    with serve(counted) as ready, running_gateway(ready.url, issuer) as (url, app):
        app.health_cache.clock = lambda: now[0]

        async def flood() -> list[int]:
            async with httpx.AsyncClient(base_url=url) as client:
                answers = await asyncio.gather(*(client.get("/api/v1/health") for _ in range(20)))
            return [a.status_code for a in answers]

        assert asyncio.run(flood()) == [200] * 20
        assert len(probes) == 4  # one round: auth, inventory, orders, audit
        now[0] += 0.9
        assert httpx.get(url + "/api/v1/health").status_code == 200
        assert len(probes) == 4
        now[0] += 0.2  # a second after the round: the next request probes again
        assert httpx.get(url + "/api/v1/health").status_code == 200
        assert len(probes) == 8
