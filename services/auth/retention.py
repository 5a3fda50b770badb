"""Retention (docs/privacy.md, "How long"): what the auth service deletes, and when.

``purge`` runs once a day in the auth service (``AUTH_RETENTION_INTERVAL_SECONDS``) and on demand with
``comptoir purge``. With ``now`` from the service's clock it deletes:
- phone codes and SMS send records, password reset links and MFA login challenges that expired (or
  were used) more than a day ago;
- sessions (with their refresh tokens) revoked or expired more than ``AUTH_RETENTION_DAYS`` ago;
- devices not seen for ``AUTH_DEVICE_TTL_DAYS``, or revoked more than ``AUTH_RETENTION_DAYS`` ago;
- failed-login counters a day after their last failure (and their wait);
and anonymises customer accounts without a login for ``AUTH_INACTIVE_ACCOUNT_DAYS`` (0: never), as a
GDPR erasure would: the other services first, then here (``auth.user.anonymised``). An account whose
erasure another service cannot complete now is left for the next run.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

import structlog
from sqlalchemy import ColumnElement, Executable, delete, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.auth.config import Settings
from services.auth.context import Runtime, system_context
from services.auth.devices import DeviceRepository
from services.auth.errors import PeerUnavailable
from services.auth.gdpr import Peers, anonymise
from services.auth.models import MfaChallenge, OtpCode, OtpSend, PasswordReset, Session, User
from services.auth.repository import LoginFailureRepository, UserRepository
from services.auth.service import AccountService

log = structlog.get_logger("comptoir.auth.retention")

SHORT_LIVED = timedelta(days=1)


@dataclass
class PurgeReport:
    otp_codes: int = 0
    otp_sends: int = 0
    # Not "password_resets": the log's redaction hides any key with "password" in it, and the command's
    # output and the log line say the same names.
    reset_links: int = 0
    mfa_challenges: int = 0
    sessions: int = 0
    devices: int = 0
    anonymised: int = 0
    postponed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


async def _count_deleted(db: AsyncSession, stmt: Executable) -> int:
    return len((await db.execute(stmt)).all())


async def purge_expired(rt: Runtime, now: datetime, report: PurgeReport) -> None:
    s = rt.settings
    day_ago = now - SHORT_LIVED
    kept = now - timedelta(days=s.retention_days)
    async with rt.sessionmaker() as db, db.begin():
        report.otp_codes = await _count_deleted(
            db,
            delete(OtpCode)
            .where(or_(OtpCode.expires_at < day_ago, OtpCode.consumed_at < day_ago))
            .returning(OtpCode.id),
        )
        report.otp_sends = await _count_deleted(
            db, delete(OtpSend).where(OtpSend.sent_at < day_ago).returning(OtpSend.id)
        )
        report.reset_links = await _count_deleted(
            db,
            delete(PasswordReset)
            .where(or_(PasswordReset.expires_at < day_ago, PasswordReset.used_at < day_ago))
            .returning(PasswordReset.id),
        )
        report.mfa_challenges = await _count_deleted(
            db, delete(MfaChallenge).where(MfaChallenge.expires_at < day_ago).returning(MfaChallenge.id)
        )
        report.sessions = await _count_deleted(
            db,
            delete(Session)
            .where(or_(Session.revoked_at < kept, Session.expires_at < kept, Session.idle_expires_at < kept))
            .returning(Session.id),
        )
        report.devices = await DeviceRepository(db).purge(
            unseen_before=now - timedelta(days=s.device_ttl_days), revoked_before=kept
        )
        await LoginFailureRepository(db).prune(day_ago)


def _inactive(before: datetime) -> tuple[ColumnElement[bool], ...]:
    """A customer's account, not erased, with neither a sign-in (or its creation) nor a session used (a
    refresh) since ``before``."""
    return (
        User.erased_at.is_(None),
        User.role == "customer",
        func.coalesce(User.last_login_at, User.created_at) < before,
        ~select(Session.id).where(Session.user_id == User.id, Session.last_used_at >= before).exists(),
    )


async def inactive_customers(rt: Runtime, now: datetime, *, only: uuid.UUID | None = None) -> list[uuid.UUID]:
    """Customers inactive for the period at ``now`` (``only``: that one, if it is)."""
    days = rt.settings.inactive_account_days
    if days == 0:
        return []
    stmt = select(User.id).where(*_inactive(now - timedelta(days=days)))
    if only is not None:
        stmt = stmt.where(User.id == only)
    async with rt.sessionmaker() as db:
        return list((await db.scalars(stmt)).all())


async def anonymise_inactive(rt: Runtime, now: datetime, report: PurgeReport) -> None:
    ctx = system_context()
    peers = Peers(rt, None)
    before = now - timedelta(days=rt.settings.inactive_account_days)
    for user_id in await inactive_customers(rt, now):
        # Asked again at its turn: the other services erase before the account is locked and checked once
        # more, and a run over many accounts takes a while; a sign-in meanwhile keeps everything.
        if not await inactive_customers(rt, now, only=user_id):
            continue
        try:
            results = await peers.erase(user_id)
        except PeerUnavailable as exc:
            log.warning("auth.retention.postponed", user_id=str(user_id), detail=exc.detail)
            report.postponed.append(str(user_id))
            continue
        async with rt.sessionmaker() as db, db.begin():
            user = await UserRepository(db).get(user_id, lock=True)
            still = select(User.id).where(User.id == user_id, *_inactive(before))
            if user is None or await db.scalar(still) is None:
                continue  # signed in, refreshed a session or was erased meanwhile
            await anonymise(AccountService(db, rt, ctx), user, action="auth.user.anonymised", services=results)
            report.anonymised += 1


async def purge(rt: Runtime) -> PurgeReport:
    now = rt.now()
    report = PurgeReport()
    await purge_expired(rt, now, report)
    await anonymise_inactive(rt, now, report)
    log.info("auth.retention.purged", **report.as_dict())
    return report


async def retention_loop(rt: Runtime) -> None:
    while True:
        await asyncio.sleep(rt.settings.retention_interval_seconds)
        try:
            await purge(rt)
        except Exception as exc:  # keep going; the next round retries
            log.warning("auth.retention.failed", error=type(exc).__name__)


async def purge_now(settings: Settings) -> PurgeReport:
    """``comptoir purge``: the auth service started in-process (keys, peers, clock), one purge, stopped."""
    from services.auth.main import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        rt = app.state.auth
        if not isinstance(rt, Runtime):
            raise TypeError("the auth app's lifespan did not set up its runtime")
        return await purge(rt)
