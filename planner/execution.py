"""Running plans: the schema extension that answers a query's planned root fields with one statement.

``PlannedQueries.on_execute`` runs after the operation has been parsed, validated, costed and
charged (it is listed after those extensions) and before graphql-core would execute it. For an HTTP
query whose context allows plans (``Context.planned``, from ``Settings.plans``), it builds or reuses
the operation's ``Plan``, binds the request's arguments, runs the one statement in the request's
tenant transaction, and sets the operation's result: planned root fields as JSON text from
PostgreSQL, the other root fields executed by graphql-core over a document holding only them (their
errors are the executor's own, with their paths and locations). When binding says the executor must
answer (a bad argument, a missing permission), it leaves the result unset and the executor answers
the whole operation, as it would without plans.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from graphql import (
    DirectiveNode,
    DocumentNode,
    ExecutionResult,
    FieldNode,
    FragmentDefinitionNode,
    GraphQLError,
    GraphQLSchema,
    OperationDefinitionNode,
    SelectionSetNode,
    VariableNode,
    execute,
    visit,
)
from graphql import OperationType as GraphQLOperation
from graphql.execution.executor import Executor
from graphql.language import Visitor
from sqlalchemy.exc import SQLAlchemyError
from strawberry.execution import optimized_is_awaitable
from strawberry.extensions import SchemaExtension
from strawberry.types.graphql import OperationType

from auth.fields import TABLE as RULES_TABLE
from auth.session import Context
from core.errors import AtriumError, Internal
from core.jsontext import PlannedData, RawJSON
from core.telemetry import ANSWER_CACHE, ANSWERED_BY, FAST_PATH, OPERATION_COST, annotate, name_operation, recording
from planner.answers import answer_key
from planner.plan import Fallback, Plan, Planner
from schema.cost import operation_cost
from schema.extensions import code_of, request_id_of

log = logging.getLogger("atrium.planner")

MAX_PLANS = 512


class DirectiveVariables(Visitor):
    """The variables ``@skip``/``@include`` read (the plan depends on their values)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def enter_directive(self, node: DirectiveNode, *_: Any) -> None:
        if node.name.value in ("skip", "include"):
            for argument in node.arguments or ():
                if isinstance(argument.value, VariableNode):
                    self.names.add(argument.value.name.value)


class PlanCache:
    """The plans of one schema, bounded (least recently used out), beside the validation cache."""

    def __init__(self, planner: Planner, maxsize: int = MAX_PLANS) -> None:
        self.planner = planner
        self.maxsize = maxsize
        self._directives: OrderedDict[tuple[str, str | None], tuple[str, ...]] = OrderedDict()
        self._plans: OrderedDict[tuple[Any, ...], Plan] = OrderedDict()
        self._prepared: OrderedDict[tuple[str, str | None], DocumentNode] = OrderedDict()

    def prepare(self, operation: Operation) -> None:
        """Remember that ``operation`` (valid: it was answered) is wholly answered by its plan."""
        key = (operation.query, operation.operation_name)
        if key not in self._prepared:
            self._prepared[key] = operation.document
            _bound(self._prepared, self.maxsize)

    def prepared(self, query: str, operation_name: str | None) -> DocumentNode | None:
        """The parsed document of an operation ``prepare`` remembered, or None."""
        return self._prepared.get((query, operation_name))

    def get(self, query: str, operation_name: str | None, executor: Executor[Any]) -> Plan:
        operation = executor.operation
        directive_key = (query, operation_name)
        names = self._directives.get(directive_key)
        if names is None:
            collector = DirectiveVariables()
            visit(operation, collector)
            for fragment in executor.fragments.values():
                visit(fragment.definition, collector)
            names = self._directives[directive_key] = tuple(sorted(collector.names))
            _bound(self._directives, self.maxsize)
        coerced = executor.variable_values.coerced
        key = (query, operation_name, tuple(coerced.get(n) for n in names))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self.planner.plan(operation, executor.fragments, executor.variable_values)
            _bound(self._plans, self.maxsize)
        else:
            self._plans.move_to_end(key)
        return plan


