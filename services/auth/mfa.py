"""A second factor: TOTP (RFC 6238, pyotp) with single-use recovery codes.

- Enrolment (``POST /mfa/totp/enrol``) returns a secret and its ``otpauth://`` provisioning URI; it is
  live once confirmed with a code (``POST /mfa/totp/confirm``), which returns the recovery codes once.
- A login whose password is right, for an account with a live authenticator or whose role requires one
  (``AUTH_MFA_REQUIRED_ROLES``), answers ``401`` ``urn:comptoir:problem:mfa-required`` with an
  ``mfa_token``; ``POST /login/mfa`` with that token and a code completes it. An account whose role
  requires a second factor but has none enrols right there: the challenge carries the secret and URI,
  and the first code confirms it.
- Codes are checked with one step of clock drift either way, never twice (the last step is kept);
  recovery codes are stored as HMACs and work once. Wrong codes are throttled per user like logins,
  and each challenge dies after a few tries.
- Disabling needs the password and a code, and is refused while the role requires a second factor.
- The secret is stored encrypted (AES-GCM, key derived from the auth service's HMAC key).
Every step is audited.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import uuid
from datetime import datetime, timedelta
from typing import Literal

import pyotp
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BaseModel, Field
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from common.audit import Outcome
from services.auth.context import RequestContext, Runtime, sha256_hex
from services.auth.errors import (
    InvalidMfaChallenge,
    InvalidMfaCode,
    LoginThrottled,
    MfaRequired,
    MfaStateConflict,
    WrongMfaCode,
)
from services.auth.models import MfaChallenge, MfaRecoveryCode, MfaTotp, User
from services.auth.repository import LoginFailureRepository
from services.auth.schemas import Input, LoginResponse
from services.auth.throttle import LoginThrottle, mfa_key

TOTP_DIGITS = 6
TOTP_PERIOD = 30
CHALLENGE_BYTES = 32
_SECRET_LABEL = b"comptoir-totp-secret-v1"
_RECOVERY_LABEL = b"comptoir-recovery-code-v1"
_RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i
_TOTP_CODE = re.compile(r"^\d{6}$")

Method = Literal["totp", "recovery_code"]


# ---- bodies ----


class TotpEnrolment(BaseModel):
    secret: str = Field(description="Base32 secret, for apps that cannot read the URI.")
    provisioning_uri: str = Field(description="otpauth://totp/… (show it as a QR code).")


class CodeBody(Input):
    code: str = Field(min_length=1, max_length=32)


class MfaConfirm(Input):
    password: str = Field(
        min_length=1,
        max_length=1024,
        description="The account's password: a stolen access "
        "token alone must not bind someone else's authenticator to the account.",
    )
    code: str = Field(min_length=1, max_length=32, description="A code from the app being set up.")


class RecoveryCodes(BaseModel):
    recovery_codes: list[str] = Field(description="Shown once; each works once.")


class MfaDisable(Input):
    password: str = Field(min_length=1, max_length=1024)
    code: str = Field(min_length=1, max_length=32, description="A code from the app, or a recovery code.")


class MfaStatus(BaseModel):
    totp_enabled: bool
    recovery_codes_left: int
    required: bool = Field(description="The account's role requires a second factor.")


class MfaLogin(Input):
    mfa_token: str = Field(min_length=1, max_length=256)
    code: str = Field(min_length=1, max_length=32, description="A code from the app, or a recovery code.")
    device_token: str | None = Field(None, max_length=512)
    session_mode: Literal["bearer", "cookie"] = "bearer"


class MfaLoginResponse(LoginResponse):
    recovery_codes: list[str] | None = Field(
        None, description="Only when this login confirmed a first enrolment: shown once."
    )


class MfaChallengeProblem(BaseModel):
    """The 401 answer of a login whose password was right and whose second factor is asked for."""

    type: Literal["urn:comptoir:problem:mfa-required"]
    title: str
    status: int
    detail: str
    mfa_token: str = Field(description="Send it with a code to POST /api/v1/auth/login/mfa.")
    expires_in: int
    methods: list[str]
    enrolment: TotpEnrolment | None = Field(
        None, description="The role requires a second factor the account does not have yet: set it up now."
    )


# ---- secrets at rest ----


def _derived(key: bytes, label: bytes) -> bytes:
    return hmac.new(key, label, hashlib.sha256).digest()


def seal(otp_key: bytes, secret: str) -> str:
    nonce = secrets.token_bytes(12)
    box = AESGCM(_derived(otp_key, _SECRET_LABEL)).encrypt(nonce, secret.encode(), _SECRET_LABEL)
    return base64.urlsafe_b64encode(nonce + box).decode()


def unseal(otp_key: bytes, sealed: str) -> str:
    raw = base64.urlsafe_b64decode(sealed.encode())
    try:
        return AESGCM(_derived(otp_key, _SECRET_LABEL)).decrypt(raw[:12], raw[12:], _SECRET_LABEL).decode()
    except InvalidTag as exc:  # another key: the operator replaced AUTH_OTP_HMAC_KEY
        raise MfaStateConflict("The authenticator cannot be read with this server's key.") from exc


def normalise_recovery(code: str) -> str:
    return re.sub(r"[\s-]", "", code).lower()


def new_recovery_code() -> str:
    raw = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(12))
    return f"{raw[:4]}-{raw[4:8]}-{raw[8:]}"


def provisioning_uri(secret: str, email: str, issuer: str) -> str:
    return pyotp.TOTP(secret, digits=TOTP_DIGITS, interval=TOTP_PERIOD).provisioning_uri(name=email, issuer_name=issuer)


class Mfa:
    def __init__(self, db: AsyncSession, rt: Runtime, ctx: RequestContext) -> None:
        self.db = db
        self.rt = rt
        self.ctx = ctx
        self.settings = rt.settings

    # ---- state ----

    async def totp(self, user_id: uuid.UUID, *, lock: bool = False) -> MfaTotp | None:
        stmt = select(MfaTotp).where(MfaTotp.user_id == user_id)
        if lock:
            stmt = stmt.with_for_update().execution_options(populate_existing=True)
        return (await self.db.scalars(stmt)).one_or_none()

    def required(self, role: str) -> bool:
        return role in self.settings.mfa_roles

    def needed_for(self, role: str, *, totp: bool) -> bool:
        """A login of ``role`` needs a second factor: the role requires one, or the user confirmed one."""
        return self.required(role) or totp

    async def status(self, user: User) -> MfaStatus:
        row = await self.totp(user.id)
        left = await self.db.scalar(
            select(func.count()).where(MfaRecoveryCode.user_id == user.id, MfaRecoveryCode.used_at.is_(None))
        )
        return MfaStatus(
            totp_enabled=row is not None and row.confirmed_at is not None,
            recovery_codes_left=int(left or 0),
            required=self.required(user.role),
        )

    async def _audit(self, user: User, action: str, *, outcome: Outcome = "success", **values: object) -> None:
        await self.ctx.as_actor(str(user.id), user.role).audit(
            self.db,
            action,
            outcome=outcome,
            resource_type="user",
            resource_id=str(user.id),
            new_values=dict(values) or None,
        )

    # ---- codes ----

    def _recovery_mac(self, code: str) -> str:
        return hmac.new(
            _derived(self.rt.otp_key, _RECOVERY_LABEL), normalise_recovery(code).encode(), hashlib.sha256
        ).hexdigest()

    def _totp_step(self, row: MfaTotp, code: str, now: datetime) -> int | None:
        """The time step ``code`` belongs to (one step of drift either way), if not used already."""
        if not _TOTP_CODE.match(code):
            return None
        totp = pyotp.TOTP(unseal(self.rt.otp_key, row.secret_box), digits=TOTP_DIGITS, interval=TOTP_PERIOD)
        current = int(now.timestamp()) // TOTP_PERIOD
        for step in (current - 1, current, current + 1):
            expected = totp.generate_otp(step)
            if hmac.compare_digest(expected, code) and (row.last_step is None or step > row.last_step):
                return step
        return None

    async def _check(self, user: User, row: MfaTotp, code: str, *, recovery: bool) -> Method | None:
        now = self.rt.now()
        step = self._totp_step(row, code.strip(), now)
        if step is not None:
            row.last_step = step
            return "totp"
        if not recovery:
            return None
        stmt = (
            select(MfaRecoveryCode)
            .where(
                MfaRecoveryCode.user_id == user.id,
                MfaRecoveryCode.code_mac == self._recovery_mac(code),
                MfaRecoveryCode.used_at.is_(None),
            )
            .with_for_update()
        )
        found = (await self.db.scalars(stmt)).one_or_none()
        if found is None:
            return None
        found.used_at = now
        return "recovery_code"

    async def _gate(self, user: User) -> float:
        """Count the attempt; the wait a wrong code starts."""
        gate = await LoginThrottle(self.rt).enter_mfa(str(user.id))
        if gate.blocked:
            await self._audit(user, "auth.mfa.throttled", outcome="denied", retry_after=int(gate.retry_after))
            await self.db.commit()
            raise LoginThrottled(gate.retry_after)
        return gate.retry_after

    async def _passed(self, user: User) -> None:
        await LoginFailureRepository(self.db).clear_keys([mfa_key(str(user.id))])

    async def verify(self, user: User, row: MfaTotp, code: str, *, recovery: bool, purpose: str) -> Method:
        """Check a code under the per-user throttle; a wrong one is audited, committed and refused."""
        return await self._checked(user, row, code, await self._gate(user), recovery=recovery, purpose=purpose)

    async def _checked(
        self, user: User, row: MfaTotp, code: str, wait: float, *, recovery: bool, purpose: str
    ) -> Method:
        """Check a code the throttle has let through; ``wait`` is what a wrong one starts."""
        method = await self._check(user, row, code, recovery=recovery)
        if method is None:
            await self._audit(user, "auth.mfa.failed", outcome="failure", purpose=purpose)
            await self.db.commit()
            if wait:
                raise LoginThrottled(wait)
            raise InvalidMfaCode() if purpose == "login" else WrongMfaCode()
        await self._passed(user)
        if method == "recovery_code":
            await self._audit(user, "auth.mfa.recovery_code_used", purpose=purpose)
        return method

    async def _new_recovery_codes(self, user: User) -> list[str]:
        now = self.rt.now()
        await self.db.execute(delete(MfaRecoveryCode).where(MfaRecoveryCode.user_id == user.id))
        codes = [new_recovery_code() for _ in range(self.settings.mfa_recovery_codes)]
        self.db.add_all(
            [MfaRecoveryCode(user_id=user.id, code_mac=self._recovery_mac(c), created_at=now) for c in codes]
        )
        await self.db.flush()
        return codes

    # ---- enrolment ----

    async def _start_enrolment(self, user: User) -> TotpEnrolment:
        """A new unconfirmed secret (replacing an unconfirmed one); refused once one is live."""
        if user.email is None:  # an erased account has no authenticator to set up
            raise MfaStateConflict("The account is not available.")
        row = await self.totp(user.id, lock=True)
        if row is not None and row.confirmed_at is not None:
            raise MfaStateConflict("An authenticator is already set up: disable it first.")
        secret = pyotp.random_base32()
        now = self.rt.now()
        if row is None:
            self.db.add(MfaTotp(user_id=user.id, secret_box=seal(self.rt.otp_key, secret), created_at=now))
        else:
            row.secret_box, row.created_at, row.last_step = seal(self.rt.otp_key, secret), now, None
        await self.db.flush()
        await self._audit(user, "auth.mfa.enrolment_started")
        return TotpEnrolment(
            secret=secret, provisioning_uri=provisioning_uri(secret, user.email, self.settings.mfa_issuer)
        )

    async def enrol(self, user: User) -> TotpEnrolment:
        return await self._start_enrolment(user)

    async def confirm(self, user: User, code: str) -> RecoveryCodes:
        row = await self.totp(user.id, lock=True)
        if row is None or row.confirmed_at is not None:
            raise MfaStateConflict("There is no authenticator waiting for confirmation: enrol first.")
        await self.verify(user, row, code, recovery=False, purpose="enrolment")
        row.confirmed_at = self.rt.now()
        codes = await self._new_recovery_codes(user)
        await self._audit(user, "auth.mfa.enabled", recovery_codes=len(codes))
        return RecoveryCodes(recovery_codes=codes)

    async def disable(self, user: User, code: str) -> None:
        """After the caller checked the password."""
        if self.required(user.role):
            raise MfaStateConflict("Your role requires a second factor: it cannot be disabled.")
        row = await self.totp(user.id, lock=True)
        if row is None or row.confirmed_at is None:
            raise MfaStateConflict("No authenticator is set up.")
        await self.verify(user, row, code, recovery=True, purpose="disable")
        await self.db.execute(delete(MfaRecoveryCode).where(MfaRecoveryCode.user_id == user.id))
        await self.db.delete(row)
        await self._audit(user, "auth.mfa.disabled")

    # ---- login ----

    async def challenge(self, user: User) -> MfaRequired:
        """The answer to a right password when a second factor is needed (the caller commits it)."""
        row = await self.totp(user.id)
        enrolment = None
        if row is None or row.confirmed_at is None:
            enrolment = await self._start_enrolment(user)
        token = secrets.token_urlsafe(CHALLENGE_BYTES)
        now = self.rt.now()
        ttl = self.settings.mfa_challenge_ttl_seconds
        self.db.add(
            MfaChallenge(
                user_id=user.id,
                token_hash=sha256_hex(token),
                created_at=now,
                expires_at=now + timedelta(seconds=ttl),
                attempts=0,
                enrol=enrolment is not None,
            )
        )
        await self.db.flush()
        await self._audit(user, "auth.mfa.challenged", enrolment=enrolment is not None)
        extra: dict[str, object] = {
            "mfa_token": token,
            "expires_in": ttl,
            "methods": ["totp"] if enrolment else ["totp", "recovery_code"],
        }
        if enrolment is not None:
            extra["enrolment"] = enrolment.model_dump()
        return MfaRequired(extra)

    async def answer(self, token: str, code: str) -> tuple[User, Method, list[str] | None]:
        """Check a challenge's code: its user (row locked), the method, recovery codes of a first enrolment."""
        now = self.rt.now()
        stmt = select(MfaChallenge).where(MfaChallenge.token_hash == sha256_hex(token)).with_for_update()
        challenge = (await self.db.scalars(stmt)).one_or_none()
        if (
            challenge is None
            or challenge.consumed_at is not None
            or challenge.expires_at <= now
            or challenge.attempts >= self.settings.mfa_max_attempts
        ):
            raise InvalidMfaChallenge()
        user = await self.db.scalar(
            select(User)
            .where(User.id == challenge.user_id, User.erased_at.is_(None))
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        row = await self.totp(challenge.user_id, lock=True)
        if user is None or not user.is_active or row is None:
            raise InvalidMfaChallenge()
        wait = await self._gate(user)
        # Only a code that is checked uses one of the challenge's tries, not a 429 during a wait.
        challenge.attempts += 1
        method = await self._checked(user, row, code, wait, recovery=not challenge.enrol, purpose="login")
        challenge.consumed_at = now
        codes = None
        if challenge.enrol:
            row.confirmed_at = now
            codes = await self._new_recovery_codes(user)
            await self._audit(user, "auth.mfa.enabled", recovery_codes=len(codes))
        await self._audit(user, "auth.mfa.verified", method=method)
        return user, method, codes

    async def new_recovery_codes(self, user: User, code: str) -> RecoveryCodes:
        """Replace the recovery codes (the old ones stop working), proven by a code from the app."""
        row = await self.totp(user.id, lock=True)
        if row is None or row.confirmed_at is None:
            raise MfaStateConflict("No authenticator is set up.")
        await self.verify(user, row, code, recovery=False, purpose="recovery_codes")
        codes = await self._new_recovery_codes(user)
        await self._audit(user, "auth.mfa.recovery_codes_replaced", recovery_codes=len(codes))
        return RecoveryCodes(recovery_codes=codes)
