"""Order rules: placing an order (the reservation saga), the state machine, expiry and reconciliation.

No database transaction is ever held open across a call to inventory. Instead, each change that needs
inventory is written down first as a durable intent on the order row (``stock_action`` with an attempt
id), then the idempotent inventory call is made, then the outcome is recorded if the attempt still owns
the intent. A crash at any point leaves an intent the sweeper can finish or undo, and the attempt id
fences a slow attempt that the sweeper has already taken over.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import asyncpg
import stamina
import structlog
from sqlalchemy import delete, select, tuple_, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from common.audit import Actor, AuditEvent, outbox_payload, record
from common.db import Database, columns
from common.errors import RETRYABLE_SQLSTATES, sqlstate_of
from common.idempotency import request_hash
from common.pagination import Page, page_of, time_key, time_key_after
from common.tokens import Claims
from services.orders import inventory as inv
from services.orders.batching import Batcher
from services.orders.config import Settings
from services.orders.errors import (
    DatabaseBusy,
    IdempotencyKeyReused,
    IdempotentRequestInProgress,
    InsufficientStock,
    InventoryUnavailable,
    OrderBusy,
    OrderExpired,
    OrderNotFound,
    OrderTotalTooLarge,
    TransitionNotAllowed,
    UnknownProducts,
)
from services.orders.metrics import BATCH_SIZE
from services.orders.models import MAX_TOTAL_XAF, Order, Status, Stock, StockAction, outbox
from services.orders.schemas import OrderCreate, OrderItemRead, OrderRead, Reservation, UserErasure, UserOrdersExport

log = structlog.get_logger("comptoir.orders")

Clock = Callable[[], datetime]

SERVICE = "orders"

# The state machine. Anything not listed is refused with 409.
ALLOWED: dict[str, frozenset[str]] = {
    Status.pending: frozenset({Status.confirmed, Status.cancelled, Status.expired}),
    Status.confirmed: frozenset({Status.shipped, Status.cancelled}),
    Status.shipped: frozenset({Status.delivered}),
}


def order_event(
    actor: Actor, action: str, order_id: uuid.UUID, old: dict[str, Any] | None, new: dict[str, Any] | None
) -> AuditEvent:
    return actor.event(SERVICE, action, resource_type="order", resource_id=str(order_id), old=old, new=new)


SYSTEM = Actor(id=None, role="system")


@dataclass(frozen=True)
class Viewer:
    user_id: uuid.UUID | None
    staff: bool

    @classmethod
    def of(cls, claims: Claims) -> Viewer:
        return cls(user_id=user_id_of(claims), staff=claims.has_role("staff"))

    def sees(self, order: Order) -> bool:
        return order.status != Status.placing and (self.staff or order.user_id == self.user_id)


STAFF = Viewer(user_id=None, staff=True)


# Placing an order runs two single-statement transactions, written once here and sent straight to the
# pooled connection's asyncpg driver in autocommit (a lone statement is its own transaction): no
# BEGIN/COMMIT round trips, and none of SQLAlchemy's per-call statement building, cache keys and ORM
# bulk bookkeeping, which were most of the CPU an order cost. Each statement takes a batch: the claims (and
# the completions) of the orders that arrive while the previous statement is out go in the next one
# (``services.orders.batching``), so under load a statement's fixed cost is shared by many orders. Tables resolve
# through the connection's search_path (the service's schema), as everywhere else.

# Claiming idempotency keys: a key already taken (earlier, or by an earlier twin in the same batch) is
# skipped, and its id is not returned. Keys are inserted in key order, so two batches that share keys
# (retries) wait for each other in one direction only: no deadlock.
_CLAIM = """
INSERT INTO orders (
    id, user_id, status, idempotency_key, request_hash, reservation_id, total_xaf, stock,
    stock_action, stock_action_id, stock_action_since, stock_action_context
)
SELECT v.id, v.user_id, 'placing', v.key, v.digest, v.reservation_id, 0, 'reserving',
    'reserve', v.attempt, v.since, v.context::jsonb
