"""Trusted documents: the two manifest formats, validation against the schema, storage per client.

A manifest is either Apollo's persisted-query manifest::

    {"format": "apollo-persisted-query-manifest", "version": 1,
     "operations": [{"id": "...", "body": "query ...", "name": "...", "type": "query"}]}

or the ``{id: document}`` map written by GraphQL Code Generator's client preset (``id`` is usually
the document's sha256 or sha1). Each document must hold exactly one operation (plus its fragments)
and is validated with the same rules the server applies (the GraphQL specification's, plus the depth
and alias limits) when it is pushed. One invalid document refuses the whole push, naming each
problem with its document id, line and column; nothing is stored.

Pushing only adds: an id already pushed for the client with the same text is left as it is, an id
that would now name a different text is refused (ids must keep meaning what partners deployed), and
ids missing from a new manifest stay until ``remove_documents`` deletes them explicitly.

Every function works inside a tenant transaction given by the caller (RLS applies) and keeps the
explicit ``tenant_id`` filter as well.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from graphql import (
    GraphQLError,
    GraphQLSchema,
    NoDeprecatedCustomRule,
    OperationDefinitionNode,
    parse,
    specified_rules,
    validate,
)
from sqlalchemy import Row, Select, delete, insert, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from core.errors import BadUserInput
from core.limits import LIMIT_RULES, MAX_TOKENS
from models.db import TenantScope
from models.tables import PERSISTED_DOCUMENTS

APOLLO_FORMAT = "apollo-persisted-query-manifest"
DOCUMENT_ID = re.compile(r"^[A-Za-z0-9._~:-]{1,200}$")
CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
MAX_OPERATIONS = 5000
RULES = (*specified_rules, *LIMIT_RULES)


@dataclass(frozen=True)
class Operation:
    """One document of a manifest, as declared (``name``/``type`` may be absent in a map)."""

    document_id: str
    body: str
    name: str | None = None
    type: str | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body.encode()).hexdigest()


@dataclass(frozen=True)
class Problem:
    document_id: str
    message: str
    line: int | None = None
    column: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"documentId": self.document_id, "message": self.message, "line": self.line, "column": self.column}

    def __str__(self) -> str:
        return f"{self.document_id}{self.where}: {self.message}"

    @property
    def where(self) -> str:
        return f" (line {self.line}, column {self.column})" if self.line is not None else ""

    def located(self) -> str:
        """The message and where in the document (without the id)."""
        return f"{self.message}{self.where}"


class InvalidManifest(BadUserInput):
    """The manifest was refused; ``extensions.problems`` lists each problem with line and column."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        first = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__("manifest", f"{first}{more}")
        self.problems = list(problems)
        self.extra["problems"] = [p.as_dict() for p in problems]


def client_name(value: str, field: str = "client") -> str:
    value = value.strip()
    if not CLIENT_NAME.match(value):
        raise BadUserInput(field, "must be letters, digits, '.', '_' or '-' (at most 100)")
    return value


def read_manifest(data: Any) -> list[Operation]:
    """The operations of a manifest in either format; BAD_USER_INPUT (field ``manifest``) otherwise."""
    if isinstance(data, dict) and "format" in data:
        if data.get("format") != APOLLO_FORMAT or data.get("version") != 1:
            raise BadUserInput("manifest", f"unknown format: expected {APOLLO_FORMAT!r} version 1")
        entries = data.get("operations")
        if not isinstance(entries, list):
            raise BadUserInput("manifest", "'operations' must be a list")
        operations = []
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("body"), str):
                raise BadUserInput("manifest", f"operations[{index}] needs a string 'body'")
            body = entry["body"]
            document_id = entry.get("id", hashlib.sha256(body.encode()).hexdigest())
            name, kind = entry.get("name"), entry.get("type")
            if not isinstance(document_id, str) or not all(isinstance(v, str | None) for v in (name, kind)):
                raise BadUserInput("manifest", f"operations[{index}]: 'id', 'name' and 'type' must be strings")
            operations.append(Operation(document_id, body, name, kind))
    elif isinstance(data, dict):
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise BadUserInput("manifest", "a document map must map string ids to GraphQL documents")
        operations = [Operation(k, v) for k, v in data.items()]
    else:
        raise BadUserInput("manifest", "must be a JSON object")
    if any("\x00" in (text or "") for op in operations for text in (op.document_id, op.body, op.name, op.type)):
        raise BadUserInput("manifest", "must not contain NUL characters")
    if not operations:
        raise BadUserInput("manifest", "holds no operations")
    if len(operations) > MAX_OPERATIONS:
        raise BadUserInput("manifest", f"holds more than {MAX_OPERATIONS} operations")
    return operations


