"""The uvicorn entry point: ``uvicorn --factory atrium.asgi:create_from_env``."""

from __future__ import annotations

from starlette.applications import Starlette

from atrium.app import create_app
from atrium.logs import configure_logging
from atrium.settings import Settings


def create_from_env() -> Starlette:
    """An app for the environment's settings (DATABASE_URL must be set: ``atrium serve`` sets it)."""
    settings = Settings.from_env()
    if not settings.database_url:
        raise RuntimeError("DATABASE_URL is not set; start Atrium with `atrium serve`")
    configure_logging(settings)
    return create_app(settings)
