"""The limits the issue calls configurable work at values other than their defaults (set through the same
settings an operator uses)."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from services.inventory.config import Settings
from tests.conftest import DatabaseFixture, assert_problem
from tests.inventory.conftest import settings_for
from tests.inventory.support import FakeClock, Tokens, create_product, stock_row
from tests.inventory.test_images import files, png_bomb, png_header_only, stored_files, upload_url


@pytest.fixture
def inventory_settings(database: DatabaseFixture, tmp_path: Path) -> Settings:
    return settings_for(database, tmp_path, image_max_pixels=1_000_000, reservation_ttl_seconds=60)


async def test_the_pixel_limit_is_a_setting_checked_before_decoding(client: httpx.AsyncClient, tokens: Tokens) -> None:
    product = await create_product(client, tokens, stock=1)
    staff = tokens.staff()
    ok = await client.post(upload_url(product), files=files(png_bomb(1000, 1000), "a.png", "image/png"), headers=staff)
    assert ok.status_code == 201, ok.text
    over = png_bomb(1001, 1000)
    body = assert_problem(
        await client.post(upload_url(product), files=files(over, "b.png", "image/png"), headers=staff), 422
    )
    assert "pixels" in str(body["detail"])
    # A header that promises too many pixels over data that could never decode: refused for its size, so the
    # size was judged from the header alone, before any decoding.
    header = png_header_only(1001, 1000)
    body = assert_problem(
        await client.post(upload_url(product), files=files(header, "c.png", "image/png"), headers=staff), 422
    )
    assert "pixels" in str(body["detail"])
    assert len(stored_files(client)) == 1


async def test_the_reservation_lifetime_is_a_setting(
    client: httpx.AsyncClient, tokens: Tokens, database: DatabaseFixture, clock: FakeClock
) -> None:
    product = await create_product(client, tokens, stock=5)
    rid = str(uuid.uuid4())
    body = {"items": [{"product_id": product["id"], "quantity": 2}]}
    orders = tokens.service("orders", "inventory")
    held = await client.put(f"/internal/reservations/{rid}", json=body, headers=orders)
    assert held.status_code == 201, held.text
    sweeper = client.app.state.inventory.sweeper  # type: ignore[attr-defined]
    clock.advance(59)
    assert await sweeper.run_once() == 0
    assert tuple(await stock_row(database, product["id"])) == (5, 2, 3)
    clock.advance(2)
    assert await sweeper.run_once() == 1
    assert tuple(await stock_row(database, product["id"])) == (5, 0, 5)
