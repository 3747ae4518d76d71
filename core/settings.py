"""Typed, frozen settings read once from the environment at the edge (CLI, app factory, tests).

Nothing reads the environment after ``Settings.from_env`` returns; everything else receives a
``Settings`` instance.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from sqlalchemy.engine import make_url

Environment = Literal["development", "test", "production"]

APP_ROLE = "atrium_app"
"""The login role the server uses: owns no table, has no BYPASSRLS (created by the first migration)."""


@dataclass(frozen=True)
class PlanLimits:
    """Rate limits of one plan, as token buckets of operation cost.

    ``tenant_*`` bound the whole tenant, ``key_*`` each of its API keys; a bucket holds at most
    ``capacity`` units and refills ``refill`` units per second. The pseudo-plan ``anonymous`` bounds
    unauthenticated callers per client address (its ``key_*`` values are unused).
    """

    plan: str
    tenant_capacity: int
    tenant_refill: float
    key_capacity: int
    key_refill: float


DEFAULT_PLAN_LIMITS = (
    PlanLimits("free", 20_000, 200.0, 10_000, 100.0),
    PlanLimits("pro", 100_000, 1_000.0, 50_000, 500.0),
    PlanLimits("enterprise", 500_000, 5_000.0, 250_000, 2_500.0),
    PlanLimits("anonymous", 1_000, 10.0, 1_000, 10.0),
)


def parse_plan_limits(text: str) -> tuple[PlanLimits, ...]:
    """``free=5000/100:2500/50,pro=...``: per plan, tenant capacity/refill, then key capacity/refill.

    Plans not named keep their defaults. Raises ``ValueError`` on anything else.
    """
    plans = {p.plan: p for p in DEFAULT_PLAN_LIMITS}
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            name, _, spec = item.partition("=")
            tenant, _, key = spec.partition(":")
            t_cap, t_rate = tenant.split("/")
            k_cap, k_rate = (key or tenant).split("/")
            plans[name.strip()] = PlanLimits(name.strip(), int(t_cap), float(t_rate), int(k_cap), float(k_rate))
        except ValueError:
            raise ValueError(f"ATRIUM_RATE_LIMITS: cannot read {item!r} (expected plan=capacity/refill"
                             "[:keycapacity/keyrefill])") from None
    return tuple(plans.values())


def switch(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    """An on/off setting: ``on``/``1``/``true``/``yes`` or ``off``/``0``/``false``/``no``; unset or
    empty is ``default``."""
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"{name}: expected on or off, not {value!r}")


@dataclass(frozen=True)
class Settings:
    env: Environment = "development"
    database_url: str | None = None
    """Admin URL (table owner / superuser): migrations and CLI administration. None: embedded PostgreSQL."""
    app_database_url: str | None = None
    """URL the server's requests use; defaults to ``database_url`` with the user replaced by ``atrium_app``."""
    redis_url: str | None = None
    jwt_secret: str = ""
    jwt_audience: str = "atrium"
    jwt_issuer: str = "atrium"
    jwks_url: str | None = None
    token_ttl_seconds: int = 3600
    data_dir: Path = field(default_factory=lambda: Path(".atrium"))
    pool_size: int = 10
    max_page_size: int = 100
    redis_prefix: str = "atrium:"
    """Prefix of every Redis key Atrium writes (rate-limit buckets, the APQ cache)."""
    rate_limits: bool = True
    plan_limits: tuple[PlanLimits, ...] = DEFAULT_PLAN_LIMITS
    batching: bool = False
    """Accept a JSON array of operations in one POST (GraphQL-over-HTTP batching); off by default."""
    max_batch: int = 10
    apq_max_documents: int = 10_000
    apq_ttl_seconds: int = 7 * 24 * 3600
    apq_max_bytes: int = 32 * 1024
    """Automatic persisted queries larger than this run but are not stored."""
    subscriber_queue_size: int = 256
    """Events a subscriber may fall behind by before its subscription ends (SUBSCRIBER_TOO_SLOW)."""
    presence_ttl_seconds: float = 30.0
    """A presence entry not refreshed for this long (its process died) disappears."""
    metrics_token: str | None = None
    """Bearer token ``/metrics`` requires; without one, production does not serve metrics."""
    answer_cache: bool = True
    """Cache answers of planned queries until a write (``planner.answers``): persisted documents by
    default, others when asked (``Atrium-Cache: on``). ``ATRIUM_ANSWER_CACHE=off`` turns it off."""
    answer_cache_entries: int = 10_000
    answer_cache_bytes: int = 64 * 1024 * 1024
    """Bounds of each process's own copy of cached answers."""
    answer_cache_ttl_seconds: int = 3600
    """How long Redis keeps an answer after it was stored (answers of old data versions are never
    asked for again; this is when they go)."""
    plans: bool = True
    """Answer queries through plans pushed down into PostgreSQL (``planner``); ``ATRIUM_PLANS=off``
    runs every query through the executor (the same answers, slower)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``).

        In development and test a missing ``ATRIUM_JWT_SECRET`` is generated once and kept in
        ``<data_dir>/jwt-secret`` so that the server and ``atrium token`` agree; in production it
        is required.
        """
        env = dict(os.environ if environ is None else environ)
        mode = env.get("ATRIUM_ENV", "development")
        if mode not in ("development", "test", "production"):
            raise ValueError(f"ATRIUM_ENV must be development, test or production, not {mode!r}")
        data_dir = Path(env.get("ATRIUM_DATA_DIR", ".atrium"))
        secret = env.get("ATRIUM_JWT_SECRET", "")
        jwks_url = env.get("ATRIUM_JWKS_URL") or None
        if not secret and not jwks_url:
            if mode == "production":
                raise ValueError("ATRIUM_JWT_SECRET or ATRIUM_JWKS_URL must be set in production")
            secret = _dev_secret(data_dir)
        return cls(
            env=mode,  # type: ignore[arg-type]
            database_url=env.get("DATABASE_URL") or None,
            app_database_url=env.get("ATRIUM_APP_DATABASE_URL") or None,
            redis_url=env.get("REDIS_URL") or None,
            jwt_secret=secret,
            jwt_audience=env.get("ATRIUM_JWT_AUDIENCE", "atrium"),
            jwt_issuer=env.get("ATRIUM_JWT_ISSUER", "atrium"),
            jwks_url=jwks_url,
            token_ttl_seconds=int(env.get("ATRIUM_TOKEN_TTL", "3600")),
            data_dir=data_dir,
            pool_size=int(env.get("ATRIUM_DB_POOL_SIZE", "10")),
            redis_prefix=env.get("ATRIUM_REDIS_PREFIX", "atrium:"),
            rate_limits=env.get("ATRIUM_RATE_LIMITS", "").strip().lower() != "off",  # or plan limits
            metrics_token=env.get("ATRIUM_METRICS_TOKEN") or None,
            plan_limits=parse_plan_limits(limits) if (limits := env.get("ATRIUM_RATE_LIMITS", "").strip())
            and limits.lower() != "off" else DEFAULT_PLAN_LIMITS,
            batching=switch(env, "ATRIUM_BATCHING", default=False),
            subscriber_queue_size=int(env.get("ATRIUM_SUBSCRIBER_QUEUE", "256")),
            presence_ttl_seconds=float(env.get("ATRIUM_PRESENCE_TTL", "30")),
            plans=switch(env, "ATRIUM_PLANS", default=True),
            answer_cache=switch(env, "ATRIUM_ANSWER_CACHE", default=True),
            answer_cache_entries=int(env.get("ATRIUM_ANSWER_CACHE_ENTRIES", "10000")),
            answer_cache_bytes=int(env.get("ATRIUM_ANSWER_CACHE_BYTES", str(64 * 1024 * 1024))),
        )

    def with_database(self, database_url: str) -> Settings:
        """The same settings pointed at another admin database URL."""
        return replace(self, database_url=database_url, app_database_url=None)

    @property
    def admin_url(self) -> str:
        if self.database_url is None:
            raise RuntimeError("database_url is not resolved yet (embedded PostgreSQL not started)")
        return async_url(self.database_url)

    @property
    def app_url(self) -> str:
        if self.app_database_url:
            return async_url(self.app_database_url)
        return app_role_url(self.admin_url)


def async_url(url: str) -> str:
    """Normalise a PostgreSQL URL to the SQLAlchemy asyncpg dialect."""
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    return parsed.render_as_string(hide_password=False)


def app_role_url(admin_url: str) -> str:
    """``admin_url`` with the user switched to the application role (no password: trust/peer or .pgpass)."""
    return make_url(admin_url).set(username=APP_ROLE, password=None).render_as_string(hide_password=False)


def _dev_secret(data_dir: Path) -> str:
    path = data_dir / "jwt-secret"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    path.write_text(secret)
    path.chmod(0o600)
    return secret
