"""Realistic, deterministic demo tenants, bulk-loaded with COPY.

``seed_tenant`` (re)creates one tenant with users, companies, contacts, two pipelines, a product
catalogue, deals, their activities and (for a quarter of the deals) their line items, whose total is
then the deal's amount as the API derives it; ``seed_demo`` does it for several tenants. Both
connect to the *admin* URL (a superuser or the table owner, which bypasses row-level security), so
no ``app.tenant_id`` is set.

Contracts:

* Repeatable: an existing tenant with the same slug is deleted first (with all of its rows) and the
  whole tenant is written in one transaction, so a failed seed leaves the previous state intact.
* Deterministic: every value except the tenant id and the timestamps comes from
  ``random.Random(seed ^ zlib.crc32(slug))``; timestamps and dates are spread relative to the moment
  of seeding (created over the past year, expected close dates within +-180 days of today). The
  tenant id is a fresh ``uuid4`` per seed so that stale tokens or caches never resolve to new data;
  row ids are version-4 UUIDs drawn from the seeded generator.
* Users are global and keyed by e-mail: the demo users of tenant ``acme`` are ``owner@acme.example``,
  ``admin@acme.example``, ``member@acme.example``, ``viewer@acme.example`` and ``rep1..rep4@acme.example``
  (members); they are upserted and all get the password :data:`DEMO_PASSWORD`, hashed once per call
  with argon2 off the event loop.
"""

from __future__ import annotations

import asyncio
import math
import random
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from uuid import UUID

import asyncpg

from auth.passwords import hash_password
from core.pgurl import libpq_url

__all__ = ["DEMO_PASSWORD", "DemoTenant", "DemoUser", "seed_demo", "seed_tenant"]

DEMO_PASSWORD = "demo-password"
"""The password of every demo user."""

PLANS = ("free", "pro", "enterprise")
CHUNK_DEALS = 1_000
"""Deals generated and copied per batch; ``progress`` is called once per batch."""

REP_COUNT = 4
DEMO_TENANT_NAMES = {
    "acme": "Acme Corporation",
    "globex": "Globex Corporation",
    "initech": "Initech",
    "umbrella": "Umbrella Corporation",
}

Row = tuple[Any, ...]


@dataclass(frozen=True)
class DemoUser:
    """A demo login: ``email`` + ``password`` authenticate as ``role`` in the demo tenant."""

    email: str
    password: str
    role: str
    user_id: uuid.UUID


@dataclass(frozen=True)
class DemoTenant:
    """A seeded tenant: its users (owner first, then admin, member, viewer, reps) and its deal count."""

    slug: str
    name: str
    tenant_id: uuid.UUID
    users: tuple[DemoUser, ...]
    deals: int

    @property
    def owner(self) -> DemoUser:
        """The user holding the ``owner`` role."""
        return next(user for user in self.users if user.role == "owner")


# --------------------------------------------------------------------------------------------------
# Word lists

_COMPANY_WORDS = (
    "Northwind", "Blue Harbor", "Silver Creek", "Red Rock", "Granite", "Summit", "Evergreen", "Ironwood",
    "Brightline", "Cedar", "Clearwater", "Copper", "Crescent", "Eastgate", "Falcon", "Golden Gate",
    "Harbor Point", "Highland", "Juniper", "Keystone", "Lakeside", "Maple", "Meridian", "Nimbus", "Oakridge",
    "Pacific", "Pinnacle", "Quantum", "Redwood", "Riverbend", "Sable", "Sierra", "Skyline", "Starlight",
    "Stonebridge", "Sunrise", "Tidewater", "Trident", "Vertex", "Westbrook", "Willow", "Zenith", "Atlas",
    "Beacon", "Cobalt", "Horizon", "Lumen", "Orion", "Polar", "Vantage",
)
_COMPANY_KINDS = (
    "Logistics", "Labs", "Systems", "Analytics", "Health", "Foods", "Energy", "Robotics", "Capital", "Media",
    "Software", "Networks", "Biotech", "Manufacturing", "Partners", "Consulting", "Retail", "Freight",
    "Dynamics", "Solutions", "Studios", "Outfitters", "Pharma", "Security", "Aerospace", "Materials",
    "Ventures", "Learning", "Mobility", "Water",
)
_LEGAL_SUFFIXES = ("Inc.", "LLC", "Group", "Co.", "Ltd", "GmbH", "Holdings")
_REGIONS = ("EMEA", "APAC", "Americas", "Europe", "UK", "Canada", "Nordics", "DACH", "Benelux", "Iberia")
_TLDS = (".com", ".com", ".com", ".io", ".co", ".net", ".ai")

