"""Every table of Atrium as SQLModel classes (the schema the migrations create).

Tenant tables derive from ``TenantTable``: ``tenant_id`` leads the primary key and every index,
foreign keys between tenant tables include ``tenant_id`` so they cannot cross tenants, and each row
carries a ``version`` (optimistic concurrency) and timezone-aware UTC timestamps. Queries use the
``__table__`` of these classes with SQLAlchemy Core; there are no ORM relationships.
"""

from __future__ import annotations

import enum
import json
import uuid
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    CHAR,
    BigInteger,
    CheckConstraint,
    Column,
    Computed,
    DateTime,
    ForeignKeyConstraint,
    Identity,
    LargeBinary,
    Numeric,
    SmallInteger,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    cast,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class Plan(enum.StrEnum):
    FREE = "free"
    PRO = "pro"
    ENTERPRISE = "enterprise"


class Isolation(enum.StrEnum):
    SHARED = "shared"
    DEDICATED = "dedicated"


class Role(enum.StrEnum):
    """A member's role, lowest first: each role may do what the ones before it may."""

    VIEWER = "viewer"
    MEMBER = "member"
    ADMIN = "admin"
    OWNER = "owner"

    @property
    def rank(self) -> int:
        """0 for VIEWER up to 3 for OWNER."""
        return ROLE_RANK[self]


ROLE_RANK = {role: rank for rank, role in enumerate(Role)}


class DealStatus(enum.StrEnum):
    OPEN = "open"
    WON = "won"
    LOST = "lost"


class ActivityKind(enum.StrEnum):
    NOTE = "note"
    CALL = "call"
    EMAIL = "email"
    MEETING = "meeting"
    TASK = "task"


def external_id_key(table: str) -> UniqueConstraint:
    """The tenant-unique constraint of a table's ``external_id`` (NULLs never collide)."""
    return UniqueConstraint("tenant_id", "external_id", name=f"{table}_external_id_key")


def _external_id() -> Any:
    """A client's own key of the record (its id in another system), unique in the tenant; optional."""
    return Field(default=None, max_length=200)


class ExactJSONB(TypeDecorator[Any]):
    """JSONB whose numbers are exact: written from ``Decimal`` as JSON numbers, read back as ``Decimal``
    (integers too), never through ``float`` (the driver's jsonb codec would: a selected column
    of this type is read as its text). Custom field values are stored in it."""

    impl = JSONB
    cache_ok = True

    def bind_processor(self, dialect: Any) -> Any:
        return lambda value: None if value is None else exact_dumps(value)

    def column_expression(self, column: Any) -> Any:
        return type_coerce(cast(column, Text), self)

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        if not isinstance(value, str):
            return value
        return {} if value == "{}" else _EXACT.decode(value)  # most records hold no custom field


_EXACT = json.JSONDecoder(parse_float=Decimal, parse_int=Decimal)
"""One decoder for every value (``json.loads`` with options builds one per call)."""


