"""The audit service: create_app() for uvicorn's --factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from common.app import ComptoirAPI, create_service_app
from common.state import service_state
from common.tokens import KeySource
from services.audit.alerts import AlertRules
from services.audit.checkpoints import Checkpointer, CheckpointService
from services.audit.config import EVENTS_PATH, Settings
from services.audit.internal_router import router as internal_router
from services.audit.router import router
from services.audit.runtime import AuditRuntime
from services.audit.service import AuditChain, Gdpr
from services.audit.signing import TrustedKeys, load_or_create_key, parse_public_keys, read_trusted_dir
from services.audit.verify import ChainVerifier


def create_app(
    settings: Settings | None = None, *, key_source: KeySource | None = None, run_checkpointer: bool = True
) -> ComptoirAPI:
    """``run_checkpointer=False`` leaves signing to the on-demand endpoint (tests)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = service_state(app.state).db
        key = load_or_create_key(settings.checkpoint_key_path)
        trusted = TrustedKeys(
            [
                key.private.public_key(),
                *parse_public_keys(settings.checkpoint_trusted_keys),
                *read_trusted_dir(settings.checkpoint_trusted_dir),
            ]
        )
        rules = AlertRules(
            failed_login_threshold=settings.failed_login_threshold,
            failed_login_window_seconds=settings.failed_login_window_seconds,
        )
        chain = AuditChain(db, rules)
        log_path = settings.checkpoint_log_path
        checkpoints = CheckpointService(db, key, ChainVerifier(db, trusted, log_path), chain, log_path)
        checkpointer = Checkpointer(checkpoints, settings.checkpoint_interval_seconds)
        app.state.audit = AuditRuntime(
            settings=settings,
            chain=chain,
            gdpr=Gdpr(db, chain, export_limit=settings.export_max_events),
            checkpoints=checkpoints,
            checkpointer=checkpointer,
        )
        async with checkpointer.alive(run_checkpointer):
            yield

    return create_service_app(
        name="audit",
        settings=settings,
        key_source=key_source,
        routers=[router, internal_router],
        lifespan_hook=lifespan,
        body_limits=[(EVENTS_PATH, settings.ingest_max_body_bytes)],
        poll_revocations=True,
    )
