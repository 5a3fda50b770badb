"""The aggregated public OpenAPI document, from the services' real schemas, and the API reference made from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from comptoir.openapi import build_document, render_markdown
from gateway.cors import ALLOWED_HEADERS, EXPOSED_HEADERS
from gateway.openapi import EXTRA_STATUSES, REQUIRED_HEADERS, public_operations, table_operations

REPO = Path(__file__).resolve().parents[2]
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return build_document()


def operations(document: dict[str, Any]):  # noqa: ANN201
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


def schema_of(response: dict[str, Any]) -> str:
    return response["content"][PROBLEM]["schema"]["$ref"].rsplit("/", 1)[-1]


def test_only_public_operations_and_the_schemas_they_reach(document: dict[str, Any]) -> None:
    paths = document["paths"]
    assert "/api/v1/products" in paths
    assert all(p.startswith("/api/v1/") and "/internal" not in p for p in paths)
    schemas = set(document["components"]["schemas"])
    internal = {s for s in schemas if s.startswith(("Reserv", "EventIn", "EventBatch", "Ingest", "ServiceToken"))}
    assert internal | {s for s in schemas if s.startswith("Revocation")} == set(), internal
    assert {"HTTPValidationError", "ValidationError", "UserErasure", "ErasureResult"} & schemas == set()
    assert {"Problem", "ValidationProblem", "OrderConflictProblem", "RetryProblem", "SystemHealth"} <= schemas
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


def test_gateway_method_table_is_exactly_the_documented_operations(document: dict[str, Any]) -> None:
    # The gateway answers 405 from this table before authentication: it must name every method each path has.
    assert table_operations() == public_operations(document)
    assert set(EXTRA_STATUSES) <= public_operations(document)
    assert set(REQUIRED_HEADERS) <= public_operations(document)


def test_every_error_is_a_typed_problem_and_every_answer_declares_its_headers(document: dict[str, Any]) -> None:
    for method, path, operation in operations(document):
        responses = operation["responses"]
        assert "default" not in responses, (method, path)
        for code, response in responses.items():
            assert "X-Request-ID" in response["headers"], (method, path, code)
            if int(code) < 400 or path == "/api/v1/health":
                continue
            expected = {"422": "ValidationProblem", "429": "RetryProblem", "503": "RetryProblem"}.get(code, "Problem")
            if (method, path, code) == ("POST", "/api/v1/orders", "409"):
                expected = "OrderConflictProblem"
            if (method, path, code) == ("POST", "/api/v1/auth/login", "401"):
                expected = "MfaRequiredProblem"
            if (method, path, code) == ("POST", "/api/v1/products/{product_id}/stock-adjustments", "409"):
                expected = "StockConflictProblem"
            if method == "POST" and path.startswith("/api/v1/orders/{order_id}/") and code == "409":
                expected = "OrderTransitionProblem"
            assert schema_of(response) == expected, (method, path, code)
        if path == "/api/v1/health":
            continue
        assert {"401", "429", "502", "503", "504"} <= set(responses), (method, path)
        assert responses["401"]["headers"]["WWW-Authenticate"]["required"] is True
        assert responses["429"]["headers"]["Retry-After"]["required"] is True
        if "requestBody" in operation:
            assert {"400", "413", "415", "422"} <= set(responses), (method, path)
            for content in operation["requestBody"]["content"].values():
                assert "anyOf" not in content["schema"], (method, path)  # crashes generated clients
        if any(p["in"] == "path" for p in operation.get("parameters", [])):
            assert "404" in responses, (method, path)
        assert ("security" in operation) != (
            (method, path)
            in {
                ("POST", "/api/v1/auth/register"),
                ("POST", "/api/v1/auth/login"),
                ("POST", "/api/v1/auth/login/mfa"),
                ("POST", "/api/v1/auth/token/refresh"),
                ("POST", "/api/v1/auth/password-reset/request"),
                ("POST", "/api/v1/auth/password-reset/confirm"),
                ("GET", "/api/v1/auth/.well-known/jwks.json"),
                ("GET", "/api/v1/products"),
                ("GET", "/api/v1/products/{product_id}"),
                ("GET", "/api/v1/products/{product_id}/images/{image_id}"),
            }
        ), (method, path)


def test_the_details_clients_rely_on(document: dict[str, Any]) -> None:
    paths, schemas = document["paths"], document["components"]["schemas"]
    place = paths["/api/v1/orders"]["post"]
    key = next(p for p in place["parameters"] if p["name"] == "Idempotency-Key")
    assert key["in"] == "header"
    assert key["required"] is True
    assert place["responses"]["201"]["headers"]["Location"]["required"] is True
    assert paths["/api/v1/products"]["post"]["responses"]["201"]["headers"]["Location"]["required"] is True
    image = paths["/api/v1/products/{product_id}/images/{image_id}"]["get"]["responses"]["200"]
    assert image["headers"]["ETag"]["required"] is True
    assert image["content"]["image/png"]["schema"] == {"type": "string", "format": "binary"}
    assert schemas["OrderRead"]["properties"]["status"]["enum"] == [
        "pending",
        "confirmed",
        "shipped",
        "delivered",
        "cancelled",
        "expired",
    ]
    assert schemas["UserRead"]["properties"]["role"]["enum"] == ["customer", "staff", "admin"]
    jwks = paths["/api/v1/auth/.well-known/jwks.json"]["get"]["responses"]["200"]["content"]["application/json"]
    assert jwks["schema"] == {"$ref": "#/components/schemas/JWKS"}
    assert set(schemas["JWK"]["required"]) == {"kty", "crv", "x", "kid", "alg", "use"}
    assert schemas["ValidationProblem"]["required"][-1] == "errors"
    assert schemas["OrderConflictProblem"]["properties"]["short_items"]["items"] == {
        "$ref": "#/components/schemas/ShortItem"
    }
    assert "retry_after" in schemas["RetryProblem"]["properties"]
    # OpenAPI 3.0 (JSON Schema draft 4): 1.0 is a number, not an integer, as the services enforce.
    assert document["openapi"] == "3.0.3"
    assert schemas["OrderLineIn"]["properties"]["quantity"]["type"] == "integer"
    assert schemas["StockAdjustment"]["properties"]["delta"]["not"] == {"enum": [0]}
    assert '"null"' not in str(document).replace("'", '"')
    logout = paths["/api/v1/auth/logout"]["post"]["requestBody"]
    assert logout["required"] is False
    assert logout["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/LogoutRequest"}


def test_api_reference_is_generated_from_the_document(document: dict[str, Any]) -> None:
    reference = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    assert reference == render_markdown(document), "docs/api.md is stale: run `make docs` and commit it"
    for method, path, _ in operations(document):
        assert f"| {method} | `{path}` |" in reference


# Headers a browser lets a page send or read without CORS naming them (the Fetch standard's safelists).
SAFELISTED_RESPONSE = {
    "cache-control",
    "content-language",
    "content-length",
    "content-type",
    "expires",
    "last-modified",
    "pragma",
}


def test_a_browser_app_may_send_and_read_every_documented_header(document: dict[str, Any]) -> None:
    """Cross-origin, a page sends only the request headers the preflight allows and reads only the answer's
    headers CORS exposes: every one the API reference documents must be among them."""
    exposed = {h.strip().lower() for h in EXPOSED_HEADERS.decode().split(",")}
    allowed = {h.decode() for h in ALLOWED_HEADERS}
    sent, read = set(), set()
    for _method, _path, operation in operations(document):
        sent |= {p["name"].lower() for p in operation.get("parameters", ()) if p["in"] == "header"}
        for response in operation["responses"].values():
            read |= {name.lower() for name in response.get("headers", {})}
    assert sent - allowed == set()
    assert read - SAFELISTED_RESPONSE - exposed == set()
