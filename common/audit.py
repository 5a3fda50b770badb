"""Audit events: built from the request, redacted, and written to the service's own outbox table in the
same transaction as the change they describe (DESIGN.md, "Data and consistency").
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal

import sqlalchemy as sa
import structlog
from fastapi import Request
from prometheus_client import Counter
from pydantic import BaseModel, Field
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from common.clientip import Network, parse_networks, resolve_client_ip
from common.clock import utcnow
from common.db import driver_of
from common.logging import is_secret_key, redact_text
from common.state import state_of
from common.tokens import Claims

log = structlog.get_logger("comptoir.audit")

Outcome = Literal["success", "failure", "denied"]


class AuditEvent(BaseModel):
    id: uuid.UUID = Field(default_factory=uuid.uuid4)
    occurred_at: datetime = Field(default_factory=utcnow)
    service: str
    action: str = Field(pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$", max_length=100)
    actor_id: str | None = None
    actor_role: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    method: str | None = None
    path: str | None = None
    request_id: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    old_values: dict[str, Any] | None = None
    new_values: dict[str, Any] | None = None
    outcome: Outcome = "success"


_PLAIN = frozenset({int, float, bool, type(None)})


def scrub(value: Any, _depth: int = 0) -> Any:
    """Drop secret-named fields entirely and mask secret-looking text, at any depth."""
    if _depth > 20:
        return None
    # The exact types an event is made of are told apart first: the abstract-class checks below cost
    # more than the rest of the walk (every order's audit event goes through here).
    kind = type(value)
    if kind is str:
        return redact_text(value)
    if kind in _PLAIN:
        return value
    if isinstance(value, Mapping):
        return {k: scrub(v, _depth + 1) for k, v in value.items() if not (isinstance(k, str) and is_secret_key(k))}
    if isinstance(value, list | tuple):
        return [scrub(v, _depth + 1) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Only the fields that changed, as (old values, new values)."""
    keys = [k for k in new if old.get(k) != new.get(k)]
    return {k: old.get(k) for k in keys}, {k: new.get(k) for k in keys}


@lru_cache(maxsize=16)
def _trusted_networks(spec: str) -> Sequence[Network]:
    # Settings are read once per process; parsing the CIDRs on every audited request was measurable.
    return tuple(parse_networks(spec))


@lru_cache(maxsize=4096)
def _client_ip(peer: str | None, forwarded_for: str | None, spec: str) -> str | None:
    # The same few (peer, X-Forwarded-For) pairs come again and again; parsing their addresses was measurable.
    return resolve_client_ip(peer, forwarded_for, _trusted_networks(spec))


def request_fields(request: Request) -> dict[str, Any]:
    """Where an action came from: client IP (believed from the gateway only), user agent, request id."""
    peer = request.client.host if request.client else None
    return {
        "ip": _client_ip(
            peer, request.headers.get("x-forwarded-for"), state_of(request).settings.gateway_networks or ""
        ),
        "user_agent": (request.headers.get("user-agent") or "")[:512] or None,
        "method": request.method,
        "path": request.url.path,
        "request_id": getattr(request.state, "request_id", None) or request.scope.get("state", {}).get("request_id"),
    }


@dataclass(frozen=True)
class Actor:
    """Who asked, and from where: the facts every audit event carries."""

    id: str | None
    role: str | None
    context: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, request: Request, claims: Claims | None) -> Actor:
        """The bearer of ``claims`` (a service is role "service"; None: anonymous), at this request."""
        if claims is None:
            return cls(id=None, role=None, context=request_fields(request))
        return cls(id=claims.sub, role="service" if claims.is_service else claims.role, context=request_fields(request))

    @classmethod
    def restore(cls, saved: Mapping[str, Any] | None) -> Actor:
        """The actor ``save`` wrote down (with a durable intent, for whoever finishes it)."""
        saved = saved or {}
        return cls(id=saved.get("actor_id"), role=saved.get("actor_role"), context=dict(saved.get("context") or {}))

    def save(self) -> dict[str, Any]:
        return {"actor_id": self.id, "actor_role": self.role, "context": self.context}

    def event(
        self,
        service: str,
        action: str,
        *,
        resource_type: str | None = None,
        resource_id: str | None = None,
        old: dict[str, Any] | None = None,
        new: dict[str, Any] | None = None,
        outcome: Outcome = "success",
    ) -> AuditEvent:
        return AuditEvent(
            service=service,
            action=action,
            actor_id=self.id,
            actor_role=self.role,
            resource_type=resource_type,
            resource_id=resource_id,
            old_values=old,
            new_values=new,
            outcome=outcome,
            **self.context,
        )


