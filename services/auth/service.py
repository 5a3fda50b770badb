"""Account rules: registration, login, sessions, profile, passwords, administration."""

from __future__ import annotations

import secrets
import uuid
from datetime import timedelta
from typing import NoReturn

import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from common.errors import ServiceError, TokenRejected
from common.pagination import Page, page_of, time_key, time_key_after
from common.tokens import Claims
from services.auth.context import RequestContext, Runtime, sha256_hex
from services.auth.devices import DeviceRepository, DeviceTokens
from services.auth.errors import (
    EmailTaken,
    HashingBusy,
    InvalidCredentials,
    InvalidField,
    InvalidResetToken,
    LoginThrottled,
    OwnAccountChange,
    SessionNotFound,
    UnlockNotAllowed,
    UserNotFound,
    WeakPassword,
    WrongPassword,
)
from services.auth.messages import Message
from services.auth.metrics import LOGINS
from services.auth.mfa import Mfa
from services.auth.models import PasswordReset, User
from services.auth.repository import (
    LoginFailureRepository,
    RefreshTokenRepository,
    ResetRepository,
    SessionRepository,
    UserRepository,
)
from services.auth.schemas import (
    AdminUserUpdate,
    LoginResponse,
    RegisterRequest,
    SessionRead,
    TokenPair,
    UserRead,
    UserUpdate,
    lookup_email,
)
from services.auth.sessions import SessionManager
from services.auth.throttle import Gate, LoginThrottle
from services.auth.throttle import not_checked as throttle_not_checked
from services.auth.throttle import succeeded as login_succeeded

log = structlog.get_logger("comptoir.auth")

RESET_TOKEN_BYTES = 32  # 256 bits


def account_key(email: str) -> str:
    """The login-throttle key of an e-mail (known or not)."""
    return sha256_hex(email)


def user_read(user: User) -> UserRead:
    return UserRead.model_validate(user)


def profile_change(changed: list[str], user: User, prefix_length: int) -> dict[str, object]:
    """What an audit event says of a change to a profile: the fields, never their values. The trail is
    insert-only and outlives an erasure, so a name or a number written there could never be erased; a new
    number's country and operator prefix (as the OTP counters keep) is all it says of one."""
    values: dict[str, object] = {"fields": sorted(changed)}
    if "phone_verified" in changed:
        values["phone_verified"] = user.phone_verified
    if "phone" in changed and user.phone:
        values["phone_prefix"] = user.phone[:prefix_length]
    return values


