"""What every part of orders shares: the state machine, who sees an order, the durable stock intents,
the audit event of an order, and the polling of something another request holds.

No database transaction is ever held open across a call to inventory. Instead, each change that needs
inventory is written down first as a durable intent on the order row (``stock_action`` with an attempt
id), then the idempotent inventory call is made, then the outcome is recorded if the attempt still owns
the intent. A crash at any point leaves an intent the sweeper can finish or undo, and the attempt id
fences a slow attempt that the sweeper has already taken over.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from pydantic_core import to_jsonable_python
from sqlalchemy.ext.asyncio import AsyncSession

from common.audit import STORED_LENGTHS, Actor, AuditEvent, record
from common.clock import utcnow
from common.logging import redact_text
from common.retries import retried
from common.tokens import Claims
from services.orders.models import Order, Status, Stock, StockAction, outbox
from services.orders.schemas import OrderItemRead, OrderRead

SERVICE = "orders"

T = TypeVar("T")

# The state machine. Anything not listed is refused with 409.
ALLOWED: dict[str, frozenset[str]] = {
    Status.pending: frozenset({Status.confirmed, Status.cancelled, Status.expired}),
    Status.confirmed: frozenset({Status.shipped, Status.cancelled}),
    Status.shipped: frozenset({Status.delivered}),
}

SYSTEM = Actor(id=None, role="system")


def order_event(
    actor: Actor, action: str, order_id: uuid.UUID, old: dict[str, Any] | None, new: dict[str, Any] | None
) -> AuditEvent:
    return actor.event(SERVICE, action, resource_type="order", resource_id=str(order_id), old=old, new=new)


@dataclass(frozen=True)
class OutboxEvent:
    """An audit event as the outbox stores it: its id, its time and its redacted payload's JSON text."""

    id: uuid.UUID
    occurred_at: datetime
    payload: str


def _stored(name: str, value: str | None) -> str | None:
    """``value`` as ``outbox_payload`` stores it in the event's field ``name``: redacted, then cut."""
    return None if value is None else redact_text(value)[: STORED_LENGTHS[name]]


def created_event(actor: Actor, order_id: uuid.UUID, total: int, lines: int) -> OutboxEvent:
    """The ``orders.order.created`` event of a placed order, as the outbox stores it: the same payload as
    ``outbox_payload(order_event(actor, "orders.order.created", order_id, None, {...}))``, field for field
    (tests/orders/test_order_events.py holds them equal), written straight. Every order has one, and
    building the event model, dumping it and walking the dump to scrub it cost more CPU than the rest of
    placing the order in this process. Its keys are fixed and none is secret-named; every text that came
    from the request is redacted as ``scrub`` redacts it."""
    event_id, at = uuid.uuid4(), utcnow()
    context = actor.context
    payload = {
        "id": str(event_id),
        "occurred_at": to_jsonable_python(at),
        "service": SERVICE,
        "action": "orders.order.created",
        "actor_id": _stored("actor_id", actor.id),
        "actor_role": _stored("actor_role", actor.role),
        "ip": _stored("ip", context.get("ip")),
        "user_agent": _stored("user_agent", context.get("user_agent")),
        "method": _stored("method", context.get("method")),
        "path": _stored("path", context.get("path")),
        "request_id": _stored("request_id", context.get("request_id")),
        "resource_type": "order",
        "resource_id": str(order_id),
        "old_values": None,
        "new_values": {"status": Status.pending.value, "total_xaf": total, "lines": lines},
        "outcome": "success",
    }
    return OutboxEvent(event_id, at, json.dumps(payload))


def user_id_of(claims: Claims) -> uuid.UUID | None:
    try:
        return uuid.UUID(claims.sub)
    except ValueError:
        return None


@dataclass(frozen=True)
class Viewer:
    user_id: uuid.UUID | None
    staff: bool

    @classmethod
    def of(cls, claims: Claims) -> Viewer:
        return cls(user_id=user_id_of(claims), staff=claims.has_role("staff"))

    def sees(self, order: Order) -> bool:
        return order.status != Status.placing and (self.staff or order.user_id == self.user_id)


def read_of(order: Order) -> OrderRead:
    return OrderRead(
        id=order.id,
        user_id=order.user_id,
        status=order.status,
        items=[OrderItemRead.model_validate(item) for item in order.items],
        total_xaf=order.total_xaf,
        expires_at=order.expires_at if order.status == Status.pending else None,
        created_at=order.created_at,
        updated_at=order.updated_at,
    )


# Durable stock intents


def start_action(
    order: Order, action: StockAction, actor: Actor | None, now: datetime, owner: int | None = None
) -> uuid.UUID:
    """Write down what inventory is owed, under a new attempt id (which fences any older attempt), and which
    process is doing it (``owner``, its liveness lock's number: None when the action is only owed)."""
    attempt = uuid.uuid4()
    order.stock_action = action
    order.stock_action_id = attempt
    order.stock_action_since = now
    order.owner = owner
    if actor is not None:
        order.stock_action_context = actor.save()
    return attempt


def clear_action(order: Order) -> None:
    order.owner = None
    order.stock_action = None
    order.stock_action_id = None
    order.stock_action_since = None
    order.stock_action_context = None


async def close(session: AsyncSession, order: Order, target: Status, actor: Actor, now: datetime) -> None:
    """Cancel or expire: the status changes now, the stock release is owed (and retried until done)."""
    old = order.status
    order.status = target
    if order.stock in (Stock.held, Stock.committed):
        start_action(order, StockAction.release, actor, now)
    await session.flush()
    await record(
        session, outbox, order_event(actor, f"orders.order.{target}", order.id, {"status": old}, {"status": target})
    )


# Waiting for another request


class Held(Exception):
    """Another request holds what this one needs (an idempotency key, an order): look again after a wait."""


class Freed(Exception):
    """What was held has been let go since: look again at once."""


def _again(exc: Exception) -> bool | float:
    if isinstance(exc, Freed):
        return 0.0
    return isinstance(exc, Held)


async def once_let_go(attempt: Callable[[], Awaitable[T]], seconds: float) -> T:
    """``attempt()``, made again while it raises Held (after a short, growing wait) or Freed (at once), for
    ``seconds`` at most; then the last Held or Freed is raised."""
    return await retried(attempt, _again, attempts=None, timeout=seconds, first_wait=0.02, max_wait=0.25)