def exact_dumps(value: Any) -> str:
    """Compact JSON text of ``value`` with ``Decimal`` as a plain JSON number (no exponent)."""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{exact_dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(exact_dumps(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _custom_fields() -> Any:
    """Custom field values of a record (``records.custom``): custom field key -> JSON value."""
    return Field(default_factory=dict, sa_column=Column(ExactJSONB, nullable=False, server_default="{}"))


def _ts(**kw: Any) -> Any:
    return Field(default_factory=utcnow, sa_type=DateTime(timezone=True), nullable=False, **kw)


class Tenant(SQLModel, table=True):
    __tablename__ = "tenants"
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    slug: str = Field(unique=True, max_length=63)
    name: str = Field(max_length=200)
    plan: str = Field(default=Plan.FREE.value)
    isolation: str = Field(default=Isolation.SHARED.value)
    database_url: str | None = Field(default=None, sa_type=Text)
    created_at: datetime = _ts()
    trash_retention_days: int = 30
    """How long a record stays in the trash before a purge removes it (migration 0012)."""


class User(SQLModel, table=True):
    """A person; global (one user may belong to several tenants through memberships)."""

    __tablename__ = "users"
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    email: str = Field(max_length=320)
    name: str = Field(max_length=200)
    password_hash: str | None = Field(default=None, sa_type=Text)
    created_at: datetime = _ts()


class TenantTable(SQLModel):
    tenant_id: uuid.UUID = Field(primary_key=True, foreign_key="tenants.id", ondelete="CASCADE")
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    version: int = Field(default=1)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class Trashable(TenantTable):
    """A tenant table whose rows can be in the trash (migration 0012): ``deleted_at`` and
    ``deleted_by`` say when and by whom; ``trash_batch`` is the id of the record whose delete moved
    the row (its own id, or the parent's it went with). Row-level security hides trashed rows unless
    the transaction shows the trash (``models.db.showing_trash``)."""

    deleted_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    deleted_by: uuid.UUID | None = None
    trash_batch: uuid.UUID | None = None


class Membership(TenantTable, table=True):
    __tablename__ = "memberships"
    __table_args__ = (
        ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
    )
    user_id: uuid.UUID
    role: str = Field(default=Role.MEMBER.value)


class Company(Trashable, table=True):
    __tablename__ = "companies"
    __table_args__ = (external_id_key("companies"),)
    name: str = Field(max_length=200)
    domain: str | None = Field(default=None, max_length=253)
    external_id: str | None = _external_id()
    custom_fields: dict[str, Any] = _custom_fields()


class Contact(Trashable, table=True):
    __tablename__ = "contacts"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "company_id"], ["companies.tenant_id", "companies.id"]),
        external_id_key("contacts"),
    )
    company_id: uuid.UUID | None = None
    first_name: str = Field(max_length=100)
    last_name: str = Field(max_length=100)
    email: str | None = Field(default=None, max_length=320)
    phone: str | None = Field(default=None, max_length=40)
    title: str | None = Field(default=None, max_length=200)
    external_id: str | None = _external_id()
    custom_fields: dict[str, Any] = _custom_fields()


class Pipeline(TenantTable, table=True):
    __tablename__ = "pipelines"
    __table_args__ = (external_id_key("pipelines"),)
    name: str = Field(max_length=200)
    external_id: str | None = _external_id()


class Stage(TenantTable, table=True):
    __tablename__ = "stages"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "pipeline_id"], ["pipelines.tenant_id", "pipelines.id"], ondelete="CASCADE"),
        CheckConstraint("probability >= 0 and probability <= 1", name="stages_probability_range"),
        external_id_key("stages"),
    )
    pipeline_id: uuid.UUID
    name: str = Field(max_length=100)
    position: int
    probability: Decimal = Field(sa_column=Column(Numeric(5, 4), nullable=False))
    external_id: str | None = _external_id()


class Deal(Trashable, table=True):
    __tablename__ = "deals"
    __table_args__ = (
        ForeignKeyConstraint(
            ["tenant_id", "pipeline_id", "stage_id"], ["stages.tenant_id", "stages.pipeline_id", "stages.id"]
        ),
        ForeignKeyConstraint(["tenant_id", "company_id"], ["companies.tenant_id", "companies.id"]),
        ForeignKeyConstraint(["tenant_id", "contact_id"], ["contacts.tenant_id", "contacts.id"]),
        ForeignKeyConstraint(["tenant_id", "owner_id"], ["memberships.tenant_id", "memberships.user_id"]),
        CheckConstraint("amount >= 0", name="deals_amount_non_negative"),
        external_id_key("deals"),
    )
    title: str = Field(max_length=200)
    amount: Decimal = Field(sa_column=Column(Numeric(18, 2), nullable=False))
    currency: str = Field(sa_column=Column(CHAR(3), nullable=False))
    pipeline_id: uuid.UUID
    stage_id: uuid.UUID
    company_id: uuid.UUID | None = None
    contact_id: uuid.UUID | None = None
    owner_id: uuid.UUID | None = None
    expected_close_date: date | None = None
    status: str = Field(default=DealStatus.OPEN.value)
    external_id: str | None = _external_id()
    custom_fields: dict[str, Any] = _custom_fields()


