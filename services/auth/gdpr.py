"""GDPR access and erasure across services.

The other services are asked over their internal endpoints, with a service token auth mints for
itself (audience = the callee):
- ``GET  /internal/users/{user_id}/export`` -> JSON of what that service holds about the user;
- ``POST /internal/users/{user_id}/erase``  -> 2xx once its personal data is erased or anonymised.
How the answers are read:
- 2xx: the body (any JSON; empty means nothing to report);
- 404: the service holds nothing about the user (or does not offer the endpoint yet);
- anything else, or no answer (connection error, timeout): 503 for the caller. On erasure nothing
  is erased here then: the account stays intact so that the user can simply try again, and the
  services already asked must treat a repeated erase as done (idempotent).
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from common.errors import TokenRejected
from common.http import forward_headers
from common.tokens import Claims
from services.auth.consent import consent_document
from services.auth.context import RequestContext, Runtime
from services.auth.devices import DeviceRepository
from services.auth.errors import PeerUnavailable
from services.auth.mfa import Mfa
from services.auth.models import Session, User
from services.auth.repository import LoginFailureRepository, OtpRepository, ResetRepository, SessionRepository
from services.auth.schemas import Export
from services.auth.service import AccountService, account_key, user_read

log = structlog.get_logger("comptoir.auth.gdpr")

NOTHING_HELD = "nothing held"


class Peers:
    """The other services' internal user-data endpoints."""

    def __init__(self, rt: Runtime, request_id: str | None) -> None:
        self.rt = rt
        self.request_id = request_id

    async def _call(self, service: str, method: str, path: str) -> Any:
        client = self.rt.peers.get(service)
        if client is None:
            raise PeerUnavailable(f"The {service} service is not configured.")
        headers = await self.rt.service_tokens.headers_for(service) | forward_headers(self.request_id)
        try:
            response = await client.request(method, path, headers=headers)
        except httpx.HTTPError as exc:
            log.warning("auth.gdpr.peer_unreachable", service=service, error=type(exc).__name__)
            raise PeerUnavailable(f"The {service} service could not be reached; try again later.") from exc
        if response.status_code == 401:
            self.rt.service_tokens.forget(service)
        if response.status_code == 404:
            return None
        if not response.is_success:
            log.warning("auth.gdpr.peer_failed", service=service, status=response.status_code)
            raise PeerUnavailable(f"The {service} service could not complete the request; try again later.")
        if not response.content:
            return {}
        try:
            return response.json()
        except ValueError as exc:
            raise PeerUnavailable(f"The {service} service answered with something that is not JSON.") from exc

    async def export(self, user_id: uuid.UUID) -> dict[str, Any]:
        return {
            service: await self._call(service, "GET", f"/internal/users/{user_id}/export")
            for service in self.rt.settings.gdpr_services
        }

    async def erase(self, user_id: uuid.UUID) -> dict[str, str]:
        results = {}
        for service in self.rt.settings.gdpr_services:
            answer = await self._call(service, "POST", f"/internal/users/{user_id}/erase")
            results[service] = NOTHING_HELD if answer is None else "erased"
        return results


def _session_doc(row: Session) -> dict[str, Any]:
    return {
        "id": str(row.id),
        "created_at": row.created_at.isoformat(),
        "last_used_at": row.last_used_at.isoformat(),
        "expires_at": row.expires_at.isoformat(),
        "ip": row.ip,
        "user_agent": row.user_agent,
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
        "revoked_reason": row.revoked_reason,
    }


class GdprService:
    def __init__(self, db: AsyncSession, rt: Runtime, ctx: RequestContext) -> None:
        self.db = db
        self.rt = rt
        self.ctx = ctx
        self.accounts = AccountService(db, rt, ctx)
        self.peers = Peers(rt, ctx.request_id)

    async def export(self, claims: Claims) -> Export:
        user = await self.accounts.current_user(claims)
        services = await self.peers.export(user.id)
        sessions = await SessionRepository(self.db).all_of(user.id)
        sends = await OtpRepository(self.db).sends_of(user.id)
        resets = await ResetRepository(self.db).of(user.id)
        await self.ctx.audit(
            self.db,
            "auth.user.exported",
            resource_type="user",
            resource_id=str(user.id),
            new_values={"services": {name: value is not None for name, value in services.items()}},
        )
        return Export(
            generated_at=self.rt.now(),
            user=user_read(user),
            sessions=[_session_doc(row) for row in sessions],
            phone_verifications=[{"phone": s.phone, "ip": s.ip, "sent_at": s.sent_at.isoformat()} for s in sends],
            password_resets=[
                {
                    "created_at": r.created_at.isoformat(),
                    "expires_at": r.expires_at.isoformat(),
                    "used_at": r.used_at.isoformat() if r.used_at else None,
                }
                for r in resets
            ],
            consent=consent_document(user),
            devices=[
                {
                    "created_at": d.created_at.isoformat(),
                    "last_seen_at": d.last_seen_at.isoformat(),
                    "user_agent": d.user_agent,
                    "revoked_at": d.revoked_at.isoformat() if d.revoked_at else None,
                }
                for d in await DeviceRepository(self.db).of(user.id)
            ],
            account={
                name: value.isoformat() if value else None
                for name, value in (
                    ("created_at", user.created_at),
                    ("updated_at", user.updated_at),
                    ("last_login_at", user.last_login_at),
                    ("password_changed_at", user.password_changed_at),
                )
            },
            second_factor=(await Mfa(self.db, self.rt, self.ctx).status(user)).model_dump(),
            services=services,
        )

    async def erase(self, claims: Claims, password: str) -> None:
        """Erase everywhere (the other services first), then here: anonymised, never reusable."""
        user = await self.accounts.current_user(claims)
        await self.accounts.verify_with_throttle(user, password, "account_erasure")
        try:
            results = await self.peers.erase(user.id)
        except PeerUnavailable as exc:
            await self.ctx.audit(
                self.db,
                "auth.user.erasure_failed",
                outcome="failure",
                resource_type="user",
                resource_id=str(user.id),
                new_values={"detail": exc.detail},
            )
            await self.accounts.fail(exc)
        locked = await self.accounts.current_user(claims, lock=True)
        if locked.email is None:  # erased by a concurrent request
            raise TokenRejected("The account is not available.")
        await anonymise(self.accounts, locked, action="auth.user.erased", services=results)


async def anonymise(accounts: AccountService, locked: User, *, action: str, services: dict[str, str]) -> None:
    """Erase the account here (its row locked by the caller; the other services already erased it)."""
    if locked.email is None:  # already erased: nothing personal is left
        return
    db, now = accounts.db, accounts.rt.now()
    revoked = await SessionRepository(db).revoke_all(locked.id, now=now, reason="erased")
    await accounts.users.delete_personal_rows(locked.id)
    await LoginFailureRepository(db).clear(account_key(locked.email))
    # Published last (the feed's lock comes after every row lock); the rows need no session.
    await accounts.sessions.publish(revoked, now)
    # The row stays (orders and the audit trail refer to its id) with nothing personal in it;
    # the e-mail is free for a new registration.
    locked.email = None
    locked.password_hash = None
    locked.full_name = None
    locked.phone = None
    locked.phone_verified = False
    locked.marketing_consent = False
    locked.marketing_consent_at = now
    locked.is_active = False
    locked.role = "customer"
    locked.erased_at = locked.updated_at = now
    await accounts.ctx.audit(
        db,
        action,
        resource_type="user",
        resource_id=str(locked.id),
        new_values={"sessions_revoked": len(revoked), "services": services},
    )
