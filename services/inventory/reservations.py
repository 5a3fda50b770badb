"""Reservations for orders: all items or none, idempotent by reservation id, expiring.

Locking order, the same everywhere: the reservation row first, then the product rows in product-id
order. Two transactions therefore never wait on each other in a cycle, and nothing deadlocks.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from services.inventory.errors import (
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
from services.inventory.repository import ProductRepository, ReservationRepository, ReserveStatements
from services.inventory.schemas import ReservationRead, ReservedItem, ReserveItem, ShortItem
from services.inventory.service import set_lock_timeout


def request_hash(items: list[ReserveItem]) -> str:
    canonical = json.dumps([[str(item.product_id), item.quantity] for item in items], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


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
class ReserveOutcome:
    reservation: ReservationRead | None = None
    created: bool = False
    short_items: list[ShortItem] | None = None


class ReservationService:
    def __init__(self, session: AsyncSession, *, ttl: timedelta, lock_timeout_ms: int) -> None:
        self.session = session
        self.products = ProductRepository(session)
        self.reservations = ReservationRepository(session)
        self.ttl = ttl
        self.lock_timeout_ms = lock_timeout_ms

    async def reserve(self, reservation_id: uuid.UUID, items: list[ReserveItem], now: datetime) -> ReserveOutcome:
        digest = request_hash(items)
        expires_at = now + self.ttl
        async with self.reservations.reserving() as statements:
            claimed = await statements.claim(
                reservation_id, digest, expires_at, now, lock_timeout_ms=self.lock_timeout_ms
            )
            if claimed:
                return await self._hold(statements, reservation_id, items, expires_at)
        return await self._replay(reservation_id, digest)

    @staticmethod
    async def _hold(
        statements: ReserveStatements, reservation_id: uuid.UUID, items: list[ReserveItem], expires_at: datetime
    ) -> ReserveOutcome:
        products = await statements.lock_products(item.product_id for item in items)
        missing = [str(item.product_id) for item in items if item.product_id not in products]
        if missing:
            # Raised inside the transaction, which rolls back: the id can be used again.
            raise UnknownProducts("Some products do not exist.", extra={"product_ids": missing})

        short = []
        for item in items:
            product = products[item.product_id]
            available = product["on_hand"] - product["reserved"] if product["is_active"] else 0
            if available < item.quantity:
                short.append(ShortItem(product_id=item.product_id, requested=item.quantity, available=available))
        if short:
            await statements.reject(reservation_id, {"short_items": [s.model_dump(mode="json") for s in short]})
            return ReserveOutcome(short_items=short)

        # The rows are locked: one statement writes the holds, the lines and the ledger (the shorter the
        # lock is held, the more orders per second one hot product can take).
        lines = [
            {
                "product_id": item.product_id,
                "line": line,
                "quantity": item.quantity,
                "sku": products[item.product_id]["sku"],
                "name": products[item.product_id]["name"],
                "unit_price_xaf": products[item.product_id]["price_xaf"],
            }
            for line, item in enumerate(items)
        ]
        await statements.hold(reservation_id, lines)
        # Built from the locked rows just read: no validation needed.
        read = ReservationRead.model_construct(
            reservation_id=reservation_id,
            status=ReservationStatus.held.value,
            expires_at=expires_at,
            items=[
                ReservedItem.model_construct(
                    product_id=line["product_id"],
                    sku=line["sku"],
                    name=line["name"],
                    quantity=line["quantity"],
                    unit_price_xaf=line["unit_price_xaf"],
                )
                for line in lines
            ],
        )
        return ReserveOutcome(reservation=read, created=True)

    async def _replay(self, reservation_id: uuid.UUID, digest: str) -> ReserveOutcome:
        existing = await self.reservations.get(reservation_id)
        assert existing is not None  # the conflicting row is committed: we waited for it
        if existing.request_hash is None:
            raise ReservationClosed(
                "This reservation id was already released.", extra={"reservation_status": existing.status}
            )
        if existing.request_hash != digest:
            raise ReservationMismatch()
        if existing.status == ReservationStatus.rejected:
            rejected = existing.rejection or {}
            return ReserveOutcome(
                short_items=[ShortItem.model_validate(s) for s in rejected.get("short_items", [])],
            )
        return ReserveOutcome(reservation=read_of(existing))

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
            assert reservation is not None
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