def outbox_columns() -> list[sa.Column[Any]]:
    """The outbox table's columns as first created (every emitting service's first outbox migration);
    later revisions add ``outbox_lease_column``. ``outbox_table`` is the current shape."""
    return [
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("payload", JSONB(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
    ]


def outbox_lease_column() -> sa.Column[Any]:
    """Until when a relay holds the row for a send in progress (``common.relay``); NULL when nobody does."""
    return sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True)


def outbox_table(metadata: sa.MetaData) -> sa.Table:
    return sa.Table(
        "outbox",
        metadata,
        *outbox_columns(),
        outbox_lease_column(),
        sa.Index("ix_outbox_pending", "next_attempt_at", postgresql_where=sa.text("delivered_at IS NULL")),
    )


# The longest text the audit service stores in each field (its ``EventIn``).
STORED_LENGTHS = {
    "actor_id": 128,
    "actor_role": 32,
    "ip": 64,
    "user_agent": 512,
    "method": 16,
    "path": 512,
    "request_id": 128,
    "resource_type": 64,
    "resource_id": 256,
}


def outbox_payload(event: AuditEvent) -> dict[str, Any]:
    """What the outbox stores for an event: redacted, then each text cut to the length audit stores.
    Cut after the redaction, which can make a text longer ("Bearer x" becomes "Bearer [REDACTED]"): an
    event audit refuses would wait in the outbox for good, and a request must not fail because a value its
    event quotes (a user agent, a path) is long."""
    payload: dict[str, Any] = scrub(event.model_dump(mode="json"))
    for name, limit in STORED_LENGTHS.items():
        value = payload.get(name)
        if value is not None and len(value) > limit:
            payload[name] = value[:limit]
    return payload


async def record(session: AsyncSession, outbox: sa.Table, event: AuditEvent) -> None:
    """Add the event to the outbox in the caller's transaction (no change without its event)."""
    payload = json.dumps(outbox_payload(event), separators=(",", ":"))
    # On the driver: one of these goes with nearly every write, and the ORM's insert cost ten times the
    # statement (measured in a login: ~0.6 ms of CPU against ~0.05).
    async with driver_of(await session.connection()) as driver:
        await driver.execute(
            f"INSERT INTO {outbox.fullname} (id, occurred_at, payload) VALUES ($1, $2, $3::text::jsonb)",  # noqa: S608
            event.id,
            event.occurred_at,
            payload,
        )


DENIALS_UNRECORDED = Counter(
    "comptoir_access_denials_unrecorded_total",
    "Refusals for want of a role answered 403 but not written to the audit trail (the caller's hour's share spent).",
    ["service"],
)


class DenialBudget:
    """How many refusals of one caller an hour go into the audit trail (per process): enough to see what it
    tried, not a way for one account to fill the insert-only trail with a thousand events an hour."""

    def __init__(self, per_hour: int = 20, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_hour = per_hour
        self.clock = clock
        self._windows: dict[str, list[float]] = {}  # caller -> [count, window ends]

    def allows(self, caller: str) -> bool:
        now = self.clock()
        window = self._windows.get(caller)
        if window is None or window[1] <= now:
            if len(self._windows) >= 10_000:
                self._windows = {k: w for k, w in self._windows.items() if w[1] > now}
            window = self._windows[caller] = [0, now + 3600]
        window[0] += 1
        return window[0] <= self.per_hour


DENIALS = DenialBudget()


async def record_denial(request: Request, claims: Claims | None, action: str, details: dict[str, Any]) -> None:
    """Write a refused request's event (``<service>.<action>``, outcome denied) to the service's outbox, in a
    transaction of its own: the request changes nothing else. A denial is answered 403 even when the
    database cannot take its event (logged), and past the caller's share of the hour (``DENIALS``, counted
    in ``comptoir_access_denials_unrecorded_total``)."""
    state = state_of(request)
    if state.outbox is None:
        return
    if not DENIALS.allows(claims.sub if claims is not None else "anonymous"):
        DENIALS_UNRECORDED.labels(state.name).inc()
        return
    route = request.scope.get("route")
    event = Actor.of(request, claims).event(
        state.name,
        f"{state.name}.{action}",
        resource_type="route",
        resource_id=f"{request.method} {getattr(route, 'path', request.url.path)}",
        new=details,
        outcome="denied",
    )
    try:
        async with state.db.sessionmaker() as session, session.begin():
            await record(session, state.outbox, event)
    except (SQLAlchemyError, OSError) as exc:
        log.warning("audit.denial_not_recorded", action=event.action, error=type(exc).__name__)
