"""Hostile values at every argument of every root field, as literals and as variables: never INTERNAL, never 5xx.

Property-based (hypothesis): for each root query and mutation field, operations are drawn whose
every argument holds a value its type accepts but hostile in what it holds (real ids of a seeded
tenant among them, so that resolvers and the write path are reached), or, in half of them, also
values that do not fit at all: the wrong type, null, NaN and infinities, numbers past every
bound, empty, blank, NUL and very long text, lone surrogates, control characters, SQL and LIKE
wildcards, base64 that is not, dates that do not exist or overflow in UTC, unknown enum values and
input fields, lists where one value goes and the reverse. Each operation is sent twice, its values
written into the document and as variables. Whatever the answer, it is a JSON GraphQL response
below 500 and no error in it is INTERNAL; afterwards no database connection is left checked out.

Operations are generated first (hypothesis draws them, derandomized so a run is reproducible) and
then sent, since the app runs on the test's event loop; a failure names the operation and values.
"""

from __future__ import annotations

import dataclasses
import json
import math
import string
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import hypothesis.strategies as st
import pytest
from graphql import (
    GraphQLEnumType,
    GraphQLField,
    GraphQLInputObjectType,
    GraphQLInputType,
    GraphQLList,
    GraphQLNonNull,
    GraphQLScalarType,
    get_named_type,
    is_composite_type,
)
from hypothesis import HealthCheck, given, settings
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from atrium.app import create_app
from atrium.schema import schema
from core.settings import Settings
from models.tables import Role
from tests.conftest import make_tenant_world
from tests.crm import gid, seed_crm
from tests.wire import QUIET, settled

GRAPHQL = schema._schema
ROOTS = [(kind, name, field) for kind, root in (("query", GRAPHQL.query_type), ("mutation", GRAPHQL.mutation_type))
         if root is not None for name, field in root.fields.items()]
EXAMPLES_PER_FIELD = 50
FEWER_EXAMPLES = {"login": 10}
"""Fields whose every call costs much (login verifies an Argon2 hash, ~70 ms)."""


@dataclass(frozen=True)
class Enum:
    """An enum value: written bare in a document, as its name in variables."""

    name: str


HOSTILE_TEXT = st.sampled_from([
    "", " ", "\t\n", "\x00", "a\x00b", "\ud800", "\udfff", "\u202e", "\ufeff", "😀" * 50, "x" * 5_000, "NaN",
    "Infinity", "-Infinity", "1e309", "-1", "0", "1.005", "9" * 40, "'; DROP TABLE deals; --", "%", "_", "\\",
    "%_\\%", "null", "true", "{}", "[]", "====", "a*b=", "AAA", "0001-01-01T00:00:00+05:00",
    "9999-12-31T23:59:59-05:00", "2030-02-30", "2030-13-01", "0000-00-00", "2030-01-01", "2030-01-01T09:30:00Z",
    "2030-01-01T09:30:00", "VXNlcjpub3BlCg==", "RGVhbDo=", "RGVhbDoxMjM=", "eyJhIjoxfQ", "owner", "OWNER",
]) | st.text(string.printable, max_size=30) | st.text(max_size=30)
HOSTILE_INT = st.sampled_from([0, -1, 1, 100, 101, 2**31 - 1, -(2**31), 2**31, 2**63, -(2**63) - 1, 10**30])
HOSTILE_FLOAT = st.sampled_from([0.5, -0.0, 1e308, -1e308, 1e-320, 0.1 + 0.2])
ANY_LEAF = (HOSTILE_TEXT | HOSTILE_INT | HOSTILE_FLOAT | st.booleans() | st.none()
            | st.sampled_from([Enum("OPEN"), Enum("NOPE"), Enum("OWNER"), Enum("ASC")]))
ANYTHING = st.recursive(ANY_LEAF, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.sampled_from(["a", "name", "id", "amount", "__typename"]), inner,
                                          max_size=2), max_leaves=6)