def check(schema: GraphQLSchema, operations: Sequence[Operation]) -> list[Problem]:
    """Every problem of ``operations`` against ``schema`` (empty when all are valid)."""
    problems: list[Problem] = []
    seen: dict[str, str] = {}
    for op in operations:
        if not DOCUMENT_ID.match(op.document_id):
            problems.append(Problem(op.document_id[:200], "an id is 1-200 letters, digits or ._~:-"))
            continue
        if op.document_id.startswith("sha256:") and op.document_id[7:] != op.sha256:
            problems.append(Problem(op.document_id, "a sha256: id must be the SHA-256 of the document"))
        if seen.setdefault(op.document_id, op.body) != op.body:
            problems.append(Problem(op.document_id, "the id names two different documents"))
        problems += _document_problems(schema, op)
    return problems


def _document_problems(schema: GraphQLSchema, op: Operation) -> list[Problem]:
    try:
        document = parse(op.body, max_tokens=MAX_TOKENS)
    except GraphQLError as error:
        return [_problem(op, error)]
    errors = validate(schema, document, RULES)
    if errors:
        return [_problem(op, e) for e in errors]
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    if len(operations) != 1:
        extra = operations[1].loc if len(operations) > 1 else None
        line, column = _position(op.body, extra.start) if extra else (None, None)
        return [Problem(op.document_id, "a persisted document holds exactly one operation", line, column)]
    operation = operations[0]
    problems = []
    actual_name = operation.name.value if operation.name else None
    if op.name is not None and op.name != actual_name:
        problems.append(Problem(op.document_id, f"declared name {op.name!r} but the operation is {actual_name!r}"))
    if op.type is not None and op.type != operation.operation.value:
        problems.append(Problem(op.document_id,
                                f"declared type {op.type!r} but the operation is a {operation.operation.value}"))
    return problems


def recheck(schema: GraphQLSchema, op: Operation) -> tuple[list[Problem], list[Problem]]:
    """A stored document against ``schema`` (a new release's): the problems that would refuse it now
    (so the partner's calls would fail), then, when there are none, its uses of deprecated fields,
    arguments, input fields and enum values (which a later release may remove)."""
    problems = _document_problems(schema, op)
    if problems:
        return problems, []
    document = parse(op.body, max_tokens=MAX_TOKENS)
    return [], [_problem(op, e) for e in validate(schema, document, [NoDeprecatedCustomRule])]


def _problem(op: Operation, error: GraphQLError) -> Problem:
    message = error.message.removeprefix("Syntax Error: ")
    if not error.locations:
        return Problem(op.document_id, message)
    location = error.locations[0]
    return Problem(op.document_id, message, location.line, location.column)


def _position(body: str, offset: int) -> tuple[int, int]:
    before = body[:offset]
    return before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1


def operation_of(body: str) -> tuple[str, str | None]:
    """``(type, name)`` of a validated single-operation document."""
    document = parse(body, max_tokens=MAX_TOKENS)
    operation = next(d for d in document.definitions if isinstance(d, OperationDefinitionNode))
    return operation.operation.value, operation.name.value if operation.name else None


@dataclass(frozen=True)
class PushResult:
    added: list[Row[Any]]
    unchanged: list[Row[Any]]