class Activity(Trashable, table=True):
    __tablename__ = "activities"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "deal_id"], ["deals.tenant_id", "deals.id"], ondelete="CASCADE"),
        ForeignKeyConstraint(["tenant_id", "contact_id"], ["contacts.tenant_id", "contacts.id"], ondelete="CASCADE"),
        ForeignKeyConstraint(["tenant_id", "company_id"], ["companies.tenant_id", "companies.id"], ondelete="CASCADE"),
        ForeignKeyConstraint(["tenant_id", "actor_id"], ["memberships.tenant_id", "memberships.user_id"]),
        external_id_key("activities"),
    )
    kind: str
    subject: str = Field(max_length=200)
    body: str | None = Field(default=None, sa_type=Text)
    deal_id: uuid.UUID | None = None
    contact_id: uuid.UUID | None = None
    company_id: uuid.UUID | None = None
    actor_id: uuid.UUID | None = None
    occurred_at: datetime = _ts()
    due_date: date | None = None
    done: bool = False
    external_id: str | None = _external_id()


class AuditEvent(SQLModel, table=True):
    __tablename__ = "audit_events"
    tenant_id: uuid.UUID = Field(primary_key=True, foreign_key="tenants.id", ondelete="CASCADE")
    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    occurred_at: datetime = _ts()
    actor_id: uuid.UUID | None = None
    action: str
    entity_type: str
    entity_id: uuid.UUID
    diff: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSONB, nullable=False))
    request_id: str | None = None
    # The hash chain (migration 0009, ``models.audit_chain``): set by the database's insert trigger,
    # whatever a writer gives; ``salt`` is None once the diff has been redacted (an erasure).
    seq: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=False))
    salt: bytes | None = Field(default=None, sa_type=LargeBinary)
    diff_sha256: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=False))
    prev_hash: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=False))
    hash: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=False))


class AuditChainHead(SQLModel, table=True):
    """Where a tenant's audit chain ends (``seq``, ``hash``) and where its verification starts (the
    anchor: the last row retention deleted, or 0 and 32 zero bytes). Written only by the database's
    audit trigger and retention function (migrations 0009, 0010)."""

    __tablename__ = "audit_chain_heads"
    tenant_id: uuid.UUID = Field(primary_key=True, foreign_key="tenants.id", ondelete="CASCADE")
    seq: int = Field(sa_type=BigInteger)
    hash: bytes = Field(sa_type=LargeBinary)
    anchor_seq: int = Field(default=0, sa_type=BigInteger)
    anchor_hash: bytes = Field(default=bytes(32), sa_type=LargeBinary)
    updated_at: datetime = _ts()


def table(model: type[SQLModel]) -> Table:
    """The Core ``Table`` behind a SQLModel class (typed accessor for ``__table__``)."""
    t = model.__table__  # type: ignore[attr-defined]
    assert isinstance(t, Table)
    return t


TENANTS = table(Tenant)
USERS = table(User)
MEMBERSHIPS = table(Membership)
COMPANIES = table(Company)
CONTACTS = table(Contact)
PIPELINES = table(Pipeline)
STAGES = table(Stage)
DEALS = table(Deal)
ACTIVITIES = table(Activity)
AUDIT_EVENTS = table(AuditEvent)
AUDIT_CHAIN_HEADS = table(AuditChainHead)


class Note(Trashable, table=True):
    """A collaborative note on exactly one deal, contact or company.

    ``state`` is the compacted Yjs document (``pycrdt`` update encoding of the whole document); the
    note's text is the document's ``Text`` named ``"body"``. ``version`` counts applied updates.
    """

    __tablename__ = "notes"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "deal_id"], ["deals.tenant_id", "deals.id"], ondelete="CASCADE"),
        ForeignKeyConstraint(["tenant_id", "contact_id"], ["contacts.tenant_id", "contacts.id"], ondelete="CASCADE"),
        ForeignKeyConstraint(["tenant_id", "company_id"], ["companies.tenant_id", "companies.id"], ondelete="CASCADE"),
        CheckConstraint("num_nonnulls(deal_id, contact_id, company_id) = 1", name="notes_one_parent"),
    )
    deal_id: uuid.UUID | None = None
    contact_id: uuid.UUID | None = None
    company_id: uuid.UUID | None = None
    state: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


