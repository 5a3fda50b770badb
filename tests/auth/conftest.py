"""The auth service on the real database, driven through its HTTP API with an injected clock."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.app import ComptoirAPI
from services.auth.config import Settings
from services.auth.main import create_app
from tests.conftest import DatabaseFixture, running
from tests.support.accounts import CONSENT
from tests.support.tokens import bearer

TABLES = (
    "users",
    "sessions",
    "refresh_tokens",
    "login_failures",
    "otp_codes",
    "otp_sends",
    "password_resets",
    "revocations",
    "devices",
    "mfa_totp",
    "mfa_recovery_codes",
    "mfa_challenges",
    "outbox",
)
# Low on purpose: the production default (600,000) is asserted in test_passwords.py.
TEST_ROUNDS = 1000
PASSWORD = "correct horse battery staple"
CLIENT_SECRETS = {name: f"{name}-secret-{'x' * 32}" for name in ("gateway", "inventory", "orders", "audit", "auth")}


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class AuthClient:
    client: httpx.AsyncClient
    app: ComptoirAPI
    clock: FakeClock
    settings: Settings
    database: DatabaseFixture
    counter: list[int] = field(default_factory=lambda: [0])

    # ---- HTTP ----

    async def register(self, email: str | None = None, password: str = PASSWORD, **extra: Any) -> dict[str, Any]:
        if email is None:
            self.counter[0] += 1
            email = f"user{self.counter[0]}-{time.time_ns()}@example.cm"
        response = await self.client.post(
            "/api/v1/auth/register", json={"email": email, "password": password} | CONSENT | extra
        )
        assert response.status_code == 201, response.text
        return dict(response.json())

    async def login(self, email: str, password: str = PASSWORD, **kwargs: Any) -> httpx.Response:
        return await self.client.post("/api/v1/auth/login", json={"email": email, "password": password}, **kwargs)

    async def tokens(self, email: str, password: str = PASSWORD) -> dict[str, Any]:
        response = await self.login(email, password)
        assert response.status_code == 200, response.text
        return dict(response.json())

    async def user(self, role: str = "customer", **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """A registered user of ``role``, signed in: (user, token pair)."""
        user = await self.register(**extra)
        if role != "customer":
            await self.sql("UPDATE auth.users SET role = $1 WHERE id = $2", role, user["id"])
        return user, await self.tokens(user["email"], extra.get("password", PASSWORD))

    async def refresh(self, refresh_token: str) -> httpx.Response:
        return await self.client.post("/api/v1/auth/token/refresh", json={"refresh_token": refresh_token})

    async def get(self, path: str, token: str, **kwargs: Any) -> httpx.Response:
        headers = bearer(token) | kwargs.pop("headers", {})
        return await self.client.get(path, headers=headers, **kwargs)

    async def me(self, token: str) -> httpx.Response:
        return await self.get("/api/v1/auth/me", token)

    # ---- the outside world ----

    def messages(self, to: str | None = None) -> list[dict[str, Any]]:
        path = self.settings.resolved_messages_path
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [row for row in rows if to is None or row["to"] == to]

    def last_code(self, phone: str) -> str:
        match = re.search(r"\b(\d{6})\b", self.messages(phone)[-1]["body"])
        assert match, "no code in the message"
        return match.group(1)

    def last_reset_token(self, email: str) -> str:
        match = re.search(r"#token=([A-Za-z0-9_-]+)", self.messages(email)[-1]["body"])
        assert match, "no reset link in the message"
        return match.group(1)

    async def sql(self, query: str, *args: Any) -> Any:
        conn = await self.database.admin()
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    async def events(self, action: str | None = None) -> list[dict[str, Any]]:
        rows = await self.sql("SELECT payload FROM auth.outbox ORDER BY occurred_at, id")
        payloads = [json.loads(row["payload"]) for row in rows]
        return [p for p in payloads if action is None or p["action"] == action]

    async def outbox_text(self) -> str:
        rows = await self.sql("SELECT payload::text AS p FROM auth.outbox")
        return "\n".join(row["p"] for row in rows)


def auth_settings(database: DatabaseFixture, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database.url("auth"),
        "environment": "test",
        "pbkdf2_rounds": TEST_ROUNDS,
        "keys_dir": tmp_path / "keys",
        "messages_path": tmp_path / "messages.jsonl",
        "service_clients": {name: digest(secret) for name, secret in CLIENT_SECRETS.items()},
        # The ASGI test client's address plays the gateway, so tests can choose client IPs.
        "gateway_networks": "203.0.113.7/32",
        "maintenance_interval_seconds": 3600,
        "bootstrap_admin_email": "",
        "bootstrap_admin_password": "",
    }
    return Settings(**(values | overrides))


@pytest.fixture(autouse=True)
async def clean_auth_schema(database: DatabaseFixture) -> None:
    conn = await database.admin()
    try:
        await conn.execute(f"TRUNCATE {', '.join('auth.' + t for t in TABLES)} RESTART IDENTITY CASCADE")
    finally:
        await conn.close()


MakeAuth = Callable[..., Any]


@pytest.fixture
def make_auth(database: DatabaseFixture, tmp_path: Path) -> MakeAuth:
    """``async with make_auth(**settings) as auth``: an app of its own (clock, keys, messages)."""

    @asynccontextmanager
    async def factory(
        *, clock: FakeClock | None = None, peer_transport: httpx.AsyncBaseTransport | None = None, **overrides: Any
    ) -> AsyncIterator[AuthClient]:
        clock = clock or FakeClock()
        settings = auth_settings(database, tmp_path, **overrides)
        app = create_app(settings, clock=clock, peer_transport=peer_transport)
        async with running(app) as client:
            yield AuthClient(client=client, app=app, clock=clock, settings=settings, database=database)

    return factory


@pytest.fixture
async def auth(make_auth: MakeAuth) -> AsyncIterator[AuthClient]:
    async with make_auth() as value:
        yield value
