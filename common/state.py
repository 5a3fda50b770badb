"""What every service's lifespan builds, kept as one typed object at ``app.state.service``.

A service's own lifespan hook may replace parts of it (the auth service verifies and mints tokens
in-process); tests replace ``service_tokens`` the same way.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from starlette.requests import HTTPConnection

if TYPE_CHECKING:
    from common.db import Database
    from common.revocation import RevocationSet
    from common.settings import ServiceSettings
    from common.tokens import Claims, TokenVerifier


class ServiceTokens(Protocol):
    async def token_for(self, audience: str) -> str: ...

    async def headers_for(self, audience: str) -> dict[str, str]: ...

    def forget(self, audience: str) -> None: ...


@dataclass
class ServiceState:
    settings: ServiceSettings
    db: Database
    access_verifier: TokenVerifier
    service_verifier: TokenVerifier
    service_tokens: ServiceTokens
    revocations: RevocationSet
    is_revoked: Callable[[Claims], Awaitable[bool]]
    name: str = ""
    outbox: Any = None  # the service's audit outbox table (sqlalchemy.Table), if it has one


def service_state(app_state: Any) -> ServiceState:
    """``app.state.service``, checked (``app_state`` is an app's ``state``)."""
    value = getattr(app_state, "service", None)
    if not isinstance(value, ServiceState):
        raise RuntimeError("the service's lifespan has not set up its state")
    return value


def state_of(connection: HTTPConnection) -> ServiceState:
    return service_state(connection.app.state)