_FIRST_NAMES = (
    "Olivia", "Liam", "Emma", "Noah", "Ava", "Oliver", "Sophia", "Elijah", "Isabella", "James", "Mia", "Lucas",
    "Amelia", "Mateo", "Harper", "Benjamin", "Evelyn", "Henry", "Abigail", "Alexander", "Priya", "Arjun",
    "Mei", "Wei", "Yuki", "Hiro", "Fatima", "Omar", "Aisha", "Carlos", "Lucia", "Diego", "Sofia", "Jonas",
    "Freya", "Lars", "Ingrid", "Pierre", "Camille", "Luca", "Giulia", "Hannah", "Daniel", "Grace", "Samuel",
    "Chloe", "David", "Zoe", "Nathan", "Leah", "Ethan", "Nora", "Aaron", "Ruth", "Kwame", "Amara", "Tomas",
    "Elena", "Marco", "Sara",
)
_LAST_NAMES = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez",
    "Hernandez", "Lopez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore", "Jackson", "Martin", "Lee",
    "Thompson", "White", "Harris", "Clark", "Lewis", "Walker", "Hall", "Young", "King", "Wright", "Patel",
    "Shah", "Nguyen", "Chen", "Wang", "Kim", "Tanaka", "Sato", "Okafor", "Mensah", "Rossi", "Bianchi",
    "Muller", "Schmidt", "Fischer", "Dubois", "Laurent", "Silva", "Santos", "Novak", "Kowalski", "Larsen",
    "Andersson", "Nielsen", "Murphy", "Kelly", "Brennan", "Hart", "Cole", "Reyes",
)
_TITLES = (
    "CEO", "CTO", "CFO", "COO", "VP of Sales", "VP of Engineering", "VP of Operations", "Head of Procurement",
    "Director of Operations", "Director of IT", "IT Manager", "Procurement Manager", "Operations Manager",
    "Product Manager", "Engineering Manager", "Marketing Director", "Finance Manager",
    "Head of Customer Success", "Data Platform Lead", "Purchasing Lead", "Chief Information Officer",
    "Security Architect",
)
_US_AREA_CODES = ("212", "312", "415", "512", "617", "646", "720", "206", "303", "404", "213", "305", "469", "503")

_PRODUCTS = (
    "Analytics Cloud", "Data Platform", "Security Suite", "Support Plus", "Field Service", "Payments",
    "Mobile SDK", "Integration Hub", "Workflow Automation", "Reporting", "Identity", "Storage",
    "Observability", "Billing", "Marketing Cloud", "Commerce",
)
_SALES_TITLES = (
    "{company} — {product} expansion",
    "{company} — {product} expansion",
    "{company} — {product} pilot",
    "{company} — {product} rollout",
    "{company} — {product} upgrade",
    "{company} — {seats} {product} seats",
    "{company} — new {product} deployment",
)
_RENEWAL_TITLES = (
    "{company} — {product} renewal {year}",
    "{company} — {product} renewal",
    "{company} — multi-year {product} renewal",
)
_COMPETITORS = ("Initrode", "Vandelay Industries", "Hooli", "Massive Dynamic", "Soylent Corp", "Wonka Systems")