def _bound(cache: OrderedDict[Any, Any], size: int) -> None:
    while len(cache) > size:
        cache.popitem(last=False)


@dataclass(frozen=True)
class Operation:
    """One request's operation, as answering it through a plan needs it."""

    query: str
    operation_name: str | None
    variables: dict[str, Any] | None
    document: DocumentNode


Admit = Callable[[], Awaitable[None]]
"""Called once the plan has bound the request's arguments, before anything runs (the fast path
charges the operation's cost there)."""


async def answer(schema: GraphQLSchema, plans: PlanCache, context: Any, operation: Operation,
                 executor_class: Any, admit: Admit | None = None) -> ExecutionResult | None:
    """The operation's result through its plan, or None when the executor must answer it whole."""
    if not isinstance(context, Context) or not context.planned or context.own_session is None:
        return None
    executor = Executor.build(schema, operation.document, raw_variable_values=operation.variables,
                              operation_name=operation.operation_name)
    if isinstance(executor, list):
        return None  # variables the executor rejects: it reports them
    if executor.operation.operation is not GraphQLOperation.QUERY:
        return None
    plan = plans.get(operation.query, operation.operation_name, executor)
    if not plan.planned:
        return None
    session = context.own_session
    try:
        binding = plan.bind(executor.variable_values, session.principal, context.settings.max_page_size,
                            session.hidden)
    except Fallback:
        return None
    if admit is not None:
        await admit()
    if not plan.fallback_keys:
        plans.prepare(operation)
    compiled = plan.compiled(binding)
    answers, key = context.answers, None
    if answers is not None:
        entry = session.db.entry
        if plan.fallback_keys or entry is None:
            _tell(context, "uncacheable")
            answers = None
        else:
            # The field rules' version too: an answer is never served across a change of what the role may see.
            versions = ",".join(f"{table}={entry.version(table)}" for table in (*compiled.tables, RULES_TABLE))
            digest = f"{hashlib.sha256(operation.query.encode()).hexdigest()}:{operation.operation_name or ''}"
            key = answer_key(session.principal.tenant_id, session.principal.scope.key, digest, operation.variables,
                             versions)
            cached = await answers.get(key)
            _tell(context, "hit" if cached is not None else "miss")
            if cached is not None:
                annotate(ANSWERED_BY, "cache")
                return ExecutionResult(data=cached, errors=None)
    annotate(ANSWERED_BY, "plan")
    row = await session.db.fetch_raw(compiled.sql, plan.arguments(compiled, binding))
    rest: ExecutionResult | None = None
    if plan.fallback_keys:
        rest = await _execute_rest(schema, operation, executor.operation, plan, context, executor_class)
        if rest.data is None:
            return rest
    data = PlannedData()
    values = iter(row)
    for root in plan.roots:
        if isinstance(root, str):
            assert rest is not None and rest.data is not None
            data[root] = rest.data[root]
        else:
            value = next(values)
            data[root.key] = RawJSON(value if value is not None else "null")
    if answers is not None and key is not None:
        await answers.put(key, data)  # wholly planned: no executor field, so no error either
    return ExecutionResult(data=data, errors=rest.errors if rest is not None else None)


async def answer_prepared(schema: GraphQLSchema, plans: PlanCache, context: Context, query: str,
                          operation_name: str | None, variables: dict[str, Any] | None) -> ExecutionResult | None:
    """The fast path: an operation wholly answered by its plan before (``PlanCache.prepare``) is
    answered again without Strawberry's pipeline, or None (the pipeline then runs as usual).

    What the pipeline would do for it is done here: its document parsed and validated once already
    (validation depends on nothing else), the cost computed from the variables and charged to the
    meter once the arguments bound (a refusal is answered as the pipeline answers it), the operation
    counted, named to the request's log record and span. Anything else (a bad variable or argument,
    a missing permission) goes the usual way.
    """
    document = plans.prepared(query, operation_name)
    if document is None or not context.planned:
        return None
    operation = Operation(query, operation_name, variables, document)
    definition = next(d for d in document.definitions if isinstance(d, OperationDefinitionNode)
                      and (operation_name is None or (d.name is not None and d.name.value == operation_name)))
    name_operation(OperationType.QUERY.value, definition.name.value if definition.name else None)

    async def admit() -> None:
        if context.meter is None and not recording():
            return
        cost = operation_cost(schema, document, definition, variables)
        annotate(OPERATION_COST, cost)
        if context.meter is not None:
            await context.meter.charge(cost)

    try:
        result = await answer(schema, plans, context, operation, None, admit)
    except AtriumError as refused:  # the meter's RATE_LIMITED or QUERY_TOO_COMPLEX
        error = GraphQLError(refused.message, original_error=refused, extensions=refused.extensions)
        if context.metrics is not None:
            context.metrics.record_operation(OperationType.QUERY.value)
            context.metrics.record_errors([code_of(error) or "UNKNOWN"])
        return ExecutionResult(data=None, errors=[error])
    if result is not None:
        annotate(FAST_PATH, True)
        if context.metrics is not None:
            context.metrics.record_operation(OperationType.QUERY.value)
    return result