NOTES = table(Note)


class Product(TenantTable, table=True):
    """Something a tenant sells, at a list price in one currency; its SKU is unique in the tenant."""

    __tablename__ = "products"
    __table_args__ = (
        UniqueConstraint("tenant_id", "sku", name="products_sku_key"),
        CheckConstraint("unit_price >= 0", name="products_unit_price_non_negative"),
        external_id_key("products"),
    )
    name: str = Field(max_length=200)
    sku: str = Field(max_length=64)
    unit_price: Decimal = Field(sa_column=Column(Numeric(18, 2), nullable=False))
    currency: str = Field(sa_column=Column(CHAR(3), nullable=False))
    active: bool = True
    external_id: str | None = _external_id()


LINE_TOTAL = "round(quantity * unit_price * (100 - discount_percent) / 100, 2)"


class DealLineItem(Trashable, table=True):
    """A quantity of one product on one deal, at a unit price in the deal's currency, less a discount.

    ``line_total`` is computed by PostgreSQL (a stored generated column), so every reader agrees.
    """

    __tablename__ = "deal_line_items"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "deal_id"], ["deals.tenant_id", "deals.id"], ondelete="CASCADE"),
        ForeignKeyConstraint(["tenant_id", "product_id"], ["products.tenant_id", "products.id"]),
        CheckConstraint("quantity > 0", name="deal_line_items_quantity_positive"),
        CheckConstraint("discount_percent >= 0 AND discount_percent <= 100", name="deal_line_items_discount_range"),
        external_id_key("deal_line_items"),
    )
    deal_id: uuid.UUID
    product_id: uuid.UUID
    quantity: int
    unit_price: Decimal = Field(sa_column=Column(Numeric(18, 2), nullable=False))
    discount_percent: Decimal = Field(sa_column=Column(Numeric(5, 2), nullable=False, server_default="0"))
    currency: str = Field(sa_column=Column(CHAR(3), nullable=False))
    line_total: Decimal = Field(sa_column=Column(Numeric(18, 2), Computed(LINE_TOTAL, persisted=True)))
    external_id: str | None = _external_id()


PRODUCTS = table(Product)
DEAL_LINE_ITEMS = table(DealLineItem)


class ApiKey(TenantTable, table=True):
    """A credential for a partner integration, acting for ``created_by`` with at most their role.

    Only ``secret_sha256`` (SHA-256 of the secret, hex) is stored; ``prefix`` is public and unique
    across tenants because a key is looked up by it before its tenant is known.
    """

    __tablename__ = "api_keys"
    prefix: str = Field(max_length=16)
    secret_sha256: str = Field(sa_column=Column(CHAR(64), nullable=False))
    name: str = Field(max_length=100)
    role: str = Field(default=Role.VIEWER.value)
    persisted_only: bool = False
    client: str | None = Field(default=None, max_length=100)
    created_by: uuid.UUID
    expires_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    revoked_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    last_used_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))


class PersistedDocument(TenantTable, table=True):
    """A trusted document (one operation) of a client's manifest; ``document_id`` is the manifest's id."""

    __tablename__ = "persisted_documents"
    client: str = Field(max_length=100)
    document_id: str = Field(max_length=200)
    sha256: str = Field(sa_column=Column(CHAR(64), nullable=False))
    name: str | None = Field(default=None, max_length=200)
    operation_type: str
    body: str = Field(sa_type=Text)
    created_by: uuid.UUID | None = None


class ApqDocument(SQLModel, table=True):
    """The automatic-persisted-query cache when there is no Redis: global, reached only via functions."""

    __tablename__ = "apq_documents"
    sha256: str = Field(sa_column=Column(CHAR(64), primary_key=True))
    document: str = Field(sa_type=Text)
    created_at: datetime = _ts()
    last_used_at: datetime = _ts()


class DataVersion(SQLModel, table=True):
    """How many writes a tenant's table has seen: bumped by triggers in every write's transaction
    (migration 0005), read by ``atrium_enter``; answers are cached under them (``planner.answers``)."""

    __tablename__ = "data_versions"
    tenant_id: uuid.UUID = Field(primary_key=True)
    table_name: str = Field(sa_column=Column(Text, primary_key=True))
    version: int = Field(sa_type=BigInteger)


