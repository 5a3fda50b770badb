"""The auth service: create_app() for uvicorn's --factory."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import timedelta

import httpx
import structlog
from fastapi import FastAPI

from common.app import ComptoirAPI, create_service_app
from common.http import create_client
from common.state import service_state
from common.tokens import ACCESS, SERVICE, Claims, TokenVerifier
from services.auth.bootstrap import AdminRefused, create_admin
from services.auth.checks import auth_checks
from services.auth.config import Settings
from services.auth.consent import router as consent_router
from services.auth.context import Runtime, system_context
from services.auth.device_router import router as device_router
from services.auth.internal_router import router as internal_router
from services.auth.keys import CLOCK_SKEW_SECONDS, KeyStore, LocalServiceTokens, TokenIssuer, load_otp_key
from services.auth.messages import JsonlSink, MessageSender, WebhookSender
from services.auth.mfa_router import router as mfa_router
from services.auth.models import outbox
from services.auth.passwords import PasswordHasher, PasswordPolicy, common_passwords
from services.auth.repository import (
    LoginFailureRepository,
    OtpRepository,
    ResetRepository,
    RevocationRepository,
    SessionRepository,
)
from services.auth.retention import retention_loop
from services.auth.router import router, well_known

log = structlog.get_logger("comptoir.auth")

Clock = Callable[[], float]


def build_sender(settings: Settings) -> MessageSender:
    if settings.message_sender == "webhook":
        return WebhookSender(
            settings.webhook_url,
            settings.webhook_secret,
            timeout=settings.webhook_timeout_seconds,
            retries=settings.webhook_retries,
        )
    if settings.is_production:
        log.warning("auth.messages.development_sink", path=str(settings.resolved_messages_path))
    return JsonlSink(settings.resolved_messages_path)


async def bootstrap_admin(rt: Runtime) -> None:
    """BOOTSTRAP_ADMIN_EMAIL / _PASSWORD: create the first admin at start-up when there is none."""
    s = rt.settings
    if not (s.bootstrap_admin_email and s.bootstrap_admin_password):
        return
    try:
        async with rt.sessionmaker() as session, session.begin():
            user = await create_admin(
                session,
                email=s.bootstrap_admin_email,
                password=s.bootstrap_admin_password,
                hasher=rt.hasher,
                policy=rt.policy,
                now=rt.now(),
                ctx=system_context(),
                only_if_none=True,
            )
    except AdminRefused as exc:
        # A weak or clashing bootstrap password is a configuration error: refuse to start.
        raise RuntimeError(f"BOOTSTRAP_ADMIN_*: {exc}") from None
    if user is not None:
        log.info("auth.bootstrap.admin_created", user_id=str(user.id))


async def prune(rt: Runtime) -> None:
    """Drop what no longer matters: feed entries whose tokens expired, stale counters, old codes."""
    now = rt.now()
    day_ago = now - timedelta(days=1)
    async with rt.sessionmaker() as session, session.begin():
        await RevocationRepository(session).prune(now)
        await LoginFailureRepository(session).prune(day_ago)
        await OtpRepository(session).prune(day_ago)
        await ResetRepository(session).prune(day_ago)


async def maintenance(rt: Runtime) -> None:
    while True:
        await asyncio.sleep(rt.settings.maintenance_interval_seconds)
        try:
            await prune(rt)
        except Exception as exc:  # keep going; the next round retries
            log.warning("auth.maintenance.failed", error=type(exc).__name__)


def create_app(
    settings: Settings | None = None,
    *,
    clock: Clock | None = None,
    sender: MessageSender | None = None,
    peer_transport: httpx.AsyncBaseTransport | None = None,
) -> ComptoirAPI:
    """The auth app. ``clock`` (also ``app.state.clock``, replaceable at any time) drives every expiry,
    delay and token time; ``sender`` and ``peer_transport`` replace the outside world in tests.
    """
    settings = settings or Settings()

    def now() -> float:
        # Late-bound: read app.state.clock on every call, so a test can move time whenever it likes.
        return float(app.state.clock())

    keys = KeyStore(
        directory=None if settings.signing_keys.strip() else settings.resolved_keys_dir,
        pem_keys=settings.signing_keys,
        clock=now,
        publish_after_retirement=settings.access_token_ttl_seconds + CLOCK_SKEW_SECONDS,
        scan_interval=settings.key_scan_interval_seconds,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(keys.load)
        otp_key = await asyncio.to_thread(load_otp_key, settings.resolved_keys_dir, settings.otp_hmac_key)
        await asyncio.to_thread(common_passwords)
        hasher = PasswordHasher(
            settings.pbkdf2_rounds,
            workers=settings.hash_workers,
            nice=settings.hash_nice,
            max_wait=settings.hash_max_wait_seconds,
        )
        message_sender = sender or build_sender(settings)
        peers: Mapping[str, httpx.AsyncClient] = {
            name: (
                httpx.AsyncClient(
                    base_url=settings.peer_url(name), transport=peer_transport, timeout=settings.peer_timeout_seconds
                )
                if peer_transport is not None
                else create_client(settings.peer_url(name), timeout=settings.peer_timeout_seconds)
            )
            for name in settings.gdpr_services
        }
        state = service_state(app.state)
        db = state.db
        issuer = TokenIssuer(
            keys,
            issuer=settings.token_issuer,
            audience=settings.token_audience,
            access_ttl=settings.access_token_ttl_seconds,
            service_ttl=settings.service_token_ttl_seconds,
            clock=now,
        )
        service_tokens = LocalServiceTokens(issuer)
        rt = Runtime(
            settings=settings,
            clock=now,
            keys=keys,
            issuer=issuer,
            service_tokens=service_tokens,
            hasher=hasher,
            policy=PasswordPolicy(min_length=settings.password_min_length, max_length=settings.password_max_length),
            sender=message_sender,
            otp_key=otp_key,
            sessionmaker=db.sessionmaker,
            peers=peers,
        )
        app.state.auth = rt
        # Auth's own calls to other services carry tokens it mints itself.
        state.service_tokens = service_tokens
        # Verify with the clock we sign with, and refuse tokens of revoked sessions from our own table.
        state.access_verifier = TokenVerifier(
            keys, issuer=settings.token_issuer, audience=settings.token_audience, token_use=ACCESS, clock=now
        )
        state.service_verifier = TokenVerifier(
            keys, issuer=settings.token_issuer, audience="auth", token_use=SERVICE, clock=now
        )

        async def is_revoked(claims: Claims) -> bool:
            try:
                sid = uuid.UUID(claims.sid or "")
            except ValueError:
                return True
            async with db.sessionmaker() as session:
                return await SessionRepository(session).is_revoked(sid)

        state.is_revoked = is_revoked
        task: asyncio.Task[None] | None = None
        purger: asyncio.Task[None] | None = None
        try:
            await hasher.dummy_hash()
            await bootstrap_admin(rt)
            task = asyncio.create_task(maintenance(rt), name="auth-maintenance")
            purger = asyncio.create_task(retention_loop(rt), name="auth-retention")
            yield
        finally:
            for running in (task, purger):
                if running is not None:
                    running.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await running
            for client in peers.values():
                await client.aclose()
            await message_sender.aclose()
            hasher.close()

    app = create_service_app(
        name="auth",
        settings=settings,
        routers=[router, mfa_router, consent_router, device_router, well_known, internal_router],
        lifespan_hook=lifespan,
        key_source=keys,
        poll_revocations=False,
        outbox=outbox,
        # Auth signs its own service tokens, so it needs no client secret to deliver its audit events;
        # it delivers when it runs among the other processes (they are then registered as clients).
        relay_enabled=bool(settings.service_clients),
        deploy_checks=auth_checks,
    )
    app.state.clock = clock or time.time
    return app
