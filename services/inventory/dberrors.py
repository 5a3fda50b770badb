"""Database errors that mean "busy, try again" become 503 with Retry-After, never a 500 or a hang."""

from __future__ import annotations

import structlog
from fastapi import FastAPI, Request
from sqlalchemy.exc import DBAPIError
from starlette.responses import Response

from common.errors import problem_response

log = structlog.get_logger("comptoir.db")

# lock_not_available (lock_timeout), deadlock_detected, serialization_failure, query_canceled (statement_timeout)
RETRYABLE_SQLSTATES = frozenset({"55P03", "40P01", "40001", "57014"})


def sqlstate_of(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return state if isinstance(state, str) else None


async def _database_error(request: Request, exc: Exception) -> Response:
    state = sqlstate_of(exc)
    if state in RETRYABLE_SQLSTATES:
        log.warning("db.busy", sqlstate=state, path=request.url.path)
        return problem_response(
            503,
            scope=request.scope,
            detail="The data is busy; retry shortly.",
            headers={"Retry-After": "1"},
        )
    log.error("db.error", sqlstate=state, error=type(exc).__name__, path=request.url.path)
    return problem_response(500, scope=request.scope, detail="An unexpected error occurred.")


def install(app: FastAPI) -> None:
    app.add_exception_handler(DBAPIError, _database_error)