class IdempotencyKey(TenantTable, table=True):
    """The stored answer of a mutation sent with an ``Idempotency-Key`` (``atrium.http.idempotency``),
    written in the transaction of its change, replayed to its retries until ``expires_at``.

    ``principal`` is who sent it (``user:<id>`` or ``key:<api key id>``): a key is scoped to its
    tenant and principal; ``fingerprint`` is the SHA-256 of the request's parameters.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("tenant_id", "principal", "key", name="idempotency_keys_key"),)
    principal: str = Field(max_length=64)
    key: str = Field(max_length=255)
    fingerprint: str = Field(sa_column=Column(CHAR(64), nullable=False))
    status: int = Field(sa_type=SmallInteger)
    body: str = Field(sa_type=Text)
    expires_at: datetime = Field(sa_type=DateTime(timezone=True))


class WebhookEndpoint(TenantTable, table=True):
    """Where a tenant wants its events POSTed (``webhooks``): a URL, the event types it wants and an
    optional filter on their data. ``secret`` is the signing secret encrypted with AES-256-GCM under
    the server's webhook key (``webhooks.signing``); the secret itself is shown once, on creation.
    An endpoint that keeps failing is disabled (``enabled`` false, ``disabled_reason``)."""

    __tablename__ = "webhook_endpoints"
    url: str = Field(sa_type=Text)
    description: str | None = Field(default=None, max_length=200)
    event_types: list[str] = Field(sa_column=Column(ARRAY(Text), nullable=False))
    filter: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONB, nullable=True))
    secret: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    enabled: bool = True
    disabled_reason: str | None = Field(default=None, sa_type=Text)
    disabled_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    failing_since: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    """When the endpoint's current run of failed attempts began (None after a success)."""
    created_by: uuid.UUID | None = None


class WebhookDelivery(TenantTable, table=True):
    """One message for one endpoint: the outbox row, written in the transaction of the change.

    ``body`` is the exact JSON text sent (and signed) on every attempt; ``message_id`` is its
    ``webhook-id`` (shared by the endpoints that get the same event, and by replays). ``seq`` orders
    the deliveries of one record (``ordering_key``) to one endpoint: one is sent only once every
    earlier pending one has been delivered or has failed.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "endpoint_id"], ["webhook_endpoints.tenant_id", "webhook_endpoints.id"],
                             ondelete="CASCADE"),
        CheckConstraint("status IN ('pending', 'delivered', 'failed')", name="webhook_deliveries_status"),
    )
    seq: int = Field(sa_column=Column(BigInteger, Identity(always=True), nullable=False))
    endpoint_id: uuid.UUID
    message_id: uuid.UUID
    event_type: str = Field(max_length=100)
    ordering_key: uuid.UUID
    body: str = Field(sa_type=Text)
    status: str = Field(default="pending", max_length=10)
    attempts: int = 0
    next_attempt_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    """None: as soon as possible."""
    first_attempt_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    last_attempt_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    response_status: int | None = Field(default=None, sa_type=SmallInteger)
    latency_ms: int | None = None
    last_error: str | None = Field(default=None, sa_type=Text)
    delivered_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    replay_of: uuid.UUID | None = None
    traceparent: str | None = Field(default=None, sa_type=Text)
    """The W3C ``traceparent`` of the change that wrote the delivery, sent with every attempt."""


class ExportJob(TenantTable, table=True):
    """A tenant's export (``resolvers.exports``): its progress, then its archive (``export_chunks``),
    downloadable once through a signed link until ``expires_at``."""

    __tablename__ = "export_jobs"
    requested_by: uuid.UUID | None = None
    status: str = Field(default="pending")
    rows_done: int = Field(default=0, sa_type=BigInteger)
    rows_total: int = Field(default=0, sa_type=BigInteger)
    archive_bytes: int = Field(default=0, sa_type=BigInteger)
    sha256: str | None = Field(default=None, sa_column=Column(CHAR(64)))
    error: str | None = Field(default=None, sa_type=Text)
    started_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    finished_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    expires_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    downloaded_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    lease_owner: uuid.UUID | None = None
    """The server process running (or about to run) the job (``models.leases``; migration 0014)."""
    lease_expires_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    """Until when that process's claim holds; renewed while it lives. Expired while pending or
    running: the process died, and the job is failed by the next process to notice."""


class ExportChunk(TenantTable, table=True):
    """Part ``n`` (from 0) of an export's zip archive."""

    __tablename__ = "export_chunks"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "job_id"], ["export_jobs.tenant_id", "export_jobs.id"], ondelete="CASCADE"),
        UniqueConstraint("tenant_id", "job_id", "n"),
    )
    job_id: uuid.UUID
    n: int
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class ImportJob(TenantTable, table=True):
    """A CSV import into one record type (``resolvers.imports``): its mapping, state and progress;
    ``processed`` is the checkpoint (rows committed), advanced with the rows it covers."""

    __tablename__ = "import_jobs"
    requested_by: uuid.UUID | None = None
    record_type: str = Field(max_length=64)
    mapping: dict[str, Any] = Field(sa_column=Column(JSONB, nullable=False))
    dry_run: bool = False
    state: str = Field(default="queued")
    total: int = 0
    processed: int = 0
    created_count: int = 0
    updated_count: int = 0
    error_count: int = 0
    file_bytes: int = Field(default=0, sa_type=BigInteger)
    error: str | None = Field(default=None, sa_type=Text)
    started_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))
    finished_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))


