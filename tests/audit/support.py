"""Helpers for the audit tests: events as services send them, and a client that speaks for each caller."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
from fastapi import FastAPI

from common.audit import AuditEvent
from tests.conftest import DatabaseFixture
from tests.support.tokens import TestIssuer, bearer

AUDIT_TABLES = ("events", "checkpoints", "alerts", "pseudonyms", "erased_subjects")


def event(service: str = "orders", action: str | None = None, **fields: Any) -> dict[str, Any]:
    """One event as common.audit.AuditEvent serialises it for the outbox."""
    fields.setdefault("occurred_at", datetime.now(UTC))
    model = AuditEvent(service=service, action=action or f"{service}.thing.done", **fields)
    return model.model_dump(mode="json")


class AuditClient:
    def __init__(self, http: httpx.AsyncClient, issuer: TestIssuer, app: FastAPI) -> None:
        self.http = http
        self.issuer = issuer
        self.app = app
        self.admin_id = str(uuid.uuid4())

    def service_headers(self, caller: str, audience: str = "audit") -> dict[str, str]:
        return bearer(self.issuer.service(caller=caller, audience=audience))

    def admin(self) -> dict[str, str]:
        return bearer(self.issuer.access(sub=self.admin_id, role="admin"))

    def user(self, role: str = "customer", sub: str | None = None) -> dict[str, str]:
        return bearer(self.issuer.access(sub=sub or str(uuid.uuid4()), role=role))

    async def post_events(self, caller: str, events: list[dict[str, Any]]) -> httpx.Response:
        return await self.http.post("/internal/events", json={"events": events}, headers=self.service_headers(caller))

    async def send(self, caller: str, events: list[dict[str, Any]]) -> dict[str, Any]:
        response = await self.post_events(caller, events)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def events(self, **params: Any) -> list[dict[str, Any]]:
        response = await self.http.get("/api/v1/audit/events", params=params, headers=self.admin())
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    async def verify(self) -> dict[str, Any]:
        response = await self.http.get("/api/v1/audit/verify", headers=self.admin())
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def checkpoint(self) -> dict[str, Any]:
        response = await self.http.post("/api/v1/audit/checkpoints", headers=self.admin())
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    async def alerts(self, status: str = "open") -> list[dict[str, Any]]:
        response = await self.http.get("/api/v1/audit/alerts", params={"status": status}, headers=self.admin())
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        return items


async def chain_rows(database: DatabaseFixture) -> list[Any]:
    """The stored chain, read as the superuser."""
    admin = await database.admin()
    try:
        sql = (
            "SELECT sequence, id, actor_id, resource_id, document, prev_hash, hash FROM audit.events ORDER BY sequence"
        )
        return list(await admin.fetch(sql))
    finally:
        await admin.close()
