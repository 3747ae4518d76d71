"""Who is calling (``Principal``) and the typed Strawberry context built for every operation."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from atrium.errors import Unauthenticated
from auth.tokens import TokenVerifier
from models.tables import Role

if TYPE_CHECKING:
    from starlette.requests import HTTPConnection

    from atrium.settings import Settings
    from models.db import Databases, TenantScope
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


async def authenticate(verifier: TokenVerifier, authorization: str | None) -> Principal | None:
    """The principal for an Authorization value: None when there is none, UNAUTHENTICATED when bad."""
    token = bearer_token(authorization)
    if token is None:
        return None
    claims = await verifier.verify(token)
    return Principal(tenant_id=claims.tenant_id, user_id=claims.user_id, role=claims.role,
                     expires_at=claims.expires_at)
