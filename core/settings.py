"""Typed, frozen settings read once from the environment at the edge (CLI, app factory, tests).

Every environment variable Atrium reads is read here, by ``Settings.from_env``, through ``Environ``:
a bad value raises ``SettingError`` naming the variable and what it expects
(``ATRIUM_TOKEN_TTL must be a whole number of seconds of at least 1, not 'abc'``). Nothing reads the
environment after ``from_env`` returns; everything else receives a ``Settings`` instance.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from core.pgurl import PgUrl, async_url, with_user

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

    Plans not named keep their defaults. Raises ``SettingError`` on anything else.
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
            raise SettingError(f"ATRIUM_RATE_LIMITS: cannot read {item!r} (expected plan=capacity/refill"
                               "[:keycapacity/keyrefill], or off)") from None
    return tuple(plans.values())


class SettingError(ValueError):
    """An environment variable's value is not what its setting expects; the message names the
    variable, what it expects and what it got (never a secret's value)."""


ON, OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")


@dataclass(frozen=True)
class Environ:
    """Typed reads of environment variables: each says what it expects in its error (``SettingError``).

    An unset or empty variable is its default.
    """

    values: Mapping[str, str]

    def text(self, name: str, default: str = "") -> str:
        return self.values.get(name, "").strip() or default

    def optional(self, name: str) -> str | None:
        return self.values.get(name, "").strip() or None

    def whole(self, name: str, default: int, *, minimum: int = 0, unit: str = "") -> int:
        raw = self.text(name)
        if not raw:
            return default
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise SettingError(f"{name} must be a whole number{unit}, at least {minimum}, not {raw!r}")
        return value

    def number(self, name: str, default: float, *, minimum: float = 0.0, unit: str = "") -> float:
        raw = self.text(name)
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not value >= minimum or math.isinf(value):
            raise SettingError(f"{name} must be a number{unit}, at least {minimum:g}, not {raw!r}")
        return value

    def switch(self, name: str, default: bool) -> bool:
        raw = self.text(name).lower()
        if not raw:
            return default
        if raw in ON or raw in OFF:
            return raw in ON
        raise SettingError(f"{name} must be on or off, not {raw!r}")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        raw = self.text(name, default)
        if raw not in choices:
            raise SettingError(f"{name} must be {', '.join(choices[:-1])} or {choices[-1]}, not {raw!r}")
        return raw

    def networks(self, name: str) -> tuple[str, ...]:
        """Comma-separated IP networks (``127.0.0.1/32,10.1.0.0/16``; a bare address is one host)."""
        out: list[str] = []
        for item in filter(None, (part.strip() for part in self.text(name).split(","))):
            try:
                out.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError:
                raise SettingError(f"{name} must be IP networks separated by commas (such as 127.0.0.1/32), "
                                   f"not {item!r}") from None
        return tuple(out)

    def keys(self, name: str) -> str | None:
        """Comma-separated base64 keys of 32 bytes each (the first encrypts, every one decrypts)."""
        raw = self.optional(name)
        if raw is None:
            return None
        for item in raw.split(","):
            try:
                valid = len(base64.b64decode(item.strip(), validate=True)) == 32
            except (binascii.Error, ValueError):
                valid = False
            if not valid:
                raise SettingError(f"{name} must be keys of 32 bytes in base64 (openssl rand -base64 32), "
                                   "separated by commas")
        return raw

    def postgres_url(self, name: str) -> str | None:
        raw = self.optional(name)
        if raw is not None:
            try:
                PgUrl.parse(raw)
            except ValueError as exc:
                raise SettingError(f"{name}: {exc}") from None
        return raw

    def origins(self, name: str) -> tuple[str, ...]:
        """Browser origins, comma- or space-separated (``https://app.example``, ``http://localhost:3000``),
        each as a browser sends it in ``Origin`` (lower case, no default port); or ``*`` alone: any."""
        raw = self.text(name)
        items = [item for item in re.split(r"[\s,]+", raw) if item]
        if items == ["*"]:
            return ("*",)
        found: list[str] = []
        for item in items:
            origin = browser_origin(item)
            if origin is None:
                raise SettingError(f"{name} must be * or origins such as https://app.example or "
                                   f"http://localhost:3000 (scheme, host, optional port; no path), not {item!r}")
            if origin not in found:
                found.append(origin)
        return tuple(found)

    def url(self, name: str, schemes: tuple[str, ...], example: str) -> str | None:
        raw = self.optional(name)
        if raw is not None and (urlsplit(raw).scheme not in schemes or not urlsplit(raw).netloc + urlsplit(raw).path):
            spelled = ", ".join(f"{scheme}://" for scheme in schemes)
            raise SettingError(f"{name} must be a URL such as {example} (one of {spelled})")
        return raw


DEFAULT_PORTS = {"http": 80, "https": 443}


def browser_origin(text: str) -> str | None:
    """``text`` as the origin a browser would send (``https://App.example:443/`` is
    ``https://app.example``), or None when it is not an http(s) origin (a path, a query, a user,
    ``null``)."""
    try:
        parts = urlsplit(text.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme.lower() not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username is not None or parts.password is not None:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    scheme = parts.scheme.lower()
    return f"{scheme}://{host}" + (f":{port}" if port is not None and port != DEFAULT_PORTS[scheme] else "")


def switch(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    """An on/off setting: ``on``/``1``/``true``/``yes`` or ``off``/``0``/``false``/``no``; unset or
    empty is ``default``."""
    return Environ(env).switch(name, default)


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
    db_connect_timeout_seconds: float = 5.0
    """How long opening a database connection (TCP, TLS, startup and authentication) may take before
    it counts as an outage (SERVICE_UNAVAILABLE): a host that silently drops packets otherwise holds
    a request for asyncpg's default of 60 s. A URL's own ``connect_timeout`` (libpq) wins."""
    db_pool_timeout_seconds: float = 5.0
    """How long a request may wait for a pooled connection while all are busy before it is answered
    SERVICE_UNAVAILABLE (SQLAlchemy's default is 30 s)."""
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
    idempotency_ttl_seconds: int = 24 * 3600
    """How long the answer of a mutation sent with an ``Idempotency-Key`` is kept for its retries."""
    max_in_flight: int = 10
    """GraphQL requests over HTTP that one process runs at once (``atrium.http.admission``); by
    default as many as the pool has connections, so that an admitted request never waits for one."""
    tenant_in_flight: int = 5
    """Of those, how many one tenant may run at once (the rest stay free for the other tenants)."""
    busy_tenant_in_flight: int = 1
    """How many one tenant may run at once while the process's CPU is busy and other tenants are
    being served too (``atrium.http.admission``): there more requests in flight add only latency."""
    admission_queue: int = 32
    """Requests that may wait for a place in the process; one more is answered 503 at once."""
    tenant_queue: int = 16
    """Of those, how many one tenant may have waiting."""
    admission_wait_seconds: float = 1.0
    """How long a request may wait for its place before it is answered 503."""
    retry_after_seconds: int = 1
    """What a 503 SERVICE_UNAVAILABLE answer's ``Retry-After`` says."""
    request_read_timeout_seconds: float = 10.0
    """Time a client has, from connecting (or from the first byte of its next request on a kept-alive
    connection), to send a request's headers and body; then the connection is closed (``atrium.http.deadline``)."""
    ws_init_timeout_seconds: float = 10.0
    """Time a WebSocket has to send ``connection_init`` after it is accepted; then it is closed with 4408."""
    plans: bool = True
    """Answer queries through plans pushed down into PostgreSQL (``planner``); ``ATRIUM_PLANS=off``
    runs every query through the executor (the same answers, slower)."""
    webhook_dispatcher: bool = True
    """Send webhook deliveries from this server process (``webhooks.dispatcher``, in the lifespan);
    ``atrium worker`` sends them from a process of its own."""
    webhook_key: str | None = None
    """Keys (base64, 32 bytes; comma-separated, the first encrypts) that encrypt webhook signing
    secrets at rest. Generated once into ``<data_dir>/webhook-key`` outside production; without one
    in production, endpoints cannot be registered."""
    webhook_allowed_networks: tuple[str, ...] = ()
    """Networks endpoints may point at although they are loopback, private or link-local."""
    webhook_timeout_seconds: float = 10.0
    webhook_retry_window_seconds: float = 24 * 3600.0
    """How long a delivery is retried after its first attempt before it fails for good."""
    webhook_backoff_base_seconds: float = 5.0
    webhook_backoff_max_seconds: float = 3600.0
    webhook_concurrency: int = 16
    """Deliveries one process sends at once."""
    webhook_poll_seconds: float = 30.0
    """The longest a dispatcher waits without a notification before it looks for due deliveries
    (retries another process scheduled before it stopped)."""
    tracing: bool = False
    """Record traces and export them over OTLP/HTTP (``atrium.observability.tracing``): on when the
    standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set, unless
    ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``. The exporter reads the other standard
    variables itself (headers, timeout, compression, certificates; ``OTEL_SERVICE_NAME``,
    ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_PROPAGATORS``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``)."""
    trace_tenant: bool = True
    """Spans carry the caller's tenant id (``atrium.tenant.id``); ``ATRIUM_TRACE_TENANT=off`` leaves it out."""
    access_log: bool = True
    """One log line per HTTP request (``atrium.access``); ``ATRIUM_ACCESS_LOG=off`` turns it off."""
    cors_origins: tuple[str, ...] = ()
    """Browser origins other than Atrium's own whose pages may call it (CORS over HTTP, the
    ``Origin`` check of WebSocket handshakes); ``("*",)`` is any origin. Empty: none."""
    cors_credentials: bool = False
    """Let those pages send cookies and HTTP authentication (``Access-Control-Allow-Credentials``).
    Never with ``*`` (``from_env`` refuses it, and so does the app). Bearer tokens in an
    ``Authorization`` header need no credentials mode."""
    graphiql: bool | None = None
    """Serve GraphiQL at ``/graphql`` to browsers; None: on, except in production."""

    @property
    def graphiql_enabled(self) -> bool:
        return self.env != "production" if self.graphiql is None else self.graphiql
    export_secret: str = ""
    """Signs export download links (``ATRIUM_EXPORT_SECRET``; by default the JWT secret)."""
    export_link_ttl_seconds: int = 900
    """How long a download link ``exportJob`` hands out stays valid."""
    export_keep_seconds: int = 7 * 24 * 3600
    """How long a finished export's archive is kept for its one download."""
    export_lease_seconds: int = 60
    """How long a server process's claim on an export lasts unless renewed (every third of it): an
    export whose process died is failed once this has passed (``models.leases``)."""
    retention_interval_seconds: int = 3600
    """How often each server process applies the tenants' retention policies (0: never; then run
    ``atrium retention run`` from a scheduler)."""
    import_resume_interval_seconds: int = 15
    """How often each server process looks for CSV import jobs no process is running (one whose
    server stopped) and resumes them; also once at start (0: only at start)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``).

        In development and test a missing ``ATRIUM_JWT_SECRET`` is generated once and kept in
        ``<data_dir>/jwt-secret`` so that the server and ``atrium token`` agree; in production it
        is required.
        """
        env = Environ(dict(os.environ if environ is None else environ))
        mode = env.choice("ATRIUM_ENV", "development", ("development", "test", "production"))
        data_dir = Path(env.text("ATRIUM_DATA_DIR", ".atrium"))
        secret = env.text("ATRIUM_JWT_SECRET")
        jwks_url = env.url("ATRIUM_JWKS_URL", ("https", "http"), "https://idp.example/.well-known/jwks.json")
        if not secret and not jwks_url:
            if mode == "production":
                raise SettingError("ATRIUM_JWT_SECRET or ATRIUM_JWKS_URL must be set in production")
            secret = _dev_secret(data_dir)
        limits = env.text("ATRIUM_RATE_LIMITS")
        rate_limits = limits.lower() not in OFF
        cors_origins = env.origins("ATRIUM_CORS_ORIGINS")
        cors_credentials = env.switch("ATRIUM_CORS_CREDENTIALS", False)
        if cors_credentials and cors_origins == ("*",):
            raise SettingError("ATRIUM_CORS_CREDENTIALS cannot be on while ATRIUM_CORS_ORIGINS is *: "
                               "list the origins allowed to send credentials")
        return cls(
            env=mode,  # type: ignore[arg-type]
            database_url=env.postgres_url("DATABASE_URL"),
            app_database_url=env.postgres_url("ATRIUM_APP_DATABASE_URL"),
            redis_url=env.url("REDIS_URL", ("redis", "rediss", "unix"), "redis://localhost:6379/0"),
            jwt_secret=secret,
            jwt_audience=env.text("ATRIUM_JWT_AUDIENCE", "atrium"),
            jwt_issuer=env.text("ATRIUM_JWT_ISSUER", "atrium"),
            jwks_url=jwks_url,
            token_ttl_seconds=env.whole("ATRIUM_TOKEN_TTL", 3600, minimum=1, unit=" of seconds"),
            data_dir=data_dir,
            pool_size=env.whole("ATRIUM_DB_POOL_SIZE", 10, minimum=1, unit=" of connections"),
            db_connect_timeout_seconds=env.number("ATRIUM_DB_CONNECT_TIMEOUT", 5.0, minimum=0.1, unit=" of seconds"),
            db_pool_timeout_seconds=env.number("ATRIUM_DB_POOL_TIMEOUT", 5.0, minimum=0.1, unit=" of seconds"),
            redis_prefix=env.text("ATRIUM_REDIS_PREFIX", "atrium:"),
            rate_limits=rate_limits,
            metrics_token=env.optional("ATRIUM_METRICS_TOKEN"),
            plan_limits=parse_plan_limits(limits) if limits and rate_limits else DEFAULT_PLAN_LIMITS,
            batching=env.switch("ATRIUM_BATCHING", False),
            subscriber_queue_size=env.whole("ATRIUM_SUBSCRIBER_QUEUE", 256, minimum=1, unit=" of events"),
            presence_ttl_seconds=env.number("ATRIUM_PRESENCE_TTL", 30.0, minimum=1.0, unit=" of seconds"),
            plans=env.switch("ATRIUM_PLANS", True),
            answer_cache=env.switch("ATRIUM_ANSWER_CACHE", True),
            answer_cache_entries=env.whole("ATRIUM_ANSWER_CACHE_ENTRIES", 10_000, minimum=0, unit=" of entries"),
            answer_cache_bytes=env.whole("ATRIUM_ANSWER_CACHE_BYTES", 64 * 1024 * 1024, minimum=0, unit=" of bytes"),
            idempotency_ttl_seconds=env.whole("ATRIUM_IDEMPOTENCY_TTL", 24 * 3600, minimum=1, unit=" of seconds"),
            webhook_dispatcher=env.switch("ATRIUM_WEBHOOK_DISPATCHER", True),
            webhook_key=env.keys("ATRIUM_WEBHOOK_KEY") or (None if mode == "production" else _dev_key(data_dir)),
            webhook_allowed_networks=env.networks("ATRIUM_WEBHOOK_ALLOWED_NETWORKS"),
            webhook_timeout_seconds=env.number("ATRIUM_WEBHOOK_TIMEOUT", 10.0, minimum=0.1, unit=" of seconds"),
            webhook_retry_window_seconds=env.number("ATRIUM_WEBHOOK_RETRY_WINDOW", 24 * 3600.0, minimum=0.0,
                                                    unit=" of seconds"),
            webhook_backoff_base_seconds=env.number("ATRIUM_WEBHOOK_BACKOFF_BASE", 5.0, minimum=0.001,
                                                    unit=" of seconds"),
            webhook_backoff_max_seconds=env.number("ATRIUM_WEBHOOK_BACKOFF_MAX", 3600.0, minimum=0.001,
                                                   unit=" of seconds"),
            webhook_concurrency=env.whole("ATRIUM_WEBHOOK_CONCURRENCY", 16, minimum=1, unit=" of deliveries"),
            webhook_poll_seconds=env.number("ATRIUM_WEBHOOK_POLL", 30.0, minimum=0.1, unit=" of seconds"),
            **admission_settings(env),
            tracing=tracing_asked(env),
            trace_tenant=env.switch("ATRIUM_TRACE_TENANT", True),
            access_log=env.switch("ATRIUM_ACCESS_LOG", True),
            cors_origins=cors_origins,
            cors_credentials=cors_credentials,
            graphiql=env.switch("ATRIUM_GRAPHIQL", mode != "production"),
            export_secret=env.text("ATRIUM_EXPORT_SECRET", secret),
            export_link_ttl_seconds=env.whole("ATRIUM_EXPORT_LINK_TTL", 900, minimum=1, unit=" of seconds"),
            export_keep_seconds=env.whole("ATRIUM_EXPORT_KEEP", 7 * 24 * 3600, minimum=1, unit=" of seconds"),
            export_lease_seconds=env.whole("ATRIUM_EXPORT_LEASE", 60, minimum=1, unit=" of seconds"),
            retention_interval_seconds=env.whole("ATRIUM_RETENTION_INTERVAL", 3600, minimum=0, unit=" of seconds"),
            import_resume_interval_seconds=env.whole("ATRIUM_IMPORT_RESUME_INTERVAL", 15, minimum=0,
                                                     unit=" of seconds"),
        )

    def with_database(self, database_url: str) -> Settings:
        """The same settings pointed at another admin database URL."""
        return replace(self, database_url=database_url, app_database_url=None)

    @property
    def download_secret(self) -> str:
        """The key export download links are signed with (``export_secret``, else the JWT secret)."""
        key = self.export_secret or self.jwt_secret
        if not key:
            raise RuntimeError("set ATRIUM_EXPORT_SECRET to sign export download links")
        return key

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


def admission_settings(env: Environ) -> dict[str, Any]:
    """The admission bounds and client timeouts of ``Settings`` (README, "Overload"): the in-flight
    bound defaults to the pool size, a tenant's shares to half of it and half of the queue."""
    # As many as the pool has connections: an admitted request never waits for one.
    max_in_flight = env.whole("ATRIUM_MAX_IN_FLIGHT", env.whole("ATRIUM_DB_POOL_SIZE", 10, minimum=1), minimum=1,
                              unit=" of requests")
    queue = env.whole("ATRIUM_ADMISSION_QUEUE", 32, minimum=0, unit=" of requests")
    tenant_in_flight = env.whole("ATRIUM_TENANT_IN_FLIGHT", max(1, max_in_flight // 2), minimum=1,
                                 unit=" of requests")
    return {
        "max_in_flight": max_in_flight,
        "tenant_in_flight": tenant_in_flight,
        "busy_tenant_in_flight": env.whole("ATRIUM_BUSY_TENANT_IN_FLIGHT", max(1, tenant_in_flight // 4), minimum=1,
                                           unit=" of requests"),
        "admission_queue": queue,
        "tenant_queue": env.whole("ATRIUM_TENANT_QUEUE", queue // 2, minimum=0, unit=" of requests"),
        "admission_wait_seconds": env.number("ATRIUM_ADMISSION_WAIT", 1.0, minimum=0.0, unit=" of seconds"),
        "retry_after_seconds": env.whole("ATRIUM_RETRY_AFTER", 1, minimum=1, unit=" of seconds"),
        "request_read_timeout_seconds": env.number("ATRIUM_REQUEST_READ_TIMEOUT", 10.0, minimum=0.1,
                                                   unit=" of seconds"),
        "ws_init_timeout_seconds": env.number("ATRIUM_WS_INIT_TIMEOUT", 10.0, minimum=0.1, unit=" of seconds"),
    }
OTLP_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
OTLP_PROTOCOLS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")


def tracing_asked(env: Environ) -> bool:
    """Whether the standard OpenTelemetry variables ask for traces (``Settings.tracing``); a value
    Atrium cannot honour (another exporter or protocol, an endpoint that is not a URL) is a
    ``SettingError`` rather than traces silently going nowhere."""
    if env.text("OTEL_SDK_DISABLED").lower() == "true":
        return False
    exporters = {e.strip() for e in env.text("OTEL_TRACES_EXPORTER", "otlp").lower().split(",")}
    if exporters == {"none"}:
        return False
    if exporters != {"otlp"}:
        raise SettingError(f"OTEL_TRACES_EXPORTER must be otlp or none, not {env.text('OTEL_TRACES_EXPORTER')!r}")
    for name in OTLP_PROTOCOLS:
        protocol = env.text(name)
        if protocol and protocol != "http/protobuf":
            raise SettingError(f"{name} must be http/protobuf (Atrium exports OTLP over HTTP), not {protocol!r}")
    endpoints = [env.url(name, ("http", "https"), "http://collector:4318") for name in OTLP_ENDPOINTS]
    return any(endpoints)


def app_role_url(admin_url: str) -> str:
    """``admin_url`` with the user switched to the application role (no password: trust/peer or .pgpass);
    everything else (hosts, TLS parameters) as it was."""
    return with_user(admin_url, APP_ROLE)


def _dev_key(data_dir: Path) -> str:
    """The development key of webhook secrets, made once into ``<data_dir>/webhook-key``."""
    path = data_dir / "webhook-key"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    path.write_text(key)
    path.chmod(0o600)
    return key


def _dev_secret(data_dir: Path) -> str:
    path = data_dir / "jwt-secret"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    path.write_text(secret)
    path.chmod(0o600)
    return secret
