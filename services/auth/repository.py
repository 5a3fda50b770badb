"""Queries only: flush, never commit."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import and_, case, delete, func, or_, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from common.db import escape_like
from services.auth.models import (
    Device,
    LoginFailure,
    MfaChallenge,
    MfaRecoveryCode,
    MfaTotp,
    OtpCode,
    OtpSend,
    PasswordReset,
    RefreshToken,
    Revocation,
    Session,
    User,
)

# One lock key for appending to the revocation feed (see RevocationRepository.append).
REVOCATION_LOCK = 0x636F6D70_74726576  # "comptrev"


class UserRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, user_id: uuid.UUID, *, lock: bool = False) -> User | None:
        stmt = select(User).where(User.id == user_id, User.erased_at.is_(None))
        if lock:
            stmt = stmt.with_for_update().execution_options(populate_existing=True)
        return (await self.session.scalars(stmt)).one_or_none()

    async def by_email(self, email: str) -> User | None:
        return (await self.session.scalars(select(User).where(User.email == email))).one_or_none()

    async def add(self, user: User) -> User:
        self.session.add(user)
        await self.session.flush()
        return user

    async def delete_personal_rows(self, user_id: uuid.UUID) -> None:
        """Sessions (with their refresh tokens), codes, sends, reset links and devices of an erased account."""
        for model in (Session, OtpCode, OtpSend, PasswordReset, Device, MfaTotp, MfaRecoveryCode, MfaChallenge):
            await self.session.execute(delete(model).where(model.user_id == user_id))

    async def any_admin(self) -> bool:
        stmt = select(User.id).where(User.role == "admin", User.erased_at.is_(None)).limit(1)
        return (await self.session.scalars(stmt)).first() is not None

    async def list(
        self, *, limit: int, after: tuple[datetime, uuid.UUID] | None, query: str | None, role: str | None
    ) -> list[User]:
        """Newest first, keyset-paginated on (created_at, id); erased accounts are not listed."""
        stmt = select(User).where(User.erased_at.is_(None))
        if query:
            stmt = stmt.where(User.email.like(f"%{escape_like(query.lower())}%", escape="\\"))
        if role:
            stmt = stmt.where(User.role == role)
        if after is not None:
            stmt = stmt.where(tuple_(User.created_at, User.id) < tuple_(*after))
        stmt = stmt.order_by(User.created_at.desc(), User.id.desc()).limit(limit)
        return list((await self.session.scalars(stmt)).all())


class SessionRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, row: Session) -> Session:
        self.session.add(row)
        await self.session.flush()
        return row

    async def get(self, session_id: uuid.UUID, *, lock: bool = False) -> Session | None:
        stmt = select(Session).where(Session.id == session_id)
        if lock:
            stmt = stmt.with_for_update().execution_options(populate_existing=True)
        return (await self.session.scalars(stmt)).one_or_none()

    async def active(self, user_id: uuid.UUID, now: datetime) -> list[Session]:
        """Sessions that can still be refreshed, oldest first."""
        stmt = (
            select(Session)
            .where(
                Session.user_id == user_id,
                Session.revoked_at.is_(None),
                Session.expires_at > now,
                Session.idle_expires_at > now,
            )
            .order_by(Session.created_at, Session.id)
        )
        return list((await self.session.scalars(stmt)).all())

    async def all_of(self, user_id: uuid.UUID) -> list[Session]:
        stmt = select(Session).where(Session.user_id == user_id).order_by(Session.created_at)
        return list((await self.session.scalars(stmt)).all())

    async def revoke(self, ids: Sequence[uuid.UUID], *, now: datetime, reason: str) -> list[tuple[uuid.UUID, datetime]]:
        """Mark sessions revoked; returns (sid, access token expiry) of those that were not yet."""
        if not ids:
            return []
        stmt = (
            update(Session)
            .where(Session.id.in_(ids), Session.revoked_at.is_(None))
            .values(revoked_at=now, revoked_reason=reason)
            .returning(Session.id, Session.access_expires_at)
            .execution_options(synchronize_session="fetch")
        )
        return [(row[0], row[1]) for row in (await self.session.execute(stmt)).all()]

    async def revoke_all(
        self, user_id: uuid.UUID, *, now: datetime, reason: str, keep: uuid.UUID | None = None
    ) -> list[tuple[uuid.UUID, datetime]]:
        conditions = [Session.user_id == user_id, Session.revoked_at.is_(None)]
        if keep is not None:
            conditions.append(Session.id != keep)
        stmt = (
            update(Session)
            .where(*conditions)
            .values(revoked_at=now, revoked_reason=reason)
            .returning(Session.id, Session.access_expires_at)
            .execution_options(synchronize_session="fetch")
        )
        return [(row[0], row[1]) for row in (await self.session.execute(stmt)).all()]

    async def is_revoked(self, session_id: uuid.UUID) -> bool:
        """Missing (erased) or revoked sessions are revoked."""
        stmt = select(Session.revoked_at).where(Session.id == session_id)
        row = (await self.session.execute(stmt)).first()
        return row is None or row[0] is not None


class RefreshTokenRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, row: RefreshToken) -> RefreshToken:
        self.session.add(row)
        await self.session.flush()
        return row

    async def by_hash_for_update(self, token_hash: str) -> RefreshToken | None:
        """The token row, locked: concurrent refreshes with one token are served one after the other."""
        stmt = select(RefreshToken).where(RefreshToken.token_hash == token_hash).with_for_update()
        return (await self.session.scalars(stmt)).one_or_none()

    async def by_hash(self, token_hash: str) -> RefreshToken | None:
        stmt = select(RefreshToken).where(RefreshToken.token_hash == token_hash)
        return (await self.session.scalars(stmt)).one_or_none()


class RevocationRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def append(self, entries: Sequence[tuple[uuid.UUID, datetime]]) -> None:
        """Add feed entries. Call it last in a transaction (after every session row lock).

        A transaction-scoped advisory lock serialises appenders, so sequence numbers become visible
        in order: a poller that has seen ``seq`` n never misses a later-committed n-1.
        """
        if not entries:
            return
        await self.session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": REVOCATION_LOCK})
        self.session.add_all([Revocation(sid=sid, expires_at=expires_at) for sid, expires_at in entries])
        await self.session.flush()

    async def after(self, seq: int, limit: int) -> list[Revocation]:
        stmt = select(Revocation).where(Revocation.seq > seq).order_by(Revocation.seq).limit(limit)
        return list((await self.session.scalars(stmt)).all())

    async def prune(self, before: datetime) -> None:
        await self.session.execute(delete(Revocation).where(Revocation.expires_at < before))


class LoginFailureRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def lock(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], LoginFailure]:
        """The counter rows of ``keys`` ((account_key, ip) pairs), created if missing, locked in one order."""
        await self.session.execute(
            insert(LoginFailure).values([{"account_key": key, "ip": ip} for key, ip in keys]).on_conflict_do_nothing()
        )
        stmt = (
            select(LoginFailure)
            .where(tuple_(LoginFailure.account_key, LoginFailure.ip).in_(list(keys)))
            .order_by(LoginFailure.account_key, LoginFailure.ip)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        return {(row.account_key, row.ip): row for row in (await self.session.scalars(stmt)).all()}

    async def get(self, account_key: str) -> LoginFailure | None:
        return await self.session.get(LoginFailure, (account_key, ""))

    async def clear(self, account_key: str, ip: str | None = None) -> None:
        """Forget the account's failures: this pair and the account counter, or every pair (ip None)."""
        stmt = delete(LoginFailure).where(LoginFailure.account_key == account_key)
        if ip is not None:
            stmt = stmt.where(LoginFailure.ip.in_(["", ip]))
        await self.session.execute(stmt)

    async def uncount(self, key: tuple[str, str], threshold: int) -> None:
        """Take back one counted attempt (it succeeded); below ``threshold`` the counter's wait goes too."""
        stmt = (
            update(LoginFailure)
            .where(LoginFailure.account_key == key[0], LoginFailure.ip == key[1])
            .values(
                failures=func.greatest(LoginFailure.failures - 1, 0),
                locked_until=case((LoginFailure.failures - 1 < threshold, None), else_=LoginFailure.locked_until),
            )
        )
        await self.session.execute(stmt)

    async def clear_keys(self, keys: Sequence[tuple[str, str]]) -> None:
        stmt = delete(LoginFailure).where(tuple_(LoginFailure.account_key, LoginFailure.ip).in_(list(keys)))
        await self.session.execute(stmt)

    async def prune(self, before: datetime) -> None:
        await self.session.execute(
            delete(LoginFailure).where(
                LoginFailure.last_failure_at < before,
                or_(LoginFailure.locked_until.is_(None), LoginFailure.locked_until < before),
            )
        )


class OtpRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def sends_since(self, since: datetime, *, user_id: uuid.UUID | None = None, **match: str) -> list[datetime]:
        """Send times since ``since`` for a user, a phone or an IP, oldest first."""
        stmt = select(OtpSend.sent_at).where(OtpSend.sent_at > since)
        if user_id is not None:
            stmt = stmt.where(OtpSend.user_id == user_id)
        for column, value in match.items():
            stmt = stmt.where(getattr(OtpSend, column) == value)
        return list((await self.session.scalars(stmt.order_by(OtpSend.sent_at))).all())

    async def add_code(self, code: OtpCode, send: OtpSend) -> None:
        # A new code replaces every unused one: only the latest code is ever accepted.
        await self.session.execute(
            delete(OtpCode).where(OtpCode.user_id == code.user_id, OtpCode.consumed_at.is_(None))
        )
        self.session.add_all([code, send])
        await self.session.flush()

    async def live_code(self, user_id: uuid.UUID, now: datetime, max_attempts: int) -> OtpCode | None:
        stmt = (
            select(OtpCode)
            .where(
                OtpCode.user_id == user_id,
                OtpCode.consumed_at.is_(None),
                OtpCode.expires_at > now,
                OtpCode.attempts < max_attempts,
            )
            .order_by(OtpCode.created_at.desc())
            .limit(1)
            .with_for_update()
        )
        return (await self.session.scalars(stmt)).first()

    async def sends_of(self, user_id: uuid.UUID) -> list[OtpSend]:
        stmt = select(OtpSend).where(OtpSend.user_id == user_id).order_by(OtpSend.sent_at)
        return list((await self.session.scalars(stmt)).all())

    async def prune(self, before: datetime) -> None:
        await self.session.execute(delete(OtpSend).where(OtpSend.sent_at < before))
        await self.session.execute(
            delete(OtpCode).where(or_(OtpCode.expires_at < before, OtpCode.consumed_at < before))
        )


class ResetRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def created_since(self, user_id: uuid.UUID, since: datetime) -> int:
        stmt = select(func.count()).where(PasswordReset.user_id == user_id, PasswordReset.created_at > since)
        return int((await self.session.scalar(stmt)) or 0)

    async def add(self, row: PasswordReset) -> None:
        # Only the newest link works: a new request expires the unused ones (kept for the hourly cap).
        await self.session.execute(
            update(PasswordReset)
            .where(
                PasswordReset.user_id == row.user_id,
                PasswordReset.used_at.is_(None),
                PasswordReset.expires_at > row.created_at,
            )
            .values(expires_at=row.created_at)
        )
        self.session.add(row)
        await self.session.flush()

    async def usable_for_update(self, token_hash: str, now: datetime) -> PasswordReset | None:
        stmt = (
            select(PasswordReset)
            .where(
                PasswordReset.token_hash == token_hash,
                PasswordReset.used_at.is_(None),
                PasswordReset.expires_at > now,
            )
            .with_for_update()
        )
        return (await self.session.scalars(stmt)).one_or_none()

    async def of(self, user_id: uuid.UUID) -> list[PasswordReset]:
        stmt = select(PasswordReset).where(PasswordReset.user_id == user_id).order_by(PasswordReset.created_at)
        return list((await self.session.scalars(stmt)).all())

    async def prune(self, before: datetime) -> None:
        await self.session.execute(
            delete(PasswordReset).where(and_(PasswordReset.expires_at < before, PasswordReset.created_at < before))
        )