TYPED: dict[str, st.SearchStrategy[Any]] = {
    "String": HOSTILE_TEXT,
    "Int": st.sampled_from([0, -1, 1, 3, 100, 101, 2**31 - 1, -(2**31)]),
    "Float": HOSTILE_FLOAT,
    "Boolean": st.booleans(),
    "Decimal": st.sampled_from(["0", "12.50", "0.5", "99999.99", "1e-309", "1e300", "-0", "-12", "0.12345", "1E+2",
                                7, 0.25]),
    "Date": st.sampled_from(["2030-01-01", "1999-12-31", "0001-01-01", "9999-12-31"]),
    "DateTime": st.sampled_from(["2030-01-01T09:30:00Z", "2030-01-01T09:30:00+14:00", "0001-01-01T00:00:00+05:00",
                                 "9999-12-31T23:59:59-12:00", "2030-01-01T09:30:00"]),
    "Base64": st.sampled_from(["AAA=", "AAAA", "", "////", "AQID", "AQIDBA=="]),
    "JSON": ANYTHING,
}
"""Values each scalar accepts as its type, hostile in what they hold (text, ranges, extremes)."""
UNTYPED: dict[str, st.SearchStrategy[Any]] = {
    "Int": HOSTILE_INT,
    "Decimal": st.sampled_from(["NaN", "-Infinity", "1e309", "9" * 200, "1,5", True]),
    "Date": st.sampled_from(["2030-02-30", "2030-13-01", "tomorrow", 20300101]),
    "DateTime": st.sampled_from(["2030-01-01T25:00:00Z", "now", 0]),
    "Base64": st.sampled_from(["abc", "a*b=", 1, "===="]),
}
"""Values that do not fit the scalar at all."""


def leaf(kind: GraphQLScalarType | GraphQLEnumType, ids: list[str], hostile: bool) -> st.SearchStrategy[Any]:
    """A value of ``kind``: one it accepts, or (``hostile``) also ones it does not."""
    if isinstance(kind, GraphQLEnumType):
        names = st.sampled_from([Enum(name) for name in kind.values])
        return names | st.sampled_from([Enum("NOPE"), Enum("OWNER")]) if hostile else names
    typed = st.sampled_from(ids) if kind.name == "ID" else TYPED.get(kind.name, HOSTILE_TEXT)
    return typed | UNTYPED[kind.name] if hostile and kind.name in UNTYPED else typed


def value_of(kind: GraphQLInputType, ids: list[str], hostile: bool, depth: int = 0) -> st.SearchStrategy[Any]:
    """A value for an input of type ``kind``: shaped like it, or (``hostile``) sometimes anything at all."""
    if isinstance(kind, GraphQLNonNull):
        shaped = value_of(kind.of_type, ids, hostile, depth)
    elif isinstance(kind, GraphQLList):
        item = value_of(kind.of_type, ids, hostile, depth + 1)
        shaped = st.lists(item, max_size=3) | item
    elif isinstance(kind, GraphQLInputObjectType):
        fields = {name: value_of(f.type, ids, hostile, depth + 1) for name, f in kind.fields.items()}
        required = {n for n, f in kind.fields.items() if isinstance(f.type, GraphQLNonNull)}
        shaped = st.fixed_dictionaries({n: fields[n] for n in required},
                                       optional={n: s for n, s in fields.items() if n not in required})
    else:
        assert isinstance(kind, GraphQLScalarType | GraphQLEnumType)
        shaped = leaf(kind, ids, hostile)
    return st.one_of(*[shaped] * 9, ANYTHING) if hostile else shaped


def literal(value: Any) -> str:
    """``value`` as a GraphQL literal."""
    if isinstance(value, Enum):
        return value.name
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if math.isfinite(value) else '"Infinity"'
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(literal(v) for v in value) + "]"
    return "{" + ", ".join(f"{k}: {literal(v)}" for k, v in value.items()) + "}"


