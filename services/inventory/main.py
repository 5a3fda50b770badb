"""The inventory service: create_app() for uvicorn's --factory."""

from common.app import ComptoirAPI, create_service_app
from common.tokens import KeySource
from services.inventory.config import Settings
from services.inventory.router import router


def create_app(settings: Settings | None = None, *, key_source: KeySource | None = None) -> ComptoirAPI:
    return create_service_app(
        name="inventory", settings=settings or Settings(), key_source=key_source, routers=[router]
    )
