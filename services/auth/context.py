"""What the service layer needs from a request and from the running app, as plain objects."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Annotated, Any

import httpx
from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from common.app import lifespan_state
from common.audit import Actor, Outcome, record, request_fields
from common.clientip import throttle_key
from common.tokens import Claims
from services.auth.config import Settings
from services.auth.keys import KeyStore, LocalServiceTokens, TokenIssuer
from services.auth.messages import MessageSender
from services.auth.models import outbox
from services.auth.passwords import PasswordHasher, PasswordPolicy

Clock = Callable[[], float]
SERVICE = "auth"


def sha256_hex(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


@dataclass
class Runtime:
    """Everything created once in the lifespan: settings, clock, keys, hasher, sender, peers."""

    settings: Settings
    clock: Clock
    keys: KeyStore
    issuer: TokenIssuer
    hasher: PasswordHasher
    policy: PasswordPolicy
    sender: MessageSender
    otp_key: bytes
    sessionmaker: async_sessionmaker[AsyncSession]
    service_tokens: LocalServiceTokens
    peers: Mapping[str, httpx.AsyncClient] = field(default_factory=dict)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)


@dataclass(frozen=True)
class RequestContext:
    """Who asks and from where: the fields every audit event carries."""

    ip: str | None = None
    user_agent: str | None = None
    method: str | None = None
    path: str | None = None
    request_id: str | None = None
    actor_id: str | None = None
    actor_role: str | None = None
    sid: str | None = None

    @property
    def ip_key(self) -> str:
        """The address that per-address throttles count (an IPv6 address's /64)."""
        return throttle_key(self.ip)

    def as_actor(self, actor_id: str | None, actor_role: str | None) -> RequestContext:
        return replace(self, actor_id=actor_id, actor_role=actor_role)

    async def audit(
        self,
        session: AsyncSession,
        action: str,
        *,
        outcome: Outcome = "success",
        resource_type: str | None = None,
        resource_id: str | None = None,
        old_values: dict[str, Any] | None = None,
        new_values: dict[str, Any] | None = None,
    ) -> None:
        """Write an audit event to the outbox in ``session``'s transaction. Never pass a secret."""
        where = {"ip": self.ip, "user_agent": self.user_agent, "method": self.method, "path": self.path}
        actor = Actor(self.actor_id, self.actor_role, where | {"request_id": self.request_id})
        event = actor.event(
            SERVICE,
            action,
            outcome=outcome,
            resource_type=resource_type,
            resource_id=resource_id,
            old=old_values,
            new=new_values,
        )
        await record(session, outbox, event)


def request_context(request: Request) -> RequestContext:
    fields = request_fields(request)
    principal: Claims | None = getattr(request.state, "principal", None)
    return RequestContext(
        ip=fields["ip"],
        user_agent=fields["user_agent"],
        method=fields["method"],
        path=fields["path"],
        request_id=fields["request_id"],
        actor_id=principal.sub if principal and not principal.is_service else None,
        actor_role=principal.role if principal and not principal.is_service else None,
        sid=principal.sid if principal and not principal.is_service else None,
    )


async def runtime(request: Request) -> Runtime:
    return lifespan_state(request, "auth", Runtime)


def system_context() -> RequestContext:
    """Actions the service takes by itself (bootstrap, maintenance)."""
    return RequestContext(actor_id=None, actor_role="system")


RuntimeDep = Annotated[Runtime, Depends(runtime)]
