"""What a service answers when something it depends on will not serve it, through the real error handlers:
a database that refuses the connection or cannot be reached is a 503 to retry; an OSError of the service's
own (a file, a disk) stays a 500, not a promise that a retry will help."""

from __future__ import annotations

import socket

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.exc import DBAPIError

from common.errors import install_error_handlers


class _Refusal(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"SQLSTATE {sqlstate}")
        self.sqlstate = sqlstate


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/refused/{sqlstate}")
    async def refused(sqlstate: str) -> None:
        raise DBAPIError("SELECT 1", None, _Refusal(sqlstate))

    @app.get("/unreachable/{kind}")
    async def unreachable(kind: str) -> None:
        raise {
            "refused": ConnectionRefusedError(111, "Connect call failed"),
            "unknown-host": socket.gaierror(-2, "Name or service not known"),
            "timeout": TimeoutError(),
        }[kind]

    @app.get("/own-file")
    async def own_file() -> None:
        raise FileNotFoundError(2, "No such file or directory", "/data/images/x.webp")

    return app


def assert_problem(answer: httpx.Response, status: int) -> dict[str, object]:
    """The handlers' answer alone (no middleware here, so no request id): status and problem+json body."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    body: dict[str, object] = answer.json()
    assert body["status"] == status
    return body


async def _get(path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.get(path)


@pytest.mark.parametrize("sqlstate", ["28P01", "28000", "53300", "3D000"])
async def test_a_database_refusing_the_connection_is_503(sqlstate: str) -> None:
    answer = await _get(f"/refused/{sqlstate}")
    assert_problem(answer, 503)
    assert answer.headers["retry-after"] == "1"


async def test_another_database_error_is_still_a_500() -> None:
    assert_problem(await _get("/refused/42P01"), 500)  # undefined table: our fault, not the database's state


@pytest.mark.parametrize("kind", ["refused", "unknown-host", "timeout"])
async def test_a_peer_that_cannot_be_reached_is_503(kind: str) -> None:
    answer = await _get(f"/unreachable/{kind}")
    assert_problem(answer, 503)
    assert answer.headers["retry-after"] == "1"


async def test_the_services_own_file_error_stays_a_500_without_the_path() -> None:
    answer = await _get("/own-file")
    body = assert_problem(answer, 500)
    assert "/data" not in answer.text
    assert body["detail"] == "An unexpected error occurred."
