"""``GET /api/v1/openapi.json``: one public OpenAPI document built from the services' own schemas.

Only the public routes (the gateway's prefixes) are kept, with the component schemas they reach. Each
operation then gets what the gateway and the services really answer, so that a generated client can read
every answer: the bearer scheme; every error status it can produce, each as ``application/problem+json``
with its schema (``Problem``, or ``ValidationProblem``, ``OrderConflictProblem``, ``RetryProblem``); the
response headers (``X-Request-ID`` and ``RateLimit-*`` on every answer, ``Retry-After``,
``WWW-Authenticate``, ``Location``, ``Cache-Control``, ``ETag``); required request headers.

The error statuses come from rules (a body can be malformed, too large or of the wrong type; a path
parameter can name nothing; any request can carry a bad token, be throttled or meet an upstream that is
down or slow) plus ``EXTRA_STATUSES``, the statuses only a service's rules produce.
``tests/gateway/test_openapi.py`` checks that table against the document.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Iterable
from typing import Any

import structlog
from fastapi import APIRouter, Request
from pydantic.json_schema import models_json_schema
from starlette.responses import JSONResponse

from common.errors import PROBLEM_CONTENT_TYPE, PROBLEM_MODELS
from common.upstream import UpstreamError
from gateway.health import HEALTH_PATH, SystemHealth
from gateway.methods import PUBLIC_METHODS
from gateway.routes import is_public, route_table

log = structlog.get_logger("gateway.openapi")

OPENAPI_PATH = "/api/v1/openapi.json"
CACHE_SECONDS = 60.0
_METHODS = ("get", "post", "put", "patch", "delete")
REF = "#/components/schemas/"

router = APIRouter()

# 403 where the caller's role is not enough (staff-only or admin-only operations).
STAFF, ADMIN = 403, 403
# Statuses that only a service's own rules produce, by operation.
EXTRA_STATUSES: dict[tuple[str, str], tuple[int, ...]] = {
    ("POST", "/api/v1/auth/register"): (409,),
    ("POST", "/api/v1/auth/token/refresh"): (403,),
    ("POST", "/api/v1/auth/mfa/totp/enrol"): (409,),
    ("POST", "/api/v1/auth/mfa/totp/confirm"): (400, 409),
    ("POST", "/api/v1/auth/mfa/recovery-codes"): (400, 409),
    ("POST", "/api/v1/auth/mfa/totp/disable"): (400, 409),
    ("POST", "/api/v1/auth/password-reset/confirm"): (400,),
    ("POST", "/api/v1/auth/otp/request"): (409,),
    ("POST", "/api/v1/auth/otp/verify"): (400, 409),
    ("GET", "/api/v1/auth/admin/users"): (STAFF,),
    ("PATCH", "/api/v1/auth/admin/users/{user_id}"): (ADMIN,),
    ("POST", "/api/v1/auth/admin/users/{user_id}/unlock"): (STAFF,),
    ("POST", "/api/v1/products"): (STAFF, 409),
    ("PATCH", "/api/v1/products/{product_id}"): (STAFF,),
    ("GET", "/api/v1/products/{product_id}/stock"): (STAFF,),
    ("POST", "/api/v1/products/{product_id}/stock-adjustments"): (STAFF, 409),
    ("GET", "/api/v1/products/{product_id}/stock-movements"): (STAFF,),
    ("POST", "/api/v1/products/{product_id}/images"): (STAFF, 409),
    ("POST", "/api/v1/orders"): (409,),
    ("GET", "/api/v1/orders"): (403,),
    ("POST", "/api/v1/orders/{order_id}/cancel"): (409,),
    ("POST", "/api/v1/orders/{order_id}/confirm"): (STAFF, 409),
    ("POST", "/api/v1/orders/{order_id}/ship"): (STAFF, 409),
    ("POST", "/api/v1/orders/{order_id}/deliver"): (STAFF, 409),
    ("GET", "/api/v1/audit/events"): (ADMIN,),
    ("GET", "/api/v1/audit/verify"): (ADMIN,),
    ("GET", "/api/v1/audit/checkpoints"): (ADMIN,),
    ("POST", "/api/v1/audit/checkpoints"): (ADMIN, 409),
    ("GET", "/api/v1/audit/alerts"): (ADMIN,),
    ("POST", "/api/v1/audit/alerts/{alert_id}/resolve"): (ADMIN,),
}

# Request headers the server requires (declared optional by the framework because the service checks
# them itself, to answer 400 with a clear problem instead of a generic 422).
REQUIRED_HEADERS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("POST", "/api/v1/orders"): {
        "Idempotency-Key": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]{1,255}$"}
    },
}

# Successful answers that name a new resource.
LOCATION = {("POST", "/api/v1/orders"), ("POST", "/api/v1/products"), ("POST", "/api/v1/products/{product_id}/images")}
ETAG = {
    ("GET", "/api/v1/products"),
    ("GET", "/api/v1/products/{product_id}"),
    ("GET", "/api/v1/products/{product_id}/images/{image_id}"),
    ("GET", "/api/v1/products/{product_id}/stock"),
    ("GET", "/api/v1/products/{product_id}/stock-movements"),
}
# Every read with an ETag answers a matching If-None-Match with 304 (inventory's validators, the gateway's
# cache; an image's by its file's validator).
CONDITIONAL = ETAG

DESCRIPTIONS = {
    400: "Malformed request: the body is not JSON, a cursor is not one the server made, or a header is missing",
    401: "Missing, invalid, expired or revoked access token (a token that is sent must be valid)",
    403: "The caller's role does not allow this",
    404: "No such resource (or not the caller's)",
    409: "Conflict with the resource's current state",
    413: "Request body too large",
    415: "Unsupported request body type",
    422: "Invalid input: `errors` lists each field and why",
    429: "Rate limited: retry after `Retry-After` seconds (also `retry_after` in the body)",
    502: "An upstream service gave an invalid answer",
    503: "An upstream service or the database is unavailable or busy; retry later",
    504: "An upstream service did not answer in time",
}

HEADERS: dict[str, dict[str, Any]] = {
    "X-Request-ID": {
        "description": "The request's id: a well-formed client value echoed, else a new UUID.",
        "schema": {"type": "string"},
    },
    "RateLimit-Limit": {"description": "Requests allowed in the current window.", "schema": {"type": "integer"}},
    "RateLimit-Remaining": {"description": "Requests left in the current window.", "schema": {"type": "integer"}},
    "RateLimit-Reset": {"description": "Seconds until the window resets.", "schema": {"type": "integer"}},
    "Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}},
    "WWW-Authenticate": {
        "description": 'The bearer challenge: `Bearer realm="comptoir"`, with `error="invalid_token"` (RFC 6750) when '
        "an access token was sent and refused (malformed, invalid, expired, revoked, or its account gone): refresh "
        "the session, or sign in again if that fails.",
        "schema": {"type": "string"},
    },
    "Location": {"description": "The path of the created resource.", "schema": {"type": "string"}},
    "Cache-Control": {
        "description": "`no-store` unless the answer may be cached (public catalogue, images).",
        "schema": {"type": "string"},
    },
    "ETag": {"description": "A strong validator: the content's hash.", "schema": {"type": "string"}},
    "Idempotent-Replayed": {
        "description": "`true` when the order is the one an earlier request with this key placed.",
        "schema": {"type": "string", "enum": ["true"]},
    },
}


def _header(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/headers/{name}"}


def _problem_schema(method: str, path: str, status: int) -> str:
    if status == 422:
        return "ValidationProblem"
    if status == 409 and (method, path) == ("POST", "/api/v1/orders"):
        return "OrderConflictProblem"
    if status == 401 and (method, path) == ("POST", "/api/v1/auth/login"):
        return "MfaRequiredProblem"
    if status == 409 and (method, path) == ("POST", "/api/v1/products/{product_id}/stock-adjustments"):
        return "StockConflictProblem"
    if status == 409 and method == "POST" and path.startswith("/api/v1/orders/{order_id}/"):
        return "OrderTransitionProblem"
    if status in (429, 503):
        return "RetryProblem"
    return "Problem"


def _headers_for(status: int) -> dict[str, Any]:
    # A Reference Object cannot carry `required` next to its $ref, so required headers are written out
    # in full; optional ones point at components.headers.
    headers: dict[str, Any] = {"X-Request-ID": {**HEADERS["X-Request-ID"], "required": True}}
    for name in ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"):
        headers[name] = _header(name)
    if status == 401:
        headers["WWW-Authenticate"] = {**HEADERS["WWW-Authenticate"], "required": True}
    if status == 429:
        headers["Retry-After"] = {**HEADERS["Retry-After"], "required": True}
    if status == 503:
        headers["Retry-After"] = _header("Retry-After")
    return headers


def _own_description(declared: dict[str, Any]) -> str | None:
    """A service's own description of an error, not FastAPI's generic one."""
    description = declared.get("description")
    return description if isinstance(description, str) and description != "Validation Error" else None


def error_statuses(method: str, path: str, operation: dict[str, Any]) -> set[int]:
    """Every error status an operation can answer."""
    statuses = {401, 429, 502, 503, 504}
    parameters = operation.get("parameters", [])
    if "requestBody" in operation:
        statuses |= {400, 413, 415, 422}
    if parameters:
        statuses.add(422)
    if any(p.get("in") == "path" for p in parameters):
        statuses.add(404)
    if any(p.get("name") == "cursor" for p in parameters):
        statuses.add(400)
    if (method, path) in REQUIRED_HEADERS:
        statuses.add(400)
    statuses |= set(EXTRA_STATUSES.get((method, path), ()))
    statuses |= {int(code) for code in operation.get("responses", {}) if code.isdigit() and int(code) >= 400}
    return statuses


def _describe(method: str, path: str, operation: dict[str, Any]) -> None:
    key = (method.upper(), path)
    responses: dict[str, Any] = operation.setdefault("responses", {})
    responses.pop("default", None)
    for status in sorted(error_statuses(key[0], path, operation)):
        declared = responses.get(str(status), {})
        responses[str(status)] = {
            "description": _own_description(declared) or DESCRIPTIONS.get(status, "Error"),
            "headers": _headers_for(status),
            "content": {
                PROBLEM_CONTENT_TYPE: {"schema": {"$ref": REF + _problem_schema(key[0], path, status)}},
            },
        }
    for code, response in responses.items():
        if not code.startswith("2"):
            continue
        headers = response.setdefault("headers", {})
        headers.update(_headers_for(int(code)))
        headers["Cache-Control"] = {**HEADERS["Cache-Control"], "required": True}
        if key in LOCATION and code == "201":
            headers["Location"] = {**HEADERS["Location"], "required": True}
        if key in ETAG:
            headers["ETag"] = {**HEADERS["ETag"], "required": True}
        if key == ("POST", "/api/v1/orders"):
            headers["Idempotent-Replayed"] = _header("Idempotent-Replayed")
        for media, content in response.get("content", {}).items():
            if media.startswith("image/"):
                content["schema"] = {"type": "string", "format": "binary"}
    if key in CONDITIONAL:
        responses["304"] = {
            "description": "Not modified: `If-None-Match` names the current `ETag`; no body",
            "headers": {
                "ETag": {**HEADERS["ETag"], "required": True},
                "Cache-Control": {**HEADERS["Cache-Control"], "required": True},
                "X-Request-ID": HEADERS["X-Request-ID"],
            },
        }
        operation.setdefault("parameters", []).append(
            {
                "name": "If-None-Match",
                "in": "header",
                "required": False,
                "description": "ETags the client holds; the current one gets 304 without a body.",
                "schema": {"type": "string"},
            }
        )
    for name, schema in REQUIRED_HEADERS.get(key, {}).items():
        for parameter in operation.get("parameters", []):
            if parameter.get("in") == "header" and parameter.get("name") == name:
                parameter["required"] = True
                parameter["schema"] = schema
    body = operation.get("requestBody")
    if body is not None:
        # An optional body is "may be left out", never "may be the JSON null": anyOf [X, null] makes
        # generated clients (openapi-python-client) fail, and the services refuse a null body anyway.
        for content in body.get("content", {}).values():
            variants = [v for v in content.get("schema", {}).get("anyOf", ()) if v.get("type") != "null"]
            if len(variants) == 1 and len(content["schema"]["anyOf"]) == 2:
                content["schema"] = variants[0]
                body["required"] = False
    if not is_public(key[0], _example_path(path)):
        operation["security"] = [{"bearerAuth": []}]


def as_openapi_30(node: Any) -> Any:
    """The services' OpenAPI 3.1 schemas written as OpenAPI 3.0.3.

    Why: in 3.0's JSON Schema (draft 4 semantics) ``1.0`` is a number, not an integer, which is exactly
    what the services enforce (money and quantities are strict integers: ``1.0`` gets 422). Published as
    3.1, the same ``type: integer`` would call ``1.0`` valid, and clients and fuzzers would send it.
    ``anyOf [X, null]`` becomes ``nullable``, ``const`` a one-value ``enum``, numeric
    ``exclusiveMinimum``/``exclusiveMaximum`` the 3.0 boolean form, schema ``examples`` one ``example``.
    """
    if isinstance(node, list):
        return [as_openapi_30(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: as_openapi_30(value) for key, value in node.items()}
    variants = out.get("anyOf")
    if isinstance(variants, list) and {"type": "null"} in variants:
        rest = [v for v in variants if v != {"type": "null"}]
        del out["anyOf"]
        if len(rest) == 1 and "$ref" not in rest[0]:
            out = {**out, **rest[0]}
        elif len(rest) == 1:
            out["allOf"] = rest
        else:
            out["anyOf"] = rest
        out["nullable"] = True
    kind = out.get("type")
    if isinstance(kind, list):
        types = [t for t in kind if t != "null"]
        out["type"] = types[0] if len(types) == 1 else types
        if "null" in kind:
            out["nullable"] = True
    if "const" in out:
        out["enum"] = [out.pop("const")]
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        value = out.get(bound)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[plain] = value
            out[bound] = True
    if isinstance(out.get("examples"), list) and "type" in out:
        examples = out.pop("examples")
        if examples:
            out["example"] = examples[0]
    return out


def _refs(node: Any) -> Iterable[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(REF):
            yield ref[len(REF) :]
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _reachable(paths: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    """Only the component schemas that a public operation reaches, directly or through other schemas."""
    seen: set[str] = set()
    todo = list(_refs(paths))
    while todo:
        name = todo.pop()
        if name in seen or name not in schemas:
            continue
        seen.add(name)
        todo.extend(_refs(schemas[name]))
    return {name: schemas[name] for name in sorted(seen)}


def problem_schemas() -> dict[str, Any]:
    _, definitions = models_json_schema(
        [(model, "serialization") for model in PROBLEM_MODELS], ref_template=REF + "{model}"
    )
    schemas: dict[str, Any] = definitions["$defs"]
    return schemas


def _health_operation() -> dict[str, Any]:
    """The gateway's own ``GET /api/v1/health`` (answered by the gateway itself: no token, no rate limit)."""
    content = {"application/json": {"schema": {"$ref": REF + "SystemHealth"}}}
    headers = {
        "X-Request-ID": {**HEADERS["X-Request-ID"], "required": True},
        "Cache-Control": {**HEADERS["Cache-Control"], "required": True},
    }
    return {
        "tags": ["health"],
        "summary": "System Health",
        "description": "Every process's liveness, seen from the gateway: 200 when all answer, else 503.",
        "operationId": "system_health",
        "responses": {
            "200": {"description": "Every process is up", "headers": headers, "content": content},
            "503": {
                "description": "Some process is down or failing (`processes` says which)",
                "headers": headers,
                "content": content,
            },
        },
    }


