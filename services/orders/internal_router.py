"""/internal/users: the auth service gathers (GDPR export) and anonymises (erasure) a user's orders."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from common.audit import Actor
from common.security import require_service
from common.tokens import Claims
from services.orders.deps import Orders
from services.orders.schemas import UserErasure, UserOrdersExport

AuthOnly = Annotated[Claims, Depends(require_service("auth"))]

router = APIRouter(prefix="/internal/users", tags=["internal"])


@router.get("/{user_id}/export", response_model=UserOrdersExport)
async def export_user(user_id: uuid.UUID, orders: Orders, _caller: AuthOnly) -> UserOrdersExport:
    """Every order of the user, with its lines."""
    return await orders.export(user_id)


@router.post("/{user_id}/erase", response_model=UserErasure)
async def erase_user(user_id: uuid.UUID, request: Request, orders: Orders, caller: AuthOnly) -> UserErasure:
    """Keep the user's orders (bookkeeping) under a random pseudonym instead of the user id. Idempotent."""
    return await orders.erase(user_id, Actor.of(request, caller))
