"""Delivery by groups: one execution per distinct subscription, its serialized results sent to many.

Strawberry executes a subscription's selection once per subscriber and event (~180 µs each). Here a
graphql-transport-ws operation instead joins a *group*: operations with equal keys (the view
chooses them: tenant, role, document, variables) share one execution, whose every result is
serialized once and queued, as the same text, to each member. So an event costs one execution
(and one loader batch) per group, whatever the number of subscribers.

Guarantees:
- Each group executes with a context of its own, built by the view (``OperationSpec.context``)
  and closed when the group ends; nothing of a connection's context is shared between operations.
- A member's outgoing queue is bounded (``queue_size``) and filled with ``put_nowait``: when a
  client does not read fast enough, its backlog is dropped, it leaves the group at once and its
  operation ends with an ``error`` coded ``SUBSCRIBER_TOO_SLOW``; the other members are unaffected.
- A member joining a running group first receives the group's greeting: its first result
  (``replay="first"``, e.g. the "subscribed" marker of event streams) or its latest one
  (``replay="last"``, for streams whose every result is a full state).
- The group's execution is cancelled when its last member leaves (``complete``, disconnect).
- An execution that fails ends its members' operations with an ``error``: SERVICE_UNAVAILABLE
  when a service it needed was down (``models.outages``; they subscribe again later), else INTERNAL.
Operations for which the view returns no spec (unparsable documents) run as Strawberry runs them.

Grouping (``Grouping.spec``): subscriptions with equal tenant, scope (``auth.scope``: role, so
permissions, and record-level view, so whose records), document,
operation name and variables share one execution. How each root field's results may be shared is
what the field itself declares (``subscriptions.events.Delivery`` in its metadata): a private state
(presence joins each subscriber) never shares, and a field whose every result is a full state
greets a late joiner with the latest one. Queries, mutations and documents whose root spreads
fragments run alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Hashable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Protocol, cast

from graphql import FieldNode, GraphQLError, GraphQLFormattedError, OperationType, get_operation_ast, parse
from starlette.websockets import WebSocketDisconnect
from strawberry.asgi import ASGIWebSocketAdapter
from strawberry.http.exceptions import WebSocketDisconnected
from strawberry.schema import BaseSchema
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
    Operation,
)
from strawberry.subscriptions.protocols.graphql_transport_ws.types import ConnectionInitMessage, ErrorMessage
from strawberry.types.execution import ExecutionResult, PreExecutionError
from strawberry.utils.aio import aclosing

from auth.principal import Principal
from core.errors import Internal, Overloaded, ServiceUnavailable, SubscriberTooSlow
from models.outages import is_outage
from subscriptions.events import DELIVERY, Delivery

log = logging.getLogger("atrium.delivery")

TOO_SLOW_ERROR = SubscriberTooSlow().formatted()
INTERNAL_ERROR = Internal().formatted()
UNAVAILABLE_ERROR = ServiceUnavailable().formatted()
TRY_AGAIN_LATER = 1013
"""The WebSocket close code (RFC 6455 registry) for a ``connection_init`` that could not be checked
because a service was down: the client reconnects after a while, as after ``Retry-After``."""


@dataclass(frozen=True)
class Frame:
    """One item of a member's queue: a serialized ``next`` payload, an ``error`` or ``complete``."""

    kind: Literal["next", "error", "complete"]
    payload: str = ""
    errors: tuple[dict[str, Any], ...] = ()


SLOW: Frame = Frame("error", errors=(TOO_SLOW_ERROR,))


def unlimited() -> AbstractAsyncContextManager[None]:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class OperationSpec:
    """How to run one operation: its group key, greeting policy, private context and admission."""

    key: Hashable
    """Operations with equal keys share one execution; give a unique object for a private one."""
    replay: Literal["first", "last"]
    context: Callable[[], AbstractAsyncContextManager[Any]]
    """Opens the group's own context (entered once per group, closed when the group ends)."""
    subscription: bool = False
    """Whether the operation is a subscription (its place is held while it starts only)."""
    place: Callable[[], AbstractAsyncContextManager[None]] = unlimited
    """A place for the operation in the process (``atrium.http.admission``), or ``Overloaded``."""


FormatResult = Callable[[ExecutionResult], dict[str, Any]]


