"""Reservations for orders: all items or none, idempotent by reservation id, expiring.

Locking order, the same everywhere: the reservation row first, then the product rows in product-id
order. Two transactions therefore never wait on each other in a cycle, and nothing deadlocks.

Reserving (``Reserver``) runs on a pooled connection of its own, its statements straight on the asyncpg
driver in one transaction, with no ORM session: the session's begin, connection, commit and close were a
sixth of inventory's CPU per reservation batch. A session is opened only to read a reservation back for a
replay (an id asked for again).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.types import Scope

from common.db import Database
from common.errors import ServiceError, error_body
from common.idempotency import request_hash
from services.inventory.errors import (
    InsufficientStock,
    ReservationClosed,
    ReservationMismatch,
    ReservationNotFound,
    UnknownProducts,
)
from services.inventory.models import (
    MovementKind,
    Reservation,
    ReservationStatus,
    StockMovement,
)
from services.inventory.repository import (
    HeldLine,
    ProductRepository,
    ReservationRepository,
    ReserveStatements,
    reserving,
)
from services.inventory.schemas import ReservationRead, ReservedItem, ReserveItem, ShortItem
from services.inventory.service import set_lock_timeout


def read_of(reservation: Reservation) -> ReservationRead:
    return ReservationRead(
        reservation_id=reservation.id,
        status=reservation.status,
        expires_at=reservation.expires_at,
        items=[
            ReservedItem(
                product_id=item.product_id,
                sku=item.sku,
                name=item.name,
                quantity=item.quantity,
                unit_price_xaf=item.unit_price_xaf,
            )
            for item in reservation.items
        ],
    )


@dataclass(frozen=True)
class ReserveAsk:
    """One reservation asked for: its id and its items (distinct products)."""

    reservation_id: uuid.UUID
    items: list[ReserveItem]


@dataclass(frozen=True)
class ReserveOutcome:
    """What a reserve call answers: the reservation (``created`` when this call made it), or the error."""

    reservation: ReservationRead | None = None
    created: bool = False
    error: ServiceError | None = None

    def answer(self, scope: Scope | None = None) -> tuple[int, dict[str, Any]]:
        """The status and body the single ``PUT`` answers for this outcome."""
        if self.error is not None:
            return self.error.status, error_body(self.error, scope)
        if self.reservation is None:
            raise RuntimeError("a reserve outcome holds either a reservation or an error")
        return (201 if self.created else 200), self.reservation.model_dump(mode="json")


def _short(short: list[ShortItem]) -> InsufficientStock:
    return InsufficientStock(
        "Some items lack stock; nothing was reserved.",
        extra={"short_items": [s.model_dump(mode="json") for s in short]},
    )


class Reserver:
    """Reserve calls: each batch in one transaction on a pooled connection of its own (no ORM session)."""

    def __init__(self, db: Database, *, ttl: timedelta, lock_timeout_ms: int) -> None:
        self.db = db
        self.ttl = ttl
        self.lock_timeout_ms = lock_timeout_ms

    async def reserve(self, reservation_id: uuid.UUID, items: list[ReserveItem], now: datetime) -> ReserveOutcome:
        return (await self.reserve_many([ReserveAsk(reservation_id, items)], now))[0]

    async def reserve_many(self, asks: Sequence[ReserveAsk], now: datetime) -> list[ReserveOutcome]:
        """Each reservation all or nothing, in one transaction for the lot: the products are locked once,
        and the asks are served in order from what the locked rows have available (a later ask finds what
        an earlier one left). An id asked for again, here or before, gets the first result."""
        digests = [request_hash(ask.items) for ask in asks]
        first: dict[uuid.UUID, int] = {}
        for number, ask in enumerate(asks):
            first.setdefault(ask.reservation_id, number)
        expires_at = now + self.ttl
        outcomes: dict[int, ReserveOutcome] = {}
        async with reserving(self.db) as statements:
            claimed = await statements.claim(
                [(rid, digests[number]) for rid, number in first.items()],
                expires_at,
                now,
                lock_timeout_ms=self.lock_timeout_ms,
            )
            fresh = [number for rid, number in first.items() if rid in claimed]
            if fresh:
                outcomes = await self._hold(statements, [asks[number] for number in fresh], fresh, expires_at)
        results = []
        for number, ask in enumerate(asks):
            outcome = outcomes.get(number)
            if outcome is None:
                outcome = await self._replay(ask, digests[number], now)
            results.append(outcome)
        return results

    @staticmethod
    async def _hold(
        statements: ReserveStatements, asks: list[ReserveAsk], numbers: list[int], expires_at: datetime
    ) -> dict[int, ReserveOutcome]:
        products = await statements.lock_products(item.product_id for ask in asks for item in ask.items)
        available = {
            pid: (row["on_hand"] - row["reserved"] if row["is_active"] else 0) for pid, row in products.items()
        }
        outcomes: dict[int, ReserveOutcome] = {}
        lines: list[HeldLine] = []
        rejected: list[tuple[uuid.UUID, dict[str, Any]]] = []
        unknown: list[uuid.UUID] = []
        for number, ask in zip(numbers, asks, strict=True):
            missing = [str(item.product_id) for item in ask.items if item.product_id not in products]
            if missing:
                # The claim is taken back: the id can be used again.
                unknown.append(ask.reservation_id)
                error = UnknownProducts("Some products do not exist.", extra={"product_ids": missing})
                outcomes[number] = ReserveOutcome(error=error)
                continue
            short = [
                ShortItem(
                    product_id=item.product_id,
                    requested=item.quantity,
                    available=available[item.product_id],
                    withdrawn=not products[item.product_id]["is_active"],
                )
                for item in ask.items
                if available[item.product_id] < item.quantity
            ]
            if short:
                # Stored, so that a repeat of this id gets the same answer.
                rejected.append((ask.reservation_id, {"short_items": [s.model_dump(mode="json") for s in short]}))
                outcomes[number] = ReserveOutcome(error=_short(short))
                continue
            held = []
            for line, item in enumerate(ask.items):
                product = products[item.product_id]
                available[item.product_id] -= item.quantity
                held.append(
                    HeldLine(
                        reservation_id=ask.reservation_id,
                        product_id=item.product_id,
                        line=line,
                        quantity=item.quantity,
                        sku=product["sku"],
                        name=product["name"],
                        unit_price_xaf=product["price_xaf"],
                    )
                )
            lines.extend(held)
            # Built from the locked rows just read: no validation needed.
            read = ReservationRead.model_construct(
                reservation_id=ask.reservation_id,
                status=ReservationStatus.held.value,
                expires_at=expires_at,
                items=[
                    ReservedItem.model_construct(
                        product_id=h.product_id,
                        sku=h.sku,
                        name=h.name,
                        quantity=h.quantity,
                        unit_price_xaf=h.unit_price_xaf,
                    )
                    for h in held
                ],
            )
            outcomes[number] = ReserveOutcome(reservation=read, created=True)
        if unknown:
            await statements.forget(unknown)
        if rejected:
            await statements.reject(rejected)
        if lines:
            # The rows are locked: the shorter the lock is held, the more orders per second a hot product takes.
            await statements.hold(lines)
        return outcomes

    async def _replay(self, ask: ReserveAsk, digest: str, now: datetime) -> ReserveOutcome:
        # Read back in a session of its own, closed before anything else: never two connections at once.
        async with self.db.sessionmaker() as session:
            existing = await ReservationRepository(session).get(ask.reservation_id)
        if existing is None:
            # A repeat, in the same batch, of an ask whose claim was taken back (unknown products): it is
            # asked afresh, and answered the same way.
            return (await self.reserve_many([ask], now))[0]
        if existing.request_hash is None:
            return ReserveOutcome(
                error=ReservationClosed(
                    "This reservation id was already released.", extra={"reservation_status": existing.status}
                )
            )
        if existing.request_hash != digest:
            return ReserveOutcome(error=ReservationMismatch())
        if existing.status == ReservationStatus.rejected:
            rejected = existing.rejection or {}
            return ReserveOutcome(error=_short([ShortItem.model_validate(s) for s in rejected.get("short_items", [])]))
        return ReserveOutcome(reservation=read_of(existing))


class ReservationService:
    def __init__(self, session: AsyncSession, reserver: Reserver) -> None:
        self.session = session
        self.products = ProductRepository(session)
        self.reservations = ReservationRepository(session)
        self.reserver = reserver
        self.ttl = reserver.ttl
        self.lock_timeout_ms = reserver.lock_timeout_ms

    async def reserve(self, reservation_id: uuid.UUID, items: list[ReserveItem], now: datetime) -> ReserveOutcome:
        """``Reserver.reserve``: in a transaction of its own, committed before this session's."""
        return await self.reserver.reserve(reservation_id, items, now)

    async def reserve_many(self, asks: Sequence[ReserveAsk], now: datetime) -> list[ReserveOutcome]:
        return await self.reserver.reserve_many(asks, now)

    async def get(self, reservation_id: uuid.UUID) -> ReservationRead:
        reservation = await self.reservations.get(reservation_id)
        if reservation is None:
            raise ReservationNotFound()
        return read_of(reservation)

    async def commit(self, reservation_id: uuid.UUID, now: datetime) -> ReservationRead:
        """Held units leave on-hand stock. Committing a committed reservation changes nothing."""
        await set_lock_timeout(self.session, self.lock_timeout_ms)
        reservation = await self.reservations.lock(reservation_id)
        if reservation is None:
            raise ReservationNotFound()
        if reservation.status == ReservationStatus.committed:
            return read_of(reservation)
        expired = reservation.expires_at is not None and reservation.expires_at <= now
        if reservation.status != ReservationStatus.held or expired:
            status = ReservationStatus.expired if expired else reservation.status
            raise ReservationClosed(f"The reservation is {status}.", extra={"reservation_status": status})
        products = await self.products.lock_many(item.product_id for item in reservation.items)
        movements = []
        for item in sorted(reservation.items, key=lambda i: i.product_id):
            product = products[item.product_id]
            product.on_hand -= item.quantity
            product.reserved -= item.quantity
            movements.append(
                self._movement(product.id, MovementKind.commit, -item.quantity, -item.quantity, reservation_id)
            )
        reservation.status = ReservationStatus.committed
        reservation.updated_at = now
        await self.products.add_movements(movements)
        return read_of(reservation)

    async def release(self, reservation_id: uuid.UUID, now: datetime) -> ReservationRead:
        """Give the units back: a hold is freed, committed units return on hand. Repeats change nothing.

        Releasing an id that was never reserved leaves a tombstone, so a reserve call with that id that
        arrives late (a retry overtaken by the release) cannot hold stock any more.
        """
        await set_lock_timeout(self.session, self.lock_timeout_ms)
        reservation = await self.reservations.lock(reservation_id)
        if reservation is None:
            await self.reservations.claim(
                {"id": reservation_id, "status": ReservationStatus.released, "created_at": now, "updated_at": now}
            )
            reservation = await self.reservations.lock(reservation_id)
            if reservation is None:
                raise RuntimeError(f"the tombstone of reservation {reservation_id} was not written")
        if reservation.status in (ReservationStatus.held, ReservationStatus.committed):
            await self._give_back(reservation, ReservationStatus.released, now, reason=None)
        return read_of(reservation)

    async def expire(self, reservation_id: uuid.UUID, now: datetime) -> bool:
        """The sweeper's step for one reservation; False when it is no longer due (or someone holds it)."""
        await set_lock_timeout(self.session, self.lock_timeout_ms)
        reservation = await self.reservations.lock(reservation_id, skip_locked=True)
        if (
            reservation is None
            or reservation.status != ReservationStatus.held
            or reservation.expires_at is None
            or reservation.expires_at > now
        ):
            return False
        await self._give_back(reservation, ReservationStatus.expired, now, reason="reservation expired")
        return True

    async def _give_back(
        self, reservation: Reservation, status: ReservationStatus, now: datetime, *, reason: str | None
    ) -> None:
        committed = reservation.status == ReservationStatus.committed
        products = await self.products.lock_many(item.product_id for item in reservation.items)
        movements = []
        for item in sorted(reservation.items, key=lambda i: i.product_id):
            product = products[item.product_id]
            if committed:
                product.on_hand += item.quantity
                movement = self._movement(product.id, MovementKind.release, item.quantity, 0, reservation.id)
            else:
                product.reserved -= item.quantity
                movement = self._movement(product.id, MovementKind.release, 0, -item.quantity, reservation.id)
            movement.reason = reason or ("committed units returned" if committed else None)
            movements.append(movement)
        reservation.status = status
        reservation.updated_at = now
        await self.products.add_movements(movements)

    @staticmethod
    def _movement(
        product_id: uuid.UUID, kind: MovementKind, on_hand: int, reserved: int, reservation_id: uuid.UUID
    ) -> StockMovement:
        return StockMovement(
            product_id=product_id,
            kind=kind,
            delta_on_hand=on_hand,
            delta_reserved=reserved,
            reservation_id=reservation_id,
        )
