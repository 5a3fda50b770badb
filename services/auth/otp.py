"""Phone verification: 6-digit codes from ``secrets``, stored as an HMAC, single use, 5 tries, capped sends."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from datetime import datetime, timedelta
from typing import NoReturn

from sqlalchemy.ext.asyncio import AsyncSession

from common.tokens import Claims
from services.auth.context import RequestContext, Runtime
from services.auth.errors import InvalidCode, NoPhone, OtpThrottled, PhoneAlreadyVerified
from services.auth.messages import Message
from services.auth.metrics import OTP_SENDS
from services.auth.models import OtpCode, OtpSend, User
from services.auth.repository import OtpRepository
from services.auth.schemas import UserRead
from services.auth.service import AccountService, profile_change, user_read

DAY = timedelta(days=1)


def wait_for(times: list[datetime], *, limit: int, period: timedelta, now: datetime) -> float:
    """Seconds until fewer than ``limit`` of ``times`` (oldest first) fall within ``period`` (0: none)."""
    recent = [t for t in times if t > now - period]
    if len(recent) < limit:
        return 0.0
    return (recent[len(recent) - limit] + period - now).total_seconds()


class OtpService:
    def __init__(self, db: AsyncSession, rt: Runtime, ctx: RequestContext) -> None:
        self.db = db
        self.rt = rt
        self.ctx = ctx
        self.settings = rt.settings
        self.codes = OtpRepository(db)
        self.accounts = AccountService(db, rt, ctx)

    def mac(self, user_id: uuid.UUID, phone: str, code: str) -> str:
        message = f"{user_id}|{phone}|{code}".encode()
        return hmac.new(self.rt.otp_key, message, hashlib.sha256).hexdigest()

    def prefix(self, phone: str) -> str:
        return phone[: self.settings.otp_metric_prefix_length]

    async def _wait(self, user: User, phone: str, now: datetime) -> float:
        s = self.settings
        window = timedelta(seconds=s.otp_window_seconds)
        since = now - max(DAY, window)
        waits = []
        for times, per_window, per_day in (
            (await self.codes.sends_since(since, user_id=user.id), s.otp_max_per_window, s.otp_max_per_day),
            (await self.codes.sends_since(since, phone=phone), s.otp_phone_max_per_window, s.otp_phone_max_per_day),
            (await self.codes.sends_since(since, ip=self.ctx.ip_key), s.otp_ip_max_per_window, s.otp_ip_max_per_day),
        ):
            waits.append(wait_for(times, limit=per_window, period=window, now=now))
            waits.append(wait_for(times, limit=per_day, period=DAY, now=now))
        return max(waits)

    async def request(self, claims: Claims, phone: str | None) -> Message:
        """Send a code to the account's phone (``phone``, when given, becomes the account's number)."""
        user = await self.accounts.current_user(claims, lock=True)
        target = phone or user.phone
        if target is None:
            raise NoPhone()
        if target == user.phone and user.phone_verified:
            raise PhoneAlreadyVerified("This phone number is already verified.")
        now = self.rt.now()
        wait = await self._wait(user, target, now)
        if wait > 0:
            await self.ctx.audit(
                self.db,
                "auth.otp.throttled",
                outcome="denied",
                resource_type="user",
                resource_id=str(user.id),
                new_values={"destination_prefix": self.prefix(target), "retry_after": int(wait) + 1},
            )
            await self.accounts.fail(OtpThrottled(wait))
        if target != user.phone:
            changed = ["phone", "phone_verified"] if user.phone_verified else ["phone"]
            user.phone, user.phone_verified, user.updated_at = target, False, now
            await self.ctx.audit(
                self.db,
                "auth.user.updated",
                resource_type="user",
                resource_id=str(user.id),
                new_values=profile_change(changed, user, self.settings.otp_metric_prefix_length),
            )
        code = f"{secrets.randbelow(10**self.settings.otp_digits):0{self.settings.otp_digits}d}"
        await self.codes.add_code(
            OtpCode(
                user_id=user.id,
                phone=target,
                code_mac=self.mac(user.id, target, code),
                created_at=now,
                expires_at=now + timedelta(seconds=self.settings.otp_ttl_seconds),
                attempts=0,
            ),
            OtpSend(user_id=user.id, phone=target, ip=self.ctx.ip_key, sent_at=now),
        )
        OTP_SENDS.labels(self.prefix(target)).inc()
        await self.ctx.audit(
            self.db,
            "auth.otp.sent",
            resource_type="user",
            resource_id=str(user.id),
            new_values={"destination_prefix": self.prefix(target)},
        )
        minutes = self.settings.otp_ttl_seconds // 60
        return Message(
            channel="sms",
            to=target,
            body=f"Comptoir: your verification code is {code}. It expires in {minutes} minutes. Never share it.",
        )

    async def verify(self, claims: Claims, code: str) -> UserRead:
        user = await self.accounts.current_user(claims, lock=True)
        now = self.rt.now()
        row = await self.codes.live_code(user.id, now, self.settings.otp_max_attempts)
        if row is None or row.phone != user.phone:
            if row is not None:
                row.consumed_at = now  # the number changed since: this code verifies nothing
            await self._failed(user, reason="no_live_code")
        if not hmac.compare_digest(self.mac(user.id, row.phone, code.strip()), row.code_mac):
            row.attempts += 1
            dead = row.attempts >= self.settings.otp_max_attempts
            await self._failed(user, reason="wrong_code", attempts=row.attempts, code_dead=dead)
        row.consumed_at = now
        user.phone_verified = True
        user.updated_at = now
        await self.ctx.audit(
            self.db,
            "auth.otp.verified",
            resource_type="user",
            resource_id=str(user.id),
            new_values={"phone_verified": True},
        )
        return user_read(user)

    async def _failed(self, user: User, *, reason: str, **details: object) -> NoReturn:
        await self.ctx.audit(
            self.db,
            "auth.otp.failed",
            outcome="failure",
            resource_type="user",
            resource_id=str(user.id),
            new_values={"reason": reason, **details},
        )
        await self.accounts.fail(InvalidCode())
