"""Running ``atrium`` commands inside a test, as the command line would, against the test database."""

from __future__ import annotations

import argparse

import pytest

from atrium.cli.main import parser
from core.settings import Settings
from partners import cli as partner_cli


async def run_cli(monkeypatch: pytest.MonkeyPatch, settings: Settings, *argv: str) -> int:
    """Exit status of ``atrium <argv>`` (a partner command: apikey, persisted), run in the test's event loop.

    The arguments go through the real parser; the command reads its settings from the environment,
    set here (through ``monkeypatch``, so undone after the test) to ``settings``' database and secret.
    Output goes to stdout and stderr (read them with ``capsys``).
    """
    monkeypatch.setenv("DATABASE_URL", str(settings.database_url))
    monkeypatch.setenv("ATRIUM_JWT_SECRET", settings.jwt_secret)
    args: argparse.Namespace = parser().parse_args(list(argv))
    assert args.command in partner_cli.COMMANDS, f"run_cli runs partner commands, not {args.command!r}"
    return await partner_cli.run(args)
