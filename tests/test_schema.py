"""The committed SDL matches the code, and our packages are the repository's (not PyPI namesakes)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from atrium.schema import schema

ROOT = Path(__file__).resolve().parent.parent


def test_schema_graphql_matches_code() -> None:
    committed = (ROOT / "schema.graphql").read_text()
    assert committed == schema.as_str() + "\n", "schema.graphql is stale: run `atrium export-schema`"


@pytest.mark.parametrize("package", ["atrium", "auth", "models", "resolvers", "schema", "subscriptions"])
def test_packages_come_from_the_repository(package: str) -> None:
    module = importlib.import_module(package)
    assert module.__file__ is not None
    assert Path(module.__file__).resolve().parent == ROOT / package


def test_production_schema_hides_introspection_and_suggestions() -> None:
    from atrium.schema import build_schema

    production = build_schema(production=True)
    result = production.execute_sync("{ __schema { types { name } } }")
    assert result.errors and "introspection" in result.errors[0].message.lower()
    result = production.execute_sync("{ dealz { totalCount } }")
    assert result.errors and "Did you mean" not in result.errors[0].message
    development = schema.execute_sync("{ dealz { totalCount } }")
    assert development.errors and "Did you mean" in development.errors[0].message
