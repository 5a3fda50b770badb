"""Helpers shared by the inventory and orders tests: a movable clock, tokens, clean tables, the ledger check."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from tests.conftest import DatabaseFixture
from tests.support.tokens import TestIssuer, bearer

INVENTORY_TABLES = ("outbox", "stock_movements", "reservation_items", "reservations", "product_images", "products")


class FakeClock:
    """A clock the test moves forward (reservation and order lifetimes)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Tokens:
    def __init__(self, issuer: TestIssuer) -> None:
        self.issuer = issuer
        self.staff_id = str(uuid.uuid4())

    def staff(self) -> dict[str, str]:
        return bearer(self.issuer.access(sub=self.staff_id, role="staff"))

    def admin(self) -> dict[str, str]:
        return bearer(self.issuer.access(role="admin"))

    def customer(self, sub: str | None = None) -> dict[str, str]:
        return bearer(self.issuer.access(sub=sub or str(uuid.uuid4()), role="customer"))

    def service(self, caller: str, audience: str) -> dict[str, str]:
        return bearer(self.issuer.service(caller=caller, audience=audience))


class IssuerServiceTokens:
    """Stands in for common.service_tokens.ServiceTokenClient until the auth service issues tokens."""

    def __init__(self, issuer: TestIssuer, caller: str) -> None:
        self.issuer = issuer
        self.caller = caller

    async def token_for(self, audience: str) -> str:
        return self.issuer.service(caller=self.caller, audience=audience)

    async def headers_for(self, audience: str) -> dict[str, str]:
        return bearer(await self.token_for(audience))

    def forget(self, audience: str) -> None:
        """Nothing is cached."""


async def truncate_inventory(database: DatabaseFixture) -> None:
    admin = await database.admin()
    try:
        await admin.execute("TRUNCATE " + ", ".join(f"inventory.{t}" for t in INVENTORY_TABLES) + " CASCADE")
    finally:
        await admin.close()


LEDGER_SQL = """
SELECT p.sku, p.on_hand, p.reserved, coalesce(m.on_hand, 0) AS ledger_on_hand,
       coalesce(m.reserved, 0) AS ledger_reserved, coalesce(h.held, 0) AS held
FROM inventory.products p
LEFT JOIN (SELECT product_id, sum(delta_on_hand) AS on_hand, sum(delta_reserved) AS reserved
           FROM inventory.stock_movements GROUP BY product_id) m ON m.product_id = p.id
LEFT JOIN (SELECT i.product_id, sum(i.quantity) AS held
           FROM inventory.reservation_items i JOIN inventory.reservations r ON r.id = i.reservation_id
           WHERE r.status = 'held' GROUP BY i.product_id) h ON h.product_id = p.id
WHERE p.on_hand <> coalesce(m.on_hand, 0) OR p.reserved <> coalesce(m.reserved, 0)
   OR p.reserved <> coalesce(h.held, 0) OR p.reserved < 0 OR p.reserved > p.on_hand
"""


async def assert_ledger_invariant(database: DatabaseFixture) -> None:
    """For every product: on_hand = sum of movements, reserved = sum of movements = units in held reservations."""
    admin = await database.admin()
    try:
        broken = await admin.fetch(LEDGER_SQL)
    finally:
        await admin.close()
    assert not broken, [dict(r) for r in broken]


async def stock_row(database: DatabaseFixture, product_id: str) -> asyncpg.Record:
    admin = await database.admin()
    try:
        row = await admin.fetchrow(
            "SELECT on_hand, reserved, on_hand - reserved AS available FROM inventory.products WHERE id = $1",
            uuid.UUID(product_id),
        )
    finally:
        await admin.close()
    assert row is not None
    return row


async def create_product(
    client: httpx.AsyncClient, tokens: Tokens, *, stock: int = 10, price: int = 1500, **fields: Any
) -> dict[str, Any]:
    body = {
        "sku": f"SKU-{uuid.uuid4().hex[:10]}",
        "name": "Savon de Marseille",
        "price_xaf": price,
        "initial_stock": stock,
    } | fields
    response = await client.post("/api/v1/products", json=body, headers=tokens.staff())
    assert response.status_code == 201, response.text
    return dict(response.json())