class ImportFile(TenantTable, table=True):
    """The uploaded CSV of an import job, kept until the job ends (any process can resume it)."""

    __tablename__ = "import_files"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "job_id"], ["import_jobs.tenant_id", "import_jobs.id"], ondelete="CASCADE"),
    )
    job_id: uuid.UUID
    content: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class ImportRowError(TenantTable, table=True):
    """One refused row of an import job: row number (1 = the first row after the header), CSV column,
    field, error code and message."""

    __tablename__ = "import_errors"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "job_id"], ["import_jobs.tenant_id", "import_jobs.id"], ondelete="CASCADE"),
    )
    job_id: uuid.UUID
    row_number: int
    column_name: str | None = Field(default=None, sa_type=Text)
    field: str | None = Field(default=None, max_length=200)
    code: str = Field(max_length=64)
    message: str = Field(sa_type=Text)


class RetentionPolicy(TenantTable, table=True):
    """Keep ``target``'s rows (a ``models.retention`` target) for ``keep_days`` days."""

    __tablename__ = "retention_policies"
    __table_args__ = (UniqueConstraint("tenant_id", "target", name="retention_policies_target_key"),)
    target: str = Field(max_length=64)
    keep_days: int


class FieldRule(TenantTable, table=True):
    """Fields of a record type hidden from some roles (``auth.fields``): ``record_type`` is the
    record's GraphQL type name, ``field`` the API's name of one of its declared restrictable fields
    or ``custom.<key>`` for a custom field (``records.custom.rule_name``), ``hidden_from`` the roles
    that neither read nor write it."""

    __tablename__ = "field_rules"
    __table_args__ = (UniqueConstraint("tenant_id", "record_type", "field", name="field_rules_field_key"),)
    record_type: str = Field(max_length=100)
    field: str = Field(max_length=100)
    hidden_from: list[str] = Field(sa_column=Column(ARRAY(Text), nullable=False))
    created_by: uuid.UUID | None = None


FIELD_RULES = table(FieldRule)


class Team(TenantTable, table=True):
    """A group of members with an optional manager (``docs/visibility.md``): a record of a type whose
    audience is ``team`` is seen by its owner's teams and their managers."""

    __tablename__ = "teams"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name", name="teams_name_key"),
        ForeignKeyConstraint(["tenant_id", "manager_id"], ["memberships.tenant_id", "memberships.user_id"]),
    )
    name: str = Field(max_length=100)
    manager_id: uuid.UUID | None = None


