"""The state machine: an order's status changes at a customer's or staff's request.

Confirming commits the order's reservation at inventory and cancelling releases it, each through a durable
intent written first (see ``services.orders.rules``); a change waits while a confirmation of the same order
is talking to inventory.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import structlog

from common.audit import Actor, record
from common.clock import Clock
from common.db import Database
from services.orders import inventory as inv
from services.orders.config import Settings
from services.orders.errors import (
    InventoryUnavailable,
    OrderBusy,
    OrderExpired,
    OrderNotFound,
    TransitionNotAllowed,
)
from services.orders.models import Status, Stock, StockAction, outbox
from services.orders.repository import OrderRepository
from services.orders.rules import (
    ALLOWED,
    SYSTEM,
    Held,
    Viewer,
    clear_action,
    close,
    once_let_go,
    order_event,
    read_of,
    start_action,
)
from services.orders.schemas import OrderRead

log = structlog.get_logger("comptoir.orders")


@dataclass(frozen=True)
class _Commit:
    """A confirmation was started: inventory's commit is owed, under this attempt id."""

    attempt: uuid.UUID


class Transitions:
    def __init__(
        self,
        db: Database,
        inventory: inv.InventoryClient,
        settings: Settings,
        clock: Clock,
        owner: Callable[[], int | None],
    ) -> None:
        self.owner = owner
        self.db = db
        self.inventory = inventory
        self.settings = settings
        self.clock = clock

    async def change(
        self, order_id: uuid.UUID, target: Status, actor: Actor, viewer: Viewer, *, request_id: str | None = None
    ) -> OrderRead:
        try:
            step = await once_let_go(
                lambda: self._step(order_id, target, actor, viewer), self.settings.idempotency_wait_seconds
            )
        except Held:
            raise OrderBusy("The order is being changed by another request; retry shortly.") from None
        if isinstance(step, OrderRead):
            return step
        if isinstance(step, _Commit):
            return await self.drive_commit(order_id, step.attempt, request_id=request_id)
        await self.drive_release(order_id, request_id=request_id)
        if step == "expired":
            raise OrderExpired("The order expired before this change; its stock was released.")
        async with self.db.sessionmaker() as session, session.begin():
            order = await OrderRepository(session).load(order_id)
            if order is None:  # erased meanwhile
                raise OrderNotFound()
            return read_of(order)

    async def _step(
        self, order_id: uuid.UUID, target: Status, actor: Actor, viewer: Viewer
    ) -> OrderRead | _Commit | Literal["release", "expired"]:
        """One transaction: the change made (the order), or what inventory is owed next."""
        async with self.db.sessionmaker() as session, session.begin():
            order = await OrderRepository(session).load(order_id, lock=True)
            if order is None or not viewer.sees(order):
                raise OrderNotFound()
            if order.stock_action == StockAction.commit:
                raise Held()  # a confirmation is talking to inventory: wait for its outcome
            if order.status == Status.pending and order.expires_at is not None and order.expires_at <= self.clock():
                await close(session, order, Status.expired, SYSTEM, self.clock())
                return "expired"
            if target not in ALLOWED.get(order.status, frozenset()):
                raise TransitionNotAllowed(
                    f"A {order.status} order cannot become {target}.",
                    extra={"order_status": order.status, "requested_status": str(target)},
                )
            if target == Status.confirmed:
                return _Commit(start_action(order, StockAction.commit, actor, self.clock(), self.owner()))
            if target in (Status.cancelled, Status.expired):
                await close(session, order, target, actor, self.clock())
                return "release"
            old = order.status
            order.status = target
            await session.flush()
            await record(
                session,
                outbox,
                order_event(actor, f"orders.order.{target}", order.id, {"status": old}, {"status": target}),
            )
            return read_of(order)

    async def drive_commit(self, order_id: uuid.UUID, attempt: uuid.UUID, *, request_id: str | None) -> OrderRead:
        """Make the owed commit under ``attempt``, then confirm the order if the attempt still owns it."""
        async with self.db.sessionmaker() as session, session.begin():
            order = await OrderRepository(session).load(order_id)
            if order is None:  # erased meanwhile
                raise OrderNotFound()
            reservation_id = order.reservation_id
        try:
            await self.inventory.commit(reservation_id, request_id=request_id)
        except InventoryUnavailable:
            # The commit may or may not have happened; both are safe (a retry commits once, a cancel or the
            # expiry releases a committed reservation back on hand). The order stays pending.
            async with self.db.sessionmaker() as session, session.begin():
                order = await OrderRepository(session).load(order_id, lock=True)
                if order is not None and order.stock_action_id == attempt:
                    clear_action(order)
            raise
        except inv.Closed:
            async with self.db.sessionmaker() as session, session.begin():
                order = await OrderRepository(session).load(order_id, lock=True)
                if order is not None and order.stock_action_id == attempt:
                    clear_action(order)
                    order.stock = Stock.released
                    if order.status == Status.pending:
                        await close(session, order, Status.expired, SYSTEM, self.clock())
            raise OrderExpired("The order's reservation expired; its stock was released.") from None
        async with self.db.sessionmaker() as session, session.begin():
            order = await OrderRepository(session).load(order_id, lock=True)
            if order is None:
                raise OrderNotFound()
            if order.stock_action_id == attempt:
                actor = Actor.restore(order.stock_action_context)
                old = order.status
                order.status = Status.confirmed
                order.stock = Stock.committed
                clear_action(order)
                await session.flush()
                event = order_event(
                    actor, "orders.order.confirmed", order.id, {"status": old}, {"status": Status.confirmed}
                )
                await record(session, outbox, event)
            return read_of(order)

    async def drive_release(self, order_id: uuid.UUID, *, request_id: str | None = None) -> bool:
        """Make the owed release; False when inventory could not be reached (the sweeper retries)."""
        async with self.db.sessionmaker() as session, session.begin():
            order = await OrderRepository(session).load(order_id)
            if order is None or order.stock_action != StockAction.release:
                return True
            reservation_id, attempt = order.reservation_id, order.stock_action_id
        try:
            await self.inventory.release(reservation_id, request_id=request_id)
        except InventoryUnavailable:
            log.warning("orders.release.deferred", order_id=str(order_id))
            return False
        async with self.db.sessionmaker() as session, session.begin():
            order = await OrderRepository(session).load(order_id, lock=True)
            if order is not None and order.stock_action_id == attempt:
                order.stock = Stock.released
                clear_action(order)
        return True