_ACTIVITY_KINDS = ("note", "call", "email", "meeting", "task")
_ACTIVITY_KIND_WEIGHTS = (20, 25, 25, 12, 18)
_SUBJECTS = {
    "note": (
        "Notes from discovery", "Budget confirmed for {year}", "Champion identified: {contact}",
        "Competitor in the deal: {competitor}", "Legal review started", "Security review passed",
    ),
    "call": (
        "Intro call with {contact}", "Discovery call", "Pricing call", "Follow-up call with {contact}",
        "Check-in call", "Call about {product} requirements",
    ),
    "email": (
        "Sent proposal", "Re: {product} pricing", "Follow-up: next steps", "Sent case study",
        "Contract draft sent", "Re: questions about {product}",
    ),
    "meeting": (
        "Demo of {product}", "On-site workshop", "Executive sponsor meeting", "Quarterly business review",
        "Technical deep dive", "Kick-off with {contact}",
    ),
    "task": (
        "Send revised quote", "Schedule demo", "Prepare security questionnaire", "Follow up with {contact}",
        "Update forecast", "Book QBR", "Send {product} datasheet",
    ),
}
_BODIES = {
    "note": (
        "{contact} confirmed budget is approved; procurement needs two quotes.",
        "Main concern is migration effort from their current tool.",
        "They are also evaluating {competitor}; our {product} integrations are the differentiator.",
        "Decision expected after their board meeting.",
    ),
    "call": (
        "Walked {contact} through {product}; asked for pricing on 3-year terms.",
        "Discussed rollout timeline and training needs.",
        "Left a voicemail, will try again next week.",
        "Good call: agreed on success criteria for the pilot.",
    ),
    "email": (
        "Hi {contact}, attached is the proposal we discussed. Happy to walk through it this week.",
        "Following up on our conversation about {product}. Let me know a good time to connect.",
        "Sharing the security whitepaper and the SOC 2 report as requested.",
    ),
    "meeting": (
        "Attendees: {contact} and two engineers. Demoed reporting and SSO.",
        "Reviewed adoption metrics and expansion opportunities.",
        "Agreed on next steps: technical validation, then commercial review.",
    ),
    "task": (
        "Include volume discount tiers.",
        "Loop in the solutions engineer.",
    ),
}

_SALES_STAGES = (
    ("Lead", Decimal("0.10"), "open", 25),
    ("Qualified", Decimal("0.25"), "open", 20),
    ("Proposal", Decimal("0.50"), "open", 15),
    ("Negotiation", Decimal("0.75"), "open", 10),
    ("Closed Won", Decimal("1.00"), "won", 18),
    ("Closed Lost", Decimal("0.00"), "lost", 12),
)
_RENEWAL_STAGES = (
    ("Upcoming", Decimal("0.60"), "open", 55),
    ("Renewed", Decimal("1.00"), "won", 35),
    ("Churned", Decimal("0.00"), "lost", 10),
)
_RENEWAL_SHARE = 0.15

_YEAR_SECONDS = 365 * 24 * 3600
_MIN_AMOUNT, _MAX_AMOUNT = Decimal(500), Decimal(250_000)
_LOG_MIN_AMOUNT = math.log(_MIN_AMOUNT)
_LOG_MAX_AMOUNT = math.log(_MAX_AMOUNT)

_COMPANY_COLUMNS = ("tenant_id", "id", "name", "domain", "created_at", "updated_at")
_CONTACT_COLUMNS = (
    "tenant_id", "id", "company_id", "first_name", "last_name", "email", "phone", "title", "created_at",
    "updated_at",
)
_DEAL_COLUMNS = (
    "tenant_id", "id", "title", "amount", "currency", "pipeline_id", "stage_id", "company_id", "contact_id",
    "owner_id", "expected_close_date", "status", "created_at", "updated_at",
)
_ACTIVITY_COLUMNS = (
    "tenant_id", "id", "kind", "subject", "body", "deal_id", "contact_id", "company_id", "actor_id",
    "occurred_at", "due_date", "done", "created_at", "updated_at",
)
_PRODUCT_COLUMNS = ("tenant_id", "id", "name", "sku", "unit_price", "currency", "active", "created_at", "updated_at")
_LINE_ITEM_COLUMNS = (
    "tenant_id", "id", "deal_id", "product_id", "quantity", "unit_price", "discount_percent", "currency",
    "created_at", "updated_at",
)
_CURRENCIES = ("USD", "EUR", "GBP")
_LINE_ITEM_SHARE = 0.25
"""Deals that list their products; their amount is then the total of their line items (records.crm)."""
_DISCOUNTS = (Decimal(0), Decimal(0), Decimal(5), Decimal(10), Decimal(15))
# Children before parents: deleting them explicitly is much cheaper than letting ON DELETE
# CASCADE / SET NULL fire row by row. ``DELETE FROM tenants`` then cascades whatever is left.
_DELETE_ORDER = ("activities", "audit_events", "deal_line_items", "deals", "products", "contacts", "companies",
                 "stages", "pipelines", "memberships")
