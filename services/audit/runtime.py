"""What the audit endpoints share, built in the app's lifespan (never at import)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import structlog
from fastapi import Depends, Request

from common.app import lifespan_state
from common.audit import Actor, Outcome
from common.db import Database, SessionDep
from common.errors import Forbidden
from common.security import bearer_token, current_user, require_service
from common.state import state_of
from common.tokens import Claims, InvalidToken
from services.audit.checkpoints import Checkpointer, CheckpointService
from services.audit.config import Settings
from services.audit.service import SERVICE, Alerts, AuditChain, EventQueries, Gdpr

log = structlog.get_logger("comptoir.audit")

INGEST_CALLERS = ("auth", "inventory", "orders", "gateway")


@dataclass
class AuditRuntime:
    settings: Settings
    chain: AuditChain
    gdpr: Gdpr
    checkpoints: CheckpointService
    checkpointer: Checkpointer

    @property
    def db(self) -> Database:
        return self.chain.db

    async def record(
        self,
        request: Request,
        action: str,
        *,
        claims: Claims | None,
        outcome: Outcome = "success",
        resource_type: str | None = None,
        resource_id: str | None = None,
        new_values: dict[str, Any] | None = None,
    ) -> None:
        """Record one of the audit service's own events in its chain; never fails the request."""
        event = Actor.of(request, claims).event(
            SERVICE, action, outcome=outcome, resource_type=resource_type, resource_id=resource_id, new=new_values
        )
        try:
            await self.chain.record_own(event)
        except Exception as exc:  # the answer still goes out; the failure is logged loudly
            log.error("audit.own_event_failed", action=action, error=type(exc).__name__)


def runtime_of(request: Request) -> AuditRuntime:
    return lifespan_state(request, "audit", AuditRuntime)


async def runtime(request: Request) -> AuditRuntime:
    # async: FastAPI runs a plain ``def`` dependency in its thread pool, a costly hop on every request.
    return runtime_of(request)


Runtime = Annotated[AuditRuntime, Depends(runtime)]


async def _events(session: SessionDep) -> EventQueries:
    return EventQueries(session)


async def _alerts(session: SessionDep) -> Alerts:
    return Alerts(session)


Events = Annotated[EventQueries, Depends(_events)]
AlertsDep = Annotated[Alerts, Depends(_alerts)]


async def audited_admin(request: Request) -> Claims:
    """An admin's access token; anyone else signed in gets 403, and the denial goes into the chain."""
    claims = await current_user(request)
    if not claims.has_role("admin"):
        await runtime_of(request).record(
            request,
            "audit.access.denied",
            claims=claims,
            outcome="denied",
            resource_type="audit_api",
            new_values={"required_role": "admin", "role": claims.role},
        )
        raise Forbidden("This action needs the admin role.")
    return claims


def audited_service(*callers: str) -> Any:
    """A service token from one of ``callers``; another (valid) caller gets 403, recorded in the chain."""
    check = require_service(*callers)

    async def dependency(request: Request) -> Claims:
        try:
            return await check(request)
        except Forbidden:
            token = bearer_token(request)
            claims = None
            if token is not None:
                try:
                    claims = await state_of(request).service_verifier.verify(token)
                except InvalidToken:
                    claims = None
            await runtime_of(request).record(
                request, "audit.internal.denied", claims=claims, outcome="denied", resource_type="internal_api"
            )
            raise

    return dependency


AuditAdmin = Annotated[Claims, Depends(audited_admin)]
IngestCaller = Annotated[Claims, Depends(audited_service(*INGEST_CALLERS))]
AuthCaller = Annotated[Claims, Depends(audited_service("auth"))]