class AccountService:
    def __init__(self, db: AsyncSession, rt: Runtime, ctx: RequestContext) -> None:
        self.db = db
        self.rt = rt
        self.ctx = ctx
        self.settings = rt.settings
        self.users = UserRepository(db)
        self.failures = LoginFailureRepository(db)
        self.sessions = SessionManager(db, rt)

    # ---- helpers ----

    def check_password(self, password: str, *, email: str | None, field: str) -> None:
        reasons = self.rt.policy.problems(password, email=email)
        if reasons:
            raise WeakPassword(field, reasons)

    async def fail(self, error: ServiceError) -> NoReturn:
        """Commit what was recorded (counters, audit events), then answer with ``error``."""
        await self.db.commit()
        raise error

    async def current_user(self, claims: Claims, *, lock: bool = False) -> User:
        user = await self.users.get(uuid.UUID(claims.sub), lock=lock)
        if user is None or not user.is_active:
            # A valid token of an account that is gone or disabled (its sessions are revoked too).
            raise TokenRejected("The account is not available.")
        return user

    async def verify_with_throttle(self, user: User, password: str, purpose: str) -> None:
        """Re-authentication of a signed-in user (password change, erasure), under the login throttle."""
        if user.email is None:  # an erased account has no e-mail and cannot sign in
            raise TokenRejected("The account is not available.")
        key = account_key(user.email)
        ctx = self.ctx
        self.rt.hasher.admit()  # before the attempt is counted: a refusal for want of capacity changes nothing
        gate = await LoginThrottle(self.rt).enter(key, ctx.ip_key)
        if gate.blocked:
            await ctx.audit(
                self.db, "auth.login.throttled", outcome="denied", resource_type="user", resource_id=str(user.id)
            )
            await self.fail(LoginThrottled(gate.retry_after))
        ok, new_hash = await self.checked(password, user.password_hash, key, None)
        if not ok:
            await ctx.audit(
                self.db,
                "auth.password.verification_failed",
                outcome="failure",
                resource_type="user",
                resource_id=str(user.id),
                new_values={"purpose": purpose, "failures": gate.failures},
            )
            await self.fail(LoginThrottled(gate.retry_after) if gate.retry_after else WrongPassword())
        await login_succeeded(self.db, self.rt, key, ctx.ip_key, None)
        if new_hash:
            user.password_hash = new_hash

    # ---- registration and login ----

    async def register(self, body: RegisterRequest) -> UserRead:
        if body.terms_version != self.settings.terms_version:
            raise InvalidField(
                "terms_version", f"The terms in force are version {self.settings.terms_version}: accept that one."
            )
        self.check_password(body.password, email=body.email, field="password")
        password_hash = await self.rt.hasher.hash(body.password)
        now = self.rt.now()
        if await self.users.by_email(body.email) is not None:
            raise EmailTaken("An account with this e-mail already exists.")
        user = User(
            id=uuid.uuid4(),
            email=body.email,
            password_hash=password_hash,
            full_name=body.full_name,
            phone=body.phone,
            phone_verified=False,
            role="customer",
            is_active=True,
            created_at=now,
            updated_at=now,
            password_changed_at=now,
            terms_version=body.terms_version,
            terms_accepted_at=now,
            marketing_consent=body.marketing_consent,
            marketing_consent_at=now if body.marketing_consent else None,
        )
        try:
            async with self.db.begin_nested():
                await self.users.add(user)
        except IntegrityError as exc:  # a concurrent registration of the same e-mail won
            raise EmailTaken("An account with this e-mail already exists.") from exc
        # Failures recorded against this e-mail before it existed must not lock the new account.
        await self.failures.clear(account_key(body.email))
        await self.ctx.as_actor(str(user.id), user.role).audit(
            self.db,
            "auth.user.registered",
            resource_type="user",
            resource_id=str(user.id),
            new_values={
                "role": user.role,
                "phone_set": user.phone is not None,
                "terms_version": user.terms_version,
                "marketing_consent": user.marketing_consent,
            },
        )
        return user_read(user)

    async def login(self, email_input: str, password: str, device_token: str | None = None) -> LoginResponse:
        """One generic 401 for unknown e-mail, wrong password or disabled account; 429 while delayed.

        A device the account knows (``device_token``) is throttled on its own counter only; any other
        attempt is counted per account, per (account, IP) and per IP (see throttle.py).
        """
        email = lookup_email(email_input)
        key = account_key(email)
        ctx = self.ctx
        self.rt.hasher.admit()  # before the attempt is counted: a refusal for want of capacity changes nothing
        # One short transaction of its own finds the account and its device and counts the attempt:
        # the request's own connection is taken only once the password is right.
        async with self.rt.sessionmaker() as short, short.begin():
            account = await UserRepository(short).credentials(email)
            user_id = account.id if account is not None else None
            known = await DeviceTokens(short, self.rt).recognise(device_token, user_id)
            device = known.id_hash if known else None
            gate = await LoginThrottle(self.rt).enter_in(short, key, ctx.ip_key, device)
        if gate.blocked:
            LOGINS.labels("throttled").inc()
            await ctx.audit(
                self.db,
                "auth.login.throttled",
                outcome="denied",
                resource_type="user",
                resource_id=str(user_id) if user_id else None,
                new_values={"retry_after": int(gate.retry_after), "scope": gate.scope},
            )
            await self.fail(LoginThrottled(gate.retry_after))
        # Unknown e-mail: a dummy hash is checked, so the answer takes as long as for a real account.
        ok, new_hash = await self.checked(password, account.password_hash if account else None, key, device)
        if not (ok and account is not None and account.is_active):
            await self._login_failed(user_id, gate, reason="inactive" if ok else "bad_credentials")
        # Lock the account row: concurrent logins of one user apply the session cap one at a time.
        signing_in = await self.users.lock_for_sign_in(account.id)
        if signing_in is None:
            raise InvalidCredentials()
        await login_succeeded(self.db, self.rt, key, ctx.ip_key, device)
        if new_hash:  # parameters changed since it was hashed: upgrade it now
            await self.users.set_password_hash(account.id, new_hash)
        mfa = Mfa(self.db, self.rt, ctx)
        if mfa.needed_for(signing_in.role, totp=signing_in.totp):
            # The password was right: a second factor is asked for (committed with the counters cleared).
            user = await self.users.get(account.id)
            if user is None:
                raise InvalidCredentials()
            await self.fail(await mfa.challenge(user))
        token = await DeviceTokens(self.db, self.rt).remember(account.id, known, ctx)
        pair = await self.start_session(
            account.id, signing_in.role, known_device=known is not None, hash_upgraded=bool(new_hash)
        )
        return LoginResponse(**pair.model_dump(), device_token=token)

    async def checked(self, password: str, stored: str | None, key: str, device: str | None) -> tuple[bool, str | None]:
        """The password checked against ``stored`` for an attempt already counted (under ``key`` and
        ``device``); if its hash is dropped for coming too late, the count is taken back first."""
        try:
            return await self.rt.hasher.verify(password, stored, admitted=True)
        except HashingBusy:
            await throttle_not_checked(self.rt, key, self.ctx.ip_key, device)
            raise

    async def start_session(
        self, user_id: uuid.UUID, role: str, *, known_device: bool, hash_upgraded: bool = False, mfa: bool = False
    ) -> TokenPair:
        """A new session for the user (row locked by the caller), audited; ``mfa``: its login passed a second
        factor."""
        ctx = self.ctx
        sid, pair, evicted = await self.sessions.start(user_id, role, ctx, mfa=mfa)
        actor = ctx.as_actor(str(user_id), role)
        for gone in evicted:
            await actor.audit(
                self.db,
                "auth.session.revoked",
                resource_type="session",
                resource_id=str(gone),
                new_values={"reason": "session_cap"},
            )
        await actor.audit(
            self.db,
            "auth.login.succeeded",
            resource_type="session",
            resource_id=str(sid),
            new_values={"hash_upgraded": hash_upgraded, "known_device": known_device},
        )
        LOGINS.labels("succeeded").inc()
        return pair

    async def _login_failed(self, user_id: uuid.UUID | None, gate: Gate, *, reason: str) -> NoReturn:
        ctx = self.ctx
        resource_id = str(user_id) if user_id else None
        await ctx.audit(
            self.db,
            "auth.login.failed",
            outcome="failure",
            resource_type="user",
            resource_id=resource_id,
            new_values={"reason": reason, "known_account": user_id is not None, "failures": gate.failures},
        )
        if gate.retry_after:
            await ctx.audit(
                self.db,
                "auth.login.throttled",
                outcome="denied",
                resource_type="user",
                resource_id=resource_id,
                new_values={"retry_after": int(gate.retry_after), "scope": gate.scope, "failures": gate.failures},
            )
        LOGINS.labels("failed").inc()
        await self.fail(LoginThrottled(gate.retry_after) if gate.retry_after else InvalidCredentials())

    # ---- sessions ----

    async def refresh(self, refresh_token: str) -> TokenPair:
        return await self.sessions.refresh(refresh_token, self.ctx)

    async def logout(self, claims: Claims, refresh_token: str | None) -> None:
        user_id = uuid.UUID(claims.sub)
        ids = [uuid.UUID(claims.sid or "")]
        if refresh_token:
            # A refresh token of another of the caller's sessions ends that session too.
            row = await RefreshTokenRepository(self.db).by_hash(sha256_hex(refresh_token))
            if row is not None and row.session_id not in ids:
                other = await SessionRepository(self.db).get(row.session_id)
                if other is not None and other.user_id == user_id:
                    ids.append(other.id)
        revoked = await self.sessions.revoke(ids, reason="logout")
        for sid in revoked:
            await self.ctx.audit(self.db, "auth.logout", resource_type="session", resource_id=str(sid))

    async def logout_all(self, claims: Claims) -> None:
        revoked = await self.sessions.revoke_all(uuid.UUID(claims.sub), reason="logout_all")
        await self.ctx.audit(
            self.db,
            "auth.logout_all",
            resource_type="user",
            resource_id=claims.sub,
            new_values={"sessions_revoked": len(revoked)},
        )

    async def list_sessions(self, claims: Claims) -> Page[SessionRead]:
        rows = await SessionRepository(self.db).active(uuid.UUID(claims.sub), self.rt.now())
        items = [
            SessionRead(
                id=row.id,
                created_at=row.created_at,
                last_used_at=row.last_used_at,
                ip=row.ip,
                user_agent=row.user_agent,
                current=str(row.id) == claims.sid,
            )
            for row in reversed(rows)
        ]
        return Page[SessionRead](items=items, next_cursor=None)

    async def delete_session(self, claims: Claims, session_id: uuid.UUID) -> None:
        row = await SessionRepository(self.db).get(session_id)
        if row is None or str(row.user_id) != claims.sub or row.revoked_at is not None:
            raise SessionNotFound("No such session.")
        await self.sessions.revoke([row.id], reason="deleted")
        await self.ctx.audit(
            self.db,
            "auth.session.revoked",
            resource_type="session",
            resource_id=str(row.id),
            new_values={"reason": "deleted"},
        )

    # ---- profile and password ----

    async def me(self, claims: Claims) -> UserRead:
        return user_read(await self.current_user(claims))

    async def update_me(self, claims: Claims, body: UserUpdate) -> UserRead:
        user = await self.current_user(claims, lock=True)
        old = {"full_name": user.full_name, "phone": user.phone, "phone_verified": user.phone_verified}
        fields = body.model_fields_set
        if "full_name" in fields:
            user.full_name = body.full_name
        if "phone" in fields and body.phone != user.phone:
            user.phone = body.phone
            user.phone_verified = False  # a new number is verified again
        new = {"full_name": user.full_name, "phone": user.phone, "phone_verified": user.phone_verified}
        if new != old:
            user.updated_at = self.rt.now()
            changed = [k for k in new if new[k] != old[k]]
            await self.ctx.audit(
                self.db,
                "auth.user.updated",
                resource_type="user",
                resource_id=str(user.id),
                new_values=profile_change(changed, user, self.settings.otp_metric_prefix_length),
            )
        return user_read(user)

    async def change_password(self, claims: Claims, current: str, new: str) -> None:
        user = await self.current_user(claims, lock=True)
        self.check_password(new, email=user.email, field="new_password")
        await self.verify_with_throttle(user, current, "password_change")
        user.password_hash = await self.rt.hasher.hash(new)
        user.password_changed_at = user.updated_at = self.rt.now()
        # A reset link asked for before (by the owner, or by whoever had the mailbox) must not undo the change.
        await ResetRepository(self.db).expire_unused(user.id, user.password_changed_at)
        keep = uuid.UUID(claims.sid) if claims.sid else None
        revoked = await self.sessions.revoke_all(user.id, reason="password_changed", keep=keep)
        await self.ctx.audit(
            self.db,
            "auth.password.changed",
            resource_type="user",
            resource_id=str(user.id),
            new_values={"other_sessions_revoked": len(revoked)},
        )

    # ---- password reset ----

    async def request_reset(self, email_input: str) -> Message | None:
        """Create a reset link for an active account; the caller answers 202 whatever happens here."""
        email = lookup_email(email_input)
        user = await self.users.by_email(email)
        if user is None or not user.is_active or user.email is None:
            return None
        now = self.rt.now()
        resets = ResetRepository(self.db)
        actor = self.ctx.as_actor(None, None)
        if await resets.created_since(user.id, now - timedelta(hours=1)) >= self.settings.password_reset_max_per_hour:
            await actor.audit(
                self.db,
                "auth.password.reset_throttled",
                outcome="denied",
                resource_type="user",
                resource_id=str(user.id),
            )
            return None
        token = secrets.token_urlsafe(RESET_TOKEN_BYTES)
        await resets.add(
            PasswordReset(
                user_id=user.id,
                token_hash=sha256_hex(token),
                created_at=now,
                expires_at=now + timedelta(seconds=self.settings.password_reset_ttl_seconds),
            )
        )
        await actor.audit(self.db, "auth.password.reset_requested", resource_type="user", resource_id=str(user.id))
        minutes = self.settings.password_reset_ttl_seconds // 60
        link = self.settings.password_reset_link.replace("{token}", token)
        return Message(
            channel="email",
            to=user.email,
            subject="Reset your Comptoir password",
            body=(
                f"Someone (hopefully you) asked to reset the password of your Comptoir account.\n"
                f"Open this link within {minutes} minutes to choose a new one:\n{link}\n"
                f"If it was not you, ignore this message: your password stays as it is."
            ),
        )

    async def confirm_reset(self, token: str, new_password: str) -> None:
        now = self.rt.now()
        row = await ResetRepository(self.db).usable_for_update(sha256_hex(token), now)
        if row is None:
            raise InvalidResetToken()
        user = await self.users.get(row.user_id, lock=True)
        if user is None or not user.is_active or user.email is None:
            raise InvalidResetToken()
        self.check_password(new_password, email=user.email, field="new_password")
        user.password_hash = await self.rt.hasher.hash(new_password)
        user.password_changed_at = user.updated_at = now
        row.used_at = now
        # A victim locked out by someone guessing always gets back in this way.
        await self.failures.clear(account_key(user.email))
        revoked = await self.sessions.revoke_all(user.id, reason="password_reset")
        devices = await DeviceRepository(self.db).revoke_all(user.id, now)
        await self.ctx.as_actor(str(user.id), user.role).audit(
            self.db,
            "auth.password.reset",
            resource_type="user",
            resource_id=str(user.id),
            new_values={"sessions_revoked": len(revoked), "devices_revoked": devices},
        )

    # ---- administration ----

    async def list_users(
        self, *, limit: int, cursor: str | None, query: str | None, role: str | None
    ) -> Page[UserRead]:
        rows = await self.users.list(limit=limit + 1, after=time_key_after(cursor), query=query, role=role)
        return page_of(rows, limit, user_read, time_key)

    async def admin_update(self, claims: Claims, user_id: uuid.UUID, body: AdminUserUpdate) -> UserRead:
        user = await self.users.get(user_id, lock=True)
        if user is None:
            raise UserNotFound("No such user.")
        fields = body.model_fields_set
        role = body.role if "role" in fields and body.role is not None else user.role
        active = body.is_active if "is_active" in fields and body.is_active is not None else user.is_active
        if str(user.id) == claims.sub and (role != user.role or active != user.is_active):
            raise OwnAccountChange()
        old = {"role": user.role, "is_active": user.is_active}
        user.role, user.is_active = role, active
        new = {"role": user.role, "is_active": user.is_active}
        if old == new:
            return user_read(user)
        user.updated_at = self.rt.now()
        # A role lives in access tokens for up to an hour and a disabled account must stop at once:
        # either change ends every session (the user signs in again with the new role).
        reason = "deactivated" if not active else "role_changed"
        revoked = await self.sessions.revoke_all(user.id, reason=reason)
        if old["role"] != new["role"]:
            await self.ctx.audit(
                self.db,
                "auth.user.role_changed",
                resource_type="user",
                resource_id=str(user.id),
                old_values={"role": old["role"]},
                new_values={"role": new["role"], "sessions_revoked": len(revoked)},
            )
        if old["is_active"] != new["is_active"]:
            await self.ctx.audit(
                self.db,
                "auth.user.deactivated" if not active else "auth.user.activated",
                resource_type="user",
                resource_id=str(user.id),
                old_values={"is_active": old["is_active"]},
                new_values={"is_active": active, "sessions_revoked": len(revoked)},
            )
        return user_read(user)

    async def unlock(self, claims: Claims, user_id: uuid.UUID) -> None:
        user = await self.users.get(user_id)
        if user is None or user.email is None:
            raise UserNotFound("No such user.")
        if user.role != "customer" and claims.role != "admin":
            # Staff clearing a colleague's or an admin's counters could keep guessing at that account.
            await self.ctx.audit(
                self.db,
                "auth.user.unlock_denied",
                outcome="denied",
                resource_type="user",
                resource_id=str(user.id),
                new_values={"role": user.role},
            )
            await self.fail(UnlockNotAllowed())
        await self.failures.clear(account_key(user.email))
        await self.ctx.audit(self.db, "auth.user.unlocked", resource_type="user", resource_id=str(user.id))
