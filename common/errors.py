"""RFC 9457 problem details for every error path.

Services raise ``ServiceError`` subclasses; one set of handlers renders them, and the framework's
own errors (404, 405, 422, unhandled exceptions), as ``application/problem+json``. Nothing in a
problem body comes from an exception's message unless the exception is one of ours.
"""

from __future__ import annotations

import re
import socket
import uuid
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import Scope

PROBLEM_CONTENT_TYPE = "application/problem+json"
TYPE_PREFIX = "urn:comptoir:problem:"
# The challenge of every 401, the gateway's and the services' alike (RFC 6750 §3).
BEARER_CHALLENGE = 'Bearer realm="comptoir"'
NO_SUCH_RESOURCE = "No such resource."

log = structlog.get_logger("comptoir.errors")

_TITLES: dict[int, tuple[str, str]] = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Authentication required"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    406: ("not-acceptable", "Not acceptable"),
    409: ("conflict", "Conflict"),
    413: ("payload-too-large", "Request body too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    422: ("validation-error", "Request validation failed"),
    429: ("rate-limited", "Too many requests"),
    500: ("internal-error", "Internal server error"),
    502: ("bad-gateway", "Bad gateway"),
    503: ("service-unavailable", "Service unavailable"),
    504: ("gateway-timeout", "Gateway timeout"),
}


# The documented shapes of those bodies (the public OpenAPI document's components).


class Problem(BaseModel):
    """RFC 9457 problem details: every error answer has these fields."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="A stable URN naming the kind of problem, e.g. urn:comptoir:problem:not-found.")
    title: str
    status: int
    detail: str
    request_id: str | None = Field(description="The X-Request-ID of the request, to quote to support.")


class FieldError(BaseModel):
    loc: list[str | int] = Field(description='Where: e.g. ["body", "items", 0, "quantity"].')
    msg: str


class ValidationProblem(Problem):
    """422: the request was understood but some values are invalid; `errors` says which (input never echoed)."""

    errors: list[FieldError]


class ShortItem(BaseModel):
    product_id: uuid.UUID
    requested: int
    available: int
    withdrawn: bool = Field(
        False, description="The product is no longer sold (staff withdrew it): `available` is 0 for good."
    )


class OrderConflictProblem(Problem):
    """409 on POST /orders: `short_items` when stock is short (nothing reserved); absent when the key is busy."""

    short_items: list[ShortItem] = Field(default_factory=list)


class RetryProblem(Problem):
    """429 and 503: `retry_after` repeats the Retry-After header (seconds) when the server knows it."""

    retry_after: Annotated[int, Field(ge=0)] = Field(0, description="Seconds to wait before retrying.")


class MfaEnrolment(BaseModel):
    secret: str = Field(description="The TOTP secret (base32), for entering by hand.")
    provisioning_uri: str = Field(description="An otpauth:// URI, to show as a QR code.")


class MfaRequiredProblem(Problem):
    """401 on POST /auth/login. With type `...:mfa-required` the password was right and a second factor is
    asked for: send a code with `mfa_token` to POST /auth/login/mfa. Any other 401 carries none of these."""

    mfa_token: str | None = Field(None, description="Proves the password step; single use.")
    expires_in: int | None = Field(None, description="Seconds the `mfa_token` stays valid.")
    methods: list[Literal["totp", "recovery_code"]] | None = Field(None, description="What may be sent as `code`.")
    enrolment: MfaEnrolment | None = Field(
        None, description="Only when the role requires an authenticator and none is set up: set it up with this."
    )


class StockConflictProblem(Problem):
    """409 on a stock adjustment that would leave fewer units on hand than are reserved: the stock now."""

    on_hand: int | None = None
    reserved: int | None = None
    available: int | None = None


class OrderTransitionProblem(Problem):
    """409 on an order's cancel, confirm, ship or deliver that its status does not allow
    (`...:transition-not-allowed`)."""

    order_status: str | None = Field(None, description="The order's status now.")
    requested_status: str | None = Field(None, description="The status asked for.")


PROBLEM_MODELS: tuple[type[Problem], ...] = (
    Problem,
    ValidationProblem,
    OrderConflictProblem,
    RetryProblem,
    MfaRequiredProblem,
    StockConflictProblem,
    OrderTransitionProblem,
)


def _retry_after(headers: Mapping[str, str] | None) -> dict[str, int]:
    for name, value in (headers or {}).items():
        if name.lower() == "retry-after" and value.isdigit():
            return {"retry_after": int(value)}
    return {}


def request_id_of(scope: Scope) -> str | None:
    state = scope.get("state")
    if isinstance(state, Mapping):
        value = state.get("request_id")
        return value if isinstance(value, str) else None
    return None


def problem_body(
    status: int,
    *,
    detail: str | None = None,
    title: str | None = None,
    type_: str | None = None,
    request_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    slug, default_title = _TITLES.get(status, ("error", "Error"))
    body: dict[str, Any] = {
        "type": type_ or TYPE_PREFIX + slug,
        "title": title or default_title,
        "status": status,
        "detail": detail or title or default_title,
        "request_id": request_id,
    }
    if extra:
        body.update(extra)
    if status == 422:
        body.setdefault("errors", [])
    return body


def problem_response(
    status: int,
    *,
    scope: Scope | None = None,
    detail: str | None = None,
    title: str | None = None,
    type_: str | None = None,
    extra: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = problem_body(
        status,
        detail=detail,
        title=title,
        type_=type_,
        request_id=request_id_of(scope) if scope is not None else None,
        extra={**_retry_after(headers), **(extra or {})},
    )
    return JSONResponse(body, status_code=status, media_type=PROBLEM_CONTENT_TYPE, headers=headers)


class ServiceError(Exception):
    """Base of every error a service raises on purpose. Subclasses fix status, type and title."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal server error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})

    @property
    def type(self) -> str:
        return TYPE_PREFIX + self.slug


