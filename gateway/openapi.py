"""``GET /api/v1/openapi.json``: one public OpenAPI document built from the services' own schemas.

Only the public routes (the gateway's prefixes) are kept; every operation gets the bearer security
scheme (unless it is public) and problem+json error responses, which is what the gateway and the
services really answer.
"""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

import aiohttp
import structlog
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from gateway.routes import is_public, route_table

log = structlog.get_logger("gateway.openapi")

OPENAPI_PATH = "/api/v1/openapi.json"
CACHE_SECONDS = 60.0
_METHODS = ("get", "post", "put", "patch", "delete")

router = APIRouter()

PROBLEM = {
    "type": "object",
    "required": ["type", "title", "status", "detail", "request_id"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "request_id": {"type": ["string", "null"]},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                    "msg": {"type": "string"},
                },
            },
        },
    },
    "additionalProperties": True,
}


def _problem_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


# Published with the code (docs/ in the repository), for the people whose accounts the API holds.
USER_DOCUMENTS = (
    "Privacy policy: [docs/privacy.md](docs/privacy.md). "
    "Security guidelines for users: [docs/security-for-users.md](docs/security-for-users.md)."
)


def merge(documents: dict[str, dict[str, Any]], title: str = "Comptoir public API") -> dict[str, Any]:
    prefixes = tuple(route.prefix for route in route_table())
    merged: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "1", "description": USER_DOCUMENTS},
        "paths": {},
        "components": {
            "schemas": {"Problem": PROBLEM},
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }
    for service, document in documents.items():
        for name, schema in document.get("components", {}).get("schemas", {}).items():
            if name in ("HTTPValidationError", "ValidationError"):
                continue
            existing = merged["components"]["schemas"].get(name)
            if existing is not None and existing != schema:
                log.warning("gateway.openapi.schema_conflict", schema=name, service=service)
                continue
            merged["components"]["schemas"][name] = schema
        for path, item in document.get("paths", {}).items():
            if not path.startswith(prefixes) or "/internal" in path:
                continue
            item = copy.deepcopy(item)
            for method in _METHODS:
                operation = item.get(method)
                if operation is None:
                    continue
                responses = operation.setdefault("responses", {})
                if "422" in responses:
                    responses["422"] = _problem_response("Validation error")
                responses.setdefault("default", _problem_response("Error"))
                if not is_public(method.upper(), _example_path(path)):
                    operation["security"] = [{"bearerAuth": []}]
                    responses.setdefault("401", _problem_response("Missing, invalid, expired or revoked token"))
                responses.setdefault("429", _problem_response("Rate limited"))
            merged["paths"][path] = item
    return merged


def _example_path(template: str) -> str:
    """A concrete path for a template such as /api/v1/products/{product_id}."""
    parts = ["x" if part.startswith("{") else part for part in template.split("/")]
    return "/".join(parts)


class OpenAPICache:
    def __init__(self) -> None:
        self.document: dict[str, Any] | None = None
        self.built_at = 0.0
        self.lock = asyncio.Lock()

    async def get(self, request: Request) -> dict[str, Any]:
        async with self.lock:
            if self.document is None or time.monotonic() - self.built_at > CACHE_SECONDS:
                proxy = request.app.proxy
                results = await asyncio.gather(*(self._fetch(proxy, name) for name in proxy.upstreams))
                documents = {name: doc for name, doc in results if doc is not None}
                self.document = merge(documents)
                self.built_at = time.monotonic() if len(documents) == len(proxy.upstreams) else 0.0
            return self.document

    async def _fetch(self, proxy: Any, name: str) -> tuple[str, dict[str, Any] | None]:
        session: aiohttp.ClientSession = proxy.sessions[name]
        try:
            async with session.get(
                proxy.upstreams[name] + "/openapi.json", timeout=aiohttp.ClientTimeout(total=3)
            ) as r:
                if r.status == 200:
                    return name, await r.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            log.warning("gateway.openapi.fetch_failed", upstream=name)
        return name, None


@router.get(OPENAPI_PATH, include_in_schema=False)
async def public_openapi(request: Request) -> JSONResponse:
    """The aggregated public API description."""
    return JSONResponse(await request.app.openapi_cache.get(request))
