"""Orders' SQL: the two batched placement statements (asyncpg, autocommit) and the ORM queries on a session.

Queries only: nothing here decides anything, and the session's owner commits.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy import ColumnElement, delete, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from common.db import Database, columns
from services.orders.models import Order, Status
from services.orders.rules import OutboxEvent

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
    stock_action, stock_action_id, stock_action_since, stock_action_context, owner
)
SELECT v.id, v.user_id, 'placing', v.key, v.digest, v.reservation_id, 0, 'reserving',
    'reserve', v.attempt, v.since, v.context::jsonb, $9::integer
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
class Claim:
    """An idempotency key asked for, with the ids the new order gets if the key is free."""

    order_id: uuid.UUID
    user_id: uuid.UUID
    key: str
    digest: str
    reservation_id: uuid.UUID
    attempt: uuid.UUID
    since: datetime
    context: str


@dataclass(frozen=True)
class Placement:
    """A placement to complete: the order's total, lines and audit event, if ``attempt`` still owns it."""

    order_id: uuid.UUID
    attempt: uuid.UUID
    total: int
    expires_at: datetime | None
    lines: list[dict[str, Any]]
    event: OutboxEvent


async def claim_batch(db: Database, claims: list[Claim], owner: int | None) -> list[bool]:
    """Whether each claim took its key (a key taken before, or by an earlier twin here, is not); ``owner`` is
    this process's instance number while it holds its liveness lock (``services.orders.liveness``)."""
    async with db.autocommit() as conn:
        rows = await conn.fetch(
            _CLAIM,
            *columns(claims, "order_id", "user_id", "key", "digest", "reservation_id", "attempt", "since", "context"),
            owner,
        )
    claimed = {row["id"] for row in rows}
    return [c.order_id in claimed for c in claims]


async def placed_batch(db: Database, placements: list[Placement]) -> list[asyncpg.Record | None]:
    """Each placement's order row (id, user_id, created_at, updated_at), or None where it lost its claim."""
    lines = [{"order_id": p.order_id, **line} for p in placements for line in p.lines]
    async with db.autocommit() as conn:
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
            [p.event.id for p in placements],
            [p.order_id for p in placements],
            [p.event.occurred_at for p in placements],
            [p.event.payload for p in placements],
        )
    placed = {row["id"]: row for row in rows}
    return [placed.get(p.order_id) for p in placements]


class OrderRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def load(self, order_id: uuid.UUID, *, lock: bool = False) -> Order | None:
        """The order with its lines, fresh from the database (locked until the end of the transaction)."""
        stmt = (
            select(Order)
            .where(Order.id == order_id)
            .options(selectinload(Order.items))
            .execution_options(populate_existing=True)
        )
        if lock:
            stmt = stmt.with_for_update()
        return (await self.session.scalars(stmt)).one_or_none()

    async def by_key(self, user_id: uuid.UUID, key: str) -> Order | None:
        stmt = (
            select(Order)
            .where(Order.user_id == user_id, Order.idempotency_key == key)
            .options(selectinload(Order.items))
        )
        return (await self.session.scalars(stmt)).one_or_none()

    async def page(
        self,
        *,
        owner: uuid.UUID | None,
        status: str | None,
        after: tuple[datetime, uuid.UUID] | None,
        limit: int,
    ) -> list[Order]:
        """Visible orders newest first, after the (created_at, id) key; only ``owner``'s when given."""
        stmt = select(Order).options(selectinload(Order.items)).where(Order.status != Status.placing)
        if owner is not None:
            stmt = stmt.where(Order.user_id == owner)
        if status is not None:
            stmt = stmt.where(Order.status == status)
        if after is not None:
            stmt = stmt.where(tuple_(Order.created_at, Order.id) < tuple_(*after))
        stmt = stmt.order_by(Order.created_at.desc(), Order.id.desc()).limit(limit)
        return list((await self.session.scalars(stmt)).all())

    async def delete_placing(self, order_id: uuid.UUID, attempt: uuid.UUID) -> None:
        """Remove an invisible (placing) order, if ``attempt`` still owns it."""
        await self.session.execute(
            delete(Order).where(Order.id == order_id, Order.status == Status.placing, Order.stock_action_id == attempt)
        )

    async def ids(self, *conditions: ColumnElement[bool], limit: int = 100) -> list[uuid.UUID]:
        stmt = select(Order.id).where(*conditions).order_by(Order.created_at).limit(limit)
        return list((await self.session.scalars(stmt)).all())

    async def lock_if(self, order_id: uuid.UUID, *conditions: ColumnElement[bool]) -> Order | None:
        """The order, locked, if it still meets ``conditions`` and no one else holds it (SKIP LOCKED)."""
        stmt = select(Order).where(Order.id == order_id, *conditions).with_for_update(skip_locked=True)
        return (await self.session.scalars(stmt)).one_or_none()

    async def reservation_of(self, order_id: uuid.UUID) -> uuid.UUID:
        return (await self.session.scalars(select(Order.reservation_id).where(Order.id == order_id))).one()

    async def pseudonymise(self, user_id: uuid.UUID, pseudonym: uuid.UUID, now: datetime) -> int:
        """Every order of ``user_id`` under ``pseudonym`` instead, its idempotency key dropped; how many."""
        result = await self.session.execute(
            update(Order)
            .where(Order.user_id == user_id)
            .values(user_id=pseudonym, idempotency_key=None, anonymised_at=now)
            .returning(Order.id)
        )
        return len(result.all())
