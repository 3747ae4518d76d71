"""JWT bearer tokens: one tenant per token.

Development: HS256 with ``ATRIUM_JWT_SECRET``. External identity provider: RS256 keys from
``ATRIUM_JWKS_URL``. Claims: ``sub`` (user id), ``tenant`` (tenant id), ``role``, ``exp``, ``aud``,
``iat``, ``iss``. Every failure (missing claim, bad signature, expired, wrong audience or issuer,
unknown role) raises ``Unauthenticated``.

A verified token is remembered (bounded, least recently used out) for at most ``REVERIFY_SECONDS``:
a client sends the same token with every request, and checking its signature again each time would
cost more than the rest of a cached answer. Expiry is checked on every use all the same.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jwt

from core.clock import SYSTEM_CLOCK, Clock
from core.errors import Unauthenticated
from core.settings import Settings
from models.tables import Role


@dataclass(frozen=True)
class Claims:
    user_id: uuid.UUID
    tenant_id: uuid.UUID
    role: Role
    expires_at: float


def issue_token(settings: Settings, *, user_id: uuid.UUID, tenant_id: uuid.UUID, role: Role,
                ttl_seconds: int | None = None) -> str:
    """An HS256 token signed with the configured secret."""
    if not settings.jwt_secret:
        raise RuntimeError("no ATRIUM_JWT_SECRET configured: tokens come from the identity provider")
    now = int(time.time())
    payload = {
        "sub": str(user_id),
        "tenant": str(tenant_id),
        "role": role.value,
        "aud": settings.jwt_audience,
        "iss": settings.jwt_issuer,
        "iat": now,
        "exp": now + (ttl_seconds if ttl_seconds is not None else settings.token_ttl_seconds),
    }
    return jwt.encode(payload, settings.jwt_secret, algorithm="HS256")


REVERIFY_SECONDS = 300.0
"""How long a verified token is trusted before its signature is checked again (as long as the JWKS
client keeps keys): a key withdrawn from the JWKS stops working within this time."""
REMEMBERED_TOKENS = 10_000


class TokenVerifier:
    """Verifies bearer tokens against the secret (HS256) and/or the JWKS (RS256)."""

    def __init__(self, settings: Settings, clock: Clock = SYSTEM_CLOCK) -> None:
        self._settings = settings
        self._clock = clock
        self._jwks = jwt.PyJWKClient(settings.jwks_url, cache_keys=True, lifespan=300) if settings.jwks_url else None
        self._verified: OrderedDict[str, tuple[Claims, float]] = OrderedDict()

    async def verify(self, token: str) -> Claims:
        """The token's claims; UNAUTHENTICATED when it is malformed, badly signed or expired."""
        now = self._clock.time()
        remembered = self._verified.get(token)
        if remembered is not None and remembered[1] > now:
            claims = remembered[0]
            if claims.expires_at <= now:
                raise Unauthenticated("Token expired")
            self._verified.move_to_end(token)
            return claims
        claims = await self._verify(token)
        self._verified[token] = (claims, now + REVERIFY_SECONDS)
        self._verified.move_to_end(token)
        if len(self._verified) > REMEMBERED_TOKENS:
            self._verified.popitem(last=False)
        return claims

    async def _verify(self, token: str) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated("Malformed token") from exc
        alg = header.get("alg")
        if alg == "HS256" and self._settings.jwt_secret:
            key: Any = self._settings.jwt_secret
        elif alg == "RS256" and self._jwks is not None:
            try:
                # PyJWKClient fetches over urllib (blocking): keep it off the event loop.
                key = (await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)).key
            except jwt.PyJWTError as exc:
                raise Unauthenticated("Token signed with an unknown key") from exc
        else:
            raise Unauthenticated("Token algorithm not accepted")
        try:
            # Expiry is checked against the app's clock below (PyJWT would read the system clock).
            payload = jwt.decode(
                token, key, algorithms=[alg], audience=self._settings.jwt_audience,
                issuer=self._settings.jwt_issuer,
                options={"require": ["exp", "sub", "aud", "iss"], "verify_exp": False},
            )
        except jwt.PyJWTError as exc:
            raise Unauthenticated("Invalid token") from exc
        try:
            expired = float(payload["exp"]) <= self._clock.time()
        except (TypeError, ValueError) as exc:
            raise Unauthenticated("Invalid token") from exc
        if expired:
            raise Unauthenticated("Token expired")
        try:
            return Claims(
                user_id=uuid.UUID(str(payload["sub"])),
                tenant_id=uuid.UUID(str(payload["tenant"])),
                role=Role(payload["role"]),
                expires_at=float(payload["exp"]),
            )
        except (KeyError, ValueError) as exc:
            raise Unauthenticated("Token lacks a valid tenant, subject or role") from exc