_ANALYZE_TABLES = ("companies", "contacts", "deals", "activities", "products", "deal_line_items")


# --------------------------------------------------------------------------------------------------
# Public API


async def seed_tenant(
    admin_url: str,
    slug: str,
    name: str,
    *,
    deals: int,
    seed: int = 0,
    plan: str = "pro",
    progress: Callable[[int], None] | None = None,
    password_hash: str | None = None,
) -> DemoTenant:
    """(Re)create tenant ``slug`` named ``name`` with ``deals`` deals and everything around them.

    ``admin_url`` is a SQLAlchemy-style PostgreSQL URL (``postgresql+asyncpg://...``, plain
    ``postgresql://`` works too) of a role that bypasses row-level security. Any existing tenant with
    this slug is deleted first; the new one is written in a single transaction. ``progress`` is
    called with the number of deals just written, once per batch of up to 1,000 deals, so the
    increments add up to ``deals``. ``password_hash``: :func:`demo_password_hash`'s result, to hash the
    demo password once when seeding many tenants. Raises ``ValueError`` for a negative ``deals`` or an
    unknown ``plan``; database errors (e.g. an invalid slug) propagate and leave the database unchanged.
    """
    _check_args(deals, plan)
    password_hash = password_hash or await demo_password_hash()
    return await _seed_tenant(admin_url, slug, name, deals, seed, plan, password_hash, progress)


async def demo_password_hash() -> str:
    """The hash of the demo users' password (argon2: slow on purpose, so compute it once)."""
    return await asyncio.to_thread(hash_password, DEMO_PASSWORD)


async def seed_demo(
    admin_url: str,
    *,
    slugs: Sequence[str] = ("acme", "globex"),
    deals: int = 500,
    progress: Callable[[int, int], None] | None = None,
) -> list[DemoTenant]:
    """Seed one demo tenant per slug (``deals`` deals each), one after the other; return them in order.

    Tenant names come from a small table of well-known demo names (``acme`` -> "Acme Corporation"),
    else from the slug. ``progress(done, total)`` is called with ``done == 0`` first and then after
    every batch, ``total`` being ``deals * len(slugs)``. The password is hashed once for all tenants.
    """
    _check_args(deals, "pro")
    total = deals * len(slugs)
    done = 0

    def advance(increment: int) -> None:
        nonlocal done
        done += increment
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    password_hash = await demo_password_hash()
    return [
        await _seed_tenant(admin_url, slug, _tenant_name(slug), deals, 0, "pro", password_hash, advance)
        for slug in slugs
    ]


# --------------------------------------------------------------------------------------------------
# Implementation


def _check_args(deals: int, plan: str) -> None:
    if deals < 0:
        raise ValueError(f"deals must be >= 0, not {deals}")
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {', '.join(PLANS)}, not {plan!r}")


def _tenant_name(slug: str) -> str:
    return DEMO_TENANT_NAMES.get(slug) or slug.replace("-", " ").title()