async def push_documents(conn: AsyncConnection, tenant_id: uuid.UUID, client: str, schema: GraphQLSchema,
                         operations: Sequence[Operation], created_by: uuid.UUID | None) -> PushResult:
    """Validate ``operations`` and add the new ones to ``client``'s documents (see module docstring).

    Raises ``InvalidManifest`` (and stores nothing) when any document is invalid or an id would change.
    """
    problems = check(schema, operations)
    if problems:
        raise InvalidManifest(problems)
    unique = list({op.document_id: op for op in operations}.values())
    table = PERSISTED_DOCUMENTS
    existing = {row.document_id: row for row in (await conn.execute(
        select(table).where(table.c.tenant_id == tenant_id, table.c.client == client,
                            table.c.document_id.in_([op.document_id for op in unique])).with_for_update()
    )).all()}
    changed = [Problem(op.document_id, "this id already names a different document for this client; "
                                       "remove it first or use a new id")
               for op in unique if op.document_id in existing and existing[op.document_id].sha256 != op.sha256]
    if changed:
        raise InvalidManifest(changed)
    added = []
    for op in unique:
        if op.document_id in existing:
            continue
        kind, name = operation_of(op.body)
        added.append((await conn.execute(insert(table).values(
            tenant_id=tenant_id, id=uuid.uuid4(), client=client, document_id=op.document_id, sha256=op.sha256,
            name=name, operation_type=kind, body=op.body, created_by=created_by,
        ).returning(table))).one())
    return PushResult(added=added, unchanged=[existing[op.document_id] for op in unique if op.document_id in existing])


async def remove_documents(conn: AsyncConnection, tenant_id: uuid.UUID, client: str,
                           document_ids: Sequence[str]) -> list[Row[Any]]:
    """Delete ``client``'s documents with these ids; returns the rows removed (unknown ids are skipped)."""
    table = PERSISTED_DOCUMENTS
    return list((await conn.execute(
        delete(table).where(table.c.tenant_id == tenant_id, table.c.client == client,
                            table.c.document_id.in_(list(document_ids))).returning(table)
    )).all())


def documents_query(tenant_id: uuid.UUID, client: str | None = None) -> Select[Any]:
    """The tenant's trusted documents (of one client, when given) by client and id."""
    table = PERSISTED_DOCUMENTS
    query = select(table).where(table.c.tenant_id == tenant_id)
    if client is not None:
        query = query.where(table.c.client == client)
    return query.order_by(table.c.client, table.c.document_id)


async def find_document(db: TenantScope, *, client: str | None, document_id: str | None = None,
                        sha256: str | None = None) -> str | None:
    """The text of the tenant's trusted document named by ``document_id`` and/or ``sha256``.

    With both, either may match (an APQ hash is a manifest id or a document's SHA-256). ``client``
    restricts the search to that client's documents. None when nothing matches, or when the name
    matches documents of several clients with different texts (the caller must use ``sha256:``).
    """
    table = PERSISTED_DOCUMENTS
    matches = []
    if document_id is not None:
        matches.append(table.c.document_id == document_id)
    if sha256 is not None:
        matches.append(table.c.sha256 == sha256)
    query = select(table.c.body).where(table.c.tenant_id == db.tenant_id, or_(*matches)).distinct().limit(2)
    if client is not None:
        query = query.where(table.c.client == client)
    rows = await db.fetch(query)
    return rows[0].body if len(rows) == 1 else None


class TrustedDocuments:
    """``find_document`` with its answers remembered (bounded) while the tenant's trusted documents
    are unchanged: the key holds the ``persisted_documents`` data version the request read when it
    entered the tenant (``TenantScope.entry``), which every change to them bumps (migration 0006).
    Not-found answers are remembered too: a document pushed later bumps the version."""

    def __init__(self, size: int = 4096) -> None:
        self._size = size
        self._found: OrderedDict[tuple[Any, ...], str | None] = OrderedDict()

    async def find(self, db: TenantScope, *, client: str | None, document_id: str | None = None,
                   sha256: str | None = None) -> str | None:
        if db.entry is None:
            return await find_document(db, client=client, document_id=document_id, sha256=sha256)
        key = (db.tenant_id, db.entry.version(PERSISTED_DOCUMENTS.name), client, document_id, sha256)
        if key in self._found:
            self._found.move_to_end(key)
            return self._found[key]
        found = self._found[key] = await find_document(db, client=client, document_id=document_id, sha256=sha256)
        if len(self._found) > self._size:
            self._found.popitem(last=False)
        return found
