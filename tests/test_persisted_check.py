"""``atrium persisted check``: every tenant's trusted documents re-validated against a schema before a
deploy; a document that would break is named (tenant, client, id, why) and the exit status is 1.

The command reads every tenant of its database, so it runs against a database of its own here,
with two shared tenants and a dedicated one (whose documents live in its own database).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from atrium.ops.admin import create_tenant
from core.settings import Settings
from models.tables import Isolation
from tests.cli import run_cli
from tests.conftest import scratch_database

SLUG = "query Slug { tenant { slug } }"
NAME = "query Name { tenant { name } }"
DEALS = "query Deals {\n  deals(first: 5) { totalCount }\n}"
NEXT_RELEASE = '''
type Query { tenant: Tenant }
type Tenant { slug: String!  name: String! @deprecated(reason: "Use slug.") }
'''
"""A release without ``deals`` and with ``Tenant.name`` deprecated."""


@pytest.fixture
async def own_settings(server_url: str, settings: Settings) -> AsyncIterator[Settings]:
    async with scratch_database(server_url, "atrium_pqcheck") as url:
        yield dataclasses.replace(settings, database_url=url)


async def test_documents_that_a_schema_would_break_are_reported(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str], server_url: str,
        own_settings: Settings) -> None:
    engine = create_async_engine(str(own_settings.database_url))
    async with scratch_database(server_url, "atrium_pqcheck_ded") as dedicated:
        try:
            await create_tenant(engine, "alpha", "Alpha")
            await create_tenant(engine, "beta", "Beta")
            await create_tenant(engine, "gamma", "Gamma", isolation=Isolation.DEDICATED, database_url=dedicated)
        finally:
            await engine.dispose()
        manifests = {"alpha": {"slug": SLUG, "deals": DEALS}, "beta": {"slug": SLUG, "name": NAME},
                     "gamma": {"deals": DEALS}}
        for slug, documents in manifests.items():
            path = tmp_path / f"{slug}.json"
            path.write_text(json.dumps(documents))
            assert await run_cli(monkeypatch, own_settings, "persisted", "push", str(path), "--client", "app",
                                 "--tenant", slug) == 0
        capsys.readouterr()

        # Against the code's schema: every document was valid when pushed and still is.
        assert await run_cli(monkeypatch, own_settings, "persisted", "check") == 0
        assert capsys.readouterr().out.splitlines() == [
            "5 documents of 3 tenants checked against the code's schema: 0 would break, 0 use something deprecated"]

        release = tmp_path / "next.graphql"
        release.write_text(NEXT_RELEASE)
        assert await run_cli(monkeypatch, own_settings, "persisted", "check", "--schema", str(release)) == 1
        lines = capsys.readouterr().out.splitlines()
        assert lines == [
            "breaks      alpha app Deals deals: Cannot query field 'deals' on type 'Query'. (line 2, column 3)",
            "deprecated  beta app Name name: The field Tenant.name is deprecated. Use slug. (line 1, column 23)",
            "breaks      gamma app Deals deals: Cannot query field 'deals' on type 'Query'. (line 2, column 3)",
            f"5 documents of 3 tenants checked against {release}: 2 would break, 1 use something deprecated",
        ]

        assert await run_cli(monkeypatch, own_settings, "persisted", "check", "--schema", str(release),
                             "--tenant", "beta") == 0  # deprecated is a warning, not a break
        assert capsys.readouterr().out.splitlines()[-1].startswith("2 documents of 1 tenants")


async def test_a_schema_that_cannot_be_read_or_a_tenant_that_does_not_exist(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        own_settings: Settings) -> None:
    bad = tmp_path / "bad.graphql"
    bad.write_text("type Query {")
    assert await run_cli(monkeypatch, own_settings, "persisted", "check", "--schema", str(bad)) == 2
    assert f"cannot read the schema {bad}" in capsys.readouterr().err
    assert await run_cli(monkeypatch, own_settings, "persisted", "check", "--tenant", "nobody") == 2
    assert "no tenant 'nobody'" in capsys.readouterr().err
