"""The long-lived resources of one app instance, owned by its lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from atrium.http.ratelimit import RateLimiter
from atrium.observability.metrics import Metrics
from auth.tokens import TokenVerifier
from core.settings import Settings
from models.db import Databases
from partners.documents import ApqStore
from partners.keys import ApiKeys
from subscriptions.broker import Broker


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    databases: Databases
    broker: Broker
    verifier: TokenVerifier
    api_keys: ApiKeys
    apq: ApqStore
    limiter: RateLimiter | None
    """None when rate limits are off (``ATRIUM_RATE_LIMITS=off``)."""
    metrics: Metrics
