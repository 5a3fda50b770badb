"""The orders service's rules, as the routers and the sweeper see them: one object, five parts.

- ``placement``: placing an order (the idempotency key, the reservation at inventory, the record);
- ``transitions``: the state machine (confirm, cancel, ship, deliver);
- ``reconciliation``: expiry, and what a crash or a lost answer left behind;
- ``personal_data``: the GDPR export and erasure the auth service asks for;
- reading (here): one order, or a page of them, as the viewer may see them.
SQL lives in ``services.orders.repository``; what the parts share in ``services.orders.rules``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from common.audit import Actor
from common.clock import Clock
from common.db import Database
from common.pagination import Page, page_of, time_key, time_key_after
from services.orders import inventory as inv
from services.orders.config import Settings
from services.orders.errors import OrderNotFound
from services.orders.gdpr import PersonalData
from services.orders.models import Status
from services.orders.placement import Placements
from services.orders.reconciliation import Reconciliation
from services.orders.repository import OrderRepository
from services.orders.rules import Viewer, read_of
from services.orders.schemas import OrderCreate, OrderRead, UserErasure, UserOrdersExport
from services.orders.transitions import Transitions


class OrderService:
    def __init__(
        self,
        db: Database,
        inventory: inv.InventoryClient,
        settings: Settings,
        clock: Clock,
        owner: Callable[[], int | None],
    ) -> None:
        """``owner``: this process's liveness number while it holds its lock (``services.orders.liveness``)."""
        self.db = db
        self.placement = Placements(db, inventory, settings, clock, owner)
        self.transitions = Transitions(db, inventory, settings, clock, owner)
        self.reconciliation = Reconciliation(db, inventory, self.transitions, settings, clock)
        self.personal_data = PersonalData(db, clock)

    async def close(self) -> None:
        await self.placement.close()

    async def get(self, order_id: uuid.UUID, viewer: Viewer) -> OrderRead:
        async with self.db.sessionmaker() as session, session.begin():
            order = await OrderRepository(session).load(order_id)
            if order is None or not viewer.sees(order):
                raise OrderNotFound()
            return read_of(order)

    async def page(
        self, viewer: Viewer, *, limit: int, cursor: str | None, status: str | None, user_id: uuid.UUID | None
    ) -> Page[OrderRead]:
        """Newest first: a customer sees their own orders, staff everyone's (or one customer's)."""
        if viewer.staff:
            owner = user_id  # None: everyone's
        elif viewer.user_id is None or user_id not in (None, viewer.user_id):
            return Page[OrderRead](items=[], next_cursor=None)
        else:
            owner = viewer.user_id
        async with self.db.sessionmaker() as session, session.begin():
            rows = await OrderRepository(session).page(
                owner=owner, status=status, after=time_key_after(cursor), limit=limit + 1
            )
            return page_of(rows, limit, read_of, time_key)

    async def place(
        self, user_id: uuid.UUID, key: str, data: OrderCreate, actor: Actor, *, request_id: str | None = None
    ) -> tuple[OrderRead, bool]:
        """The order, and whether it is a replay of an earlier request with the same key."""
        return await self.placement.place(user_id, key, data, actor, request_id=request_id)

    async def change(
        self, order_id: uuid.UUID, target: Status, actor: Actor, viewer: Viewer, *, request_id: str | None = None
    ) -> OrderRead:
        return await self.transitions.change(order_id, target, actor, viewer, request_id=request_id)

    async def sweep(self) -> dict[str, int]:
        return await self.reconciliation.sweep()

    async def export(self, user_id: uuid.UUID) -> UserOrdersExport:
        return await self.personal_data.export(user_id)

    async def erase(self, user_id: uuid.UUID, actor: Actor) -> UserErasure:
        return await self.personal_data.erase(user_id, actor)