async def _seed_tenant(
    admin_url: str,
    slug: str,
    name: str,
    deals: int,
    seed: int,
    plan: str,
    password_hash: str,
    progress: Callable[[int], None] | None,
) -> DemoTenant:
    gen = _Generator(slug, seed, deals)
    conn = await asyncpg.connect(libpq_url(admin_url))
    try:
        async with conn.transaction():
            await _delete_tenant(conn, slug)
            await conn.execute(
                "INSERT INTO tenants (id, slug, name, plan, isolation) VALUES ($1, $2, $3, $4, 'shared')",
                gen.tenant_id, slug, name, plan,
            )
            users = await _upsert_users(conn, gen, password_hash)
            await _copy(conn, "memberships", ("tenant_id", "id", "user_id", "role", "created_at", "updated_at"),
                        gen.memberships(users))
            pipelines, stages = gen.pipelines()
            await _copy(conn, "pipelines", ("tenant_id", "id", "name", "created_at", "updated_at"), pipelines)
            await _copy(conn, "stages",
                        ("tenant_id", "id", "pipeline_id", "name", "position", "probability", "created_at",
                         "updated_at"), stages)
            await _copy(conn, "companies", _COMPANY_COLUMNS, gen.companies())
            await _copy(conn, "contacts", _CONTACT_COLUMNS, gen.contacts())
            await _copy(conn, "products", _PRODUCT_COLUMNS, gen.products())
            # Generate the next batch in a worker thread while the server ingests the current one.
            # Batches are generated strictly one after another, so the output stays deterministic.
            sizes = [min(CHUNK_DEALS, deals - start) for start in range(0, deals, CHUNK_DEALS)]
            pending = asyncio.ensure_future(asyncio.to_thread(gen.deal_batch, sizes[0])) if sizes else None
            for i, size in enumerate(sizes):
                assert pending is not None
                deal_rows, activity_rows, line_rows = await pending
                pending = (
                    asyncio.ensure_future(asyncio.to_thread(gen.deal_batch, sizes[i + 1]))
                    if i + 1 < len(sizes) else None
                )
                try:
                    await _copy(conn, "deals", _DEAL_COLUMNS, deal_rows)
                    await _copy(conn, "activities", _ACTIVITY_COLUMNS, activity_rows)
                    await _copy(conn, "deal_line_items", _LINE_ITEM_COLUMNS, line_rows)
                except BaseException:
                    if pending is not None:
                        await asyncio.gather(pending, return_exceptions=True)
                    raise
                if progress is not None:
                    progress(size)
        # Fresh statistics so that the first queries on a large demo tenant get good plans.
        if deals >= 10_000:
            for table in _ANALYZE_TABLES:
                await conn.execute(f"ANALYZE {table}")
    finally:
        await conn.close()
    return DemoTenant(slug=slug, name=name, tenant_id=gen.tenant_id, users=tuple(users), deals=deals)


async def _delete_tenant(conn: asyncpg.Connection, slug: str) -> None:
    tenant_id = await conn.fetchval("SELECT id FROM tenants WHERE slug = $1 FOR UPDATE", slug)
    if tenant_id is None:
        return
    for table in _DELETE_ORDER:
        await conn.execute(f"DELETE FROM {table} WHERE tenant_id = $1", tenant_id)  # noqa: S608 (constant names)
    await conn.execute("DELETE FROM tenants WHERE id = $1", tenant_id)


async def _upsert_users(conn: asyncpg.Connection, gen: _Generator, password_hash: str) -> list[DemoUser]:
    users = []
    for email, full_name, role in gen.user_specs():
        user_id = await conn.fetchval(
            "INSERT INTO users (id, email, name, password_hash) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT ((lower(email))) DO UPDATE SET password_hash = EXCLUDED.password_hash, "
            "name = EXCLUDED.name RETURNING id",
            uuid.uuid4(), email, full_name, password_hash,
        )
        users.append(DemoUser(email=email, password=DEMO_PASSWORD, role=role, user_id=user_id))
    return users


async def _copy(conn: asyncpg.Connection, table: str, columns: Sequence[str], rows: list[Row]) -> None:
    if rows:
        await conn.copy_records_to_table(table, records=rows, columns=list(columns))


@dataclass(frozen=True)
class _Stage:
    id: uuid.UUID
    pipeline_id: uuid.UUID
    name: str
    status: str
    renewal: bool


@dataclass(frozen=True)
class _Company:
    id: uuid.UUID
    name: str
    domain: str
    created_at: datetime
    contacts: tuple[tuple[uuid.UUID, str], ...]  # (contact id, "First Last")


