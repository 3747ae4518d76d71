"""The committed SDL matches the code and states every permission; our packages are the repository's
(not PyPI namesakes). What the code may change against the last release: tests/test_contract.py."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from graphql import GraphQLObjectType

from atrium.schema import schema
from auth.roles import described

ROOT = Path(__file__).resolve().parent.parent


def test_schema_graphql_matches_code() -> None:
    committed = (ROOT / "schema.graphql").read_text()
    assert committed == schema.as_str() + "\n", "schema.graphql is stale: run `atrium export-schema`"


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
