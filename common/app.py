"""The application factory every service shares."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from fastapi import APIRouter, FastAPI, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from common import health
from common.db import Database
from common.deploychecks import Check, enforce, service_checks
from common.errors import install_error_handlers
from common.http import PooledTransport
from common.logging import configure_logging
from common.middleware import standard_stack
from common.relay import OutboxRelay
from common.revocation import RevocationPoller, RevocationSet
from common.service_tokens import ServiceTokenClient
from common.settings import CommonSettings, ServiceSettings
from common.state import ServiceState
from common.tokens import ACCESS, JWKS_PATH, SERVICE, Claims, KeySource, RemoteJWKS, TokenVerifier

LifespanHook = Callable[[FastAPI], AbstractAsyncContextManager[None]]


class ComptoirAPI(FastAPI):
    """FastAPI whose standard middlewares sit outside Starlette's error middleware.

    That way a 500 rendered by our handler still gets the request id and the security headers.
    """

    def __init__(
        self,
        *,
        service: str,
        settings: CommonSettings,
        body_limits: Iterable[tuple[str, int]] = (),
        multipart_paths: str | None = None,
        **kwargs: Any,
    ) -> None:
        production = settings.is_production
        kwargs.setdefault("docs_url", None if production else "/docs")
        kwargs.setdefault("redoc_url", None)
        # The schema stays available on the process's own port (the gateway aggregates it; it never
        # routes /openapi.json); the interactive docs are off in production.
        kwargs.setdefault("openapi_url", "/openapi.json")
        super().__init__(**kwargs)
        self.state.service_name = service
        self.state.readiness_checks = {}
        self.state.readiness_advisories = {}
        self._comptoir_service = service
        self._comptoir_settings = settings
        self._body_limits = list(body_limits)
        self._multipart_paths = multipart_paths
        install_error_handlers(self)
        self.include_router(health.router)

    def build_middleware_stack(self) -> ASGIApp:
        return self.wrap(super().build_middleware_stack())  # type: ignore[no-any-return]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        # Straight to the middleware stack: FastAPI's own __call__ looks up an OpenTelemetry tracer
        # provider on every request, and Comptoir exports Prometheus metrics instead (measured: ~3 % of
        # the gateway's CPU per request).
        if scope["method"] == "HEAD":
            # Every GET route answers HEAD too (RFC 9110 §9.3.2), as the 405s' Allow headers say: routed,
            # authorised, limited and answered as the GET, on a copy of the scope. The server still sees
            # HEAD in its own and sends the head of the answer without its body.
            scope = dict(scope, method="GET")
        if self.root_path:
            scope["root_path"] = self.root_path
        scope["app"] = self
        if self.middleware_stack is None:
            self.middleware_stack = self.build_middleware_stack()
        await self.middleware_stack(scope, receive, send)

    def wrap(self, app: ASGIApp) -> Any:
        settings = self._comptoir_settings
        return standard_stack(
            app,
            service=self._comptoir_service,
            hsts_seconds=settings.hsts_seconds if settings.send_hsts else None,
            max_body_bytes=settings.max_body_bytes,
            body_limits=self._body_limits,
            multipart_paths=self._multipart_paths,
        )


S = TypeVar("S")


def lifespan_state(request: Request, name: str, kind: type[S]) -> S:
    """The typed state a service's lifespan keeps at ``app.state.<name>`` (one object, not loose keys)."""
    value = getattr(request.app.state, name, None)
    if not isinstance(value, kind):
        raise RuntimeError(f"the {name} service's lifespan has not set up its state")
    return value


def create_service_app(
    *,
    name: str,
    settings: ServiceSettings,
    routers: Sequence[APIRouter] = (),
    lifespan_hook: LifespanHook | None = None,
    body_limits: Iterable[tuple[str, int]] = (),
    multipart_paths: str | None = None,
    title: str | None = None,
    key_source: KeySource | None = None,
    poll_revocations: bool = True,
    outbox: sa.Table | None = None,
    deploy_checks: Callable[[Any], list[Check]] | None = None,
    relay_enabled: bool | None = None,
) -> ComptoirAPI:
    """A service app: logging, database, token verification, health, errors and the standard middlewares.

    In production a failing critical deployment check stops it here (common.deploychecks).

    ``key_source`` replaces the auth service's JWKS over HTTP (the auth service's own keys, a test's).
    ``outbox``: the service's audit outbox table; a relay delivers it to the audit service (started when
    the service has a client secret, or when ``relay_enabled`` says so).
    """
    configure_logging(
        level=settings.log_level,
        fmt=settings.log_format,
        service=name,
    )
    checks = deploy_checks(settings) if deploy_checks is not None else service_checks(settings, name)
    enforce(checks, production=settings.is_production)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database(
            settings.database_url,
            schema=name,
            application_name=f"comptoir-{name}",
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            connect_timeout=settings.db_connect_timeout_seconds,
            statement_timeout_ms=settings.db_statement_timeout_ms,
        )
        auth_client = PooledTransport(settings.auth_internal_url)
        keys = key_source or RemoteJWKS(JWKS_PATH, auth_client)
        issuer = settings.token_issuer
        service_tokens = ServiceTokenClient(auth_client, client_id=name, client_secret=settings.client_secret)
        revocations = RevocationSet()
        poller = RevocationPoller(auth_client, service_tokens, revocations, interval=settings.revocation_poll_seconds)

        async def is_revoked(claims: Claims) -> bool:
            return revocations.is_revoked(claims.sid)

        state = app.state.service = ServiceState(
            settings=settings,
            db=db,
            access_verifier=TokenVerifier(keys, issuer=issuer, audience=settings.token_audience, token_use=ACCESS),
            service_verifier=TokenVerifier(keys, issuer=issuer, audience=name, token_use=SERVICE),
            service_tokens=service_tokens,
            revocations=revocations,
            is_revoked=is_revoked,
            name=name,
            outbox=outbox,
        )
        if poll_revocations and settings.client_secret:
            poller.start()

        async def database_ready() -> bool:
            return await db.ping(settings.readiness_timeout_seconds)

        app.state.readiness_checks["database"] = database_ready
        audit_client = PooledTransport(settings.audit_internal_url)
        relay: OutboxRelay | None = None
        try:
            async with lifespan_hook(app) if lifespan_hook is not None else contextlib.nullcontext():
                # After the hook: a service may have installed its own token source (auth signs in-process).
                if outbox is not None:
                    relay = OutboxRelay(
                        service=name,
                        db=db,
                        outbox=outbox,
                        client=audit_client,
                        # relay.py annotates the HTTP client; any token source serves (auth mints its own).
                        tokens=cast(ServiceTokenClient, state.service_tokens),
                        batch_size=settings.outbox_batch_size,
                        poll_seconds=settings.outbox_poll_seconds,
                        max_backoff_seconds=settings.outbox_max_backoff_seconds,
                        alert_after_attempts=settings.outbox_alert_after_attempts,
                        lease_seconds=settings.outbox_lease_seconds,
                    )
                    if relay_enabled if relay_enabled is not None else bool(settings.client_secret):
                        relay.start()
                yield
        finally:
            if relay is not None:
                await relay.stop()
            await poller.stop()
            await audit_client.aclose()
            await auth_client.aclose()
            await db.dispose()

    app = ComptoirAPI(
        service=name,
        settings=settings,
        body_limits=body_limits,
        multipart_paths=multipart_paths,
        title=title or f"Comptoir {name}",
        lifespan=lifespan,
    )
    for router in routers:
        app.include_router(router)
    return app
