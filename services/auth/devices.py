"""Device tokens: what lets a known device sign in while strangers guessing the password are held back.

A successful login issues a device token, bound to the account:

    <device id>.<HMAC-SHA256(device key, "<user id>:<device id>")>   (both parts base64url)

The device key is derived from the auth service's OTP HMAC key, so there is no new secret to manage.
Only the SHA-256 of the device id is stored (``auth.devices``), with when it was first and last seen,
so that a device can be revoked (password reset, the user's own request) and forgotten (retention).

A token counts as *known* for a login only if its MAC matches the account of the e-mail given, its row
exists for that account, is not revoked and was seen within ``device_ttl_days``. Anything else (no
token, a malformed or forged one, one of another account, an unknown e-mail) is simply an unknown
device: never an error, so the answer does not tell an attacker anything.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from common.db import driver_of
from services.auth.context import RequestContext, Runtime, sha256_hex
from services.auth.models import Device

DEVICE_ID_BYTES = 24
DEVICE_KEY_LABEL = b"comptoir-device-token-v1"
# The MAC of unknown accounts is computed against this id, so that they cost the same work.
NOBODY = uuid.UUID(int=0)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def device_key(otp_key: bytes) -> bytes:
    return hmac.new(otp_key, DEVICE_KEY_LABEL, hashlib.sha256).digest()


# Both run on every login (on the driver: through the ORM each cost ~1 ms of CPU, measured).
_RECOGNISE = """
SELECT id FROM devices WHERE id_hash = $1 AND user_id = $2 AND revoked_at IS NULL AND last_seen_at > $3 LIMIT 1
"""
_ADD = """
INSERT INTO devices (id, user_id, id_hash, created_at, last_seen_at, user_agent) VALUES ($1, $2, $3, $4, $4, $5)
"""


@dataclass(frozen=True)
class KnownDevice:
    row_id: uuid.UUID
    id_hash: str
    token: str


class DeviceTokens:
    """Signing and checking device tokens, and their rows."""

    def __init__(self, db: AsyncSession, rt: Runtime) -> None:
        self.db = db
        self.rt = rt
        self.key = device_key(rt.otp_key)

    def _mac(self, user_id: uuid.UUID, device_id: str) -> bytes:
        return hmac.new(self.key, f"{user_id}:{device_id}".encode(), hashlib.sha256).digest()

    def sign(self, user_id: uuid.UUID, device_id: str) -> str:
        return f"{device_id}.{_b64(self._mac(user_id, device_id))}"

    def _parse(self, token: str | None, user_id: uuid.UUID | None) -> str | None:
        """The device id if ``token`` is a well-formed token of ``user_id`` (same work either way)."""
        device_id, _, mac_text = (token or "").partition(".")
        try:
            mac = _unb64(mac_text)
        except (binascii.Error, ValueError):
            mac = b""
        expected = self._mac(user_id or NOBODY, device_id)
        if user_id is None or not device_id or not hmac.compare_digest(mac, expected):
            return None
        return device_id

    async def recognise(self, token: str | None, user_id: uuid.UUID | None) -> KnownDevice | None:
        """The device of ``token`` if it is a live device of ``user_id`` (None for an unknown e-mail)."""
        device_id = self._parse(token, user_id)
        id_hash = sha256_hex(device_id or secrets.token_urlsafe(DEVICE_ID_BYTES))
        since = self.rt.now() - timedelta(days=self.rt.settings.device_ttl_days)
        async with driver_of(await self.db.connection()) as driver:
            row_id = await driver.fetchval(_RECOGNISE, id_hash, user_id or NOBODY, since)
        if device_id is None or row_id is None or token is None:
            return None
        return KnownDevice(row_id=row_id, id_hash=id_hash, token=token)

    async def remember(self, user_id: uuid.UUID, known: KnownDevice | None, ctx: RequestContext) -> str:
        """After a successful login: the token to hand back (the known one, or a new device's)."""
        now = self.rt.now()
        async with driver_of(await self.db.connection()) as driver:
            if known is not None:
                await driver.execute("UPDATE devices SET last_seen_at = $2 WHERE id = $1", known.row_id, now)
                return known.token
            device_id = secrets.token_urlsafe(DEVICE_ID_BYTES)
            await driver.execute(
                _ADD, uuid.uuid4(), user_id, sha256_hex(device_id), now, (ctx.user_agent or "")[:512] or None
            )
        return self.sign(user_id, device_id)


class DeviceRepository:
    def __init__(self, db: AsyncSession) -> None:
        self.db = db

    async def of(self, user_id: uuid.UUID) -> list[Device]:
        stmt = select(Device).where(Device.user_id == user_id).order_by(Device.created_at)
        return list((await self.db.scalars(stmt)).all())

    async def revoke_all(self, user_id: uuid.UUID, now: datetime) -> int:
        stmt = (
            update(Device)
            .where(Device.user_id == user_id, Device.revoked_at.is_(None))
            .values(revoked_at=now)
            .returning(Device.id)
        )
        return len((await self.db.execute(stmt)).all())

    async def revoke(self, user_id: uuid.UUID, device_id: uuid.UUID, now: datetime) -> bool:
        stmt = (
            update(Device)
            .where(Device.id == device_id, Device.user_id == user_id, Device.revoked_at.is_(None))
            .values(revoked_at=now)
            .returning(Device.id)
        )
        return (await self.db.execute(stmt)).first() is not None

    async def purge(self, *, unseen_before: datetime, revoked_before: datetime) -> int:
        """Devices not seen since ``unseen_before`` or revoked before ``revoked_before``."""
        stmt = (
            delete(Device)
            .where(or_(Device.last_seen_at < unseen_before, Device.revoked_at < revoked_before))
            .returning(Device.id)
        )
        return len((await self.db.execute(stmt)).all())
