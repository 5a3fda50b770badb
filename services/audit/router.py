"""/api/v1/audit: the trail, its verification, checkpoints and alerts (admins only; denials are audited)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request

from common.db import BIGINT_MAX, NO_NUL, SessionDep
from common.pagination import DEFAULT_LIMIT, CursorParam, LimitParam, Page
from services.audit.runtime import AlertsDep, AuditAdmin, Events, Runtime
from services.audit.schemas import AlertRead, CheckpointRead, EventRead, VerifyResult
from services.audit.service import Alerts, checkpoint_page
from services.audit.types import RFC3339

router = APIRouter(
    prefix="/api/v1/audit",
    tags=["audit"],
    responses={403: {"description": "Not an admin (the denial is recorded in the audit chain)"}},
)

# Text filters are compared with stored text, which cannot hold NUL: a filter with one is a 422 here.
ShortText = Annotated[str | None, Query(max_length=256, pattern=NO_NUL)]


@router.get("/events", response_model=Page[EventRead])
async def list_events(
    request: Request,
    events: Events,
    rt: Runtime,
    claims: AuditAdmin,
    actor_id: Annotated[
        str | None, Query(max_length=128, pattern=NO_NUL, description="A user id, a pseudonym or a service.")
    ] = None,
    action: Annotated[
        str | None, Query(max_length=100, pattern=NO_NUL, description="Exact dotted action name.")
    ] = None,
    resource_type: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
    resource_id: ShortText = None,
    since: Annotated[RFC3339 | None, Query(description="occurred_at at or after (RFC 3339).")] = None,
    until: Annotated[RFC3339 | None, Query(description="occurred_at strictly before (RFC 3339).")] = None,
    limit: LimitParam = DEFAULT_LIMIT,
    cursor: CursorParam = None,
) -> Page[EventRead]:
    """Events newest first (by sequence), filtered; actor and user resource ids are pseudonyms."""
    page = await events.page(
        actor_id=actor_id,
        action=action,
        resource_type=resource_type,
        resource_id=resource_id,
        since=since,
        until=until,
        limit=limit,
        cursor=cursor,
    )
    filters = {
        "actor_id": actor_id,
        "action": action,
        "resource_type": resource_type,
        "resource_id": resource_id,
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
    }
    await rt.record(
        request,
        "audit.events.viewed",
        claims=claims,
        resource_type="audit_events",
        new_values={"filters": {k: v for k, v in filters.items() if v is not None}, "returned": len(page.items)},
    )
    return page


@router.get("/verify", response_model=VerifyResult)
async def verify(request: Request, rt: Runtime, claims: AuditAdmin) -> VerifyResult:
    """Recompute the whole chain and check every signed checkpoint against it."""
    result = await rt.checkpoints.verify(source="api")
    await rt.record(
        request,
        "audit.chain.verified",
        claims=claims,
        outcome="success" if result.ok else "failure",
        resource_type="audit_chain",
        new_values={"ok": result.ok, "checked": result.checked, "first_bad_sequence": result.first_bad_sequence},
    )
    return result


@router.get("/checkpoints", response_model=Page[CheckpointRead])
async def list_checkpoints(
    session: SessionDep, _admin: AuditAdmin, limit: LimitParam = DEFAULT_LIMIT, cursor: CursorParam = None
) -> Page[CheckpointRead]:
    """Signed checkpoints, newest first."""
    return await checkpoint_page(session, limit=limit, cursor=cursor)


@router.post(
    "/checkpoints",
    response_model=CheckpointRead,
    status_code=201,
    responses={409: {"description": "The chain is empty, or does not verify (then nothing is signed)"}},
)
async def sign_checkpoint(request: Request, rt: Runtime, claims: AuditAdmin) -> CheckpointRead:
    """Verify the events since the last checkpoint and sign the current head now."""
    checkpoint = await rt.checkpoints.sign("manual")
    await rt.record(
        request,
        "audit.checkpoint.signed",
        claims=claims,
        resource_type="audit_checkpoint",
        resource_id=str(checkpoint.id),
        new_values={"sequence": checkpoint.sequence},
    )
    return checkpoint


@router.get("/alerts", response_model=Page[AlertRead])
async def list_alerts(
    alerts: AlertsDep,
    _admin: AuditAdmin,
    status: Annotated[Literal["open", "resolved", "all"], Query()] = "open",
    limit: LimitParam = DEFAULT_LIMIT,
    cursor: CursorParam = None,
) -> Page[AlertRead]:
    """Security alerts, newest first (open ones by default)."""
    return await alerts.page(status=None if status == "all" else status, limit=limit, cursor=cursor)


@router.post("/alerts/{alert_id}/resolve", response_model=AlertRead)
async def resolve_alert(
    alert_id: Annotated[int, Path(ge=1, le=BIGINT_MAX)], request: Request, rt: Runtime, claims: AuditAdmin
) -> AlertRead:
    """Close an alert once it has been dealt with."""
    async with rt.db.sessionmaker() as session, session.begin():
        alert = await Alerts(session).resolve(alert_id, by=claims.sub)
    await rt.record(
        request, "audit.alert.resolved", claims=claims, resource_type="audit_alert", resource_id=str(alert_id)
    )
    return alert