class Grouping:
    """Which WebSocket operations share an execution, from the schema's subscription fields (module docstring)."""

    def __init__(self, schema: BaseSchema) -> None:
        root = schema.subscription
        fields = root.__strawberry_definition__.fields if root is not None else []
        names = schema.config.name_converter
        self._delivery = {names.get_graphql_name(f): Delivery(f.metadata.get(DELIVERY, Delivery.EVENTS))
                          for f in fields}

    def spec(self, principal: Principal, query: str, variables: dict[str, Any] | None,
             operation_name: str | None) -> tuple[Hashable, Literal["first", "last"], bool] | None:
        """Group key, greeting policy and whether it is a subscription, of an operation; None when
        unparsable (left to Strawberry)."""
        parsed = root_fields(query, operation_name)
        if parsed is None:
            return None
        kind, names, opaque = parsed
        deliveries = {self._delivery.get(name, Delivery.EVENTS) for name in names}
        key: Hashable = object()
        if kind is OperationType.SUBSCRIPTION and not opaque and Delivery.PRIVATE_STATE not in deliveries:
            key = (principal.tenant_id, principal.scope.key, query, operation_name,
                   json.dumps(variables or {}, sort_keys=True, default=str))
        states = names and not opaque and deliveries <= {Delivery.STATE, Delivery.PRIVATE_STATE}
        return key, "last" if states else "first", kind is OperationType.SUBSCRIPTION


@lru_cache(maxsize=1024)
def root_fields(query: str, operation_name: str | None) -> tuple[OperationType, frozenset[str], bool] | None:
    """(operation type, root field names, whether the root also spreads fragments); None if unparsable."""
    try:
        operation = get_operation_ast(parse(query), operation_name)
    except GraphQLError:
        return None
    if operation is None:
        return None
    selections = operation.selection_set.selections
    names = frozenset(s.name.value for s in selections if isinstance(s, FieldNode))
    return operation.operation, names, len(names) != len(selections)


class Member:
    __slots__ = ("group", "queue")

    def __init__(self, group: Group, maxsize: int) -> None:
        self.group = group
        self.queue: asyncio.Queue[Frame] = asyncio.Queue(maxsize)


@dataclass(eq=False)
class Group:
    """One shared execution and the members it delivers to."""

    registry: LiveGroups
    spec: OperationSpec
    query: str
    variables: dict[str, Any] | None
    operation_name: str | None
    members: set[Member] = field(default_factory=set)
    greeting: str | None = None
    done: bool = False
    task: asyncio.Task[None] | None = None

    def send(self, frame: Frame) -> None:
        """Queue ``frame`` to every member; a member whose queue is full is cut off."""
        for member in tuple(self.members):
            try:
                member.queue.put_nowait(frame)
            except asyncio.QueueFull:
                while not member.queue.empty():
                    member.queue.get_nowait()
                member.queue.put_nowait(SLOW)
                self.members.discard(member)
                self.registry.cut_off += 1
        if not self.members and not self.done and self.task is not None:
            self.registry.retire(self)  # everyone was cut off: stop executing for nobody
            self.task.cancel()

    async def pump(self) -> None:
        terminal = Frame("complete")
        try:
            async with self.spec.context() as context:
                stream = await self.registry.schema.stream(
                    self.query, variable_values=self.variables, context_value=context,
                    operation_name=self.operation_name,
                )
                async with aclosing(stream):
                    first = True
                    async for result in stream:
                        if first and isinstance(result, PreExecutionError):
                            payload = self.registry.format_result(result)
                            terminal = Frame("error", errors=tuple(payload.get("errors") or ()))
                            break
                        first = False
                        if not isinstance(result, ExecutionResult):
                            terminal = Frame("error", errors=({"message": "Incremental delivery is not supported"},))
                            break
                        text = json.dumps(self.registry.format_result(result), separators=(",", ":"))
                        if self.spec.replay == "last" or self.greeting is None:
                            self.greeting = text
                        self.registry.events += 1
                        self.send(Frame("next", text))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if is_outage(exc):
                log.warning("shared execution ended by an outage: %s: %s", type(exc).__name__, exc)
                terminal = Frame("error", errors=(UNAVAILABLE_ERROR,))
            else:
                log.exception("shared execution failed: %s", self.operation_name or self.query[:80])
                terminal = Frame("error", errors=(INTERNAL_ERROR,))
        finally:
            self.registry.retire(self)
        self.send(terminal)


