from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from services.inventory.config import Settings as InventorySettings
from services.inventory.main import create_app as create_inventory
from services.orders.config import Settings as OrdersSettings
from services.orders.main import create_app as create_orders
from tests.conftest import DatabaseFixture, running
from tests.inventory.support import (
    FakeClock,
    IssuerServiceTokens,
    Tokens,
    assert_ledger_invariant,
    create_product,
    truncate_inventory,
)
from tests.support.tokens import TestIssuer

ORDERS_TABLES = ("outbox", "order_items", "orders")


async def truncate_orders(database: DatabaseFixture) -> None:
    admin = await database.admin()
    try:
        await admin.execute("TRUNCATE " + ", ".join(f"orders.{t}" for t in ORDERS_TABLES) + " CASCADE")
    finally:
        await admin.close()


@pytest.fixture(autouse=True)
async def clean_tables(database: DatabaseFixture) -> AsyncIterator[None]:
    """Every scenario starts from empty tables and ends with the stock ledger consistent."""
    await truncate_orders(database)
    await truncate_inventory(database)
    yield
    await assert_ledger_invariant(database)


@dataclass
class System:
    """Orders and inventory on the same real database; orders reaches inventory in-process over ASGI."""

    orders: httpx.AsyncClient
    inventory: httpx.AsyncClient
    orders_app: FastAPI
    inventory_app: FastAPI
    tokens: Tokens
    clock: FakeClock
    database: DatabaseFixture
    keys: dict[str, str] = field(default_factory=dict)

    async def product(self, *, stock: int = 10, price: int = 1500, **fields: Any) -> dict[str, Any]:
        return await create_product(self.inventory, self.tokens, stock=stock, price=price, **fields)

    async def place(
        self,
        items: list[tuple[str, int]],
        *,
        customer: dict[str, str] | None = None,
        key: str | None = None,
    ) -> httpx.Response:
        import uuid

        headers = (customer or self.tokens.customer()) | {"Idempotency-Key": key or str(uuid.uuid4())}
        body = {"items": [{"product_id": pid, "quantity": qty} for pid, qty in items]}
        return await self.orders.post("/api/v1/orders", json=body, headers=headers)

    async def stock(self, product_id: str) -> dict[str, int]:
        response = await self.inventory.get(f"/api/v1/products/{product_id}/stock", headers=self.tokens.staff())
        assert response.status_code == 200, response.text
        body = dict(response.json())
        body.pop("product_id")
        return body

    async def sweep(self) -> dict[str, int]:
        result: dict[str, int] = await self.orders_app.state.orders.sweeper.run_once()
        return result


def orders_settings(database: DatabaseFixture, tmp_path: Path, **overrides: Any) -> OrdersSettings:
    return OrdersSettings(
        database_url=database.url("orders"),
        environment="test",
        data_dir=tmp_path / "data",
        db_pool_size=10,
        db_max_overflow=10,
        **overrides,
    )


def inventory_settings(database: DatabaseFixture, tmp_path: Path, **overrides: Any) -> InventorySettings:
    return InventorySettings(
        database_url=database.url("inventory"),
        environment="test",
        data_dir=tmp_path / "data",
        db_pool_size=10,
        db_max_overflow=10,
        **overrides,
    )


SystemFactory = Callable[..., Awaitable[Any]]


@pytest.fixture
def start_system(
    database: DatabaseFixture, tmp_path: Path, issuer: TestIssuer, tokens: Tokens, clock: FakeClock
) -> Callable[..., Any]:
    @asynccontextmanager
    async def start(
        *,
        inventory_transport: httpx.AsyncBaseTransport | None = None,
        orders_overrides: dict[str, Any] | None = None,
    ) -> AsyncIterator[System]:
        inventory_app = create_inventory(
            inventory_settings(database, tmp_path), key_source=issuer.keys(), clock=clock, run_sweeper=False
        )
        async with running(inventory_app) as inventory:
            transport = inventory_transport or httpx.ASGITransport(app=inventory_app)
            orders_app = create_orders(
                orders_settings(database, tmp_path, **(orders_overrides or {})),
                key_source=issuer.keys(),
                clock=clock,
                inventory_transport=transport,
                run_sweeper=False,
            )
            async with running(orders_app) as orders:
                # Stands in for the auth service's client-credentials grant until auth lands.
                orders_app.state.service.service_tokens = IssuerServiceTokens(issuer, "orders")
                yield System(orders, inventory, orders_app, inventory_app, tokens, clock, database)

    return start


@pytest.fixture
async def system(start_system: Callable[..., Any]) -> AsyncIterator[System]:
    async with start_system() as running_system:
        yield running_system
