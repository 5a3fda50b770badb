"""``GET /api/v1/health``: liveness of the gateway and of every service, as seen from the gateway."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from common.upstream import UpstreamError

router = APIRouter(tags=["health"])

HEALTH_PATH = "/api/v1/health"


@router.get(HEALTH_PATH)
async def system_health(request: Request) -> JSONResponse:
    """200 when every process answers its /healthz, else 503 naming the ones that do not."""
    proxy = request.app.proxy

    async def probe(name: str) -> tuple[str, str]:
        try:
            status, _ = await proxy.fetch(name, "/healthz", timeout=2.0)
        except (UpstreamError, TimeoutError):
            return name, "unreachable"
        return name, "ok" if status == 200 else "failing"

    results = dict(await asyncio.gather(*(probe(name) for name in proxy.upstreams)))
    processes = {"gateway": "ok", **results}
    healthy = all(status == "ok" for status in processes.values())
    return JSONResponse(
        {"status": "ok" if healthy else "degraded", "processes": processes},
        status_code=200 if healthy else 503,
    )
