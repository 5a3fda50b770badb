"""Placing an order: the idempotency key is claimed, inventory reserves the lines, the order is recorded.

Placing runs two single-statement transactions (``repository.claim_batch`` and ``placed_batch``), each
taking a batch: the claims (and the completions) of the orders that arrive while the previous statement
is out go in the next one (``services.orders.batching``), so under load a statement's fixed cost is shared
by many orders. Until it is recorded, an order is an invisible ``placing`` row whose ``reserve`` intent
the sweeper finishes or undoes if this request dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog
from sqlalchemy.exc import DBAPIError

from common.audit import Actor
from common.clock import Clock
from common.db import Database
from common.errors import RETRYABLE_SQLSTATES, sqlstate_of
from common.idempotency import request_hash
from services.orders import inventory as inv
from services.orders.batching import Batcher
from services.orders.config import Settings
from services.orders.errors import (
    DatabaseBusy,
    IdempotencyKeyReused,
    IdempotentRequestInProgress,
    InsufficientStock,
    InventoryUnavailable,
    OrderTotalTooLarge,
    UnknownProducts,
)
from services.orders.metrics import BATCH_SIZE
from services.orders.models import MAX_TOTAL_XAF, Status
from services.orders.repository import Claim, OrderRepository, Placement, claim_batch, placed_batch
from services.orders.rules import Freed, Held, created_event, once_let_go, read_of
from services.orders.schemas import OrderCreate, OrderItemRead, OrderRead, Reservation

log = structlog.get_logger("comptoir.orders")


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


# How long a failed placement's answer waits for the release of what it may hold (the rest is background).
COMPENSATION_WAIT_SECONDS = 2.0


class Placements:
    def __init__(
        self,
        db: Database,
        inventory: inv.InventoryClient,
        settings: Settings,
        clock: Clock,
        owner: Callable[[], int | None],
    ) -> None:
        self.db = db
        self.owner = owner
        self.inventory = inventory
        self.settings = settings
        self.clock = clock
        in_flight = settings.statement_batches_in_flight
        self.claims: Batcher[Claim, bool] = Batcher(
            self._claim_batch,
            failure=_database_failure,
            in_flight=in_flight,
            observe=BATCH_SIZE.labels("claim").observe,
            isolate=_refused_for_its_data,
        )
        self.placements: Batcher[Placement, asyncpg.Record | None] = Batcher(
            self._placed_batch,
            failure=_database_failure,
            in_flight=in_flight,
            observe=BATCH_SIZE.labels("placed").observe,
            isolate=_refused_for_its_data,
        )
        # Releases of what failed placements may hold, going on after their requests were answered.
        self.compensating: set[asyncio.Task[None]] = set()

    def _compensated(self, task: asyncio.Task[None]) -> None:
        self.compensating.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The placing timeout's recovery releases and removes it later.
            log.error("orders.placement.abandon_failed", error=repr(task.exception()))

    async def close(self) -> None:
        await self.claims.close()
        await self.placements.close()
        for task in list(self.compensating):
            task.cancel()  # the placing timeout's recovery finishes what is left
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _claim_batch(self, claims: list[Claim]) -> list[bool]:
        return await claim_batch(self.db, claims, self.owner())

    async def _placed_batch(self, placements: list[Placement]) -> list[asyncpg.Record | None]:
        return await placed_batch(self.db, placements)

    async def place(
        self, user_id: uuid.UUID, key: str, data: OrderCreate, actor: Actor, *, request_id: str | None = None
    ) -> tuple[OrderRead, bool]:
        """Returns the order and whether it is a replay of an earlier request with the same key."""
        digest = request_hash(data.items)
        try:
            claimed = await once_let_go(
                lambda: self._claim_key(user_id, key, digest, actor), self.settings.idempotency_wait_seconds
            )
        except (Held, Freed):
            raise IdempotentRequestInProgress(
                "The first request with this key is still running; retry shortly.", headers={"Retry-After": "1"}
            ) from None
        if isinstance(claimed, OrderRead):
            return claimed, True
        order_id, attempt, reservation_id = claimed.order_id, claimed.attempt, claimed.reservation_id

        try:
            # The whole reserve, waiting for a place in a batch included: a hung inventory is this request's
            # 503 before the gateway's deadline, not the gateway's 504 (which counts against orders).
            async with asyncio.timeout(self.settings.inventory_budget_seconds):
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
        except (inv.Closed, InventoryUnavailable, TimeoutError):
            # The reservation may exist (a lost answer): release it; inventory's expiry covers a failure here.
            # Waited for only briefly: inventory is failing, and the client's answer is due before the
            # gateway's deadline; the rest goes on in the background. The key stays claimed (a retry waits)
            # until the release is done.
            task = asyncio.create_task(self._abandon(order_id, attempt, release=reservation_id, request_id=request_id))
            self.compensating.add(task)
            task.add_done_callback(self._compensated)
            with contextlib.suppress(Exception):  # a failure is logged by _compensated
                await asyncio.wait_for(asyncio.shield(task), COMPENSATION_WAIT_SECONDS)
            raise InventoryUnavailable(
                "Inventory is unavailable; the order was not placed. Retry shortly.", headers={"Retry-After": "2"}
            ) from None
        return await self._record_placed(order_id, attempt, data, reservation, actor, request_id=request_id), False

    async def _claim_key(self, user_id: uuid.UUID, key: str, digest: str, actor: Actor) -> Claim | OrderRead:
        """The key claimed for a new order, or the order an earlier request with it placed (a replay)."""
        order_id, attempt, reservation_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        claim = Claim(order_id, user_id, key, digest, reservation_id, attempt, self.clock(), json.dumps(actor.save()))
        if await self.claims.submit(claim):
            return claim
        # The key is taken: that request is done (replay it) or still running (wait for it).
        async with self.db.sessionmaker() as session, session.begin():
            existing = await OrderRepository(session).by_key(user_id, key)
            if existing is None:
                raise Freed()  # its placement was abandoned since: claim it again at once
            if existing.request_hash != digest:
                raise IdempotencyKeyReused()
            if existing.status == Status.placing:
                raise Held()
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
        event = created_event(actor, order_id, total, len(lines))
        # Only the attempt that still owns the placement may complete it (the sweeper may have taken over).
        placed = await self.placements.submit(Placement(order_id, attempt, total, reservation.expires_at, lines, event))
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
            await OrderRepository(session).delete_placing(order_id, attempt)