FROM unnest(
    $1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::uuid[], $6::uuid[], $7::timestamptz[], $8::text[]
) WITH ORDINALITY AS v(id, user_id, key, digest, reservation_id, attempt, since, context, n)
ORDER BY v.user_id, v.key, v.n
ON CONFLICT ON CONSTRAINT uq_orders_user_id_idempotency_key DO NOTHING
RETURNING id
"""

# Completing placements: the orders, their lines and their audit events in one statement (all or nothing).
# An order's lines and event are written only when its UPDATE matched, i.e. its attempt still owns the
# placement (the sweeper may have taken over).
_PLACED = """
WITH placed AS (
    UPDATE orders AS o
    SET status = 'pending', stock = 'held', total_xaf = v.total, expires_at = v.expires_at,
        stock_action = NULL, stock_action_id = NULL, stock_action_since = NULL, stock_action_context = NULL,
        updated_at = now()
    FROM unnest($1::uuid[], $2::uuid[], $3::bigint[], $4::timestamptz[]) AS v(id, attempt, total, expires_at)
    WHERE o.id = v.id AND o.status = 'placing' AND o.stock_action_id = v.attempt
    RETURNING o.id, o.user_id, o.created_at, o.updated_at
),
lines AS (
    INSERT INTO order_items (order_id, line, product_id, sku, name, quantity, unit_price_xaf, line_total_xaf)
    SELECT l.order_id, l.line, l.product_id, l.sku, l.name, l.quantity, l.unit_price_xaf, l.line_total_xaf
    FROM unnest(
        $5::uuid[], $6::integer[], $7::uuid[], $8::varchar[], $9::varchar[], $10::integer[], $11::bigint[],
        $12::bigint[]
    ) AS l(order_id, line, product_id, sku, name, quantity, unit_price_xaf, line_total_xaf)
    JOIN placed ON placed.id = l.order_id
),
events AS (
    INSERT INTO outbox (id, occurred_at, payload)
    SELECT e.id, e.occurred_at, e.payload::jsonb
    FROM unnest($13::uuid[], $14::uuid[], $15::timestamptz[], $16::text[]) AS e(id, order_id, occurred_at, payload)
    JOIN placed ON placed.id = e.order_id
)
SELECT id, user_id, created_at, updated_at FROM placed
"""


@dataclass(frozen=True)
class _Claim:
    order_id: uuid.UUID
    user_id: uuid.UUID
    key: str
    digest: str
    reservation_id: uuid.UUID
    attempt: uuid.UUID
    since: datetime
    context: str


@dataclass(frozen=True)
class _Placement:
    order_id: uuid.UUID
    attempt: uuid.UUID
    total: int
    expires_at: datetime | None
    lines: list[dict[str, Any]]
    event: AuditEvent


@dataclass(frozen=True)
class _Commit:
    """A confirmation was started: inventory's commit is owed, under this attempt id."""

    attempt: uuid.UUID


class _KeyHeld(Exception):
    """The idempotency key belongs to a placement still running."""


class _KeyFreed(Exception):
    """The idempotency key was taken, and its placement abandoned since."""


class _OrderHeld(Exception):
    """A confirmation of the order is talking to inventory."""


def _wait_again(exc: Exception) -> bool | float:
    """How ``_waiting`` treats a failed try: a freed key is claimed again at once, a held one after a wait."""
    if isinstance(exc, _KeyFreed):
        return 0.0
    return isinstance(exc, _KeyHeld | _OrderHeld)


def _database_failure(exc: BaseException) -> Exception:
    """What the orders of a failed statement batch get: the database refusing an order's data is a fault
    (answered 500 by the handlers, as before batching); anything else (busy, unreachable, shutting down)
    is a 503 to retry."""
    state = sqlstate_of(exc)
    if isinstance(exc, DBAPIError) and state is not None and state not in RETRYABLE_SQLSTATES:
        return DBAPIError(None, None, exc.orig)  # type: ignore[arg-type]
    return DatabaseBusy("The order could not be recorded right now; retry shortly.", headers={"Retry-After": "1"})


def _refused_for_its_data(exc: Exception) -> bool:
    """The statement was refused for what it carried (a data or constraint error): it changed nothing, and
    sending its orders one by one finds the order that caused it. A lost answer is not one of these."""
    state = sqlstate_of(exc)
    return isinstance(exc, DBAPIError) and state is not None and state[:2] in ("22", "23")


def user_id_of(claims: Claims) -> uuid.UUID | None:
    try:
        return uuid.UUID(claims.sub)
    except ValueError:
        return None


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


