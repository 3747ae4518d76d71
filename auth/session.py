"""The typed state of one operation: ``Context`` (what every resolver gets) and ``Session``.

A ``Session`` is one unit of work of one verified caller: the principal, its tenant scope (one
lazily begun tenant transaction) and the loaders bound to that scope. It is made once per HTTP
request, once per WebSocket operation, and once per delivered subscription event (``event_session``),
and closed when that unit ends; nothing in it is ever swapped.

``Context`` is frozen too. ``context.session`` is never optional for a resolver: fields that need
one declare a permission (``auth.roles.Can``), which refuses anonymous callers before the resolver
runs; reaching ``session`` anonymously anyway raises UNAUTHENTICATED. During a subscription event,
``session`` is that event's own session: the transport cannot hand Strawberry a new context per
event, so the event's session travels in a context variable set for exactly the event's execution.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import strawberry

from auth.fields import NO_RULES, FieldRules, read_rules
from auth.principal import Principal
from core.clock import Clock
from core.errors import Unauthenticated
from core.settings import Settings
from models.db import Databases, TenantScope
from models.loaders import Loaders

if TYPE_CHECKING:
    from starlette.requests import HTTPConnection

    from core.tasks import BackgroundTasks
    from models.leases import JobLeases
    from planner.answers import AnswerCache
    from subscriptions.broker import Broker


@dataclass(frozen=True)
class Session:
    """One unit of work of one verified principal (see the module docstring)."""

    principal: Principal
    db: TenantScope
    loaders: Loaders
    rules: FieldRules = NO_RULES
    """The tenant's field rules (``auth.fields``), read by ``with_rules`` before anything resolves."""

    @classmethod
    def open(cls, databases: Databases, principal: Principal) -> Session:
        """A session whose transaction begins with its first statement."""
        db = TenantScope(databases, principal.tenant_id, principal.view)
        return cls(principal=principal, db=db, loaders=Loaders(db))

    async def with_rules(self) -> Session:
        """This session with its tenant's field rules read (after ``confirm_membership``, whose entry
        names their version: usually no statement)."""
        return dataclasses.replace(self, rules=await read_rules(self.db))

    def hidden(self, record_type: str) -> frozenset[str]:
        """The fields of ``record_type`` the caller's role may neither read nor write."""
        return self.rules.hidden(self.principal.role, record_type)

    @property
    def tenant_id(self) -> uuid.UUID:
        return self.principal.tenant_id

    @property
    def user_id(self) -> uuid.UUID:
        return self.principal.user_id

    async def close(self) -> None:
        """End the transaction (committing reads) and release the connection; idempotent."""
        await self.db.close()


class Meter(Protocol):
    """Charges each operation's cost to the caller's rate limits before it runs (``atrium.http.ratelimit``)."""

    async def charge(self, cost: int) -> None:
        """Spend ``cost`` units; raises RATE_LIMITED (or QUERY_TOO_COMPLEX when it can never fit)."""


class OperationRecorder(Protocol):
    """Counts executed operations and their error codes (``atrium.observability.metrics``)."""

    def record_operation(self, operation_type: str) -> None: ...

    def record_errors(self, codes: Iterable[str]) -> None: ...


_EVENT_SESSION: ContextVar[Session | None] = ContextVar("atrium_event_session", default=None)


@dataclass(frozen=True)
class Context:
    """What every resolver of one operation gets as ``info.context``."""

    settings: Settings
    databases: Databases
    broker: Broker
    clock: Clock
    request: HTTPConnection | None
    request_id: str
    principal: Principal | None = None
    own_session: Session | None = None
    """The operation's session (None when anonymous); read it through ``session``."""
    response: Any = None
    """Strawberry's sub-response of an HTTP request (headers and cookies a resolver may set)."""
    meter: Meter | None = None
    """Rate limits of the request or WebSocket operation; None where nothing is metered (limits off, scripts)."""
    metrics: OperationRecorder | None = None
    planned: bool = False
    """Queries may be answered through plans (``planner``): HTTP requests, when ``Settings.plans``."""
    answers: AnswerCache | None = None
    """Where this operation's planned answer may be cached (None: it is not)."""
    trace_event: Callable[[], AbstractContextManager[None]] | None = None
    """A subscription's: what each of its events runs in (a span, when tracing is on)."""
    tasks: BackgroundTasks | None = None
    """The app's background tasks (exports), which outlive the request; None outside an app."""
    leases: JobLeases | None = None
    """This process's leases on the background jobs it runs (``models.leases``); None outside an app."""

    @property
    def session(self) -> Session:
        """The session of the current unit of work; UNAUTHENTICATED when the caller is anonymous."""
        event = _EVENT_SESSION.get()
        if event is not None:
            return event
        if self.own_session is None:
            raise Unauthenticated()
        return self.own_session


@asynccontextmanager
async def event_session(context: Context) -> AsyncIterator[Session]:
    """A fresh session for one subscription event, which ``context.session`` is while the block runs
    (the event's execution: the block yields the event to the executor), inside the context's
    ``trace_event`` (its span).

    The operation's own session is closed first, so no connection is held between events.
    """
    principal = context.session.principal
    if context.own_session is not None:
        await context.own_session.close()
    with context.trace_event() if context.trace_event is not None else nullcontext():
        session = Session.open(context.databases, principal)
        outer = _EVENT_SESSION.get()
        try:
            session = await session.with_rules()  # rules may change while a subscription lives
            _EVENT_SESSION.set(session)
            yield session
        finally:
            # set(), not reset(token): a generator closed from another task runs this in another context.
            _EVENT_SESSION.set(outer)
            await session.close()


Info = strawberry.Info[Context, None]
"""What resolvers receive as ``info``."""
