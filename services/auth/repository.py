"""Queries only: flush, never commit."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, delete, func, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession

from common.db import columns, driver_of, escape_like
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


@dataclass(frozen=True, slots=True)
class Credentials:
    id: uuid.UUID
    password_hash: str | None
    is_active: bool


@dataclass(frozen=True, slots=True)
class SignIn:
    role: str
    totp: bool  # a confirmed authenticator


_LOCK_FOR_SIGN_IN = """
SELECT u.role,
       EXISTS (SELECT 1 FROM mfa_totp AS m WHERE m.user_id = u.id AND m.confirmed_at IS NOT NULL) AS totp
FROM users AS u
WHERE u.id = $1 AND u.erased_at IS NULL
FOR UPDATE OF u
"""


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

    # A login's two reads of the account are on the driver: through the ORM each cost ~1 ms of CPU, ten
    # times the statement (measured), and every login attempt makes them.

    async def credentials(self, email: str) -> Credentials | None:
        """What a login checks the password against: the account of ``email``, its hash, whether it is active."""
        async with driver_of(await self.session.connection()) as driver:
            row = await driver.fetchrow("SELECT id, password_hash, is_active FROM users WHERE email = $1", email)
        return Credentials(row["id"], row["password_hash"], row["is_active"]) if row is not None else None

    async def lock_for_sign_in(self, user_id: uuid.UUID) -> SignIn | None:
        """The account's row locked, for a login whose password was right: its role and whether it has a
        confirmed authenticator (None if it is gone)."""
        async with driver_of(await self.session.connection()) as driver:
            row = await driver.fetchrow(_LOCK_FOR_SIGN_IN, user_id)
        return SignIn(row["role"], row["totp"]) if row is not None else None

    async def set_password_hash(self, user_id: uuid.UUID, password_hash: str) -> None:
        """The same password hashed again with the parameters in force (a login upgrading it)."""
        async with driver_of(await self.session.connection()) as driver:
            await driver.execute("UPDATE users SET password_hash = $2 WHERE id = $1", user_id, password_hash)

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
        async with driver_of(await self.session.connection()) as driver:
            await driver.execute("SELECT pg_advisory_xact_lock($1)", REVOCATION_LOCK)
            await driver.execute(
                "INSERT INTO revocations (sid, expires_at) SELECT * FROM unnest($1::uuid[], $2::timestamptz[])",
                *columns(entries, 0, 1),
            )

    async def prune(self, before: datetime) -> None:
        await self.session.execute(delete(Revocation).where(Revocation.expires_at < before))


@dataclass(slots=True)
class Counter:
    """One login-failure counter as locked (``LoginFailureRepository.lock``), changed by the throttle."""

    failures: int
    locked_until: datetime | None
    last_failure_at: datetime | None


_CREATE_COUNTERS = """
INSERT INTO login_failures (account_key, ip, failures)
SELECT account_key, ip, 0 FROM unnest($1::varchar[], $2::varchar[]) AS k(account_key, ip)
ON CONFLICT DO NOTHING
"""
_LOCK_COUNTERS = """
SELECT account_key, ip, failures, locked_until, last_failure_at FROM login_failures
WHERE (account_key, ip) IN (SELECT * FROM unnest($1::varchar[], $2::varchar[]))
ORDER BY account_key, ip
FOR UPDATE
"""
_SAVE_COUNTERS = """
UPDATE login_failures AS f
SET failures = v.failures, locked_until = v.locked_until, last_failure_at = v.last_failure_at
FROM unnest($1::varchar[], $2::varchar[], $3::integer[], $4::timestamptz[], $5::timestamptz[])
    AS v(account_key, ip, failures, locked_until, last_failure_at)
WHERE f.account_key = v.account_key AND f.ip = v.ip
"""

_UNCOUNT = """
UPDATE login_failures
SET failures = greatest(failures - 1, 0), locked_until = CASE WHEN failures - 1 < $3 THEN NULL ELSE locked_until END
WHERE account_key = $1 AND ip = $2
"""
_CLEAR_COUNTERS = """
DELETE FROM login_failures WHERE (account_key, ip) IN (SELECT * FROM unnest($1::varchar[], $2::varchar[]))
"""


class LoginFailureRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def lock(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Counter]:
        """The counter rows of ``keys`` ((account_key, ip) pairs), created if missing, locked in one order.

        On the driver, as ``save``: every login attempt runs both, and through the ORM (three statements
        and a flush) they cost ~2 ms of CPU an attempt (measured)."""
        ordered = columns(sorted(set(keys)), 0, 1)
        async with driver_of(await self.session.connection()) as driver:
            await driver.execute(_CREATE_COUNTERS, *ordered)
            rows = await driver.fetch(_LOCK_COUNTERS, *ordered)
        return {
            (row["account_key"], row["ip"]): Counter(row["failures"], row["locked_until"], row["last_failure_at"])
            for row in rows
        }

    async def save(self, counters: Mapping[tuple[str, str], Counter]) -> None:
        """Write back counters changed after ``lock`` (in the same transaction)."""
        async with driver_of(await self.session.connection()) as driver:
            await driver.execute(
                _SAVE_COUNTERS,
                *columns(counters, 0, 1),
                *columns(counters.values(), "failures", "locked_until", "last_failure_at"),
            )

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
        async with driver_of(await self.session.connection()) as driver:
            await driver.execute(_UNCOUNT, key[0], key[1], threshold)

    async def clear_keys(self, keys: Sequence[tuple[str, str]]) -> None:
        async with driver_of(await self.session.connection()) as driver:
            await driver.execute(_CLEAR_COUNTERS, *columns(keys, 0, 1))

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

    async def expire_unused(self, user_id: uuid.UUID, now: datetime) -> None:
        """End the account's unused links (the rows stay, for the hourly cap)."""
        await self.session.execute(
            update(PasswordReset)
            .where(PasswordReset.user_id == user_id, PasswordReset.used_at.is_(None), PasswordReset.expires_at > now)
            .values(expires_at=now)
        )

    async def add(self, row: PasswordReset) -> None:
        # Only the newest link works: a new request expires the unused ones.
        await self.expire_unused(row.user_id, row.created_at)
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
