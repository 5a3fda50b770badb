from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from services.inventory.config import Settings
from services.inventory.main import create_app
from tests.conftest import DatabaseFixture, running
from tests.inventory.support import FakeClock, assert_ledger_invariant, truncate_inventory
from tests.support.tokens import TestIssuer


@pytest.fixture(autouse=True)
async def clean_inventory(database: DatabaseFixture, request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Every scenario starts from empty tables and ends with the stock ledger consistent."""
    await truncate_inventory(database)
    yield
    if getattr(request.module, "LEDGER_CHECK", True):
        await assert_ledger_invariant(database)


def settings_for(database: DatabaseFixture, tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database.url("inventory"),
        "environment": "test",
        "data_dir": tmp_path / "data",
        "db_pool_size": 10,
        "db_max_overflow": 10,
    }
    return Settings(**(values | overrides))


@pytest.fixture
def inventory_settings(database: DatabaseFixture, tmp_path: Path) -> Settings:
    return settings_for(database, tmp_path)


@pytest.fixture
async def client(
    inventory_settings: Settings, issuer: TestIssuer, clock: FakeClock
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(inventory_settings, key_source=issuer.keys(), clock=clock, run_sweeper=False)
    async with running(app) as c:
        c.app = app  # type: ignore[attr-defined]
        yield c
