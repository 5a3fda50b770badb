"""Internal endpoints (never routed by the gateway): service tokens and the revocation feed."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from common.db import SessionDep
from common.security import require_service
from common.tokens import Claims
from services.auth.context import RuntimeDep, request_context
from services.auth.repository import RevocationRepository
from services.auth.schemas import RevocationItem, RevocationPage, ServiceTokenRequest, ServiceTokenResponse
from services.auth.service_clients import ServiceClients

router = APIRouter(prefix="/internal", tags=["internal"])

FEED_PAGE = 500
FEED_CALLERS = ("gateway", "inventory", "orders", "audit")


@router.post("/token", response_model=ServiceTokenResponse)
async def service_token(
    body: ServiceTokenRequest, session: SessionDep, rt: RuntimeDep, request: Request
) -> ServiceTokenResponse:
    """Client credentials: a short-lived service token for one audience (a service name)."""
    return await ServiceClients(session, rt, request_context(request)).issue(body)


@router.get("/revocations", response_model=RevocationPage)
async def revocations(
    _caller: Annotated[Claims, Depends(require_service(*FEED_CALLERS))],
    session: SessionDep,
    after: Annotated[int, Query(ge=0, le=2**63 - 1, description="The last seq already seen.")] = 0,
) -> RevocationPage:
    """Revoked sessions after ``after``, in order (at most 500 per page)."""
    rows = await RevocationRepository(session).after(after, FEED_PAGE + 1)
    items = [
        RevocationItem(seq=row.seq, sid=str(row.sid), expires_at=row.expires_at.timestamp()) for row in rows[:FEED_PAGE]
    ]
    return RevocationPage(items=items, has_more=len(rows) > FEED_PAGE)
