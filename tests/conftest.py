"""Shared fixtures: a real PostgreSQL (embedded, or TEST_DATABASE_URL), provisioned by ``comptoir migrate``."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from comptoir.config import RunSettings
from comptoir.embedded import EmbeddedPostgres
from comptoir.provision import ServiceRole, migrate, to_asyncpg_dsn

# issuer, tokens and clock for the inventory and orders suites (a closer conftest's fixture wins).
pytest_plugins = ["tests.inventory.fixtures"]


@dataclass
class DatabaseFixture:
    admin_url: str
    roles: dict[str, ServiceRole]
    data_dir: Path

    def url(self, service: str) -> str:
        return self.roles[service].url

    async def admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(to_asyncpg_dsn(self.admin_url))

    async def connect_as(self, service: str) -> asyncpg.Connection:
        return await asyncpg.connect(to_asyncpg_dsn(self.url(service)))


@pytest.fixture(scope="session")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DatabaseFixture]:
    data_dir = tmp_path_factory.mktemp("data")
    embedded = None
    admin_url = os.environ.get("TEST_DATABASE_URL", "")
    if not admin_url:
        embedded = EmbeddedPostgres(data_dir)
        admin_url = embedded.start()
    settings = RunSettings(data_dir=data_dir, database_url=admin_url)
    roles = migrate(settings, admin_url)
    try:
        yield DatabaseFixture(admin_url=admin_url, roles={r.service: r for r in roles}, data_dir=data_dir)
    finally:
        if embedded is not None:
            embedded.stop()


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An ASGI client with the app's lifespan run around it (engine, pools, HTTP clients)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
    "referrer-policy": "strict-origin-when-cross-origin",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


def assert_security_headers(response: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get(name) == value, f"{name} on {response.status_code} {response.url}"
    assert "permissions-policy" in response.headers
    assert "server" not in response.headers
    assert response.headers.get("x-request-id")


def assert_problem(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    assert {"type", "title", "detail", "request_id"} <= set(body)
    assert body["request_id"] == response.headers["x-request-id"]
    if status == 422:  # the API reference: a 422 always says which input and why
        assert body["errors"], body
        assert all(set(error) == {"loc", "msg"} and error["loc"] for error in body["errors"]), body
    assert_security_headers(response)
    return dict(body)
