"""Queries only: flush, never commit."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload, undefer

from common.db import Database, columns, escape_like
from services.inventory.models import (
    Product,
    ProductImage,
    Reservation,
    StockMovement,
)


class ProductRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, product_id: uuid.UUID) -> Product | None:
        """The product row without its images (the catalogue's reads are ``CatalogueStatements``)."""
        return (await self.session.scalars(select(Product).where(Product.id == product_id))).one_or_none()

    async def reread(self, product_id: uuid.UUID) -> Product:
        """A product this transaction wrote, read back with its images (NoResultFound if it is not there)."""
        stmt = (
            select(Product)
            .where(Product.id == product_id)
            .options(undefer(Product.image_ids))
            .execution_options(populate_existing=True)
        )
        return (await self.session.scalars(stmt)).one()

    async def lock(self, product_id: uuid.UUID) -> Product | None:
        """The product row, locked until the end of the transaction."""
        stmt = select(Product).where(Product.id == product_id).with_for_update()
        return (await self.session.scalars(stmt)).one_or_none()

    async def lock_many(self, product_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, Product]:
        """Lock the rows in product-id order: two transactions over the same products never deadlock."""
        ids = sorted(set(product_ids))
        stmt = select(Product).where(Product.id.in_(ids)).order_by(Product.id).with_for_update()
        # populate_existing: a row read earlier in this transaction must show the locked, current values.
        stmt = stmt.execution_options(populate_existing=True)
        return {p.id: p for p in (await self.session.scalars(stmt)).all()}

    async def insert(self, values: dict[str, object]) -> uuid.UUID | None:
        """Insert unless the sku is taken (by any case); returns the new id or None."""
        stmt = insert(Product).values(**values).on_conflict_do_nothing().returning(Product.id)
        return (await self.session.execute(stmt)).scalar_one_or_none()

    async def add_movements(self, movements: Sequence[StockMovement]) -> None:
        self.session.add_all(movements)
        await self.session.flush()

    async def movements(self, product_id: uuid.UUID, *, limit: int, before: int | None) -> list[StockMovement]:
        stmt = select(StockMovement).where(StockMovement.product_id == product_id)
        if before is not None:
            stmt = stmt.where(StockMovement.id < before)
        stmt = stmt.order_by(StockMovement.id.desc()).limit(limit)
        return list((await self.session.scalars(stmt)).all())

    async def image(self, product_id: uuid.UUID, image_id: uuid.UUID) -> ProductImage | None:
        stmt = select(ProductImage).where(ProductImage.id == image_id, ProductImage.product_id == product_id)
        return (await self.session.scalars(stmt)).one_or_none()

    async def count_images(self, product_id: uuid.UUID) -> int:
        stmt = select(func.count()).select_from(ProductImage).where(ProductImage.product_id == product_id)
        return int((await self.session.execute(stmt)).scalar_one())


# The catalogue's reads in SQL written once, run on a pooled connection's asyncpg driver outside any
# transaction (one statement: no BEGIN and COMMIT round trips), returning exactly the columns of a
# ProductRead in its order, the image URLs built by the database. Tables resolve through the search_path.
_PRODUCT_COLUMNS = """
SELECT p.id, p.sku, p.name, p.description, p.price_xaf, p.is_active, p.on_hand - p.reserved AS available,
       coalesce(
           (SELECT array_agg('/api/v1/products/' || i.product_id || '/images/' || i.id ORDER BY i.created_at, i.id)
            FROM product_images AS i WHERE i.product_id = p.id),
           '{}'
       ) AS image_urls,
       p.created_at, p.updated_at
FROM products AS p
"""

_PRODUCT = _PRODUCT_COLUMNS + "WHERE p.id = $1"


def _page_statement(*, include_inactive: bool, query: bool, after: bool) -> str:
    """The page statement for one combination of filters (each its own statement: each gets its own plan)."""
    conditions: list[str] = []
    params = 0
    if not include_inactive:
        conditions.append("p.is_active")
    if query:
        params += 1
        conditions.append(f"(lower(p.sku) LIKE ${params} ESCAPE '\\' OR lower(p.name) LIKE ${params} ESCAPE '\\')")
    if after:
        conditions.append(f"(p.created_at, p.id) < (${params + 1}, ${params + 2})")
        params += 2
    where = f"WHERE {' AND '.join(conditions)}\n" if conditions else ""
    return f"{_PRODUCT_COLUMNS}{where}ORDER BY p.created_at DESC, p.id DESC LIMIT ${params + 1}"


_PAGES = {
    (inactive, query, after): _page_statement(include_inactive=inactive, query=query, after=after)
    for inactive in (False, True)
    for query in (False, True)
    for after in (False, True)
}


class CatalogueStatements:
    """The catalogue's reads on one asyncpg connection (``common.db.Database.autocommit``)."""

    def __init__(self, driver: asyncpg.Connection) -> None:
        self.driver = driver

    async def product(self, product_id: uuid.UUID) -> asyncpg.Record | None:
        return await self.driver.fetchrow(_PRODUCT, product_id)

    async def page(
        self,
        *,
        limit: int,
        include_inactive: bool,
        query: str | None,
        after: tuple[datetime, uuid.UUID] | None,
    ) -> list[asyncpg.Record]:
        """Newest first, keyset-paginated on (created_at, id); ``query`` matches sku or name, taken literally."""
        args: list[object] = []
        if query:
            args.append(f"%{escape_like(query.lower())}%")
        if after is not None:
            args.extend(after)
        statement = _PAGES[include_inactive, bool(query), after is not None]
        return list(await self.driver.fetch(statement, *args, limit))


# The reserve path in SQL written once, run on the session's asyncpg driver connection: SQLAlchemy's
# per-call statement building, cache keys and ORM identity bookkeeping cost more CPU than the database work
# itself. Every statement takes a whole batch of reservations (orders sends the reservations that arrive
# while one batch is in flight as the next): a hot product's row is locked once per batch, not per order.
# Tables resolve through the connection's search_path (the service's schema).

# The lock timeout rides on the claim (SET LOCAL as a function call): one round trip fewer, and it is in
# force before the claim may wait for a concurrent twin. Ids are claimed in id order, so two batches that
# share ids (retries) wait for each other in one direction only.
_CLAIM = """
INSERT INTO reservations (id, status, request_hash, expires_at, created_at, updated_at)
SELECT c.id, 'held', c.request_hash, $3, $4, $4
FROM (SELECT set_config('lock_timeout', $5, true)) AS settings,
     unnest($1::uuid[], $2::text[]) AS c(id, request_hash)
ORDER BY c.id
ON CONFLICT DO NOTHING
RETURNING id
"""

_LOCK_PRODUCTS = """
SELECT id, sku, name, price_xaf, is_active, on_hand, reserved
FROM products WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE
"""

_REJECT = """
UPDATE reservations AS r SET status = 'rejected', expires_at = NULL, rejection = v.rejection::jsonb
FROM unnest($1::uuid[], $2::text[]) AS v(id, rejection)
WHERE r.id = v.id
"""

# Claims whose request named unknown products are taken back, so that the id can be used again.
_FORGET = "DELETE FROM reservations WHERE id = ANY($1::uuid[])"

# The rows are locked: one statement writes the holds (one update per product, however many reservations
# hold it), the lines and the ledger (a movement per reservation line).
_HOLD = """
WITH v AS (
    SELECT * FROM unnest(
        $1::uuid[], $2::uuid[], $3::integer[], $4::bigint[], $5::varchar[], $6::varchar[], $7::bigint[]
    ) AS v(reservation_id, product_id, line, quantity, sku, name, unit_price_xaf)
),
held AS (
    UPDATE products AS p SET reserved = p.reserved + t.quantity
    FROM (SELECT product_id, sum(quantity)::bigint AS quantity FROM v GROUP BY product_id) AS t
    WHERE p.id = t.product_id
),
lines AS (
    INSERT INTO reservation_items (reservation_id, product_id, line, quantity, sku, name, unit_price_xaf)
    SELECT reservation_id, product_id, line, quantity, sku, name, unit_price_xaf FROM v
)
INSERT INTO stock_movements (product_id, kind, delta_on_hand, delta_reserved, reservation_id)
SELECT product_id, 'reserve', 0, quantity, reservation_id FROM v
"""


@dataclass(frozen=True)
class HeldLine:
    reservation_id: uuid.UUID
    product_id: uuid.UUID
    line: int
    quantity: int
    sku: str
    name: str
    unit_price_xaf: int


class ReserveStatements:
    """The reserve path's statements, inside the transaction opened by ``ReservationRepository.reserving``."""

    def __init__(self, driver: asyncpg.Connection) -> None:
        self.driver = driver

    async def claim(
        self,
        claims: Sequence[tuple[uuid.UUID, str]],
        expires_at: datetime,
        now: datetime,
        *,
        lock_timeout_ms: int,
    ) -> set[uuid.UUID]:
        """Insert a held row for each (id, request hash) whose id is new; returns those ids. A concurrent
        twin of an id waits for the transaction that inserted it."""
        rows = await self.driver.fetch(
            _CLAIM,
            [rid for rid, _ in claims],
            [digest for _, digest in claims],
            expires_at,
            now,
            f"{int(lock_timeout_ms)}ms",
        )
        return {row["id"] for row in rows}

    async def lock_products(self, product_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, asyncpg.Record]:
        """Lock the rows in product-id order: two transactions over the same products never deadlock."""
        rows = await self.driver.fetch(_LOCK_PRODUCTS, sorted(set(product_ids)))
        return {row["id"]: row for row in rows}

    async def reject(self, rejections: Sequence[tuple[uuid.UUID, dict[str, Any]]]) -> None:
        await self.driver.execute(
            _REJECT, [rid for rid, _ in rejections], [json.dumps(rejection) for _, rejection in rejections]
        )

    async def forget(self, reservation_ids: Sequence[uuid.UUID]) -> None:
        await self.driver.execute(_FORGET, list(reservation_ids))

    async def hold(self, lines: Sequence[HeldLine]) -> None:
        """Add the held units to the (already locked) products, the reservations' lines and the ledger rows."""
        await self.driver.execute(
            _HOLD,
            *columns(lines, "reservation_id", "product_id", "line", "quantity", "sku", "name", "unit_price_xaf"),
        )


@asynccontextmanager
async def reserving(db: Database) -> AsyncIterator[ReserveStatements]:
    """One transaction for the reserve statements on a pooled connection's asyncpg driver, no ORM session.

    It commits when the block ends and rolls back when it raises. Database errors leave as SQLAlchemy's
    ``DBAPIError`` (``Database.autocommit``), so that the error handler maps them as usual (a lock timeout
    is a 503).
    """
    async with db.autocommit() as driver, driver.transaction():
        yield ReserveStatements(driver)


class ReservationRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def claim(self, values: dict[str, object]) -> bool:
        """Insert the reservation row unless the id exists; a concurrent twin waits for our commit."""
        stmt = insert(Reservation).values(**values).on_conflict_do_nothing().returning(Reservation.id)
        return (await self.session.execute(stmt)).scalar_one_or_none() is not None

    async def lock(self, reservation_id: uuid.UUID, *, skip_locked: bool = False) -> Reservation | None:
        stmt = (
            select(Reservation)
            .where(Reservation.id == reservation_id)
            .options(selectinload(Reservation.items))
            .with_for_update(skip_locked=skip_locked)
            .execution_options(populate_existing=True)
        )
        return (await self.session.scalars(stmt)).one_or_none()

    async def get(self, reservation_id: uuid.UUID) -> Reservation | None:
        stmt = select(Reservation).where(Reservation.id == reservation_id).options(selectinload(Reservation.items))
        return (await self.session.scalars(stmt)).one_or_none()

    async def expired_ids(self, now: datetime, *, limit: int) -> list[uuid.UUID]:
        stmt = (
            select(Reservation.id)
            .where(Reservation.status == "held", Reservation.expires_at <= now)
            .order_by(Reservation.expires_at)
            .limit(limit)
        )
        return list((await self.session.scalars(stmt)).all())