class TeamMember(TenantTable, table=True):
    """One member of one team (migration 0016)."""

    __tablename__ = "team_members"
    __table_args__ = (
        UniqueConstraint("tenant_id", "team_id", "user_id", name="team_members_key"),
        ForeignKeyConstraint(["tenant_id", "team_id"], ["teams.tenant_id", "teams.id"], ondelete="CASCADE"),
        ForeignKeyConstraint(["tenant_id", "user_id"], ["memberships.tenant_id", "memberships.user_id"],
                             ondelete="CASCADE"),
    )
    team_id: uuid.UUID
    user_id: uuid.UUID


class RecordVisibility(TenantTable, table=True):
    """Who sees the records of one owned type in a tenant: ``workspace`` (the default, also for a type
    without a row) or ``team`` (owner, owner's teams, their managers, admins and owners)."""

    __tablename__ = "record_visibility"
    __table_args__ = (UniqueConstraint("tenant_id", "record_type", name="record_visibility_type_key"),)
    record_type: str = Field(max_length=64)
    audience: str = Field(max_length=16)


TEAMS = table(Team)
TEAM_MEMBERS = table(TeamMember)
RECORD_VISIBILITY = table(RecordVisibility)


class CustomFieldDefinition(TenantTable, table=True):
    """A custom field a tenant defines on one record type (``records.custom``): ``key`` is what
    values, filters and orderings name (fixed once created), ``label`` what forms show (renamable).
    A deleted definition (``deleted_at``) hides its values and keeps its key taken until a purge
    removes the values and the definition for good."""

    __tablename__ = "custom_field_definitions"
    __table_args__ = (UniqueConstraint("tenant_id", "record_type", "key", name="custom_field_definitions_key"),)
    record_type: str = Field(max_length=40)
    key: str = Field(max_length=40)
    label: str = Field(max_length=200)
    type: str = Field(max_length=20)
    required: bool = False
    options: list[str] = Field(default_factory=list, sa_column=Column(ARRAY(Text), nullable=False))
    default_value: Any = Field(default=None, sa_column=Column(ExactJSONB, nullable=True))
    position: int = 0
    deleted_at: datetime | None = Field(default=None, sa_type=DateTime(timezone=True))


CUSTOM_FIELD_DEFINITIONS = table(CustomFieldDefinition)
EXPORT_JOBS = table(ExportJob)
EXPORT_CHUNKS = table(ExportChunk)
RETENTION_POLICIES = table(RetentionPolicy)
IMPORT_JOBS = table(ImportJob)
IMPORT_FILES = table(ImportFile)
IMPORT_ERRORS = table(ImportRowError)
API_KEYS = table(ApiKey)
PERSISTED_DOCUMENTS = table(PersistedDocument)
APQ_DOCUMENTS = table(ApqDocument)
DATA_VERSIONS = table(DataVersion)
IDEMPOTENCY_KEYS = table(IdempotencyKey)
WEBHOOK_ENDPOINTS = table(WebhookEndpoint)
WEBHOOK_DELIVERIES = table(WebhookDelivery)

TENANT_TABLES = (MEMBERSHIPS, COMPANIES, CONTACTS, PIPELINES, STAGES, DEALS, ACTIVITIES, AUDIT_EVENTS, NOTES,
                 API_KEYS, PERSISTED_DOCUMENTS, PRODUCTS, DEAL_LINE_ITEMS, IDEMPOTENCY_KEYS, WEBHOOK_ENDPOINTS,
                 WEBHOOK_DELIVERIES, EXPORT_JOBS, EXPORT_CHUNKS, RETENTION_POLICIES, FIELD_RULES, TEAMS,
                 TEAM_MEMBERS, RECORD_VISIBILITY, CUSTOM_FIELD_DEFINITIONS, IMPORT_JOBS, IMPORT_FILES, IMPORT_ERRORS)
"""Every table holding tenant rows (RLS enabled and forced on each; tests/test_rls.py checks the catalog)."""

DATABASE_WRITTEN_TABLES = (DATA_VERSIONS, AUDIT_CHAIN_HEADS)
"""Tables holding tenant rows that only the database's own triggers and functions write (RLS enabled
and forced, read-only to the application role); not record tables, so not in ``TENANT_TABLES``."""

