"""Running ``atrium`` commands in a test: in the test's event loop against the test database
(``run_cli``), or as a process of its own, as a person would (``atrium``)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from atrium.cli.main import parser
from core.settings import Settings
from partners import cli as partner_cli
from tests.conftest import TEST_SECRET

ROOT = Path(__file__).resolve().parent.parent
COMMAND_TIMEOUT = 120.0
"""Seconds a command run by ``atrium`` may take before the test fails."""


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


@dataclass(frozen=True)
class Ran:
    status: int
    stdout: str
    stderr: str


def environment(**overrides: str) -> dict[str, str]:
    """The test's environment without Atrium's settings, plus a JWT secret, a data dir and ``overrides``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ATRIUM_", "DATABASE_URL", "REDIS_URL"))}
    env.update({"ATRIUM_JWT_SECRET": TEST_SECRET, "ATRIUM_DATA_DIR": tempfile.gettempdir()}, **overrides)
    return env


async def atrium(*argv: str, env: Mapping[str, str]) -> Ran:
    """``python -m atrium <argv>`` in a process of its own, with ``env``; its status and output."""
    return await python_module("atrium", *argv, env=env)


async def python_module(module: str, *argv: str, env: Mapping[str, str]) -> Ran:
    """``python -m <module> <argv>`` in a process of its own, with ``env``; its status and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, *argv, cwd=ROOT, env=dict(env), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT)
    assert process.returncode is not None
    return Ran(process.returncode, stdout.decode(), stderr.decode())


def one_line(ran: Ran) -> str:
    """The single line a failed command printed (nothing on stdout, no traceback)."""
    assert ran.stdout == "", ran.stdout
    lines = [line for line in ran.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, ran.stderr
    assert "Traceback" not in ran.stderr
    return lines[0]
