"""``GET /api/v1/health``: liveness of the gateway and of every service, as seen from the gateway."""

from __future__ import annotations

import asyncio

import aiohttp
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

router = APIRouter(tags=["health"])

HEALTH_PATH = "/api/v1/health"


@router.get(HEALTH_PATH)
async def system_health(request: Request) -> JSONResponse:
    """200 when every process answers its /healthz, else 503 naming the ones that do not."""
    proxy = request.app.proxy

    async def probe(name: str) -> tuple[str, str]:
        session: aiohttp.ClientSession = proxy.sessions[name]
        try:
            async with session.get(proxy.upstreams[name] + "/healthz", timeout=aiohttp.ClientTimeout(total=2)) as r:
                return name, "ok" if r.status == 200 else "failing"
        except (aiohttp.ClientError, TimeoutError):
            return name, "unreachable"

    results = dict(await asyncio.gather(*(probe(name) for name in proxy.upstreams)))
    processes = {"gateway": "ok", **results}
    healthy = all(status == "ok" for status in processes.values())
    return JSONResponse(
        {"status": "ok" if healthy else "degraded", "processes": processes},
        status_code=200 if healthy else 503,
    )
