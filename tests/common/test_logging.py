"""Logs are JSON events with the request id, and secrets never reach them."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys

import pytest
import structlog

from common.logging import REDACTED, configure_logging, redact

PASSWORD = "Tr0ub4dor&3-horse-staple"
TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlLXZhbHVl"
OPAQUE = "rt_5f4dcc3b5aa765d61d8327deb882cf99"


def test_redact_walks_nested_structures() -> None:
    event = {
        "user": {"email": "a@b.cm", "password": PASSWORD, "profile": [{"otp": "123456"}]},
        "headers": {"Authorization": f"Bearer {OPAQUE}"},
        "refresh_token": OPAQUE,
        "status_code": 200,
        "code": "654321",
    }
    text = json.dumps(redact(event))
    for secret in (PASSWORD, OPAQUE, "123456", "654321"):
        assert secret not in text
    assert '"status_code": 200' in text
    assert "a@b.cm" in text


@pytest.mark.parametrize(
    "line",
    [
        f"GET /login?email=a@b.cm&password={PASSWORD}&next=/",
        f"Authorization: Bearer {OPAQUE}",
        f"token {TOKEN} was used",
        f'body={{"password": "{PASSWORD}", "email": "a@b.cm"}}',
        f"{{'new_password': '{PASSWORD}'}}",
        f"refresh_token={OPAQUE}",
    ],
)
def test_redact_scrubs_secrets_inside_free_text(line: str) -> None:
    out = redact(line)
    assert PASSWORD not in out
    assert OPAQUE not in out
    assert TOKEN not in out
    assert REDACTED in out


def test_every_logger_writes_redacted_json(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buffer)
    configure_logging(level="INFO", fmt="json", service="probe")
    structlog.contextvars.bind_contextvars(request_id="req-abcdef12")
    try:
        structlog.get_logger("probe").info("auth.login.failed", email="a@b.cm", password=PASSWORD)
        logging.getLogger("uvicorn.error").warning("client sent Authorization: Bearer %s", OPAQUE)
        try:
            raise ValueError(f"bad payload {{'password': '{PASSWORD}'}}")
        except ValueError:
            logging.getLogger("sqlalchemy").exception("statement failed")
    finally:
        structlog.contextvars.clear_contextvars()
        configure_logging(level="INFO", fmt="json", service="tests")
    lines = [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]
    assert [line["event"] for line in lines][0] == "auth.login.failed"
    assert len(lines) == 3
    assert all(line["request_id"] == "req-abcdef12" and line["service"] == "probe" for line in lines)
    dumped = buffer.getvalue()
    assert PASSWORD not in dumped
    assert OPAQUE not in dumped
    assert "exception" in lines[2]


def test_paths_naming_a_person_are_logged_as_their_template(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    import httpx

    from common.app import ComptoirAPI
    from common.settings import CommonSettings

    app = ComptoirAPI(service="probe", settings=CommonSettings())

    @app.post("/internal/users/{user_id}/erase")
    async def erase(user_id: str) -> dict[str, str]:
        return {"erased": "yes"}

    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buffer)
    configure_logging(level="INFO", fmt="json", service="probe")

    async def call() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.post("/internal/users/4b1d2c3e-user-secret-id/erase")).status_code == 200

    try:
        asyncio.run(call())
    finally:
        configure_logging(level="INFO", fmt="json", service="tests")
    assert "4b1d2c3e-user-secret-id" not in buffer.getvalue()
    assert "/internal/users/{user_id}/erase" in buffer.getvalue()


def test_uvicorn_builds_no_access_line_of_its_own() -> None:
    """uvicorn formats its access line's arguments for every response when its access logger reaches a
    handler, disabled or not; ours is the structured one (common.middleware)."""
    from uvicorn.config import Config
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    configure_logging(level="INFO", fmt="json", service="test")

    async def app(_scope: object, _receive: object, _send: object) -> None:
        return None

    config = Config(app=app, log_config=None, access_log=True)
    config.load()
    loop = asyncio.new_event_loop()
    try:
        assert HttpToolsProtocol(config, ServerState(), app_state={}, _loop=loop).access_log is False
    finally:
        loop.close()
