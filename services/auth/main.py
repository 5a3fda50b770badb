"""The auth service: create_app() for uvicorn's --factory."""

from common.app import ComptoirAPI, create_service_app
from services.auth.config import Settings


def create_app(settings: Settings | None = None) -> ComptoirAPI:
    return create_service_app(name="auth", settings=settings or Settings())
