"""The long-lived resources of one app instance, owned by its lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from atrium.metrics import Metrics
from atrium.persisted import ApqStore
from atrium.ratelimit import RateLimiter
from atrium.settings import Settings
from auth.api_keys import ApiKeys
from auth.tokens import TokenVerifier
from models.db import Databases
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