def variable(value: Any) -> Any:
    """``value`` as JSON for a variable."""
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, list):
        return [variable(v) for v in value]
    if isinstance(value, dict):
        return {k: variable(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Operation:
    kind: str
    field: str
    arguments: dict[str, Any]
    types: dict[str, str]
    selection: str

    def as_literals(self) -> dict[str, Any]:
        arguments = ", ".join(f"{name}: {literal(value)}" for name, value in self.arguments.items())
        return {"query": f"{self.kind} {{ {self.field}{f'({arguments})' if arguments else ''} {self.selection} }}"}

    def as_variables(self) -> dict[str, Any]:
        if not self.arguments:
            return self.as_literals()
        declared = ", ".join(f"${name}: {self.types[name]}" for name in self.arguments)
        used = ", ".join(f"{name}: ${name}" for name in self.arguments)
        return {"query": f"{self.kind}({declared}) {{ {self.field}({used}) {self.selection} }}",
                "variables": {name: variable(value) for name, value in self.arguments.items()}}


def operations(kind: str, name: str, field: GraphQLField, ids: list[str]) -> list[Operation]:
    """``EXAMPLES_PER_FIELD`` (or ``FEWER_EXAMPLES``) drawn operations on root field ``name``."""
    selection = "{ __typename }" if is_composite_type(get_named_type(field.type)) else ""
    required = {a for a, arg in field.args.items() if isinstance(arg.type, GraphQLNonNull)}

    def arguments_of(hostile: bool) -> st.SearchStrategy[dict[str, Any]]:
        return st.fixed_dictionaries({a: value_of(field.args[a].type, ids, hostile) for a in required},
                                     optional={a: value_of(arg.type, ids, hostile) for a, arg in field.args.items()
                                               if a not in required})

    arguments = st.booleans().flatmap(arguments_of)
    drawn: list[Operation] = []

    @settings(max_examples=FEWER_EXAMPLES.get(name, EXAMPLES_PER_FIELD), deadline=None, derandomize=True,
              database=None,
              suppress_health_check=list(HealthCheck))
    @given(arguments)
    def draw(values: dict[str, Any]) -> None:
        drawn.append(Operation(kind, name, values, {a: str(arg.type) for a, arg in field.args.items()}, selection))

    draw()
    return drawn


@pytest.fixture(scope="module")
async def app(settings: Settings) -> AsyncIterator[Starlette]:
    """An app of this module's own whose periodic jobs stay out of the pool check (``tests.wire.QUIET``,
    their looks at start awaited), so a connection in use after the requests is one they left behind."""
    application = create_app(dataclasses.replace(settings, **QUIET))
    async with application.router.lifespan_context(application):
        await settled(application)
        yield application


@pytest.fixture(scope="module")
async def world(app: Starlette, admin_engine: AsyncEngine, settings: Settings) -> AsyncIterator[tuple[str, list[str]]]:
    """An owner's token and real ids of every kind of a seeded tenant (plus some that are not)."""
    tenant = await make_tenant_world(admin_engine, settings, "hostile")
    token = tenant.token(Role.OWNER)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as client:
        crm = await seed_crm(client, token)
        headers = {"authorization": f"Bearer {token}"}
        note = (await client.post("/graphql", headers=headers, json={
            "query": "mutation($d: ID!) { createNote(input: {dealId: $d}) { id } }",
            "variables": {"d": crm.deal["id"]}})).json()["data"]["createNote"]["id"]
    ids = [crm.pipeline["id"], crm.stage["id"], crm.company["id"], crm.contact["id"], crm.deal["id"],
           crm.activity["id"], note, *(gid("User", user) for user in tenant.users.values()),
           "", "nope", "RGVhbDpub3BlCg", gid("Deal", tenant.id)]
    yield token, ids


@pytest.mark.parametrize(("kind", "name"), [(kind, name) for kind, name, _ in ROOTS])
async def test_hostile_values_never_answer_internal(client: httpx.AsyncClient, app: Starlette,
                                                    world: tuple[str, list[str]], kind: str, name: str) -> None:
    token, ids = world
    field = next(f for k, n, f in ROOTS if (k, n) == (kind, name))
    for operation in operations(kind, name, field, ids):
        for body in (operation.as_literals(), operation.as_variables()):
            response = await client.post("/graphql", content=json.dumps(body), headers={
                "authorization": f"Bearer {token}", "content-type": "application/json"})
            assert response.status_code < 500, (body, response.text)
            assert response.headers["content-type"].startswith("application/json"), (body, response.text)
            errors = response.json().get("errors") or []
            assert not [e for e in errors if e.get("extensions", {}).get("code") == "INTERNAL"], (body, errors)
    await app.state.runtime.tasks.idle()  # background work a mutation started (an export) holds connections
    assert app.state.runtime.databases.pool_usage()[0] == 0
