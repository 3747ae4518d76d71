"""Who is calling: the verified ``Principal`` of a credential, and its membership re-checked."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass

from auth.scope import Scope
from auth.tokens import TokenVerifier
from core.errors import Unauthenticated
from models.db import TenantScope
from models.tables import Role
from models.visibility import NOBODY, View
from partners.keys import ApiKeys, is_api_key


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
    view: View = NOBODY
    """Whose records the caller sees (``models.visibility``), read by ``confirm_membership``: until
    then no record of a restricted type."""

    @property
    def scope(self) -> Scope:
        """What the caller may see (``auth.scope``): shared work is keyed by it."""
        return Scope(role=self.role, view=self.view)


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


async def confirm_membership(db: TenantScope, principal: Principal) -> Principal:
    """``principal`` checked against the database: its user must still be a member of its tenant,
    and its role is capped by the membership's current role (a token never outranks the member).
    The result also carries the tenant's current plan (what its rate limits follow) and the caller's
    view of its records (``models.visibility``: teams and the tenant's audiences, computed by the same
    statement with the capped role).

    Raises UNAUTHENTICATED when the membership is gone. It is the first statement of the request's
    read transaction, the one that sets the tenant (``TenantScope.enter``): it costs no statement
    of its own, and no other connection (a request never waits for a second one).
    """
    entry = await db.enter(principal.user_id, principal.role.value)
    if entry.role is None:
        raise Unauthenticated("This credential's user is not a member of its workspace")
    current = Role(entry.role)
    role = current if current.rank < principal.role.rank else principal.role
    return dataclasses.replace(principal, role=role, plan=entry.plan, view=entry.view)


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
