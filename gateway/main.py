"""The gateway: the only process client apps reach."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from common.app import ComptoirAPI
from common.logging import configure_logging
from gateway.config import MULTIPART_OVERHEAD_BYTES, GatewaySettings
from gateway.health import HEALTH_PATH
from gateway.health import router as health_router
from gateway.proxy import Proxy
from gateway.routes import IMAGE_UPLOAD_PATH

# Paths under /api/v1 that the gateway answers itself.
OWN_PATHS = frozenset({HEALTH_PATH})


class _Dispatch:
    """``/api/v1/...`` goes straight to the proxy; everything else to the gateway's own endpoints."""

    def __init__(self, proxy: Proxy, own: ASGIApp) -> None:
        self.proxy = proxy
        self.own = own

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith("/api/v1/") and path not in OWN_PATHS:
            await self.proxy(scope, receive, send)
        else:
            await self.own(scope, receive, send)


class GatewayApp(ComptoirAPI):
    proxy: Proxy

    def build_middleware_stack(self) -> ASGIApp:
        own = FastAPI.build_middleware_stack(self)
        return self.wrap(_Dispatch(self.proxy, own))  # type: ignore[no-any-return]


def create_app(settings: GatewaySettings | None = None) -> GatewayApp:
    settings = settings or GatewaySettings()
    configure_logging(level=settings.log_level, fmt=settings.log_format, service="gateway")
    proxy = Proxy(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await proxy.start()
        try:
            yield
        finally:
            await proxy.close()

    app = GatewayApp(
        service="gateway",
        settings=settings,
        body_limits=[(IMAGE_UPLOAD_PATH, settings.image_upload_max_bytes + MULTIPART_OVERHEAD_BYTES)],
        multipart_paths=IMAGE_UPLOAD_PATH,
        title="Comptoir gateway",
        lifespan=lifespan,
    )
    app.proxy = proxy
    app.include_router(health_router)
    app.state.settings = settings
    return app