class _Generator:
    """All random choices of one tenant, drawn in a fixed order from one seeded ``random.Random``."""

    def __init__(self, slug: str, seed: int, deals: int) -> None:
        self.rng = random.Random(seed ^ zlib.crc32(slug.encode()))
        self.slug = slug
        self.deals = deals
        self.tenant_id = uuid.uuid4()
        self.now = datetime.now(UTC)
        self.today = self.now.date()
        self.n_companies = max(5, deals // 4)
        self._companies: list[_Company] = []
        self._sellers: list[uuid.UUID] = []
        self._sales: list[_Stage] = []
        self._sales_cum: list[int] = []
        self._renewals: list[_Stage] = []
        self._renewals_cum: list[int] = []
        self._catalogue: dict[str, list[tuple[uuid.UUID, Decimal]]] = {}

    def uuid(self) -> uuid.UUID:
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def past(self, max_seconds: float) -> datetime:
        return self.now - timedelta(seconds=self.rng.random() * max_seconds)

    def between(self, start: datetime, end: datetime) -> datetime:
        return start + (end - start) * self.rng.random()

    def person(self) -> tuple[str, str]:
        return self.rng.choice(_FIRST_NAMES), self.rng.choice(_LAST_NAMES)

    # -- users, pipelines -------------------------------------------------------------------------

    def user_specs(self) -> list[tuple[str, str, str]]:
        """(email, name, role) of the demo users: owner, admin, member, viewer, rep1..repN."""
        handles = [("owner", "owner"), ("admin", "admin"), ("member", "member"), ("viewer", "viewer")]
        handles += [(f"rep{i}", "member") for i in range(1, REP_COUNT + 1)]
        return [(f"{handle}@{self.slug}.example", " ".join(self.person()), role) for handle, role in handles]

    def memberships(self, users: Sequence[DemoUser]) -> list[Row]:
        rows = []
        for user in users:
            created = self.now - timedelta(days=400) + timedelta(days=self.rng.randrange(30))
            rows.append((self.tenant_id, self.uuid(), user.user_id, user.role, created, created))
            if user.role != "viewer":
                self._sellers.append(user.user_id)
        return rows

    def pipelines(self) -> tuple[list[Row], list[Row]]:
        created = self.now - timedelta(days=400)
        pipeline_rows: list[Row] = []
        stage_rows: list[Row] = []
        for pipeline_name, specs, renewal in (("Sales", _SALES_STAGES, False), ("Renewals", _RENEWAL_STAGES, True)):
            pipeline_id = self.uuid()
            pipeline_rows.append((self.tenant_id, pipeline_id, pipeline_name, created, created))
            stages = self._renewals if renewal else self._sales
            cum = self._renewals_cum if renewal else self._sales_cum
            total = 0
            for position, (stage_name, probability, status, weight) in enumerate(specs):
                stage = _Stage(self.uuid(), pipeline_id, stage_name, status, renewal)
                stage_rows.append((self.tenant_id, stage.id, pipeline_id, stage_name, position, probability,
                                   created, created))
                stages.append(stage)
                total += weight
                cum.append(total)
        return pipeline_rows, stage_rows

    # -- companies, contacts ----------------------------------------------------------------------

    def company_name(self, taken: set[str]) -> tuple[str, str]:
        """A company name not in ``taken`` and the part of it its domain is derived from."""
        rng = self.rng
        for _ in range(12):
            form = rng.random()
            if form < 0.55:
                base = f"{rng.choice(_COMPANY_WORDS)} {rng.choice(_COMPANY_KINDS)}"
            elif form < 0.8:
                base = f"{rng.choice(_LAST_NAMES)} {rng.choice(_COMPANY_KINDS)}"
            else:
                first, second = rng.sample(_LAST_NAMES, 2)
                base = f"{first} & {second}"
            name = f"{base} {rng.choice(_LEGAL_SUFFIXES)}" if rng.random() < 0.35 else base
            if name not in taken:
                return name, base
        # The word lists are saturated (tens of thousands of companies): add regional subsidiaries.
        counter = 2
        while True:
            region = rng.choice(_REGIONS)
            name = f"{base} {region}" if counter == 2 else f"{base} {region} {counter}"
            if name not in taken:
                return name, name
            counter += 1

    def companies(self) -> list[Row]:
        rows: list[Row] = []
        taken: set[str] = set()
        domains: set[str] = set()
        for _ in range(self.n_companies):
            name, base = self.company_name(taken)
            taken.add(name)
            stem = "".join(ch for ch in base.lower().replace("&", "and") if ch.isalnum() or ch == " ")
            stem = "-".join(stem.split()) if self.rng.random() < 0.3 else "".join(stem.split())
            domain = stem + self.rng.choice(_TLDS)
            n = 2
            while domain in domains:
                domain = f"{stem}{n}{self.rng.choice(_TLDS)}"
                n += 1
            domains.add(domain)
            created = self.past(_YEAR_SECONDS * 1.5)
            rows.append((self.tenant_id, self.uuid(), name, domain, created, self.between(created, self.now)))
            self._companies.append(_Company(rows[-1][1], name, domain, created, ()))
        return rows

    def products(self) -> list[Row]:
        """The catalogue: every product in each currency, at a list price of its own."""
        rows: list[Row] = []
        for name in _PRODUCTS:
            stem = "".join(word[:3].upper() for word in name.split())
            for currency in _CURRENCIES:
                price = Decimal(self.rng.randrange(9_000, 1_200_000, 100)).scaleb(-2)
                created = self.past(_YEAR_SECONDS * 2)
                product_id = self.uuid()
                rows.append((self.tenant_id, product_id, name, f"{stem}-{currency}", price, currency,
                             self.rng.random() < 0.95, created, self.between(created, self.now)))
                self._catalogue.setdefault(currency, []).append((product_id, price))
        return rows

    def line_items(self, deal_id: UUID, currency: str, amount: Decimal,
                   created: datetime) -> tuple[Decimal, list[Row]]:
        """1-3 line items of about ``amount`` in all; returns their exact total (the deal's amount)."""
        rng = self.rng
        parts = rng.randrange(1, 4)
        lines = [_Line(product_id, max(1, min(500, int(amount / parts / price))), price, rng.choice(_DISCOUNTS))
                 for product_id, price in rng.sample(self._catalogue[currency], parts)]

        def total() -> Decimal:
            return sum((line_total(line.quantity, line.price, line.discount) for line in lines), Decimal(0))

        while total() < _MIN_AMOUNT:
            lines[0].quantity += 1
        while total() > _MAX_AMOUNT and any(line.quantity > 1 for line in lines):
            max(lines, key=lambda line: line.quantity).quantity -= 1
        rows: list[Row] = [(self.tenant_id, self.uuid(), deal_id, line.product_id, line.quantity, line.price,
                            line.discount, currency, created, created) for line in lines]
        return total(), rows

    def phone(self) -> str | None:
        rng = self.rng
        r = rng.random()
        if r < 0.1:
            return None
        if r < 0.25:  # Ofcom's range reserved for drama: 020 7946 0000-0999
            return f"+44 20 7946 0{rng.randrange(1000):03d}"
        return f"+1 {rng.choice(_US_AREA_CODES)}-{rng.randrange(200, 1000)}-{rng.randrange(10000):04d}"

    def contacts(self) -> list[Row]:
        rows: list[Row] = []
        rng = self.rng
        companies = []
        for company in self._companies:
            contacts = []
            for _ in range(rng.choice((1, 2, 2, 3))):
                first, last = self.person()
                contact_id = self.uuid()
                contacts.append((contact_id, f"{first} {last}"))
                email = f"{first}.{last}@{company.domain}".lower() if rng.random() < 0.95 else None
                created = self.between(company.created_at, self.now)
                rows.append((self.tenant_id, contact_id, company.id, first, last, email, self.phone(),
                             rng.choice(_TITLES), created, self.between(created, self.now)))
            companies.append(_Company(company.id, company.name, company.domain, company.created_at,
                                      tuple(contacts)))
        self._companies = companies
        return rows

    # -- deals, activities ------------------------------------------------------------------------

    def deal_batch(self, count: int) -> tuple[list[Row], list[Row], list[Row]]:
        """The next ``count`` deals, their 3-5 activities each, and the line items of some."""
        rng = self.rng
        random_ = rng.random
        tenant_id = self.tenant_id
        now, today = self.now, self.today
        companies = self._companies
        n_companies = len(companies)
        sellers = self._sellers
        deals: list[Row] = []
        activities: list[Row] = []
        lines: list[Row] = []
        for _ in range(count):
            renewal = random_() < _RENEWAL_SHARE
            if renewal:
                stage = rng.choices(self._renewals, cum_weights=self._renewals_cum)[0]
            else:
                stage = rng.choices(self._sales, cum_weights=self._sales_cum)[0]
            # Skewed: a few accounts carry many deals.
            company = companies[int(n_companies * random_() ** 1.6)]
            contact = rng.choice(company.contacts) if company.contacts and random_() < 0.9 else None
            product = rng.choice(_PRODUCTS)
            created = now - timedelta(seconds=random_() * _YEAR_SECONDS)
            template = rng.choice(_RENEWAL_TITLES if renewal else _SALES_TITLES)
            title = template.format(company=company.name, product=product, seats=rng.randrange(10, 500, 5),
                                    year=created.year + 1)
            cents = int(math.exp(rng.uniform(_LOG_MIN_AMOUNT, _LOG_MAX_AMOUNT)) * 100)
            if random_() < 0.6:  # most quotes are round numbers
                cents = max(50_000, cents // 10_000 * 10_000)
            amount = Decimal(cents).scaleb(-2)
            r = random_()
            currency = "USD" if r < 0.78 else "EUR" if r < 0.92 else "GBP"
            owner = rng.choice(sellers)
            created_day = created.date()
            if stage.status == "open":
                close = today + timedelta(days=rng.randrange(-30, 181))
                close = max(close, created_day)
            else:
                start = max(created_day, today - timedelta(days=180))
                close = start + timedelta(days=rng.randrange((today - start).days + 1))
            updated = created + (now - created) * random_()
            deal_id = self.uuid()
            if random_() < _LINE_ITEM_SHARE:
                amount, items = self.line_items(deal_id, currency, amount, created)
                lines += items
            contact_id = contact[0] if contact else None
            deals.append((tenant_id, deal_id, title, amount, currency, stage.pipeline_id, stage.id, company.id,
                          contact_id, owner, close, stage.status, created, updated))

            fields = {
                "contact": contact[1] if contact else "the buyer",
                "product": product,
                "competitor": rng.choice(_COMPETITORS),
                "year": created.year + 1,
            }
            n_activities = rng.randrange(3, 6)
            span = now - created
            offsets = sorted(random_() for _ in range(n_activities))
            kinds = rng.choices(_ACTIVITY_KINDS, weights=_ACTIVITY_KIND_WEIGHTS, k=n_activities)
            for kind, offset in zip(kinds, offsets, strict=True):
                occurred = created + span * offset
                subject = rng.choice(_SUBJECTS[kind]).format(**fields)
                body = rng.choice(_BODIES[kind]).format(**fields) if random_() < 0.7 else None
                due = None
                done = False
                if kind == "task":
                    due = occurred.date() + timedelta(days=rng.randrange(1, 15))
                    done = random_() < (0.85 if due < today else 0.1)
                actor = owner if random_() < 0.7 else rng.choice(sellers)
                activity_contact = contact_id if kind in ("call", "email", "meeting") else None
                activities.append((tenant_id, self.uuid(), kind, subject, body, deal_id, activity_contact,
                                   company.id, actor, occurred, due, done, occurred, occurred))
        return deals, activities, lines


@dataclass
class _Line:
    product_id: UUID
    quantity: int
    price: Decimal
    discount: Decimal


def line_total(quantity: int, unit_price: Decimal, discount_percent: Decimal) -> Decimal:
    """What PostgreSQL computes for ``deal_line_items.line_total`` (models.tables.LINE_TOTAL)."""
    return (quantity * unit_price * (100 - discount_percent) / 100).quantize(Decimal("0.01"), ROUND_HALF_UP)
