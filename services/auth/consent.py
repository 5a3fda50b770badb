"""Consent: the terms and privacy policy version a user accepted, and optional marketing consent.

Registration requires ``accept_terms: true`` and the current ``terms_version`` (``AUTH_TERMS_VERSION``);
marketing consent is optional (off unless given). Both carry the time they were given or changed.
``GET /me/consent`` shows them, ``PATCH /me/consent`` accepts a newer terms version or gives or
withdraws marketing consent. Consent is part of the GDPR export, and every change is audited.
Withdrawing consent to the terms themselves is erasing the account (``DELETE /me``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from common.db import SessionDep
from common.security import CurrentUser
from services.auth.context import RequestContext, Runtime, RuntimeDep, request_context
from services.auth.errors import InvalidField
from services.auth.models import User
from services.auth.schemas import Input
from services.auth.service import AccountService


class ConsentRead(BaseModel):
    terms_version: str | None = Field(description="The terms and privacy policy version accepted.")
    terms_accepted_at: datetime | None
    current_terms_version: str = Field(description="The version in force; accept it if it differs.")
    marketing_consent: bool
    marketing_consent_at: datetime | None = Field(description="When marketing consent was last given or withdrawn.")


class ConsentUpdate(Input):
    """What to change; a field left out (or null) stays as it is, so an empty body changes nothing."""

    marketing_consent: bool | None = Field(None, strict=True)
    accept_terms_version: str | None = Field(None, min_length=1, max_length=32)


def consent_read(user: User, current: str) -> ConsentRead:
    return ConsentRead(
        terms_version=user.terms_version,
        terms_accepted_at=user.terms_accepted_at,
        current_terms_version=current,
        marketing_consent=user.marketing_consent,
        marketing_consent_at=user.marketing_consent_at,
    )


def consent_document(user: User) -> dict[str, Any]:
    """What the GDPR export says about consent."""
    return {
        "terms_version": user.terms_version,
        "terms_accepted_at": user.terms_accepted_at.isoformat() if user.terms_accepted_at else None,
        "marketing_consent": user.marketing_consent,
        "marketing_consent_at": user.marketing_consent_at.isoformat() if user.marketing_consent_at else None,
    }


def check_terms_version(rt: Runtime, version: str, field: str) -> None:
    current = rt.settings.terms_version
    if version != current:
        raise InvalidField(field, f"The terms in force are version {current}: read and accept that one.")


async def update_consent(accounts: AccountService, user: User, body: ConsentUpdate, ctx: RequestContext) -> ConsentRead:
    rt = accounts.rt
    now = rt.now()
    old = consent_document(user)
    if body.accept_terms_version is not None:
        check_terms_version(rt, body.accept_terms_version, "accept_terms_version")
        if user.terms_version != body.accept_terms_version:
            user.terms_version, user.terms_accepted_at = body.accept_terms_version, now
    if body.marketing_consent is not None and body.marketing_consent != user.marketing_consent:
        user.marketing_consent, user.marketing_consent_at = body.marketing_consent, now
    new = consent_document(user)
    if new != old:
        user.updated_at = now
        changed = [key for key in new if new[key] != old[key] and not key.endswith("_at")]
        await ctx.audit(
            accounts.db,
            "auth.consent.changed",
            resource_type="user",
            resource_id=str(user.id),
            old_values={key: old[key] for key in changed},
            new_values={key: new[key] for key in changed},
        )
    return consent_read(user, rt.settings.terms_version)


router = APIRouter(prefix="/api/v1/auth", tags=["auth"])


@router.get("/me/consent", response_model=ConsentRead)
async def get_consent(claims: CurrentUser, session: SessionDep, rt: RuntimeDep, request: Request) -> ConsentRead:
    """The terms version the caller accepted and their marketing consent, with when."""
    user = await AccountService(session, rt, request_context(request)).current_user(claims)
    return consent_read(user, rt.settings.terms_version)


@router.patch("/me/consent", response_model=ConsentRead)
async def patch_consent(
    body: ConsentUpdate, claims: CurrentUser, session: SessionDep, rt: RuntimeDep, request: Request
) -> ConsentRead:
    """Accept the terms in force, or give or withdraw marketing consent."""
    ctx = request_context(request)
    accounts = AccountService(session, rt, ctx)
    user = await accounts.current_user(claims, lock=True)
    return await update_consent(accounts, user, body, ctx)