def _tell(context: Context, outcome: str) -> None:
    """The ``Atrium-Cache`` response header of an HTTP request (and the operation's span attribute)."""
    annotate(ANSWER_CACHE, outcome)
    if context.response is not None:
        context.response.headers["Atrium-Cache"] = outcome


async def _execute_rest(schema: GraphQLSchema, request: Operation, operation: OperationDefinitionNode,
                        plan: Plan, context: Context, executor_class: Any) -> ExecutionResult:
    """The root fields the plan leaves to the executor, executed over a document holding only them."""
    nodes: list[FieldNode] = [node for key, group in zip(plan.keys, plan.all_nodes, strict=True)
                              if key in plan.fallback_keys for node in group]
    only = OperationDefinitionNode(operation=operation.operation, name=operation.name,
                                   variable_definitions=operation.variable_definitions, directives=operation.directives,
                                   selection_set=SelectionSetNode(selections=tuple(nodes)))
    fragments = [d for d in request.document.definitions if isinstance(d, FragmentDefinitionNode)]
    kwargs = {"executor_class": executor_class} if executor_class is not None else {}
    result = execute(schema, DocumentNode(definitions=(only, *fragments)), context_value=context,
                     variable_values=request.variables, operation_name=request.operation_name,
                     is_awaitable=optimized_is_awaitable, **kwargs)  # type: ignore[arg-type]
    if not isinstance(result, ExecutionResult):
        result = await result
    assert isinstance(result, ExecutionResult)
    return result


class PlannedQueries(SchemaExtension):
    """Answers queries through their plans (module docstring). The schema carries the plan cache.

    A plan that fails unexpectedly is logged and the executor answers instead: a planner fault
    costs speed, never an answer.
    """

    async def on_execute(self) -> AsyncIterator[None]:
        ec = self.execution_context
        if ec.result is None:
            schema = ec.schema
            plans = getattr(schema, "plans", None)
            if plans is not None:
                try:
                    result = None
                    if ec.graphql_document is not None and ec.query is not None:
                        # The name as the request gave it (None for a single operation), as the fast path sees it.
                        provided: str | None = getattr(ec, "_provided_operation_name", None)
                        operation = Operation(ec.query, provided, ec.variables, ec.graphql_document)
                        result = await answer(schema._schema, plans, ec.context, operation,
                                              schema.execution_context_class)
                except AtriumError:
                    raise  # SERVICE_UNAVAILABLE: the executor would fail the same way
                except (OSError, SQLAlchemyError, asyncpg.PostgresError) as exc:
                    # The database refused the statement: the executor would fail the same way. Logged,
                    # and answered as any unexpected error is (nothing of the driver's message shows).
                    log.error("planned statement failed (request %s)", request_id_of(ec), exc_info=exc)
                    raise Internal(request_id_of(ec)) from exc
                except Exception:
                    log.exception("plan failed; the executor answers %s", ec.operation_name or "the query")
                    result = None
                if result is not None:
                    ec.result = result
                else:
                    annotate(ANSWERED_BY, "executor")
                    if isinstance(ec.context, Context) and ec.context.answers is not None:
                        _tell(ec.context, "uncacheable")  # the executor answers it
        yield
