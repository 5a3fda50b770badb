"""``/healthz`` (alive), ``/readyz`` (dependencies reachable) and ``/metrics`` on every process."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from common.errors import problem_response
from common.metrics import metrics_endpoint

ReadinessCheck = Callable[[], Awaitable[bool]]

router = APIRouter(include_in_schema=False)


@router.get("/healthz")
async def healthz(request: Request) -> dict[str, str]:
    """The process is alive and serving."""
    return {"status": "ok", "service": request.app.state.service_name}


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    """Every dependency this process needs answers (503 with the failing ones otherwise)."""
    checks: dict[str, ReadinessCheck] = getattr(request.app.state, "readiness_checks", {})
    advisories: dict[str, ReadinessCheck] = getattr(request.app.state, "readiness_advisories", {})
    names = list(checks)
    results = await asyncio.gather(*(checks[name]() for name in names))
    status = dict(zip(names, results, strict=True))
    advisory_names = list(advisories)
    advisory = dict(zip(advisory_names, await asyncio.gather(*(advisories[n]() for n in advisory_names)), strict=True))
    if all(results):
        body: dict[str, object] = {"status": "ready", "checks": status}
        if advisory:
            body["advisories"] = advisory
        return JSONResponse(body)
    failing = ", ".join(name for name, ok in status.items() if not ok)
    return problem_response(
        503, scope=request.scope, detail=f"Not ready: {failing} unreachable.", extra={"checks": status}
    )


router.add_api_route("/metrics", metrics_endpoint, methods=["GET"])
