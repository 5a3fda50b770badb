"""Sessions and their tokens: start (with the per-user cap), refresh rotation with reuse detection,
revocation published on the feed in the same transaction.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from common.db import driver_of
from services.auth.context import RequestContext, Runtime, sha256_hex
from services.auth.errors import InvalidRefreshToken
from services.auth.metrics import REFRESH_REUSE
from services.auth.models import RefreshToken, Session, User
from services.auth.repository import RefreshTokenRepository, RevocationRepository, SessionRepository, UserRepository
from services.auth.schemas import TokenPair

REFRESH_TOKEN_BYTES = 32  # 256 bits

# A session started: the user's live sessions beyond the newest (cap - 1) revoked, the new one and its
# refresh token inserted, the login time noted. The sessions evicted are returned, for the feed and audit.
_START = """
WITH beyond AS (
    SELECT id FROM sessions
    WHERE user_id = $1 AND revoked_at IS NULL AND expires_at > $2 AND idle_expires_at > $2
    ORDER BY created_at DESC, id DESC
    OFFSET $3
),
evicted AS (
    UPDATE sessions AS s SET revoked_at = $2, revoked_reason = 'session_cap'
    FROM beyond
    WHERE s.id = beyond.id AND s.revoked_at IS NULL
    RETURNING s.id, s.created_at, s.access_expires_at
),
started AS (
    INSERT INTO sessions (id, user_id, created_at, last_used_at, expires_at, idle_expires_at, access_expires_at, ip,
                          user_agent, mfa_at)
    VALUES ($4, $1, $2, $2, $5, $6, $7, $8, $9, CASE WHEN $12::boolean THEN $2 END)
),
token AS (
    INSERT INTO refresh_tokens (id, session_id, token_hash, created_at, expires_at) VALUES ($10, $4, $11, $2, $6)
),
signed_in AS (
    UPDATE users SET last_login_at = $2 WHERE id = $1
)
SELECT id, access_expires_at FROM evicted ORDER BY created_at, id
"""


SECOND_FACTOR_NOW_REQUIRED = (
    "This session was opened without the second factor the account's role requires: sign in again."
)


def seconds_until(moment: datetime, now: datetime) -> int:
    return max(0, int((moment - now).total_seconds()))


class SessionManager:
    def __init__(self, db: AsyncSession, rt: Runtime) -> None:
        self.db = db
        self.rt = rt
        self.settings = rt.settings
        self.sessions = SessionRepository(db)
        self.tokens = RefreshTokenRepository(db)
        self.revocations = RevocationRepository(db)

    async def _issue(self, row: Session, user: User, now: datetime) -> TokenPair:
        access, exp = self.rt.issuer.access_token(user_id=str(user.id), role=user.role, sid=str(row.id))
        row.access_expires_at = max(row.access_expires_at, datetime.fromtimestamp(exp, UTC))
        refresh = secrets.token_urlsafe(REFRESH_TOKEN_BYTES)
        await self.tokens.add(
            RefreshToken(
                session_id=row.id, token_hash=sha256_hex(refresh), created_at=now, expires_at=row.idle_expires_at
            )
        )
        return self._pair(access, refresh, row.expires_at, row.idle_expires_at, now)

    def _pair(self, access: str, refresh: str, expires: datetime, idle: datetime, now: datetime) -> TokenPair:
        return TokenPair(
            access_token=access,
            refresh_token=refresh,
            expires_in=self.settings.access_token_ttl_seconds,
            refresh_expires_in=seconds_until(expires, now),
            refresh_idle_expires_in=seconds_until(idle, now),
        )

    async def start(
        self, user_id: uuid.UUID, role: str, ctx: RequestContext, *, mfa: bool = False
    ) -> tuple[uuid.UUID, TokenPair, list[uuid.UUID]]:
        """A new session for the user (whose row the caller has locked); the oldest ones beyond the cap go.
        ``mfa``: its login passed a second factor.

        Returns the new session's id, its tokens and the ids of the sessions it evicted. One statement on
        the driver: a login's other work is a few milliseconds, and the ORM's five statements and flushes
        here cost ~5 ms of CPU on their own (measured).
        """
        now = self.rt.now()
        sid = uuid.uuid4()
        access, exp = self.rt.issuer.access_token(user_id=str(user_id), role=role, sid=str(sid))
        expires = now + timedelta(seconds=self.settings.refresh_token_ttl_seconds)
        idle = min(expires, now + timedelta(seconds=self.settings.refresh_idle_timeout_seconds))
        refresh = secrets.token_urlsafe(REFRESH_TOKEN_BYTES)
        async with driver_of(await self.db.connection()) as driver:
            rows = await driver.fetch(
                _START,
                user_id,
                now,
                self.settings.max_sessions_per_user - 1,
                sid,
                expires,
                idle,
                max(now, datetime.fromtimestamp(exp, UTC)),
                ctx.ip,
                ctx.user_agent,
                uuid.uuid4(),
                sha256_hex(refresh),
                mfa,
            )
        revoked = [(row["id"], row["access_expires_at"]) for row in rows]
        await self.publish(revoked, now)
        return sid, self._pair(access, refresh, expires, idle, now), [gone for gone, _ in revoked]

    async def refresh(self, token: str, ctx: RequestContext) -> TokenPair:
        """Rotate: the presented token is spent, a new pair is returned.

        The token row is locked first (then its session), so two concurrent refreshes with one token
        run one after the other and the second sees a spent token: 401 and the session is revoked;
        the session never forks. A spent token presented again is treated as stolen: the whole session
        is revoked, committed, audited, and the answer is 401.
        """
        now = self.rt.now()
        row = await self.tokens.by_hash_for_update(sha256_hex(token))
        if row is None:
            raise InvalidRefreshToken()
        session = await self.sessions.get(row.session_id, lock=True)
        if session is None:  # the foreign key rules it out
            raise RuntimeError(f"refresh token {row.id} has no session")
        actor = ctx.as_actor(str(session.user_id), None)
        if row.rotated_at is not None:
            revoked = await self.sessions.revoke([session.id], now=now, reason="refresh_reuse")
            await self.publish(revoked, now)
            since = (now - row.rotated_at).total_seconds()
            await actor.audit(
                self.db,
                "auth.token.reuse_detected",
                outcome="denied",
                resource_type="session",
                resource_id=str(session.id),
                new_values={
                    "session_revoked": bool(revoked),
                    "seconds_since_rotation": round(since, 3),
                    "likely_concurrent_retry": since <= self.settings.refresh_race_window_seconds,
                },
            )
            # The revocation and its audit event must survive the error answer.
            await self.db.commit()
            REFRESH_REUSE.inc()
            raise InvalidRefreshToken()
        if session.revoked_at is not None or session.expires_at <= now or row.expires_at <= now:
            raise InvalidRefreshToken()
        user = await UserRepository(self.db).get(session.user_id)
        if user is None or not user.is_active:
            raise InvalidRefreshToken()
        if session.mfa_at is None and user.role in self.settings.mfa_roles:
            # Opened before the role required a second factor (an upgrade, a change of setting): it ends here,
            # and the user signs in again through one. Its access tokens are refused from now on too.
            revoked = await self.sessions.revoke([session.id], now=now, reason="mfa_required")
            await self.publish(revoked, now)
            await actor.as_actor(str(user.id), user.role).audit(
                self.db,
                "auth.session.revoked",
                resource_type="session",
                resource_id=str(session.id),
                new_values={"reason": "mfa_required"},
            )
            await self.db.commit()
            raise InvalidRefreshToken(SECOND_FACTOR_NOW_REQUIRED)
        row.rotated_at = now
        session.last_used_at = now
        session.idle_expires_at = min(
            session.expires_at, now + timedelta(seconds=self.settings.refresh_idle_timeout_seconds)
        )
        pair = await self._issue(session, user, now)
        await actor.as_actor(str(user.id), user.role).audit(
            self.db, "auth.token.refreshed", resource_type="session", resource_id=str(session.id)
        )
        return pair

    async def revoke(self, ids: Sequence[uuid.UUID], *, reason: str) -> list[uuid.UUID]:
        now = self.rt.now()
        revoked = await self.sessions.revoke(ids, now=now, reason=reason)
        await self.publish(revoked, now)
        return [sid for sid, _ in revoked]

    async def revoke_all(self, user_id: uuid.UUID, *, reason: str, keep: uuid.UUID | None = None) -> list[uuid.UUID]:
        now = self.rt.now()
        revoked = await self.sessions.revoke_all(user_id, now=now, reason=reason, keep=keep)
        await self.publish(revoked, now)
        return [sid for sid, _ in revoked]

    async def publish(self, revoked: Sequence[tuple[uuid.UUID, datetime]], now: datetime) -> None:
        """Feed entries for revoked sessions whose access tokens may still be presented."""
        await self.revocations.append([(sid, until) for sid, until in revoked if until > now])
