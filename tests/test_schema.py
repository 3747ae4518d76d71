"""The committed SDL matches the code, breaks no client of the last release, and states every
permission; our packages are the repository's (not PyPI namesakes)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from graphql import (
    DangerousChangeType,
    GraphQLObjectType,
    build_schema,
    find_breaking_changes,
    find_dangerous_changes,
)

from atrium.schema import schema
from auth.roles import described

ROOT = Path(__file__).resolve().parent.parent


def test_schema_graphql_matches_code() -> None:
    committed = (ROOT / "schema.graphql").read_text()
    assert committed == schema.as_str() + "\n", "schema.graphql is stale: run `atrium export-schema`"


def test_the_schema_keeps_everything_the_release_had() -> None:
    """``schema.release.graphql`` is the SDL of the last release: nothing it has may break or change
    meaning (new types, fields and descriptions are fine, and so are new optional input fields, such
    as ``externalId``: a client that does not send one gets what it got before)."""
    release = build_schema((ROOT / "schema.release.graphql").read_text())
    current = build_schema((ROOT / "schema.graphql").read_text())
    assert find_breaking_changes(release, current) == []
    assert [change for change in find_dangerous_changes(release, current)
            if change.type is not DangerousChangeType.OPTIONAL_INPUT_FIELD_ADDED] == []


ANONYMOUS = {("Mutation", "login")}
"""Root fields anyone may call (signing in)."""


@pytest.mark.parametrize("root", ["Query", "Mutation", "Subscription"])
def test_every_root_field_requires_a_permission_and_says_which(root: str) -> None:
    definition = getattr(schema, root.lower()).__strawberry_definition__
    graphql_type = schema._schema.type_map[root]
    assert isinstance(graphql_type, GraphQLObjectType)
    for field in definition.fields:
        name = schema.config.name_converter.get_graphql_name(field)
        if (root, name) in ANONYMOUS:
            assert not field.permission_classes
            continue
        permissions = [getattr(p, "permission", None) for p in field.permission_classes]
        assert len(permissions) == 1 and permissions[0] is not None, f"{root}.{name} has no permission"
        description = graphql_type.fields[name].description or ""
        assert description.endswith(described(None, permissions[0])), f"{root}.{name}: {description!r}"


@pytest.mark.parametrize("package", ["atrium", "auth", "core", "models", "partners", "planner", "records",
                                     "resolvers", "schema", "subscriptions"])
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