# Published with the code (docs/ in the repository), for the people whose accounts the API holds.
USER_DOCUMENTS = (
    "Privacy policy: [docs/privacy.md](docs/privacy.md). "
    "Security guidelines for users: [docs/security-for-users.md](docs/security-for-users.md)."
)


def merge(documents: dict[str, dict[str, Any]], title: str = "Comptoir public API") -> dict[str, Any]:
    prefixes = tuple(route.prefix for route in route_table())
    schemas: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    for service, document in documents.items():
        for name, schema in document.get("components", {}).get("schemas", {}).items():
            existing = schemas.get(name)
            if existing is not None and existing != schema:
                log.warning("gateway.openapi.schema_conflict", schema=name, service=service)
                continue
            schemas[name] = schema
        for path, item in document.get("paths", {}).items():
            if not path.startswith(prefixes) or "/internal" in path:
                continue
            item = copy.deepcopy(item)
            for method in _METHODS:
                if method in item:
                    _describe(method, path, item[method])
            paths[path] = item
    paths[HEALTH_PATH] = {"get": _health_operation()}
    schemas["SystemHealth"] = SystemHealth.model_json_schema(ref_template=REF + "{model}")
    schemas.update(problem_schemas())
    document = {
        "openapi": "3.0.3",
        "info": {
            "title": title,
            "version": "1",
            "description": "Every error is RFC 9457 `application/problem+json`. A method that a path does not "
            "have is answered 405 with an `Allow` header, before any authentication. Every path with GET also "
            "answers HEAD: the GET's status and headers, without a body. Anonymous catalogue answers are "
            "`Cache-Control: public, max-age=1` and may come from the gateway's shared cache "
            "(`GATEWAY_PUBLIC_CACHE_SECONDS`, 0.5 s): a catalogue write through the gateway shows at once, but a "
            "product's `available` may lag an order or a cancellation by up to that long. Answers to requests "
            "with credentials are never shared.\n\n" + USER_DOCUMENTS,
        },
        "paths": paths,
        "components": {
            "schemas": _reachable(paths, schemas),
            "headers": HEADERS,
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }
    converted: dict[str, Any] = as_openapi_30(document)
    return converted


def public_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    """(METHOD, path template) of every operation in a document."""
    return {(method.upper(), path) for path, item in document["paths"].items() for method in item if method in _METHODS}


def table_operations() -> set[tuple[str, str]]:
    """What the gateway's 405 table says each path has (the gateway's own health included)."""
    return {(method, path) for path, methods in PUBLIC_METHODS.items() for method in methods} | {("GET", HEALTH_PATH)}


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
        try:
            status, body = await proxy.fetch(name, "/openapi.json", timeout=3.0)
            if status == 200:
                document = json.loads(body)
                if isinstance(document, dict):
                    return name, document
        except (UpstreamError, TimeoutError, ValueError):
            pass
        log.warning("gateway.openapi.fetch_failed", upstream=name)
        return name, None


@router.get(OPENAPI_PATH, include_in_schema=False)
async def public_openapi(request: Request) -> JSONResponse:
    """The aggregated public API description."""
    return JSONResponse(await request.app.openapi_cache.get(request))
