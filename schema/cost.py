"""Operation cost, computed from the document and its variables before anything runs.

The model is an upper bound of the objects an operation can return:

- a leaf field (scalar, enum, ``__typename``) costs 0; an object field costs 1 plus its selection;
- a list field costs ``n x (1 + its selection)``. ``n`` is its ``first``/``last`` argument (a literal
  or a variable; the larger when both are given), else that argument's default in the schema, else
  the page size of the connection the list belongs to (a connection's ``edges`` and ``nodes``), else
  the bound of its item type (``LIST_BOUNDS``: a record's ``customFields`` hold at most
  ``records.custom.MAX_DEFINITIONS`` values), else ``UNBOUNDED_LIST`` for lists without paging
  arguments (``pipelines``, ``stages``, ``members``);
- a connection field (an object field taking ``first``/``last``) costs 1 plus its selection, and hands
  its page size (``first``/``last``, or ``DEFAULT_PAGE`` when neither is given) to its ``edges`` and
  ``nodes``; so ``deals(first: 50) { edges { node { company { name } } } }`` costs 1 + 50 x 3 = 151;
- a batch field (one whose ``input`` argument is a list: ``createDeals(input: [...])``) costs
  ``n x (1 + its selection)`` whatever it returns, ``n`` the number of records sent (the list
  literal's length or the variable's), so 500 created deals cost 500 times one;
- an aggregate's ``first`` sizes its ``groups`` like a connection's page (an object field taking
  ``first``, below);
- fragments, named or inline, count where they are spread (inline fragments on different types of
  an interface are all counted: an over-estimate); a selection that ``@skip``/``@include`` leaves out
  costs 0; introspection fields cost 1 and are not walked (introspection is off in production).

An operation costs at least 1. ``CostLimit`` refuses operations above ``MAX_COST`` with
QUERY_TOO_COMPLEX, and refuses a document holding several operations when the request names none
(instead of running the first); ``MeteredCostLimit`` also charges the cost to ``Context.meter``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

from graphql import (
    BooleanValueNode,
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    GraphQLField,
    GraphQLInterfaceType,
    GraphQLNamedType,
    GraphQLObjectType,
    GraphQLSchema,
    InlineFragmentNode,
    IntValueNode,
    ListValueNode,
    OperationDefinitionNode,
    SelectionSetNode,
    ValueNode,
    VariableNode,
    get_named_type,
    get_nullable_type,
    is_leaf_type,
    is_list_type,
)
from graphql.utilities import value_from_ast_untyped
from strawberry.extensions import SchemaExtension
from strawberry.types import ExecutionResult
from strawberry.types.execution import ExecutionContext

from core.errors import AtriumError, ErrorCode, QueryTooComplex
from core.telemetry import OPERATION_COST, annotate
from records.custom import MAX_DEFINITIONS

MAX_COST = 50_000
DEFAULT_PAGE = 20
"""The page size of a connection asked for without ``first``/``last`` (``resolvers/paging.py``)."""
UNBOUNDED_LIST = 10
LIST_BOUNDS = {"CustomFieldValue": MAX_DEFINITIONS, "CustomFieldDefinition": MAX_DEFINITIONS}
"""Lists whose length the server bounds, by item type: custom fields per record type."""
BATCH_ARGUMENT = "input"
SIZE_ARGUMENTS = ("first", "last")
MULTIPLE_OPERATIONS = "Must provide operation name if query contains multiple operations."


def operation_cost(schema: GraphQLSchema, document: DocumentNode, operation: OperationDefinitionNode,
                   variables: Mapping[str, Any] | None = None) -> int:
    """The cost of ``operation`` (see the module docstring) with ``variables`` as sent by the client.

    Never raises on an invalid document: unknown fields count 1 and unknown fragments nothing.
    """
    root = schema.get_root_type(operation.operation)
    if root is None:
        return 1
    values = {d.variable.name.value: value_from_ast_untyped(d.default_value)
              for d in operation.variable_definitions or () if d.default_value is not None}
    values.update(variables or {})
    fragments = {d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)}
    walk = _Walk(schema, fragments, values)
    return max(1, walk.selection(root, operation.selection_set, page=None, spreading=frozenset()))


class _Walk:
    def __init__(self, schema: GraphQLSchema, fragments: Mapping[str, FragmentDefinitionNode],
                 variables: Mapping[str, Any]) -> None:
        self.schema = schema
        self.fragments = fragments
        self.variables = variables

    def selection(self, parent: GraphQLNamedType, selection_set: SelectionSetNode | None, *, page: int | None,
                  spreading: frozenset[str]) -> int:
        total = 0
        for node in selection_set.selections if selection_set else ():
            if not self.included(node):
                continue
            if isinstance(node, FieldNode):
                total += self.field(parent, node, page, spreading)
            elif isinstance(node, InlineFragmentNode):
                condition = node.type_condition
                target = self.schema.get_type(condition.name.value) if condition else parent
                total += self.selection(target or parent, node.selection_set, page=page, spreading=spreading)
            elif isinstance(node, FragmentSpreadNode):
                name = node.name.value
                fragment = self.fragments.get(name)
                if fragment is None or name in spreading:  # unknown or cyclic: validation reports it
                    continue
                target = self.schema.get_type(fragment.type_condition.name.value)
                total += self.selection(target or parent, fragment.selection_set, page=page,
                                        spreading=spreading | {name})
        return total

    def field(self, parent: GraphQLNamedType, node: FieldNode, page: int | None, spreading: frozenset[str]) -> int:
        name = node.name.value
        if name.startswith("__"):
            return 0 if name == "__typename" else 1
        fields = parent.fields if isinstance(parent, GraphQLObjectType | GraphQLInterfaceType) else {}
        field = fields.get(name)
        if field is None:
            return 1
        named = get_named_type(field.type)
        if is_leaf_type(named):
            return 0
        records = self.batch(node, field)
        if records is not None:
            return records * (1 + self.selection(named, node.selection_set, page=None, spreading=spreading))
        size = self.size(node, field)
        if is_list_type(get_nullable_type(field.type)):
            n = size if size is not None else page if page is not None else LIST_BOUNDS.get(named.name, UNBOUNDED_LIST)
            return n * (1 + self.selection(named, node.selection_set, page=None, spreading=spreading))
        if size is None and not any(arg in field.args for arg in SIZE_ARGUMENTS):
            return 1 + self.selection(named, node.selection_set, page=None, spreading=spreading)
        return 1 + self.selection(named, node.selection_set, page=size if size is not None else DEFAULT_PAGE,
                                  spreading=spreading)

    def size(self, node: FieldNode, field: GraphQLField) -> int | None:
        """The larger of ``first``/``last`` as sent (or defaulted in the schema); None when neither is."""
        sent = {a.name.value: a.value for a in node.arguments or ()}
        sizes: list[int] = []
        for name in SIZE_ARGUMENTS:
            if name in sent:
                value = self.value(sent[name])
            elif name in field.args:
                value = field.args[name].default_value
            else:
                continue
            if isinstance(value, int) and not isinstance(value, bool):
                sizes.append(max(0, value))
        return max(sizes) if sizes else None

    def batch(self, node: FieldNode, field: GraphQLField) -> int | None:
        """The records a batch field is sent (at least 1); None for a field that is not a batch."""
        argument = field.args.get(BATCH_ARGUMENT)
        if argument is None or not is_list_type(get_nullable_type(argument.type)):
            return None
        sent = next((a.value for a in node.arguments or () if a.name.value == BATCH_ARGUMENT), None)
        if isinstance(sent, ListValueNode):
            return max(1, len(sent.values))
        if isinstance(sent, VariableNode):
            value = self.variables.get(sent.name.value)
            return max(1, len(value)) if isinstance(value, list) else 1
        return 1

    def value(self, node: ValueNode) -> Any:
        if isinstance(node, VariableNode):
            return self.variables.get(node.name.value)
        if isinstance(node, IntValueNode):
            return int(node.value)
        return None

    def included(self, node: FieldNode | InlineFragmentNode | FragmentSpreadNode | Any) -> bool:
        for directive in getattr(node, "directives", None) or ():
            name = directive.name.value
            if name not in ("skip", "include"):
                continue
            condition = next((a.value for a in directive.arguments or () if a.name.value == "if"), None)
            if isinstance(condition, BooleanValueNode):
                flag: Any = condition.value
            elif isinstance(condition, VariableNode):
                flag = self.variables.get(condition.name.value)
            else:
                continue
            if isinstance(flag, bool) and flag == (name == "skip"):
                return False
        return True


def _refuse(execution_context: ExecutionContext, error: GraphQLError) -> None:
    """Answer the operation with ``error`` instead of executing it."""
    execution_context.result = ExecutionResult(data=None, errors=[error])


def _refuse_atrium(execution_context: ExecutionContext, error: AtriumError) -> None:
    _refuse(execution_context, GraphQLError(error.message, original_error=error, extensions=error.extensions))


def _admit(execution_context: ExecutionContext) -> int | None:
    """The cost of the operation about to run, or None when it is refused (the result is set)."""
    document = execution_context.graphql_document
    if document is None or execution_context.result is not None:
        return None
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    # Strawberry falls back to the first operation when the request names none; the spec says refuse.
    provided: str | None = getattr(execution_context, "_provided_operation_name", None)
    if provided is None and len(operations) > 1:
        _refuse(execution_context, GraphQLError(
            MULTIPLE_OPERATIONS, extensions={"code": ErrorCode.GRAPHQL_VALIDATION_FAILED.value}))
        return None
    operation = next((o for o in operations if provided is None or (o.name and o.name.value == provided)), None)
    if operation is None:
        return None
    cost = operation_cost(execution_context.schema._schema, document, operation, execution_context.variables)
    annotate(OPERATION_COST, cost)
    if cost > MAX_COST:
        _refuse_atrium(execution_context, QueryTooComplex(cost, MAX_COST))
        return None
    return cost


class CostLimit(SchemaExtension):
    """The operation rules above, for synchronous execution (no metering)."""

    def on_execute(self) -> Iterator[None]:
        _admit(self.execution_context)
        yield


class MeteredCostLimit(SchemaExtension):
    """The operation rules above, then the cost charged to the context's ``meter`` (when it has one)."""

    async def on_execute(self) -> AsyncIterator[None]:
        cost = _admit(self.execution_context)
        meter = getattr(self.execution_context.context, "meter", None)
        if cost is not None and meter is not None:
            try:
                await meter.charge(cost)
            except AtriumError as exc:
                _refuse_atrium(self.execution_context, exc)
        yield
