"""``GET /api/v1/health``: whether the gateway and every service can serve, as seen from the gateway.

Each service is asked for its readiness (``/readyz``: up, and its database answering), not only its
liveness: a service whose database refuses it answers every request 503, and the system is not healthy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.responses import JSONResponse

from common.upstream import UpstreamError

router = APIRouter(tags=["health"])

HEALTH_PATH = "/api/v1/health"
# Longer than a service's own readiness check waits for its database (2 s): a slow database makes the
# service answer "not ready" (failing), not miss the probe (unreachable).
PROBE_SECONDS = 3.5

ProcessState = Literal["ok", "failing", "unreachable"]


class SystemHealth(BaseModel):
    """200 with ``status: ok`` when every process is ready, else 503 with ``status: degraded``."""

    status: Literal["ok", "degraded"]
    processes: dict[str, ProcessState] = Field(
        description="Every process by name (gateway, auth, ...): `ok` (ready), `failing` (it answers, but is not "
        "ready: its database is unreachable or refuses it) or `unreachable` (no answer)."
    )


# One round of probes answers every health request for this long, and concurrent requests wait for the one
# round under way: the path is public and not rate limited (monitors poll it), and each round costs a call
# to every service and a query of every database, which a flood of requests would otherwise multiply.
FRESH_SECONDS = 1.0


class HealthCache:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = asyncio.Lock()
        self._answer: SystemHealth | None = None
        self._at = float("-inf")

    async def get(self, probe: Callable[[], Awaitable[SystemHealth]]) -> SystemHealth:
        async with self._lock:
            if self._answer is None or self.clock() - self._at >= FRESH_SECONDS:
                self._answer = await probe()
                self._at = self.clock()
            return self._answer


@router.get(HEALTH_PATH)
async def system_health(request: Request) -> JSONResponse:
    """200 when every service is ready (its /readyz: up, and its database answering), else 503 naming
    the ones that are not (as probed at most a second ago)."""
    own = request.app.state.readiness_advisories
    body = await request.app.health_cache.get(lambda: probe_all(request.app.proxy, own))
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if body.status == "ok" else 503)


async def probe_all(proxy: Any, own: Mapping[str, Callable[[], Awaitable[bool]]] | None = None) -> SystemHealth:
    """``own``: the gateway's own dependencies (the rate-limit storage, Redis): one that does not answer makes
    the gateway ``failing``, since it then refuses the auth routes (``closed-for-auth``) or more."""

    async def probe(name: str) -> tuple[str, ProcessState]:
        try:
            status, _ = await proxy.fetch(name, "/readyz", timeout=PROBE_SECONDS)
        except (UpstreamError, TimeoutError):
            return name, "unreachable"
        return name, "ok" if status == 200 else "failing"

    async def gateway() -> ProcessState:
        answers = await asyncio.gather(*(check() for check in (own or {}).values()))
        return "ok" if all(answers) else "failing"

    mine, results = await asyncio.gather(gateway(), asyncio.gather(*(probe(name) for name in proxy.upstreams)))
    processes: dict[str, ProcessState] = {"gateway": mine, **dict(results)}
    healthy = all(status == "ok" for status in processes.values())
    return SystemHealth(status="ok" if healthy else "degraded", processes=processes)
