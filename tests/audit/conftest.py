from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from services.audit.config import Settings
from services.audit.main import create_app
from tests.audit.support import AUDIT_TABLES, AuditClient
from tests.conftest import DatabaseFixture, running
from tests.support.tokens import TestIssuer


@pytest.fixture(scope="session")
def issuer() -> TestIssuer:
    return TestIssuer()


@pytest.fixture(autouse=True)
async def clean_audit(database: DatabaseFixture) -> None:
    """Every test starts from an empty chain (the triggers that refuse TRUNCATE are bypassed as superuser)."""
    admin = await database.admin()
    try:
        await admin.execute("SET session_replication_role = replica")
        await admin.execute(f"TRUNCATE {', '.join('audit.' + t for t in AUDIT_TABLES)} RESTART IDENTITY")
    finally:
        await admin.close()


@pytest.fixture
def audit_settings(database: DatabaseFixture, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database.url("audit"),
        environment="test",
        data_dir=tmp_path / "data",
        db_pool_size=10,
        db_max_overflow=10,
    )


@pytest.fixture
async def audit(audit_settings: Settings, issuer: TestIssuer) -> AsyncIterator[AuditClient]:
    app = create_app(audit_settings, key_source=issuer.keys(), run_checkpointer=False)
    async with running(app) as client:
        yield AuditClient(client, issuer, app)


@pytest.fixture
def http(audit: AuditClient) -> httpx.AsyncClient:
    return audit.http