class BadRequest(ServiceError):
    status, slug, title = 400, "bad-request", "Bad request"


class Unauthorized(ServiceError):
    status, slug, title = 401, "unauthorized", "Authentication required"

    def __init__(self, detail: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"WWW-Authenticate": BEARER_CHALLENGE})
        super().__init__(detail, **kwargs)


_CHALLENGE_TEXT = re.compile(r"[^\x20-\x21\x23-\x5b\x5d-\x7e]")


def rejected_token_challenge(description: str) -> str:
    """RFC 6750 §3.1: a token was sent and is refused (malformed, invalid, expired, revoked, or its account
    gone): the client refreshes, or signs in again. A request without one gets the bare challenge."""
    text = _CHALLENGE_TEXT.sub("", description)
    return f'{BEARER_CHALLENGE}, error="invalid_token", error_description="{text}"'


class TokenRejected(Unauthorized):
    """401 for an access token that was sent and cannot be used."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": rejected_token_challenge(detail)})


class Forbidden(ServiceError):
    status, slug, title = 403, "forbidden", "Forbidden"


class NotFound(ServiceError):
    status, slug, title = 404, "not-found", "Not found"


class Conflict(ServiceError):
    status, slug, title = 409, "conflict", "Conflict"


class PayloadTooLarge(ServiceError):
    status, slug, title = 413, "payload-too-large", "Request body too large"


class UnsupportedMediaType(ServiceError):
    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"


class Unprocessable(ServiceError):
    """422. Its problem document always lists ``errors`` (API reference): the raiser's own, or one entry at
    ``loc`` (the class's, or the one given) saying what the detail says."""

    status, slug, title = 422, "validation-error", "Request validation failed"
    loc: ClassVar[tuple[str | int, ...]] = ("body",)

    def __init__(self, detail: str | None = None, *, loc: Sequence[str | int] | None = None, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.extra.setdefault("errors", [{"loc": list(self.loc if loc is None else loc), "msg": self.detail}])


class TooManyRequests(ServiceError):
    status, slug, title = 429, "rate-limited", "Too many requests"


class ServiceUnavailable(ServiceError):
    status, slug, title = 503, "service-unavailable", "Service unavailable"


# What pydantic puts before the message of a validator's own ValueError or assertion.
_VALIDATOR_PREFIXES = ("Value error, ", "Assertion failed, ")


def _validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Location and message only: the offending input is never echoed (it may be a password)."""
    out = []
    for err in errors:
        loc = [part for part in err.get("loc", ()) if isinstance(part, str | int)]
        msg = str(err.get("msg", "invalid value"))
        for prefix in _VALIDATOR_PREFIXES:
            msg = msg.removeprefix(prefix)
        out.append({"loc": loc, "msg": msg})
    return out


def error_body(exc: ServiceError, scope: Scope | None = None) -> dict[str, Any]:
    """The problem document of one of our errors."""
    return problem_body(
        exc.status,
        detail=exc.detail,
        title=exc.title,
        type_=exc.type,
        request_id=request_id_of(scope) if scope is not None else None,
        extra={**_retry_after(exc.headers), **exc.extra},
    )


def error_response(exc: ServiceError, scope: Scope | None = None) -> JSONResponse:
    """One of our errors answered as ``application/problem+json`` (what raising it would answer)."""
    return JSONResponse(
        error_body(exc, scope), status_code=exc.status, media_type=PROBLEM_CONTENT_TYPE, headers=exc.headers
    )


async def _service_error(request: Request, exc: ServiceError) -> Response:
    return error_response(exc, request.scope)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    detail = exc.detail if isinstance(exc.detail, str) else None
    if exc.status_code == 404 and detail == "Not Found":  # the router's own words: say it as every 404 does
        detail = NO_SUCH_RESOURCE
    # Framework messages such as "Not Found" are safe; anything else is replaced by the title.
    return problem_response(exc.status_code, scope=request.scope, detail=detail, headers=exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    errors = list(exc.errors())
    if any(err.get("type") == "json_invalid" for err in errors):
        return problem_response(400, scope=request.scope, detail="The request body is not valid JSON.")
    return problem_response(
        422,
        scope=request.scope,
        detail="One or more fields are invalid.",
        extra={"errors": _validation_errors(errors)},
    )


# lock_not_available (lock_timeout), deadlock_detected, serialization_failure, query_canceled (statement_timeout)
RETRYABLE_SQLSTATES = frozenset({"55P03", "40P01", "40001", "57014"})
# Besides class 08 (connection exception): the server shutting down, crashed, or not yet accepting.
LOST_CONNECTION_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})


def sqlstate_of(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return state if isinstance(state, str) else None


def connection_lost(exc: BaseException) -> bool:
    """The statement's connection was lost: the server restarted, failed over or ended it. The pool has
    dropped it (``connection_invalidated``), so the same request sent again gets a live one."""
    state = sqlstate_of(exc)
    return bool(getattr(exc, "connection_invalidated", False)) or (
        state is not None and (state.startswith("08") or state in LOST_CONNECTION_SQLSTATES)
    )


def database_refused(exc: BaseException) -> bool:
    """The database would not give the service a connection: its credentials were refused (class 28), its
    database does not exist (3D000), or the server is out of connections or memory (class 53). Nothing the
    request did; the service is unavailable until the database or an operator mends it."""
    state = sqlstate_of(exc)
    return state is not None and (state[:2] in ("28", "53") or state == "3D000")


def _unavailable(request: Request, detail: str) -> Response:
    return problem_response(503, scope=request.scope, detail=f"{detail}; retry shortly.", headers={"Retry-After": "1"})


async def _database_error(request: Request, exc: Exception) -> Response:
    """A busy database (lock or statement timeout, deadlock), a lost connection or a database that refuses
    connections is a 503 with Retry-After, never a hang or a 500; a value it cannot take is a 400."""
    state = sqlstate_of(exc)
    busy = state in RETRYABLE_SQLSTATES
    if busy or connection_lost(exc):
        log.warning("db.busy" if busy else "db.connection_lost", sqlstate=state, path=request.url.path)
        return _unavailable(request, "The data is busy" if busy else "The database connection was lost")
    if database_refused(exc):
        # An operator's matter (a changed password, a dropped database, max_connections): logged as an error.
        log.error("db.refused", sqlstate=state, path=request.url.path)
        return _unavailable(request, "The database is unavailable")
    if state is not None and state.startswith("22"):
        # A data exception: a value the request carried that the database cannot hold or compare (a
        # timestamp beyond its range, a NUL in text). Each input is checked before it gets here; this is
        # the backstop for one that was not: the statement changed nothing, and it is the request's fault.
        log.warning("db.data_exception", sqlstate=state, path=request.url.path)
        return problem_response(
            400, scope=request.scope, detail="A value in the request cannot be stored or compared; check its range."
        )
    log.error("db.error", sqlstate=state, error=type(exc).__name__, path=request.url.path)
    return problem_response(500, scope=request.scope, detail="An unexpected error occurred.")


async def _os_error(request: Request, exc: OSError) -> Response:
    """A peer the service needs could not be reached at all (the database refusing or dropping the TCP
    connection before any SQL, a name that does not resolve, a connect that timed out): 503, as when it is
    busy. Any other ``OSError`` (a file, a disk) is the service's own fault, answered as one."""
    if isinstance(exc, ConnectionError | TimeoutError | socket.gaierror):
        log.error("backend.unreachable", error=type(exc).__name__, detail=str(exc), path=request.url.path)
        return _unavailable(request, "A service this one depends on is unreachable")
    return await _unhandled(request, exc)


async def _unhandled(request: Request, exc: Exception) -> Response:
    # The traceback goes to the (redacting) log, never to the client.
    log.error("http.unhandled_exception", exc_info=exc, path=request.url.path)
    return problem_response(500, scope=request.scope, detail="An unexpected error occurred.")


def install_error_handlers(app: FastAPI) -> None:
    # The decorator form takes handlers typed with their own exception class (add_exception_handler wants
    # every handler to accept any Exception).
    app.exception_handler(ServiceError)(_service_error)
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.exception_handler(RequestValidationError)(_validation_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.exception_handler(OSError)(_os_error)
    app.add_exception_handler(Exception, _unhandled)
