"""Who is calling (``Principal``) and the typed Strawberry context built for every operation."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import bindparam, select

from auth.roles import RANK
from auth.tokens import TokenVerifier
from core.errors import Unauthenticated
from models.db import TenantScope
from models.tables import MEMBERSHIPS, TENANTS, Role
from partners.keys import ApiKeys, is_api_key

if TYPE_CHECKING:
    from starlette.requests import HTTPConnection

    from core.settings import Settings
    from models.db import Databases
    from resolvers.loaders import Loaders
    from subscriptions.broker import Broker


@dataclass(frozen=True)
class Principal:
    """The verified caller: exactly one tenant, from the credential only."""

    tenant_id: uuid.UUID
    user_id: uuid.UUID
    role: Role
    expires_at: float
    api_key_id: uuid.UUID | None = None
    """Set when the credential is an API key (which acts for ``user_id``, its creator)."""
    persisted_only: bool = False
    """The credential may run trusted documents only (of ``client``, when set)."""
    client: str | None = None
    plan: str | None = None
    """The tenant's plan (rate limits), read by ``confirm_membership``; None until then."""


class Meter(Protocol):
    """Charges each operation's cost to the caller's rate limits before it runs (``atrium/ratelimit.py``)."""

    async def charge(self, cost: int) -> None:
        """Spend ``cost`` units; raises RATE_LIMITED (or QUERY_TOO_COMPLEX when it can never fit)."""


class OperationRecorder(Protocol):
    """Counts executed operations and their error codes (``atrium/metrics.py``)."""

    def record_operation(self, operation_type: str) -> None: ...

    def record_errors(self, codes: Iterable[str]) -> None: ...


@dataclass
class Context:
    """Per-operation state. ``db`` and ``loaders`` exist only for an authenticated principal."""

    settings: Settings
    databases: Databases
    broker: Broker
    request: HTTPConnection | None
    request_id: str
    principal: Principal | None = None
    db: TenantScope | None = None
    loaders: Loaders | None = None
    connection_params: dict[str, Any] | None = field(default=None)
    response: Any = None
    meter: Meter | None = None
    """Rate limits of the request or WebSocket operation; None where nothing is metered (limits off, scripts)."""
    metrics: OperationRecorder | None = None

    def require(self) -> tuple[Principal, TenantScope, Loaders]:
        """The principal, its tenant scope and loaders; UNAUTHENTICATED when anonymous."""
        if self.principal is None or self.db is None or self.loaders is None:
            raise Unauthenticated()
        return self.principal, self.db, self.loaders


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value; None when absent.

    Raises UNAUTHENTICATED for any other scheme, so a malformed header never degrades to anonymous.
    """
    if authorization is None or not authorization.strip():
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("Authorization must be 'Bearer <token>'")
    return token.strip()


MEMBERSHIP = (
    select(MEMBERSHIPS.c.role, TENANTS.c.plan)
    .join(TENANTS, TENANTS.c.id == MEMBERSHIPS.c.tenant_id)
    .where(MEMBERSHIPS.c.tenant_id == bindparam("tenant_id"), MEMBERSHIPS.c.user_id == bindparam("user_id"))
)


async def confirm_membership(db: TenantScope, principal: Principal) -> Principal:
    """``principal`` checked against the database: its user must still be a member of its tenant,
    and its role is capped by the membership's current role (a token never outranks the member).
    The result also carries the tenant's current plan (what its rate limits follow).

    Raises UNAUTHENTICATED when the membership is gone. Runs in the request's read transaction,
    so it costs one statement (and no other connection: a request never waits for a second one).
    """
    rows = await db.fetch(MEMBERSHIP, {"tenant_id": principal.tenant_id, "user_id": principal.user_id})
    if not rows:
        raise Unauthenticated("This credential's user is not a member of its workspace")
    current = Role(rows[0].role)
    role = current if RANK[current] < RANK[principal.role] else principal.role
    return dataclasses.replace(principal, role=role, plan=str(rows[0].plan))


async def authenticate(verifier: TokenVerifier, authorization: str | None, *, api_key: str | None = None,
                       api_keys: ApiKeys | None = None) -> Principal | None:
    """The principal for an Authorization value (a JWT, or an API key recognised by its ``atr_``
    prefix) or an ``X-API-Key`` value: None when there is neither, UNAUTHENTICATED when bad.

    Sending both headers is refused, and API keys are refused where no ``api_keys`` verifier is given.
    """
    token = bearer_token(authorization)
    if api_key is not None:
        if token is not None:
            raise Unauthenticated("Send either an Authorization or an X-API-Key header, not both")
        token = api_key.strip()
        if not is_api_key(token):
            raise Unauthenticated("Invalid API key")
    if token is None:
        return None
    if is_api_key(token):
        if api_keys is None:
            raise Unauthenticated("API keys are not accepted here")
        key = await api_keys.verify(token)
        return Principal(tenant_id=key.tenant_id, user_id=key.user_id, role=key.role, expires_at=key.expires_at,
                         api_key_id=key.key_id, persisted_only=key.persisted_only, client=key.client)
    claims = await verifier.verify(token)
    return Principal(tenant_id=claims.tenant_id, user_id=claims.user_id, role=claims.role,
                     expires_at=claims.expires_at)
