"""/internal: event ingest for every emitting service, GDPR access and erasure for the auth service."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request

from services.audit.errors import BatchTooLarge, ForeignEvent
from services.audit.runtime import AuthCaller, IngestCaller, Runtime
from services.audit.schemas import ErasureResult, EventBatch, IngestResult, UserExport

router = APIRouter(prefix="/internal", tags=["internal"])


@router.post(
    "/events",
    response_model=IngestResult,
    responses={
        403: {"description": "A caller that may not send events, or an event of another service"},
        422: {"description": "An invalid event (the whole batch is refused, nothing is stored)"},
        503: {"description": "The chain is busy; retry"},
    },
)
async def ingest(batch: EventBatch, request: Request, rt: Runtime, caller: IngestCaller) -> IngestResult:
    """Store a batch in the chain, each event once (idempotent by id); secrets are removed again here."""
    if len(batch.events) > rt.settings.max_batch_events:
        raise BatchTooLarge(f"At most {rt.settings.max_batch_events} events per batch.")
    foreign = sorted({event.service for event in batch.events if event.service != caller.sub})
    if foreign:
        await rt.record(
            request,
            "audit.ingest.rejected",
            claims=caller,
            outcome="denied",
            resource_type="internal_api",
            new_values={"reason": "foreign service", "services": foreign[:10]},
        )
        raise ForeignEvent(f"The {caller.sub} service may only submit events with service={caller.sub!r}.")
    return await rt.chain.append([event.model_dump(mode="json") for event in batch.events])


@router.get("/users/{user_id}/export", response_model=UserExport, responses={404: {"description": "Nothing held"}})
async def export_user(user_id: uuid.UUID, request: Request, rt: Runtime, caller: AuthCaller) -> UserExport:
    """The events in which this user acts or is the subject (GDPR access)."""
    export = await rt.gdpr.export(user_id)
    await rt.record(
        request,
        "audit.subject.exported",
        claims=caller,
        resource_type="user",
        resource_id=str(user_id),
        new_values={"events": len(export.events)},
    )
    return export


@router.post("/users/{user_id}/erase", response_model=ErasureResult)
async def erase_user(user_id: uuid.UUID, request: Request, rt: Runtime, caller: AuthCaller) -> ErasureResult:
    """Forget which pseudonym is this user's: the events stay (and verify), nothing links them to the person."""
    result = await rt.gdpr.erase(user_id)
    await rt.record(
        request,
        "audit.subject.erased",
        claims=caller,
        resource_type="user",
        resource_id=str(user_id),
        new_values={"events": result.events_pseudonymised},
    )
    return result
