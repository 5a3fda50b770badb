"""The database itself refuses impossible stock and money, whatever code writes to it: each CHECK constraint
is attacked directly as the service's own role, and nothing changes."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from tests.conftest import DatabaseFixture


async def _refused(conn: asyncpg.Connection, sql: str, *args: object) -> str:
    with pytest.raises(asyncpg.CheckViolationError) as refused:
        await conn.execute(sql, *args)
    return str(refused.value.constraint_name)


async def test_inventory_refuses_impossible_stock_prices_and_movements(database: DatabaseFixture) -> None:
    conn = await database.connect_as("inventory")
    pid = uuid.uuid4()
    try:
        await conn.execute(
            "INSERT INTO products (id, sku, name, description, price_xaf, is_active, on_hand, reserved)"
            " VALUES ($1, $2, 'Savon', '', 500, true, 0, 0)",
            pid,
            f"CHK-{pid.hex[:8]}",
        )
        update = "UPDATE products SET {} WHERE id = $1"
        assert (await _refused(conn, update.format("reserved = on_hand + 1"), pid)).endswith("reserved_within_on_hand")
        assert (await _refused(conn, update.format("reserved = -1"), pid)).endswith("reserved_within_on_hand")
        assert (await _refused(conn, update.format("on_hand = -1"), pid)).endswith("on_hand_non_negative")
        assert (await _refused(conn, update.format("price_xaf = -1"), pid)).endswith("price_xaf_range")
        assert (await _refused(conn, update.format("price_xaf = 1000000000001"), pid)).endswith("price_xaf_range")
        movement = (
            "INSERT INTO stock_movements (product_id, kind, delta_on_hand, delta_reserved) VALUES ($1, $2, $3, $4)"
        )
        for kind, on_hand, reserved in [("steal", 1, 0), ("receive", -1, 0), ("adjust", 0, 0), ("reserve", 1, 1)]:
            await _refused(conn, movement, pid, kind, on_hand, reserved)
        row = await conn.fetchrow("SELECT on_hand, reserved, price_xaf FROM products WHERE id = $1", pid)
        assert tuple(row) == (0, 0, 500)
        assert await conn.fetchval("SELECT count(*) FROM stock_movements WHERE product_id = $1", pid) == 0
    finally:
        await conn.execute("DELETE FROM products WHERE id = $1", pid)
        await conn.close()


async def test_orders_refuse_impossible_lines_and_totals(database: DatabaseFixture) -> None:
    conn = await database.connect_as("orders")
    oid = uuid.uuid4()
    try:
        await conn.execute(
            "INSERT INTO orders (id, user_id, status, request_hash, reservation_id, total_xaf, stock)"
            " VALUES ($1, $2, 'pending', 'h', $3, 1500, 'held')",
            oid,
            uuid.uuid4(),
            uuid.uuid4(),
        )
        line = (
            "INSERT INTO order_items (order_id, line, product_id, sku, name, quantity, unit_price_xaf, line_total_xaf)"
            " VALUES ($1, 0, $2, 'SKU', 'Savon', $3, $4, $5)"
        )
        assert (await _refused(conn, line, oid, uuid.uuid4(), 2, 750, 1)).endswith("line_total_xaf_product")
        assert (await _refused(conn, line, oid, uuid.uuid4(), 0, 750, 0)).endswith("quantity_range")
        assert (await _refused(conn, line, oid, uuid.uuid4(), 10_001, 1, 10_001)).endswith("quantity_range")
        assert (await _refused(conn, line, oid, uuid.uuid4(), 1, -1, -1)).endswith("unit_price_xaf_range")
        update = "UPDATE orders SET {} WHERE id = $1"
        assert (await _refused(conn, update.format("total_xaf = -1"), oid)).endswith("total_xaf_range")
        assert (await _refused(conn, update.format("status = 'teleported'"), oid)).endswith("status_known")
        assert await conn.fetchval("SELECT total_xaf FROM orders WHERE id = $1", oid) == 1500
    finally:
        await conn.execute("DELETE FROM orders WHERE id = $1", oid)
        await conn.close()
