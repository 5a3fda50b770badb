"""Reconciliation: what a crash, a lost answer or the clock left behind is finished or undone.

One pass releases orphaned placements, finishes interrupted confirmations, makes owed releases and expires
due pending orders. Every take-over writes a new attempt id first, which fences the attempt it replaces;
rows are taken with SKIP LOCKED, so several replicas may sweep at once.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import structlog
from sqlalchemy import ColumnElement, and_, or_, select

from common.clock import Clock
from common.db import Database
from services.orders import inventory as inv
from services.orders.config import Settings
from services.orders.errors import InventoryUnavailable, OrderExpired
from services.orders.liveness import OWNER_GONE
from services.orders.models import Order, Status, StockAction
from services.orders.repository import OrderRepository
from services.orders.rules import SYSTEM, close, start_action
from services.orders.transitions import Transitions

log = structlog.get_logger("comptoir.orders")


class Reconciliation:
    def __init__(
        self, db: Database, inventory: inv.InventoryClient, transitions: Transitions, settings: Settings, clock: Clock
    ) -> None:
        # Owners found gone by the previous pass: one is taken over only when found gone twice in a row, so
        # that a live process that lost its lock's connection has a pass's time to take its number again.
        self._gone: frozenset[int] = frozenset()
        self.db = db
        self.inventory = inventory
        self.transitions = transitions
        self.settings = settings
        self.clock = clock

    async def _ids(self, *conditions: ColumnElement[bool]) -> list[uuid.UUID]:
        async with self.db.sessionmaker() as session, session.begin():
            return await OrderRepository(session).ids(*conditions)

    async def _take_over(
        self, order_id: uuid.UUID, *conditions: ColumnElement[bool], action: StockAction
    ) -> uuid.UUID | None:
        """Take over an interrupted action with a new attempt id (fencing the old attempt)."""
        async with self.db.sessionmaker() as session, session.begin():
            order = await OrderRepository(session).lock_if(order_id, *conditions)
            if order is None:
                return None
            return start_action(order, action, None, self.clock(), self.transitions.owner())

    async def _owners_gone(self) -> frozenset[int]:
        """Owners of unfinished actions gone on this pass and on the previous one."""
        async with self.db.sessionmaker() as session, session.begin():
            # (An unfinished action always has a stock action: the partial index on actions finds them.)
            query = select(Order.owner).where(Order.stock_action.is_not(None), OWNER_GONE).distinct()
            now_gone = frozenset(owner for owner in (await session.scalars(query)).all() if owner is not None)
        confirmed, self._gone = now_gone & self._gone, now_gone
        return confirmed

    async def sweep(self) -> dict[str, int]:
        """One pass: orphaned placements released, interrupted confirmations finished, owed releases made,
        due pending orders expired. Safe to run in several replicas at once."""
        now = self.clock()
        done = {"orphans": 0, "confirmations": 0, "releases": 0, "expired": 0}

        gone = await self._owners_gone()
        orphan_cutoff = now - timedelta(seconds=self.settings.placing_timeout_seconds)
        stale_placing = (Order.status == Status.placing, Order.stock_action_since < orphan_cutoff)
        abandoned = (Order.status == Status.placing, Order.stock_action == StockAction.release)
        # (A placing order always has a stock action: the partial index on actions finds them.)
        owner_gone = (Order.status == Status.placing, Order.owner.in_(gone), OWNER_GONE)
        orphans = await self._ids(*stale_placing) + await self._ids(*abandoned)
        if gone:
            orphans += await self._ids(*owner_gone)
        for order_id in dict.fromkeys(orphans):
            attempt = await self._take_over(order_id, Order.status == Status.placing, action=StockAction.release)
            if attempt is None:
                continue
            async with self.db.sessionmaker() as session, session.begin():
                reservation_id = await OrderRepository(session).reservation_of(order_id)
            try:
                await self.inventory.release(reservation_id)
            except InventoryUnavailable:
                continue
            async with self.db.sessionmaker() as session, session.begin():
                await OrderRepository(session).delete_placing(order_id, attempt)
            done["orphans"] += 1
            log.info("orders.placement.reconciled", order_id=str(order_id))

        stale_cutoff = now - timedelta(seconds=self.settings.stale_action_seconds)
        # A confirmation whose process died is finished at once; a live one only after it went stale.
        stale_commit = (
            Order.stock_action == StockAction.commit,
            or_(Order.stock_action_since < stale_cutoff, and_(Order.owner.in_(gone), OWNER_GONE)),
        )
        for order_id in await self._ids(*stale_commit):
            attempt = await self._take_over(order_id, *stale_commit, action=StockAction.commit)
            if attempt is None:
                continue
            try:
                await self.transitions.drive_commit(order_id, attempt, request_id=None)
                done["confirmations"] += 1
            except (InventoryUnavailable, OrderExpired):
                continue

        owed = (Order.stock_action == StockAction.release, Order.status != Status.placing)
        for order_id in await self._ids(*owed):
            if await self.transitions.drive_release(order_id):
                done["releases"] += 1

        due = (Order.status == Status.pending, Order.stock_action.is_(None), Order.expires_at <= now)
        for order_id in await self._ids(*due):
            async with self.db.sessionmaker() as session, session.begin():
                order = await OrderRepository(session).lock_if(order_id, *due)
                if order is None:
                    continue
                await close(session, order, Status.expired, SYSTEM, self.clock())
            await self.transitions.drive_release(order_id)
            done["expired"] += 1
        if any(done.values()):
            log.info("orders.sweep", **done)
        return done
