"""The caller's known devices: list them, forget one (it is then an unknown device again)."""

from __future__ import annotations

import uuid
from datetime import datetime

from fastapi import APIRouter, Request, status
from pydantic import BaseModel

from common.db import SessionDep
from common.errors import NotFound
from common.pagination import Page
from common.security import CurrentUser
from services.auth.context import RuntimeDep, request_context
from services.auth.devices import DeviceRepository
from services.auth.service import AccountService

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])


class DeviceRead(BaseModel):
    id: uuid.UUID
    created_at: datetime
    last_seen_at: datetime
    user_agent: str | None


class DeviceNotFound(NotFound):
    slug = "device-not-found"
    title = "Device not found"


@router.get("/me/devices", response_model=Page[DeviceRead])
async def list_devices(claims: CurrentUser, session: SessionDep, rt: RuntimeDep, request: Request) -> Page[DeviceRead]:
    """Devices that signed in to the caller's account and are still known, most recently seen first, all in
    one page (`next_cursor` is always null)."""
    user = await AccountService(session, rt, request_context(request)).current_user(claims)
    rows = [d for d in await DeviceRepository(session).of(user.id) if d.revoked_at is None]
    rows.sort(key=lambda d: d.last_seen_at, reverse=True)
    items = [
        DeviceRead(id=d.id, created_at=d.created_at, last_seen_at=d.last_seen_at, user_agent=d.user_agent) for d in rows
    ]
    return Page[DeviceRead](items=items, next_cursor=None)


@router.delete("/me/devices/{device_id}", status_code=status.HTTP_204_NO_CONTENT)
async def forget_device(
    device_id: uuid.UUID, claims: CurrentUser, session: SessionDep, rt: RuntimeDep, request: Request
) -> None:
    """Forget a device: its next logins are throttled like a stranger's until it signs in again."""
    ctx = request_context(request)
    user = await AccountService(session, rt, ctx).current_user(claims)
    if not await DeviceRepository(session).revoke(user.id, device_id, rt.now()):
        raise DeviceNotFound("No such device.")
    await ctx.audit(session, "auth.device.revoked", resource_type="device", resource_id=str(device_id))