class LiveGroups:
    """The groups of one process (one per app)."""

    def __init__(self, schema: BaseSchema, format_result: FormatResult, queue_size: int = 256) -> None:
        self.schema = schema
        self.format_result = format_result
        self.queue_size = queue_size
        self._groups: dict[Hashable, Group] = {}
        self.events = 0
        """Results executed (each sent to every member of its group)."""
        self.cut_off = 0
        """Members cut off for being too slow."""

    def join(self, spec: OperationSpec, query: str, variables: dict[str, Any] | None,
             operation_name: str | None) -> Member:
        group = self._groups.get(spec.key)
        if group is None:
            group = Group(self, spec, query, variables, operation_name)
            self._groups[spec.key] = group
            group.task = asyncio.create_task(group.pump(), name="atrium-live-group")
        member = Member(group, self.queue_size)
        if group.greeting is not None:
            member.queue.put_nowait(Frame("next", group.greeting))
        group.members.add(member)
        return member

    def leave(self, member: Member) -> None:
        group = member.group
        group.members.discard(member)
        if not group.members and not group.done and group.task is not None:
            self.retire(group)
            group.task.cancel()

    def retire(self, group: Group) -> None:
        group.done = True
        if self._groups.get(group.spec.key) is group:
            del self._groups[group.spec.key]

    def counts(self) -> tuple[int, int]:
        """(groups, members) currently live."""
        return len(self._groups), sum(len(g.members) for g in self._groups.values())


class LiveView(Protocol):
    """What the GraphQL view provides to the handler."""

    live_groups: LiveGroups

    def operation_spec(self, context: Any, query: str, variables: dict[str, Any] | None,
                       operation_name: str | None) -> OperationSpec | None: ...


class GroupedTransportWSHandler(BaseGraphQLTransportWSHandler[Any, Any]):
    """graphql-transport-ws whose operations run through ``LiveGroups`` (see module docstring).

    A ``connection_init`` whose credential cannot be checked because of an outage (the membership
    lives in PostgreSQL) closes the socket with 1013 Try Again Later, reason ``SERVICE_UNAVAILABLE``.
    """

    async def handle_connection_init(self, message: ConnectionInitMessage) -> None:
        try:
            await super().handle_connection_init(message)
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("connection_init not checked, service unavailable: %s: %s", type(exc).__name__, exc)
            await self.websocket.close(code=TRY_AGAIN_LATER, reason=ServiceUnavailable.code.value)

    async def run_operation(self, operation: Operation[Any, Any]) -> None:
        """Run ``operation`` in its place (``OperationSpec.place``): a query or mutation holds it until
        it is answered, a subscription until its first result (or end) is ready, so that a flood of
        subscribes or of operations over a socket is bounded and shared between tenants as over HTTP.
        Refused, the operation ends with an ``error`` coded SERVICE_UNAVAILABLE (``retryAfter``)."""
        view = cast("LiveView", self.view)
        spec = view.operation_spec(self.context, operation.query, operation.variables, operation.operation_name)
        if spec is None:
            await super().run_operation(operation)
            return
        async with contextlib.AsyncExitStack() as place:
            try:
                await place.enter_async_context(spec.place())
            except Overloaded as exc:
                error: ErrorMessage = {"id": operation.id, "type": "error",
                                       "payload": cast("list[GraphQLFormattedError]", [exc.formatted()])}
                with contextlib.suppress(WebSocketDisconnected):
                    await operation.send_operation_message(error)
                return
            member = view.live_groups.join(spec, operation.query, operation.variables, operation.operation_name)
            started = place.aclose if spec.subscription else None
            try:
                await self._forward(operation, member, started)
            except WebSocketDisconnected:
                pass
            finally:
                view.live_groups.leave(member)

    async def _forward(self, operation: Operation[Any, Any], member: Member,
                       started: Callable[[], Awaitable[None]] | None = None) -> None:
        """Send ``member``'s frames as ``operation``'s messages; ``started`` is awaited once the first is ready."""
        while True:
            frame = await member.queue.get()
            if started is not None:
                await started()
                started = None
            if operation.completed:
                return
            if frame.kind == "next":
                await self._send_next(operation.id, frame.payload)
            elif frame.kind == "error":
                error: ErrorMessage = {"id": operation.id, "type": "error",
                                       "payload": cast("list[GraphQLFormattedError]", list(frame.errors))}
                await operation.send_operation_message(error)
                return
            else:
                await operation.send_operation_message({"id": operation.id, "type": "complete"})
                return

    async def _send_next(self, operation_id: str, payload: str) -> None:
        """Send a ``next`` message around an already serialized payload."""
        if not isinstance(self.websocket, ASGIWebSocketAdapter):
            await self.send_message({"id": operation_id, "type": "next", "payload": json.loads(payload)})
            return
        text = f'{{"id":{json.dumps(operation_id)},"type":"next","payload":{payload}}}'
        try:
            await self.websocket.ws.send_text(text)
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            raise WebSocketDisconnected from exc