def price_lines(data: OrderCreate, reservation: Reservation) -> tuple[list[dict[str, Any]], int]:
    """The order's lines from what inventory reserved (never from the client), and the total, checked."""
    reserved = {line.product_id: line for line in reservation.items}
    if reservation.status != "held" or len(reserved) != len(data.items):
        raise InventoryUnavailable("Inventory reserved something other than what was asked.")
    lines = []
    total = 0
    for number, item in enumerate(data.items):
        line = reserved.get(item.product_id)
        if line is None or line.quantity != item.quantity:
            raise InventoryUnavailable("Inventory reserved something other than what was asked.")
        line_total = line.quantity * line.unit_price_xaf  # Python ints do not overflow; the bounds are checked
        total += line_total
        lines.append(
            {
                "line": number,
                "product_id": line.product_id,
                "sku": line.sku,
                "name": line.name,
                "quantity": line.quantity,
                "unit_price_xaf": line.unit_price_xaf,
                "line_total_xaf": line_total,
            }
        )
    if total > MAX_TOTAL_XAF:
        raise OrderTotalTooLarge(f"An order total may not exceed {MAX_TOTAL_XAF} XAF.")
    return lines, total


class OrderService:
    def __init__(self, db: Database, inventory: inv.InventoryClient, settings: Settings, clock: Clock) -> None:
        self.db = db
        self.inventory = inventory
        self.settings = settings
        self.clock = clock
        in_flight = settings.statement_batches_in_flight
        self.claims: Batcher[_Claim, bool] = Batcher(
            self._claim_batch,
            failure=_database_failure,
            in_flight=in_flight,
            observe=BATCH_SIZE.labels("claim").observe,
            isolate=_refused_for_its_data,
        )
        self.placements: Batcher[_Placement, asyncpg.Record | None] = Batcher(
            self._placed_batch,
            failure=_database_failure,
            in_flight=in_flight,
            observe=BATCH_SIZE.labels("placed").observe,
            isolate=_refused_for_its_data,
        )

    async def close(self) -> None:
        await self.claims.close()
        await self.placements.close()

    async def _claim_batch(self, claims: list[_Claim]) -> list[bool]:
        async with self.db.autocommit() as conn:
            rows = await conn.fetch(
                _CLAIM,
                *columns(
                    claims, "order_id", "user_id", "key", "digest", "reservation_id", "attempt", "since", "context"
                ),
            )
        claimed = {row["id"] for row in rows}
        return [c.order_id in claimed for c in claims]

    async def _placed_batch(self, placements: list[_Placement]) -> list[asyncpg.Record | None]:
        lines = [{"order_id": p.order_id, **line} for p in placements for line in p.lines]
        events = [
            {"id": p.event.id, "order_id": p.order_id, "at": p.event.occurred_at, "payload": outbox_payload(p.event)}
            for p in placements
        ]
        async with self.db.autocommit() as conn:
            rows = await conn.fetch(
                _PLACED,
                *columns(placements, "order_id", "attempt", "total", "expires_at"),
                *columns(
                    lines,
                    "order_id",
                    "line",
                    "product_id",
                    "sku",
                    "name",
                    "quantity",
                    "unit_price_xaf",
                    "line_total_xaf",
                ),
                *columns(events, "id", "order_id", "at"),
                [json.dumps(e["payload"]) for e in events],
            )
        placed = {row["id"]: row for row in rows}
        return [placed.get(p.order_id) for p in placements]

    # Reading

    @staticmethod
    async def _load(session: AsyncSession, order_id: uuid.UUID, *, lock: bool = False) -> Order | None:
        stmt = (
            select(Order)
            .where(Order.id == order_id)
            .options(selectinload(Order.items))
            .execution_options(populate_existing=True)
        )
        if lock:
            stmt = stmt.with_for_update()
        return (await session.scalars(stmt)).one_or_none()

    async def get(self, order_id: uuid.UUID, viewer: Viewer) -> OrderRead:
        async with self.db.sessionmaker() as session, session.begin():
            order = await self._load(session, order_id)
            if order is None or not viewer.sees(order):
                raise OrderNotFound()
            return read_of(order)

    async def page(
        self,
        viewer: Viewer,
        *,
        limit: int,
        cursor: str | None,
        status: str | None,
        user_id: uuid.UUID | None,
    ) -> Page[OrderRead]:
        stmt = select(Order).options(selectinload(Order.items)).where(Order.status != Status.placing)
        if not viewer.staff:
            stmt = stmt.where(Order.user_id == viewer.user_id)
        if user_id is not None:
            stmt = stmt.where(Order.user_id == user_id)
        if status is not None:
            stmt = stmt.where(Order.status == status)
        after = time_key_after(cursor)
        if after is not None:
            stmt = stmt.where(tuple_(Order.created_at, Order.id) < tuple_(*after))
        stmt = stmt.order_by(Order.created_at.desc(), Order.id.desc()).limit(limit + 1)
        async with self.db.sessionmaker() as session, session.begin():
            rows = list((await session.scalars(stmt)).all())
        return page_of(rows, limit, read_of, time_key)

    # Placing an order

    async def place(
        self, user_id: uuid.UUID, key: str, data: OrderCreate, actor: Actor, *, request_id: str | None = None
    ) -> tuple[OrderRead, bool]:
        """Returns the order and whether it is a replay of an earlier request with the same key."""
        digest = request_hash(data.items)
        try:
            async for waiting in self._waiting(self.settings.idempotency_wait_seconds):
                with waiting:
                    claimed = await self._claim_key(user_id, key, digest, actor)
        except (_KeyHeld, _KeyFreed):
            raise IdempotentRequestInProgress(
                "The first request with this key is still running; retry shortly.", headers={"Retry-After": "1"}
            ) from None
        if isinstance(claimed, OrderRead):
            return claimed, True
        order_id, attempt, reservation_id = claimed.order_id, claimed.attempt, claimed.reservation_id

        try:
            reservation = await self.inventory.reserve(reservation_id, data.items, request_id=request_id)
        except inv.Rejected as exc:
            await self._abandon(order_id, attempt)
            raise InsufficientStock(
                "Some items lack stock; nothing was reserved.",
                extra={"short_items": [s.model_dump(mode="json") for s in exc.short]},
            ) from None
        except inv.UnknownProducts as exc:
            await self._abandon(order_id, attempt)
            index = {str(item.product_id): n for n, item in enumerate(data.items)}
            raise UnknownProducts(
                "Some products do not exist.",
                extra={
                    "errors": [
                        {"loc": ["body", "items", index.get(p, 0), "product_id"], "msg": "Unknown product"}
                        for p in exc.product_ids
                    ]
                },
            ) from None
        except (inv.Closed, InventoryUnavailable):
            # The reservation may exist (a lost answer): release it; inventory's expiry covers a failure here.
            await self._abandon(order_id, attempt, release=reservation_id, request_id=request_id)
            raise InventoryUnavailable(
                "Inventory is unavailable; the order was not placed. Retry shortly.", headers={"Retry-After": "2"}
            ) from None
        return await self._record_placed(order_id, attempt, data, reservation, actor, request_id=request_id), False

    @staticmethod
    def _waiting(seconds: float) -> AsyncIterator[stamina.Attempt]:
        """Polls a busy idempotency key or order with a short backoff, for ``seconds`` at most."""
        return stamina.retry_context(
            on=_wait_again, attempts=None, timeout=seconds, wait_initial=0.02, wait_max=0.25, wait_jitter=0
        )

    async def _claim_key(self, user_id: uuid.UUID, key: str, digest: str, actor: Actor) -> _Claim | OrderRead:
        """The key claimed for a new order, or the order an earlier request with it placed (a replay)."""
        order_id, attempt, reservation_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        claim = _Claim(order_id, user_id, key, digest, reservation_id, attempt, self.clock(), json.dumps(actor.save()))
        if await self.claims.submit(claim):
            return claim
        # The key is taken: that request is done (replay it) or still running (wait for it).
        async with self.db.sessionmaker() as session, session.begin():
            existing = (
                await session.scalars(
                    select(Order)
                    .where(Order.user_id == user_id, Order.idempotency_key == key)
                    .options(selectinload(Order.items))
                )
            ).one_or_none()
            if existing is None:
                raise _KeyFreed()  # its placement was abandoned since: claim it again at once
            if existing.request_hash != digest:
                raise IdempotencyKeyReused()
            if existing.status == Status.placing:
                raise _KeyHeld()
            return read_of(existing)

    async def _record_placed(
        self,
        order_id: uuid.UUID,
        attempt: uuid.UUID,
        data: OrderCreate,
        reservation: Reservation,
        actor: Actor,
        *,
        request_id: str | None,
    ) -> OrderRead:
        try:
            lines, total = price_lines(data, reservation)
        except Exception:
            await self._abandon(order_id, attempt, release=reservation.reservation_id, request_id=request_id)
            raise
        event = order_event(
            actor,
            "orders.order.created",
            order_id,
            None,
            {"status": Status.pending, "total_xaf": total, "lines": len(lines)},
        )
        # Only the attempt that still owns the placement may complete it (the sweeper may have taken over).
        placed = await self.placements.submit(
            _Placement(order_id, attempt, total, reservation.expires_at, lines, event)
        )
        if placed is None:
            # The sweeper judged this attempt orphaned and released its reservation first.
            await self._abandon(order_id, attempt, release=reservation.reservation_id, request_id=request_id)
            raise InventoryUnavailable("The order could not be completed; retry.", headers={"Retry-After": "1"})
        # Built from values already checked (inventory's answer, our own row): no second validation.
        result = OrderRead.model_construct(
            id=order_id,
            user_id=placed["user_id"],
            status=Status.pending.value,
            items=[OrderItemRead.model_construct(**{k: v for k, v in line.items() if k != "line"}) for line in lines],
            total_xaf=total,
            expires_at=reservation.expires_at,
            created_at=placed["created_at"],
            updated_at=placed["updated_at"],
        )
        log.info("orders.order.created", order_id=str(order_id), total_xaf=total)
        return result

    async def _abandon(
        self,
        order_id: uuid.UUID,
        attempt: uuid.UUID,
        *,
        release: uuid.UUID | None = None,
        request_id: str | None = None,
    ) -> None:
        """Forget a placement that failed: release what may be held, then remove the invisible row."""
        if release is not None:
            try:
                await self.inventory.release(release, request_id=request_id)
            except InventoryUnavailable:
                log.warning("orders.placement.release_failed", reservation_id=str(release))
        async with self.db.sessionmaker() as session, session.begin():
            await session.execute(
                delete(Order).where(
                    Order.id == order_id, Order.status == Status.placing, Order.stock_action_id == attempt
                )
            )

    # The state machine

    @staticmethod
    def _clear_action(order: Order) -> None:
        order.stock_action = None
        order.stock_action_id = None
        order.stock_action_since = None
        order.stock_action_context = None

    def _start_action(self, order: Order, action: StockAction, actor: Actor) -> uuid.UUID:
        attempt = uuid.uuid4()
        order.stock_action = action
        order.stock_action_id = attempt
        order.stock_action_since = self.clock()
        order.stock_action_context = actor.save()
        return attempt

    async def _close(self, session: AsyncSession, order: Order, target: Status, actor: Actor) -> None:
        """Cancel or expire: the status changes now, the stock release is owed (and retried until done)."""
        old = order.status
        order.status = target
        if order.stock in (Stock.held, Stock.committed):
            self._start_action(order, StockAction.release, actor)
        await session.flush()
        await record(
            session, outbox, order_event(actor, f"orders.order.{target}", order.id, {"status": old}, {"status": target})
        )

    async def change(
        self, order_id: uuid.UUID, target: Status, actor: Actor, viewer: Viewer, *, request_id: str | None = None
    ) -> OrderRead:
        try:
            async for waiting in self._waiting(self.settings.idempotency_wait_seconds):
                with waiting:
                    step = await self._step(order_id, target, actor, viewer)
        except _OrderHeld:
            raise OrderBusy("The order is being changed by another request; retry shortly.") from None
        if isinstance(step, OrderRead):
            return step
        if isinstance(step, _Commit):
            return await self._drive_commit(order_id, step.attempt, request_id=request_id)
        await self._drive_release(order_id, request_id=request_id)
        if step == "expired":
            raise OrderExpired("The order expired before this change; its stock was released.")
        return await self.get(order_id, STAFF)

    async def _step(
        self, order_id: uuid.UUID, target: Status, actor: Actor, viewer: Viewer
    ) -> OrderRead | _Commit | Literal["release", "expired"]:
        """One transaction: the change made (the order), or what inventory is owed next."""
        async with self.db.sessionmaker() as session, session.begin():
            order = await self._load(session, order_id, lock=True)
            if order is None or not viewer.sees(order):
                raise OrderNotFound()
            if order.stock_action == StockAction.commit:
                raise _OrderHeld()  # a confirmation is talking to inventory: wait for its outcome
            if order.status == Status.pending and order.expires_at is not None and order.expires_at <= self.clock():
                await self._close(session, order, Status.expired, SYSTEM)
                return "expired"
            if target not in ALLOWED.get(order.status, frozenset()):
                raise TransitionNotAllowed(
                    f"A {order.status} order cannot become {target}.",
                    extra={"order_status": order.status, "requested_status": str(target)},
                )
            if target == Status.confirmed:
                return _Commit(self._start_action(order, StockAction.commit, actor))
            if target in (Status.cancelled, Status.expired):
                await self._close(session, order, target, actor)
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

    async def _drive_commit(self, order_id: uuid.UUID, attempt: uuid.UUID, *, request_id: str | None) -> OrderRead:
        async with self.db.sessionmaker() as session, session.begin():
            order = await self._load(session, order_id)
            if order is None:  # erased meanwhile
                raise OrderNotFound()
            reservation_id = order.reservation_id
        try:
            await self.inventory.commit(reservation_id, request_id=request_id)
        except InventoryUnavailable:
            # The commit may or may not have happened; both are safe (a retry commits once, a cancel or the
            # expiry releases a committed reservation back on hand). The order stays pending.
            async with self.db.sessionmaker() as session, session.begin():
                order = await self._load(session, order_id, lock=True)
                if order is not None and order.stock_action_id == attempt:
                    self._clear_action(order)
            raise
        except inv.Closed:
            async with self.db.sessionmaker() as session, session.begin():
                order = await self._load(session, order_id, lock=True)
                if order is not None and order.stock_action_id == attempt:
                    self._clear_action(order)
                    order.stock = Stock.released
                    if order.status == Status.pending:
                        await self._close(session, order, Status.expired, SYSTEM)
            raise OrderExpired("The order's reservation expired; its stock was released.") from None
        async with self.db.sessionmaker() as session, session.begin():
            order = await self._load(session, order_id, lock=True)
            if order is None:
                raise OrderNotFound()
            if order.stock_action_id == attempt:
                actor = Actor.restore(order.stock_action_context)
                old = order.status
                order.status = Status.confirmed
                order.stock = Stock.committed
                self._clear_action(order)
                await session.flush()
                event = order_event(
                    actor, "orders.order.confirmed", order.id, {"status": old}, {"status": Status.confirmed}
                )
                await record(session, outbox, event)
            return read_of(order)

    async def _drive_release(self, order_id: uuid.UUID, *, request_id: str | None = None) -> bool:
        """Make the owed release; False when inventory could not be reached (the sweeper retries)."""
        async with self.db.sessionmaker() as session, session.begin():
            order = await self._load(session, order_id)
            if order is None or order.stock_action != StockAction.release:
                return True
            reservation_id, attempt = order.reservation_id, order.stock_action_id
        try:
            await self.inventory.release(reservation_id, request_id=request_id)
        except InventoryUnavailable:
            log.warning("orders.release.deferred", order_id=str(order_id))
            return False
        async with self.db.sessionmaker() as session, session.begin():
            order = await self._load(session, order_id, lock=True)
            if order is not None and order.stock_action_id == attempt:
                order.stock = Stock.released
                self._clear_action(order)
        return True

    # Background work: expiry and reconciliation

    async def _ids(self, *conditions: Any, limit: int = 100) -> list[uuid.UUID]:
        async with self.db.sessionmaker() as session, session.begin():
            stmt = select(Order.id).where(*conditions).order_by(Order.created_at).limit(limit)
            return list((await session.scalars(stmt)).all())

    async def _claim(self, order_id: uuid.UUID, *conditions: Any, action: StockAction) -> uuid.UUID | None:
        """Take over an interrupted action with a new attempt id (fencing the old attempt)."""
        async with self.db.sessionmaker() as session, session.begin():
            stmt = select(Order).where(Order.id == order_id, *conditions).with_for_update(skip_locked=True)
            order = (await session.scalars(stmt)).one_or_none()
            if order is None:
                return None
            attempt = uuid.uuid4()
            order.stock_action = action
            order.stock_action_id = attempt
            order.stock_action_since = self.clock()
            return attempt

    async def sweep(self) -> dict[str, int]:
        """One pass: orphaned placements released, interrupted confirmations finished, owed releases made,
        due pending orders expired. Safe to run in several replicas at once."""
        now = self.clock()
        done = {"orphans": 0, "confirmations": 0, "releases": 0, "expired": 0}

        orphan_cutoff = now - timedelta(seconds=self.settings.placing_timeout_seconds)
        stale_placing = (Order.status == Status.placing, Order.stock_action_since < orphan_cutoff)
        abandoned = (Order.status == Status.placing, Order.stock_action == StockAction.release)
        for order_id in await self._ids(*stale_placing) + await self._ids(*abandoned):
            attempt = await self._claim(order_id, Order.status == Status.placing, action=StockAction.release)
            if attempt is None:
                continue
            async with self.db.sessionmaker() as session, session.begin():
                reservation_id = (await session.scalars(select(Order.reservation_id).where(Order.id == order_id))).one()
            try:
                await self.inventory.release(reservation_id)
            except InventoryUnavailable:
                continue
            async with self.db.sessionmaker() as session, session.begin():
                await session.execute(
                    delete(Order).where(
                        Order.id == order_id, Order.status == Status.placing, Order.stock_action_id == attempt
                    )
                )
            done["orphans"] += 1
            log.info("orders.placement.reconciled", order_id=str(order_id))

        stale_cutoff = now - timedelta(seconds=self.settings.stale_action_seconds)
        stale_commit = (Order.stock_action == StockAction.commit, Order.stock_action_since < stale_cutoff)
        for order_id in await self._ids(*stale_commit):
            attempt = await self._claim(order_id, *stale_commit, action=StockAction.commit)
            if attempt is None:
                continue
            try:
                await self._drive_commit(order_id, attempt, request_id=None)
                done["confirmations"] += 1
            except (InventoryUnavailable, OrderExpired):
                continue

        owed = (Order.stock_action == StockAction.release, Order.status != Status.placing)
        for order_id in await self._ids(*owed):
            if await self._drive_release(order_id):
                done["releases"] += 1

        due = (Order.status == Status.pending, Order.stock_action.is_(None), Order.expires_at <= now)
        for order_id in await self._ids(*due):
            async with self.db.sessionmaker() as session, session.begin():
                stmt = select(Order).where(Order.id == order_id, *due).with_for_update(skip_locked=True)
                order = (await session.scalars(stmt)).one_or_none()
                if order is None:
                    continue
                await self._close(session, order, Status.expired, SYSTEM)
            await self._drive_release(order_id)
            done["expired"] += 1
        if any(done.values()):
            log.info("orders.sweep", **done)
        return done

    # Personal data (called by the auth service)

    async def export(self, user_id: uuid.UUID) -> UserOrdersExport:
        page = await self.page(STAFF, limit=10**6, cursor=None, status=None, user_id=user_id)
        return UserOrdersExport(user_id=user_id, orders=page.items)

    async def erase(self, user_id: uuid.UUID, actor: Actor) -> UserErasure:
        """Orders stay (bookkeeping) but no longer point at the person: a random pseudonym replaces the user id."""
        pseudonym = uuid.uuid4()
        async with self.db.sessionmaker() as session, session.begin():
            result = await session.execute(
                update(Order)
                .where(Order.user_id == user_id)
                .values(user_id=pseudonym, idempotency_key=None, anonymised_at=self.clock())
                .returning(Order.id)
            )
            count = len(result.all())
            if count:
                # The request path names the user; the event must not undo the erasure it records.
                context = actor.context | {"path": "/internal/users/{user_id}/erase"}
                event = AuditEvent(
                    service=SERVICE,
                    action="orders.user.anonymised",
                    actor_id=actor.id,
                    actor_role=actor.role,
                    resource_type="customer",
                    resource_id=str(pseudonym),
                    new_values={"orders_anonymised": count},
                    **context,
                )
                await record(session, outbox, event)
        return UserErasure(orders_anonymised=count)
