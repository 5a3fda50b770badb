"""Logs are JSON events with the request id, and secrets never reach them."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
import time

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
        f"GET /api/v1/orders/{TOKEN}/confirm",
        f'{{"jwt":"{TOKEN}"}}',
        f"id_token:{TOKEN}\nnext",
    ],
)
def test_redact_scrubs_secrets_inside_free_text(line: str) -> None:
    out = redact(line)
    assert PASSWORD not in out
    assert OPAQUE not in out
    assert TOKEN not in out
    assert REDACTED in out


@pytest.mark.parametrize("run", ["eyJ-", "eyJab.", "eyJabcde.fghij-", "Bearer ", "password=", '"token":"', "eyJ_"])
def test_redacting_a_long_hostile_text_takes_linear_time(run: str) -> None:
    """A request's path or user agent is redacted in every access log line, before any check: text that made
    a pattern restart at every repeat cost seconds of CPU for one 60 KB request (the old token pattern took
    1-2.5 s on ``eyJ-`` * 15,000; it now takes milliseconds; the bound leaves a hundredfold margin)."""
    text = "/api/v1/x/" + run * (60_000 // len(run))
    started = time.perf_counter()
    redact(text)
    assert time.perf_counter() - started < 0.25


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


def test_the_access_line_is_the_pipelines_line_written_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    """The access log's direct writer makes the very line the general pipeline would (same keys, same
    order, the request's context, the same redaction), and is the one used under configure_logging."""
    import common.logging as logs

    class Flushes(io.StringIO):
        flushed = 0

        def flush(self) -> None:
            Flushes.flushed += 1

    buffer = Flushes()
    monkeypatch.setattr(sys, "stdout", buffer)
    configure_logging(level="INFO", fmt="json", service="probe")
    fields = {
        "method": "GET",
        "path": "/api/v1/things/eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJzb21lb25lIn0.c2lnbmF0dXJl",
        "route": "/api/v1/things/*",
        "status": 200,
        "duration_ms": 1.25,
        "client": "192.0.2.1",
    }

    class Refuses:
        def info(self, *_args: object, **_kwargs: object) -> None:
            raise AssertionError("the direct writer should have been used")

    async def direct() -> None:
        structlog.contextvars.bind_contextvars(request_id="req-abcdef12", tenant="shop-1")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(logs, "_access_structlog", Refuses())
            logs.log_access(**fields)
            logs.log_access(**fields)
        assert Flushes.flushed == 0  # once, at the end of this turn of the loop
        await asyncio.sleep(0)
        assert Flushes.flushed == 1
        structlog.get_logger("comptoir.access").info("http.request", **fields)  # the general pipeline

    try:
        asyncio.run(direct())
    finally:
        configure_logging(level="INFO", fmt="json", service="tests")
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert len(lines) == 3
    for line in lines:
        assert line.pop("timestamp").endswith("Z")
    assert list(lines[0].items()) == list(lines[2].items())
    assert lines[0]["request_id"] == "req-abcdef12"
    assert lines[0]["tenant"] == "shop-1"
    assert lines[0]["service"] == "probe"
    assert "eyJzdWIi" not in buffer.getvalue()


def test_an_added_handler_gets_the_access_line_through_the_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    import common.logging as logs

    monkeypatch.setattr(sys, "stdout", io.StringIO())
    configure_logging(level="INFO", fmt="json", service="probe")
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    extra = Collect()
    logging.getLogger().addHandler(extra)
    try:
        logs.log_access(method="GET", path="/x", route="/x", status=200, duration_ms=1.0, client="192.0.2.1")
    finally:
        logging.getLogger().removeHandler(extra)
        configure_logging(level="INFO", fmt="json", service="tests")
    assert [record.name for record in records] == ["comptoir.access"]


@pytest.mark.parametrize(
    "now", [1_765_000_000.0, 1_765_000_000.25, 1_765_000_000.000001, 1_765_003_599.5, 951_782_400.75]
)
def test_the_access_lines_timestamp_is_the_time_stampers(now: float) -> None:
    import datetime

    from common.logging import _AccessLines

    expected = datetime.datetime.fromtimestamp(now, tz=datetime.UTC).isoformat().replace("+00:00", "Z")
    lines = _AccessLines(logging.Handler(), "probe", clock=lambda: now)
    assert lines.timestamp() == expected
    assert lines.timestamp() == expected  # the second time from the date and time it kept
