"""The uvicorn entry point: ``uvicorn --factory atrium.asgi:create_from_env``."""

from __future__ import annotations

import sys
from typing import NoReturn

from starlette.applications import Starlette

from atrium.app import create_app
from atrium.observability.logs import configure_logging
from atrium.observability.memory import settle_the_heap, track_arenas
from core.settings import SettingError, Settings


def create_from_env() -> Starlette:
    """An app for the environment's settings.

    The server connects only as the application role: ``ATRIUM_APP_DATABASE_URL`` is enough (what a
    production deployment gives it, keeping the table owner's URL to the migration job), or
    ``DATABASE_URL``, from which that role's URL is derived (``atrium serve`` sets it).

    A bad or missing setting ends the process with one line naming it (exit status 2), as
    ``atrium serve`` does, rather than a traceback from inside uvicorn.
    """
    try:
        settings = Settings.from_env()
    except SettingError as exc:
        refuse(str(exc))
    if not settings.database_url and not settings.app_database_url:
        refuse("set ATRIUM_APP_DATABASE_URL or DATABASE_URL, or start Atrium with `atrium serve`")
    configure_logging(settings)
    app = create_app(settings)
    settle_the_heap()
    track_arenas()  # what the app allocates from here on can be given back (MemoryTrimmer)
    return app


def refuse(reason: str) -> NoReturn:
    sys.stderr.write(f"atrium: {reason}\n")
    sys.stderr.flush()
    raise SystemExit(2)
