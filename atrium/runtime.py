"""The long-lived resources of one app instance, owned by its lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from atrium.settings import Settings
from auth.tokens import TokenVerifier
from models.db import Databases
from subscriptions.broker import Broker


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    databases: Databases
    broker: Broker
    verifier: TokenVerifier
