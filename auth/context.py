"""Who is calling (``Principal``) and the typed Strawberry context built for every operation."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, select

from atrium.errors import Unauthenticated
from auth.roles import RANK
from auth.tokens import TokenVerifier
from models.db import TenantScope
from models.tables import MEMBERSHIPS, Role

if TYPE_CHECKING:
    from starlette.requests import HTTPConnection

    from atrium.settings import Settings
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


MEMBERSHIP_ROLE = select(MEMBERSHIPS.c.role).where(
    MEMBERSHIPS.c.tenant_id == bindparam("tenant_id"), MEMBERSHIPS.c.user_id == bindparam("user_id"))


async def confirm_membership(db: TenantScope, principal: Principal) -> Principal:
    """``principal`` checked against the database: its user must still be a member of its tenant,
    and its role is capped by the membership's current role (a token never outranks the member).

    Raises UNAUTHENTICATED when the membership is gone. Runs in the request's read transaction,
    so it costs one statement.
    """
    rows = await db.fetch(MEMBERSHIP_ROLE, {"tenant_id": principal.tenant_id, "user_id": principal.user_id})
    if not rows:
        raise Unauthenticated("This credential's user is not a member of its workspace")
    current = Role(rows[0].role)
    if RANK[current] < RANK[principal.role]:
        return dataclasses.replace(principal, role=current)
    return principal


async def authenticate(verifier: TokenVerifier, authorization: str | None) -> Principal | None:
    """The principal for an Authorization value: None when there is none, UNAUTHENTICATED when bad."""
    token = bearer_token(authorization)
    if token is None:
        return None
    claims = await verifier.verify(token)
    return Principal(tenant_id=claims.tenant_id, user_id=claims.user_id, role=claims.role,
                     expires_at=claims.expires_at)
