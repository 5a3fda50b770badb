"""The aggregated public OpenAPI document, from the services' real schemas."""

from __future__ import annotations

import importlib

from gateway.openapi import merge


def service_documents() -> dict[str, dict]:
    documents = {}
    for name in ("auth", "inventory", "orders", "audit"):
        main = importlib.import_module(f"services.{name}.main")
        config = importlib.import_module(f"services.{name}.config")
        app = main.create_app(config.Settings(database_url="postgresql://unused@/x", environment="test"))
        documents[name] = app.openapi()
    return documents


def test_public_routes_with_security_and_problems() -> None:
    document = merge(service_documents())
    paths = document["paths"]
    assert "/api/v1/products" in paths
    assert all(not p.startswith(("/healthz", "/readyz", "/metrics")) and "/internal" not in p for p in paths)
    listing = paths["/api/v1/products"]["get"]
    assert "security" not in listing  # public catalogue
    assert listing["responses"]["422"]["content"]["application/problem+json"]["schema"] == {
        "$ref": "#/components/schemas/Problem"
    }
    assert "HTTPValidationError" not in document["components"]["schemas"]
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for item in paths.values():
        for operation in item.values():
            assert "default" in operation["responses"]
            if "security" in operation:
                assert "401" in operation["responses"]
