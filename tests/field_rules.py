"""What the field-rule tests share (a ``pytest_plugins`` entry of ``tests/conftest.py``): the rule
mutations, and the fixtures ``apps`` (the app with plans and without, per module) and ``api`` (a
client of each in turn: every test that takes it runs both ways). Modules with an ``apps`` or
``api`` fixture of their own keep theirs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest
from starlette.applications import Starlette

from atrium.app import create_app
from core.settings import Settings

SET = """mutation($t: String!, $f: String!, $r: [Role!]!) {
  setFieldRule(recordType: $t, field: $f, hiddenFrom: $r) { recordType field hiddenFrom } }"""
REMOVE = "mutation($t: String!, $f: String!) { removeFieldRule(recordType: $t, field: $f) }"


@pytest.fixture(scope="module")
async def apps(settings: Settings) -> AsyncIterator[dict[str, Starlette]]:
    planned, executed = create_app(replace(settings, plans=True)), create_app(replace(settings, plans=False))
    async with planned.router.lifespan_context(planned), executed.router.lifespan_context(executed):
        yield {"plans-on": planned, "plans-off": executed}


@pytest.fixture(params=["plans-on", "plans-off"])
async def api(request: pytest.FixtureRequest, apps: dict[str, Starlette]) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app with plans, then of the app without (every test runs both ways)."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=apps[request.param]),
                                 base_url="http://rules.test") as client:
        yield client
