"""/readyz follows the database: 503 while it is stopped, 200 again once it is back."""

from __future__ import annotations

from pathlib import Path

from comptoir.config import RunSettings
from comptoir.embedded import EmbeddedPostgres
from comptoir.provision import migrate
from services.orders.config import Settings
from services.orders.main import create_app
from tests.conftest import assert_problem, running


async def test_readyz_tracks_the_database(tmp_path: Path) -> None:
    import asyncio

    embedded = EmbeddedPostgres(tmp_path)
    admin = await asyncio.to_thread(embedded.start)
    try:
        roles = await asyncio.to_thread(migrate, RunSettings(data_dir=tmp_path, database_url=admin), admin)
        url = next(r.url for r in roles if r.service == "orders")
        app = create_app(Settings(database_url=url, environment="test", readiness_timeout_seconds=2))
        async with running(app) as client:
            assert (await client.get("/readyz")).status_code == 200
            await asyncio.to_thread(embedded.stop)
            body = assert_problem(await client.get("/readyz"), 503)
            assert body["checks"] == {"database": False}
            assert (await client.get("/healthz")).status_code == 200  # alive, just not ready
            await asyncio.to_thread(embedded.start)
            assert (await client.get("/readyz")).status_code == 200
    finally:
        await asyncio.to_thread(embedded.stop)
