"""Row-level security as the backstop: PostgreSQL alone keeps tenants apart, without the app's filters.

These tests talk to the database as the server does (the non-owner ``atrium_app`` role, through
``models.db.Databases``) but send statements with no ``tenant_id`` filter, or with one naming the
wrong tenant, and check that only the transaction's tenant is visible or writable. The catalog
tests pin the configuration the policies rely on: RLS enabled and forced on every tenant table, one
policy each, and an application role that is neither superuser, BYPASSRLS nor owner of anything.
Both tenants are seeded through the API first, so every table holds rows of both.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import Row, Select, Table, delete, func, insert, literal_column, select, text, update
from sqlalchemy.exc import DBAPIError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.ids import to_global_id
from core.settings import APP_ROLE
from models.db import Databases, TenantScope
from models.loaders import Loaders
from models.tables import (
    AUDIT_EVENTS,
    COMPANIES,
    CONTACTS,
    DATABASE_WRITTEN_TABLES,
    DEALS,
    EXPORT_JOBS,
    IMPORT_JOBS,
    MEMBERSHIPS,
    TENANT_TABLES,
    TENANTS,
    USERS,
    Role,
)
from planner.plan import READS_THROUGH_POLICY
from records.crm import RECORDS
from records.declare import Listing, Sort
from resolvers.paging import count_rows, fetch_page
from tests.conftest import TenantWorld, data_or_fail, gql
from tests.crm import Crm, seed_crm, uuid_of

MakeTenant = Callable[..., Awaitable[TenantWorld]]
ALL_TABLES = (TENANTS, USERS, *TENANT_TABLES)
RLS_VIOLATION = "new row violates row-level security policy"
TRASHABLE_TABLES = {record.table.name for record in RECORDS if record.trash}
VISIBILITY_TABLES = {record.table.name for record in RECORDS if record.owners}
"""Tables of records a workspace may restrict to their owners' teams (``Record.owners``)."""
PERMISSION_DENIED = "permission denied"


class Rollback(Exception):
    """Raised to end a tenant transaction with a rollback."""


@dataclass(frozen=True)
class Seeded:
    """A tenant with one of each record, by database key."""

    world: TenantWorld
    crm: Crm

    @property
    def id(self) -> uuid.UUID:
        return self.world.id

    products: dict[str, Any] = field(default_factory=dict)
    """A product and a line item of the tenant's deal (``product``, ``line``), made through the API."""
    export_job: uuid.UUID = field(default_factory=uuid.uuid4)
    """The id of the tenant's export job (planted by ``seeded_pair``), which its export chunk names."""
    import_job: uuid.UUID = field(default_factory=uuid.uuid4)
    """The id of the tenant's import job (planted by ``seeded_pair``), which its file and error name."""

    def key(self, entity: str) -> uuid.UUID:
        if entity in self.products:
            return uuid_of(self.products[entity]["id"])
        record: dict[str, Any] = self.crm.stage if entity == "stage" else getattr(self.crm, entity)
        return uuid_of(record["id"])

    @property
    def users(self) -> set[uuid.UUID]:
        return set(self.world.users.values())


async def seeded_pair(make_tenant: MakeTenant, client: httpx.AsyncClient,
                      admin_engine: AsyncEngine) -> tuple[Seeded, Seeded]:
    """Tenants A and B with rows in every tenant table.

    Records are made through the API; a table the API cannot fill yet gets one row of ``rows_for``
    from the table owner, so every tenant table is covered as soon as it exists.
    """
    a, b = await make_tenant("rls-a"), await make_tenant("rls-b")
    pair = (Seeded(a, await seed_crm(client, a.token(Role.OWNER))),
            Seeded(b, await seed_crm(client, b.token(Role.OWNER))))
    for tenant in pair:
        token = tenant.world.token(Role.OWNER)
        made = data_or_fail(await gql(client, "mutation($i: ProductInput!) { createProduct(input: $i) { id } }", {
            "i": {"name": "Seeded", "sku": uuid.uuid4().hex, "unitPrice": "1234.50", "currency": "USD"}}, token=token))
        line = data_or_fail(await gql(client, "mutation($i: DealLineItemInput!) { createDealLineItem(input: $i) "
                                              "{ id } }", {"i": {"dealId": tenant.crm.deal["id"], "quantity": 1,
                                                                 "productId": made["createProduct"]["id"]}},
                                      token=token))
        # A disabled endpoint: nothing is ever sent to it.
        hook = data_or_fail(await gql(client, "mutation($i: WebhookEndpointInput!) { createWebhookEndpoint(input: $i) "
                                              "{ endpoint { id } } }", {"i": {"url": "http://127.0.0.1:9/rls",
                                                                              "eventTypes": ["company.created"]}},
                                      token=token))["createWebhookEndpoint"]["endpoint"]
        data_or_fail(await gql(client, "mutation($id: ID!) { updateWebhookEndpoint(id: $id, input: {enabled: false}) "
                                       "{ enabled } }", {"id": hook["id"]}, token=token))
        team = data_or_fail(await gql(client, "mutation($u: ID!) { createTeam(input: {name: \"Seeded\", "
                                              "memberIds: [$u]}) { id } }",
                                      {"u": to_global_id("User", tenant.world.users[Role.OWNER])}, token=token))
        data_or_fail(await gql(client, "mutation { setRecordVisibility(recordType: DEAL, audience: WORKSPACE) "
                                       "{ audience } }", token=token))
        field_def = data_or_fail(await gql(client, "mutation { createCustomFieldDefinition(input: {recordType: DEAL, "
                                                   'key: "tier", label: "Tier", type: TEXT}) { id } }', token=token))
        tenant.products.update(product=made["createProduct"], line=line["createDealLineItem"], endpoint=hook,
                               team=team["createTeam"], custom_field=field_def["createCustomFieldDefinition"])
    async with admin_engine.begin() as conn:
        for tenant in pair:
            rows = rows_for(tenant, uuid.uuid4())
            for table in TENANT_TABLES:
                count = (await conn.execute(select(func.count()).select_from(table)
                                            .where(table.c.tenant_id == tenant.id))).scalar_one()
                if count == 0:
                    row = rows[table.name]
                    if table is EXPORT_JOBS:
                        row = {**row, "id": tenant.export_job}
                    if table is IMPORT_JOBS:
                        row = {**row, "id": tenant.import_job}
                    await conn.execute(insert(table).values(row))
    return pair


def owner_view(table: Table, tenant_id: uuid.UUID) -> Select[Any]:
    """What ``tenant_id`` should see of ``table``, as the table owner (no RLS) computes it."""
    if table is TENANTS:
        return select(TENANTS.c.id).where(TENANTS.c.id == tenant_id)
    if table is USERS:
        return (select(USERS.c.id).join(MEMBERSHIPS, MEMBERSHIPS.c.user_id == USERS.c.id)
                .where(MEMBERSHIPS.c.tenant_id == tenant_id))
    return select(table.c.id).where(table.c.tenant_id == tenant_id)


async def ids(conn: AsyncConnection, statement: Any, params: dict[str, Any] | None = None) -> set[uuid.UUID]:
    return {row.id for row in (await conn.execute(statement, params)).all()}


async def current_tenant(conn: AsyncConnection) -> str | None:
    value: str | None = (await conn.execute(text("SELECT current_setting('app.tenant_id', true)"))).scalar_one()
    return value


# ---- reading --------------------------------------------------------------------------------------

@pytest.mark.parametrize("table", ALL_TABLES, ids=lambda t: t.name)
async def test_unfiltered_select_sees_only_the_transactions_tenant(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine, databases: Databases,
    table: Table,
) -> None:
    a, b = await seeded_pair(make_tenant, client, admin_engine)
    async with admin_engine.connect() as conn:
        expected = {tenant.id: await ids(conn, owner_view(table, tenant.id)) for tenant in (a, b)}
        everything = await ids(conn, select(table.c.id))
    assert expected[a.id] and expected[b.id] and not expected[a.id] & expected[b.id]

    for tenant in (a, b):
        async with databases.tenant_transaction(tenant.id) as conn:
            # SELECT * FROM <table>, no WHERE: whatever comes back is what RLS lets through.
            rows = (await conn.execute(select(literal_column("*")).select_from(table))).mappings().all()
        assert {r["id"] for r in rows} == expected[tenant.id], table.name
        if "tenant_id" in table.c:
            assert {r["tenant_id"] for r in rows} == {tenant.id}
    assert len(everything) > len(expected[a.id])


async def test_tenant_and_user_rows_are_scoped(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine, databases: Databases,
) -> None:
    a, b = await seeded_pair(make_tenant, client, admin_engine)
    async with databases.tenant_transaction(a.id) as conn:
        assert await ids(conn, text("SELECT id FROM tenants")) == {a.id}
        assert await ids(conn, text("SELECT id FROM users")) == a.users
        # Looking B up by key, with no tenant filter at all, finds nothing.
        assert await ids(conn, text("SELECT id FROM tenants WHERE id = :id"), {"id": b.id}) == set()
        assert await ids(conn, text("SELECT id FROM users WHERE id = ANY(:ids)"), {"ids": list(b.users)}) == set()
        assert await ids(conn, text("SELECT id FROM deals WHERE id = :id"), {"id": b.key("deal")}) == set()
        # Joins cannot reach across either.
        joined = await conn.execute(text(
            "SELECT d.id FROM deals d JOIN companies c ON c.id = d.company_id JOIN stages s ON s.id = d.stage_id"))
        assert {r.id for r in joined} == {a.key("deal")}


# ---- writing --------------------------------------------------------------------------------------

class RowsForEveryTable(dict[str, dict[str, Any]]):
    def __missing__(self, name: str) -> dict[str, Any]:
        raise AssertionError(f"tenant table {name!r} is new: add a row for it to rows_for() in {__name__}")


def rows_for(tenant: Seeded, stranger: uuid.UUID) -> dict[str, dict[str, Any]]:
    """For each tenant table, a row of ``tenant`` that would be valid there (references its own records).

    ``stranger`` is a user who is not yet a member of ``tenant``.
    """
    t = tenant.id
    return RowsForEveryTable({
        "memberships": {"tenant_id": t, "id": uuid.uuid4(), "user_id": stranger, "role": Role.OWNER.value},
        "companies": {"tenant_id": t, "id": uuid.uuid4(), "name": "Planted"},
        "contacts": {"tenant_id": t, "id": uuid.uuid4(), "first_name": "P", "last_name": "Lanted",
                     "company_id": tenant.key("company")},
        "pipelines": {"tenant_id": t, "id": uuid.uuid4(), "name": "Planted"},
        "stages": {"tenant_id": t, "id": uuid.uuid4(), "pipeline_id": tenant.key("pipeline"), "name": "Planted",
                   "position": 9, "probability": Decimal("0.5")},
        "deals": {"tenant_id": t, "id": uuid.uuid4(), "title": "Planted", "amount": Decimal("1.00"),
                  "currency": "USD", "pipeline_id": tenant.key("pipeline"), "stage_id": tenant.key("stage"),
                  "company_id": tenant.key("company"), "contact_id": tenant.key("contact"),
                  "owner_id": tenant.world.users[Role.OWNER]},
        "activities": {"tenant_id": t, "id": uuid.uuid4(), "kind": "note", "subject": "Planted",
                       "deal_id": tenant.key("deal")},
        "audit_events": {"tenant_id": t, "id": uuid.uuid4(), "action": "create", "entity_type": "Deal",
                         "entity_id": tenant.key("deal"), "diff": {}},
        # An empty Yjs document (update encoding of no structs and an empty delete set).
        "notes": {"tenant_id": t, "id": uuid.uuid4(), "deal_id": tenant.key("deal"), "state": b"\x00\x00"},
        "api_keys": {"tenant_id": t, "id": uuid.uuid4(), "prefix": uuid.uuid4().hex[:12], "secret_sha256": "0" * 64,
                     "name": "Planted", "role": Role.VIEWER.value, "created_by": tenant.world.users[Role.OWNER]},
        "persisted_documents": {"tenant_id": t, "id": uuid.uuid4(), "client": "planted",
                                "document_id": uuid.uuid4().hex,
                                "sha256": "0" * 64, "operation_type": "query", "body": "{ __typename }"},
        "products": {"tenant_id": t, "id": uuid.uuid4(), "name": "Planted", "sku": uuid.uuid4().hex,
                     "unit_price": Decimal("1.00"), "currency": "USD"},
        "deal_line_items": {"tenant_id": t, "id": uuid.uuid4(), "deal_id": tenant.key("deal"),
                            "product_id": tenant.key("product"), "quantity": 1, "unit_price": Decimal("1.00"),
                            "currency": "USD"},
        "custom_field_definitions": {"tenant_id": t, "id": uuid.uuid4(), "record_type": "Deal",
                                     "key": f"planted_{uuid.uuid4().hex[:8]}", "label": "Planted", "type": "text"},
        "export_jobs": {"tenant_id": t, "id": uuid.uuid4(), "requested_by": tenant.world.users[Role.OWNER]},
        "export_chunks": {"tenant_id": t, "id": uuid.uuid4(), "job_id": tenant.export_job,
                          "n": uuid.uuid4().int % (1 << 31), "data": b"PK"},
        "retention_policies": {"tenant_id": t, "id": uuid.uuid4(), "target": f"planted-{uuid.uuid4().hex[:8]}",
                               "keep_days": 30},
        "field_rules": {"tenant_id": t, "id": uuid.uuid4(), "record_type": "Deal",
                        "field": f"planted-{uuid.uuid4().hex[:8]}", "hidden_from": ["viewer"]},
        "import_jobs": {"tenant_id": t, "id": uuid.uuid4(), "requested_by": tenant.world.users[Role.OWNER],
                        "record_type": "companies", "mapping": {"name": "name"}, "state": "failed"},
        "import_files": {"tenant_id": t, "id": uuid.uuid4(), "job_id": tenant.import_job, "content": b"name\n"},
        "import_errors": {"tenant_id": t, "id": uuid.uuid4(), "job_id": tenant.import_job, "row_number": 1,
                          "code": "BAD_USER_INPUT", "message": "planted"},
        "idempotency_keys": {"tenant_id": t, "id": uuid.uuid4(), "principal": f"user:{stranger}",
                             "key": uuid.uuid4().hex, "fingerprint": "0" * 64, "status": 200, "body": "{}",
                             "expires_at": dt.datetime.now(dt.UTC) + dt.timedelta(days=1)},
        "webhook_endpoints": {"tenant_id": t, "id": uuid.uuid4(), "url": "http://127.0.0.1:9/planted",
                              "event_types": ["deal.created"], "secret": b"\x00", "enabled": False},
        # Failed: never claimed by a dispatcher.
        "webhook_deliveries": {"tenant_id": t, "id": uuid.uuid4(), "endpoint_id": tenant.key("endpoint"),
                               "message_id": uuid.uuid4(), "event_type": "deal.created",
                               "ordering_key": tenant.key("deal"), "body": "{}", "status": "failed"},
        "teams": {"tenant_id": t, "id": uuid.uuid4(), "name": f"Planted {uuid.uuid4().hex[:8]}",
                  "manager_id": tenant.world.users[Role.OWNER]},
        # The seeded team has the OWNER alone.
        "team_members": {"tenant_id": t, "id": uuid.uuid4(), "team_id": tenant.key("team"),
                         "user_id": tenant.world.users[Role.MEMBER]},
        # A type with no records (Deal has its row, WORKSPACE: every member sees every deal).
        "record_visibility": {"tenant_id": t, "id": uuid.uuid4(), "record_type": "Planted", "audience": "workspace"},
    })


@pytest.mark.parametrize("table", TENANT_TABLES, ids=lambda t: t.name)
async def test_inserting_a_row_of_another_tenant_violates_the_policy(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine, databases: Databases,
    table: Table,
) -> None:
    a, b = await seeded_pair(make_tenant, client, admin_engine)
    stranger = a.world.users[Role.OWNER]
    planted = rows_for(b, stranger)[table.name]
    # The same row is valid for B itself (inserted, then rolled back): only the tenant makes it fail below.
    with pytest.raises(Rollback):
        async with databases.tenant_transaction(b.id) as conn:
            await conn.execute(insert(table).values(planted))
            raise Rollback

    with pytest.raises(DBAPIError, match=RLS_VIOLATION):
        async with databases.tenant_transaction(a.id) as conn:
            await conn.execute(insert(table).values(planted))
    async with admin_engine.connect() as conn:
        assert (await conn.execute(select(table.c.id).where(table.c.id == planted["id"]))).first() is None


async def test_inserting_tenants_or_users_is_not_granted(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine, databases: Databases,
) -> None:
    a, _ = await seeded_pair(make_tenant, client, admin_engine)
    with pytest.raises(DBAPIError, match=PERMISSION_DENIED):
        async with databases.tenant_transaction(a.id) as conn:
            await conn.execute(insert(TENANTS).values(id=uuid.uuid4(), slug=f"x-{uuid.uuid4().hex[:8]}", name="X"))
    with pytest.raises(DBAPIError, match=PERMISSION_DENIED):
        async with databases.tenant_transaction(a.id) as conn:
            await conn.execute(insert(USERS).values(id=uuid.uuid4(), email=f"{uuid.uuid4().hex}@x.example", name="X"))


MUTABLE_TABLES = tuple(t for t in TENANT_TABLES if t is not AUDIT_EVENTS)


@pytest.mark.parametrize("table", MUTABLE_TABLES, ids=lambda t: t.name)
async def test_updating_or_deleting_another_tenants_rows_affects_none(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine, databases: Databases,
    table: Table,
) -> None:
    a, b = await seeded_pair(make_tenant, client, admin_engine)
    async with admin_engine.connect() as conn:
        before = (await conn.execute(select(table).where(table.c.tenant_id == b.id).order_by(table.c.id))).all()
    assert before
    b_ids = [row.id for row in before]

    async with databases.tenant_transaction(a.id) as conn:
        # A filtered UPDATE/DELETE raises nothing under RLS: it matches no row, so assert on RETURNING.
        by_tenant = await conn.execute(update(table).where(table.c.tenant_id == b.id)
                                       .values(version=table.c.version + 1).returning(table.c.id))
        assert by_tenant.all() == []
        by_key_ = await conn.execute(update(table).where(table.c.id.in_(b_ids))
                                     .values(version=table.c.version + 1).returning(table.c.id))
        assert by_key_.all() == []
        unfiltered = await conn.execute(update(table).values(version=table.c.version).returning(table.c.tenant_id))
        assert set(unfiltered.scalars()) <= {a.id}
        deleted = await conn.execute(delete(table).where(table.c.tenant_id == b.id).returning(table.c.id))
        assert deleted.all() == []
        deleted = await conn.execute(delete(table).where(table.c.id.in_(b_ids)).returning(table.c.id))
        assert deleted.all() == []

    async with admin_engine.connect() as conn:
        after = (await conn.execute(select(table).where(table.c.tenant_id == b.id).order_by(table.c.id))).all()
    assert after == before


@pytest.mark.parametrize("table", MUTABLE_TABLES, ids=lambda t: t.name)
async def test_moving_own_row_to_another_tenant_violates_the_policy(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine, databases: Databases,
    table: Table,
) -> None:
    a, b = await seeded_pair(make_tenant, client, admin_engine)
    async with admin_engine.connect() as conn:
        own = (await conn.execute(select(table.c.id).where(table.c.tenant_id == a.id).limit(1))).scalar_one()
    with pytest.raises(DBAPIError, match=RLS_VIOLATION):
        async with databases.tenant_transaction(a.id) as conn:
            await conn.execute(update(table).where(table.c.id == own).values(tenant_id=b.id))
    async with admin_engine.connect() as conn:
        assert (await conn.execute(select(table.c.tenant_id).where(table.c.id == own))).scalar_one() == a.id


@pytest.mark.parametrize("table", ["tenants", "users"])
async def test_tenant_and_user_rows_are_read_only_for_the_app_role(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine, databases: Databases, table: str,
) -> None:
    """Users are global and tenants are administered as the owner: the app role may not change either,
    not even its own tenant's rows (a tenant must never rewrite a person other tenants share)."""
    a, b = await seeded_pair(make_tenant, client, admin_engine)
    t, targets = (TENANTS, [a.id, b.id]) if table == "tenants" else (USERS, [*a.users, *b.users])
    for target in targets:
        with pytest.raises(ProgrammingError, match="permission denied"):
            async with databases.tenant_transaction(a.id) as conn:
                await conn.execute(update(t).where(t.c.id == target).values(name="Taken"))
    async with admin_engine.connect() as conn:
        names = (await conn.execute(select(t.c.name).where(t.c.id.in_(targets)))).scalars().all()
    assert names and "Taken" not in names


@pytest.mark.parametrize("statement", [
    "UPDATE audit_events SET action = 'forged'",
    "DELETE FROM audit_events",
    "TRUNCATE audit_events",
])
async def test_audit_events_are_append_only_for_the_app_role(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine, databases: Databases,
    statement: str,
) -> None:
    a, _ = await seeded_pair(make_tenant, client, admin_engine)
    async with admin_engine.connect() as conn:
        before = (await conn.execute(select(AUDIT_EVENTS).where(AUDIT_EVENTS.c.tenant_id == a.id)
                                     .order_by(AUDIT_EVENTS.c.id))).all()
    assert before
    with pytest.raises(DBAPIError, match=PERMISSION_DENIED):
        async with databases.tenant_transaction(a.id) as conn:
            await conn.execute(text(statement))
    async with admin_engine.connect() as conn:
        after = (await conn.execute(select(AUDIT_EVENTS).where(AUDIT_EVENTS.c.tenant_id == a.id)
                                    .order_by(AUDIT_EVENTS.c.id))).all()
    assert after == before


# ---- no tenant, a bad tenant, and the pool --------------------------------------------------------

async def test_without_a_tenant_every_table_is_empty(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine, databases: Databases,
) -> None:
    await seeded_pair(make_tenant, client, admin_engine)
    async with databases.default.connect() as conn:
        assert await current_tenant(conn) in (None, "")
        for table in ALL_TABLES:
            count = (await conn.execute(select(func.count()).select_from(table))).scalar_one()
            assert count == 0, table.name
        await conn.rollback()
        # Nothing can be written without a tenant either.
        with pytest.raises(DBAPIError, match=RLS_VIOLATION):
            await conn.execute(insert(COMPANIES).values(tenant_id=uuid.uuid4(), id=uuid.uuid4(), name="Orphan"))
        await conn.rollback()


async def test_an_empty_or_malformed_tenant_setting_fails_closed(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine, databases: Databases,
) -> None:
    await seeded_pair(make_tenant, client, admin_engine)
    async with databases.default.connect() as conn:
        await conn.execute(text("SELECT set_config('app.tenant_id', '', true)"))
        assert (await conn.execute(select(func.count()).select_from(DEALS))).scalar_one() == 0
        await conn.rollback()
        await conn.execute(text("SELECT set_config('app.tenant_id', 'not-a-uuid', true)"))
        with pytest.raises(DBAPIError, match="invalid input syntax for type uuid"):
            await conn.execute(select(DEALS.c.id))
        await conn.rollback()


async def test_the_tenant_does_not_outlive_its_transaction_on_a_pooled_connection(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine, databases: Databases,
) -> None:
    a, b = await seeded_pair(make_tenant, client, admin_engine)
    pid = text("SELECT pg_backend_pid()")

    async with databases.tenant_transaction(a.id) as conn:
        first_pid = (await conn.execute(pid)).scalar_one()
        assert await current_tenant(conn) == str(a.id)
        assert await ids(conn, select(DEALS.c.id)) == {a.key("deal")}

    async with databases.default.connect() as conn:
        assert (await conn.execute(pid)).scalar_one() == first_pid, "the pooled connection was not reused"
        assert await current_tenant(conn) in (None, "")
        assert (await conn.execute(select(func.count()).select_from(DEALS))).scalar_one() == 0
        await conn.rollback()

    # A transaction that fails is rolled back, and its tenant goes with it.
    with pytest.raises(DBAPIError):
        async with databases.tenant_transaction(a.id) as conn:
            assert (await conn.execute(pid)).scalar_one() == first_pid
            await conn.execute(text("SELECT 1 / 0"))
    async with databases.default.connect() as conn:
        assert (await conn.execute(pid)).scalar_one() == first_pid
        assert await current_tenant(conn) in (None, "")
        assert (await conn.execute(select(func.count()).select_from(DEALS))).scalar_one() == 0
        await conn.rollback()

    # The next tenant on the same connection sees only itself.
    async with databases.tenant_transaction(b.id) as conn:
        assert (await conn.execute(pid)).scalar_one() == first_pid
        assert await ids(conn, select(DEALS.c.id)) == {b.key("deal")}


# ---- the application's own query path, with its tenant filter taken away ------------------------

@pytest.mark.parametrize("table", ALL_TABLES, ids=lambda t: t.name)
async def test_tenant_scope_fetch_without_a_filter_sees_only_its_tenant(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine, databases: Databases,
    table: Table,
) -> None:
    a, _ = await seeded_pair(make_tenant, client, admin_engine)
    async with admin_engine.connect() as conn:
        expected = await ids(conn, owner_view(table, a.id))
    scope = TenantScope(databases, a.id)
    try:
        rows = await scope.fetch(select(table))
        assert {r.id for r in rows} == expected
    finally:
        await scope.close()


async def test_app_queries_naming_the_wrong_tenant_return_nothing(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine, databases: Databases,
) -> None:
    """The records' own list queries, built for B but run in A's scope: RLS wins over the filter."""
    a, b = await seeded_pair(make_tenant, client, admin_engine)
    scope = TenantScope(databases, a.id)
    listed = [record for record in RECORDS if record.root.listing is not Listing.NONE]
    assert {record.name for record in listed} >= {"Deal", "Company", "Contact", "Activity", "Pipeline"}
    try:
        for record in listed:
            assert len(await scope.fetch(record.listing_query(a.id, None))) == 1, record.name
            assert await scope.fetch(record.listing_query(b.id, None)) == [], record.name
    finally:
        await scope.close()


@dataclass(frozen=True, eq=False)
class Unfiltered:
    """A loader lookup with no tenant condition at all (``models.loaders.ListLookup``)."""

    query: Any
    key: Any
    order_by: tuple[Any, ...] = ()


async def test_loaders_and_paging_without_a_filter_see_only_their_tenant(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine, databases: Databases,
) -> None:
    a, b = await seeded_pair(make_tenant, client, admin_engine)
    scope = TenantScope(databases, a.id)
    try:
        # The one loader factory, given a query with no tenant condition.
        loaders = Loaders(scope)
        own, foreign = await loaders.one(Unfiltered(select(DEALS), DEALS.c.id)).load_many(
            [a.key("deal"), b.key("deal")])
        assert own is not None and own.tenant_id == a.id and foreign is None
        children = loaders.many(Unfiltered(select(CONTACTS), CONTACTS.c.company_id, (CONTACTS.c.id,)), 50)
        own_contacts, foreign_contacts = await children.load_many([a.key("company"), b.key("company")])
        assert [c.id for c in own_contacts] == [a.key("contact")] and foreign_contacts == []

        # Keyset paging and totalCount over an unfiltered select.
        key = Sort("NAME", "name").key(COMPANIES)
        page = await fetch_page(scope, select(COMPANIES), COMPANIES.c.id, key, descending=False, first=100,
                                after=None, last=None, before=None, max_page=100)
        assert [r.id for r in page.rows] == [a.key("company")]
        assert await count_rows(scope, select(COMPANIES)) == 1

        # A write through the scope cannot plant a row in B.
        with pytest.raises(DBAPIError, match=RLS_VIOLATION):
            async with scope.write() as conn:
                await conn.execute(insert(COMPANIES).values(tenant_id=b.id, id=uuid.uuid4(), name="Planted"))
        assert [r.id for r in await scope.fetch(select(COMPANIES))] == [a.key("company")]
    finally:
        await scope.close()



PLANNED = """{ deals(first: 10) { totalCount nodes { id title company { name } contact { email } owner { name }
  stage { name pipeline { name } } activities { subject } lineItems { lineTotal product { name } } } }
  companies { nodes { name contacts { email } deals { title } } } products { nodes { sku } }
  node(id: "%s") { ... on Deal { title } } }"""


async def test_a_plan_naming_another_tenant_sees_nothing_of_it(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine, databases: Databases,
) -> None:
    """A plan's statement carries the tenant filter as well as running under RLS: with its filter
    made to name tenant B while the transaction is A's, it answers nothing of either."""
    from graphql import parse
    from graphql.execution.executor import Executor

    from atrium.schema import schema
    from auth.principal import Principal
    from models.loaders import TENANT

    a, b = await seeded_pair(make_tenant, client, admin_engine)
    query = PLANNED % b.crm.deal["id"]
    executor = Executor.build(schema._schema, parse(query))
    assert not isinstance(executor, list)
    plan = schema.plans.get(query, None, executor)
    assert len(plan.planned) == 4 and not plan.fallback_keys
    for own, other in ((a, b), (b, a)):
        binding = plan.bind(executor.variable_values, Principal(own.id, own.world.users[Role.OWNER], Role.OWNER, 0),
                            100)
        binding.params[TENANT.key] = other.id  # the application's filter says the other tenant
        compiled = plan.compiled(binding)
        scope = TenantScope(databases, own.id)
        try:
            row = await scope.fetch_raw(compiled.sql, plan.arguments(compiled, binding))
        finally:
            await scope.close()
        deals, companies, products, node = (json.loads(value) if value else None for value in row)
        assert deals == {"totalCount": 0, "nodes": []} and companies == {"nodes": []}
        assert products == {"nodes": []} and node is None

# ---- the catalog: what the policies rely on -----------------------------------------------------

async def catalog(admin_engine: AsyncEngine, sql: str, **params: Any) -> list[Row[Any]]:
    async with admin_engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


async def test_every_tenant_table_has_rls_enabled_and_forced(admin_engine: AsyncEngine) -> None:
    tables = await catalog(admin_engine, """
        SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity,
               EXISTS (SELECT 1 FROM pg_attribute a
                       WHERE a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped) AS has_tenant
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')""")
    with_tenant = {t.relname for t in tables if t.has_tenant}
    assert with_tenant == {t.name for t in (*TENANT_TABLES, *DATABASE_WRITTEN_TABLES)}, \
        "a table with tenant_id is missing from TENANT_TABLES"
    for t in tables:
        if t.has_tenant or t.relname in ("tenants", "users"):
            assert t.relrowsecurity and t.relforcerowsecurity, t.relname

    # Every table the app role may touch at all is under RLS.
    reachable = await catalog(admin_engine, """
        SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
          AND has_table_privilege(:role, c.oid, 'SELECT, INSERT, UPDATE, DELETE')""", role=APP_ROLE)
    assert {t.relname for t in reachable} >= {t.name for t in ALL_TABLES}
    for t in reachable:
        assert t.relrowsecurity and t.relforcerowsecurity, f"{t.relname} is reachable by {APP_ROLE} without RLS"


async def test_each_tenant_table_has_exactly_one_policy_keyed_by_the_tenant_setting(
    admin_engine: AsyncEngine,
) -> None:
    policies = await catalog(admin_engine, """
        SELECT tablename, policyname, permissive, roles::text[] AS roles, cmd, qual, with_check
        FROM pg_policies WHERE schemaname = 'public'""")
    by_table: dict[str, list[Row[Any]]] = {}
    for p in policies:
        by_table.setdefault(p.tablename, []).append(p)
    assert set(by_table) >= {t.name for t in ALL_TABLES}
    for name, found in by_table.items():
        # A second permissive policy would be OR-ed in and could widen what a tenant sees.
        assert len(found) == 1, (name, found)
        policy = found[0]
        assert policy.permissive == "PERMISSIVE" and policy.cmd == "ALL" and policy.roles == [APP_ROLE], policy
        assert "current_setting('app.tenant_id'" in policy.qual, policy
        if name in TRASHABLE_TABLES:
            # The tenant, and rows outside the trash unless the transaction shows it (migration 0012).
            assert policy.qual.startswith("((tenant_id = "), policy
            assert "AND ((deleted_at IS NULL) OR" in policy.with_check
            assert "current_setting('atrium.trash'" in policy.with_check
            if name in VISIBILITY_TABLES:
                # ... and, to read, rows the transaction's viewer may see (migration 0016): a row may be
                # written for someone else (WITH CHECK is the tenant and the trash alone).
                assert policy.qual.startswith(policy.with_check[:-1] + " AND "), policy
                assert "current_setting('atrium.sees_all'" in policy.qual, policy
            else:
                assert policy.with_check == policy.qual, policy
        elif name != "users":
            column = "id" if name == "tenants" else "tenant_id"
            assert policy.qual.startswith(f"({column} = ") and policy.with_check == policy.qual, policy


async def test_the_app_role_cannot_bypass_rls(admin_engine: AsyncEngine) -> None:
    (role,) = await catalog(admin_engine, "SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb "
                                          "FROM pg_roles WHERE rolname = :role", role=APP_ROLE)
    assert not role.rolsuper and not role.rolbypassrls and not role.rolcreaterole and not role.rolcreatedb
    # Nor through any role it is a member of.
    inherited = await catalog(admin_engine, """
        SELECT r.rolname FROM pg_roles r
        WHERE pg_has_role(:role, r.oid, 'MEMBER') AND r.rolname <> :role AND (r.rolsuper OR r.rolbypassrls)""",
                              role=APP_ROLE)
    assert inherited == []
    # It owns nothing (an owner is exempt from RLS unless forced, and can disable it), directly or by membership.
    owned = await catalog(admin_engine, """
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND pg_has_role(:role, c.relowner, 'MEMBER')""",
                          role=APP_ROLE)
    assert owned == []
    schemas = await catalog(admin_engine, "SELECT nspname FROM pg_namespace WHERE pg_has_role(:role, nspowner, "
                                          "'MEMBER')", role=APP_ROLE)
    assert schemas == []
    # TRUNCATE is not subject to RLS, so it must not be granted anywhere.
    truncatable = await catalog(admin_engine, """
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
          AND has_table_privilege(:role, c.oid, 'TRUNCATE, REFERENCES, TRIGGER')""", role=APP_ROLE)
    assert truncatable == []


async def test_audit_events_privileges_are_select_and_insert_only(admin_engine: AsyncEngine) -> None:
    (privileges,) = await catalog(admin_engine, """
        SELECT has_table_privilege(:role, 'audit_events', 'SELECT') AS can_select,
               has_table_privilege(:role, 'audit_events', 'INSERT') AS can_insert,
               has_table_privilege(:role, 'audit_events', 'UPDATE') AS can_update,
               has_table_privilege(:role, 'audit_events', 'DELETE') AS can_delete,
               has_any_column_privilege(:role, 'audit_events', 'UPDATE') AS can_update_a_column""", role=APP_ROLE)
    assert privileges.can_select and privileges.can_insert
    assert not (privileges.can_update or privileges.can_delete or privileges.can_update_a_column)


async def test_nothing_the_app_role_can_read_sidesteps_rls(admin_engine: AsyncEngine) -> None:
    # Views run as their owner unless security_invoker is set, so a readable view would bypass RLS.
    views = await catalog(admin_engine, """
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('v', 'm') AND has_table_privilege(:role, c.oid, 'SELECT')
          AND NOT coalesce('security_invoker=true' = ANY(c.reloptions), false)""", role=APP_ROLE)
    assert views == []
    # SECURITY DEFINER functions see across tenants: only the two reviewed ones may be callable.
    definers = await catalog(admin_engine, """
        SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = 'public' AND p.prosecdef AND has_function_privilege(:role, p.oid, 'EXECUTE')""",
                             role=APP_ROLE)
    # The audit functions act only on the transaction's tenant: redaction of its events (an erasure),
    # the trim its own retention policy allows; retention_due lists policies and trash retentions,
    # abandoned_exports the ids of jobs whose lease expired, dedicated_tenants the ids of tenants on a
    # database of their own, webhook_backlog two numbers over every tenant, import_jobs_due the ids of
    # unfinished imports (no tenant data); audit_append and audit_link chain the tenant's own events.
    assert sorted(d.proname for d in definers) == ["atrium_abandoned_exports", "atrium_api_key",
                                                   "atrium_apq_get", "atrium_apq_put",
                                                   "atrium_audit_append", "atrium_audit_link",
                                                   "atrium_audit_redact", "atrium_audit_trim",
                                                   "atrium_dedicated_tenants",
                                                   "atrium_ensure_user", "atrium_import_jobs_due",
                                                   "atrium_login_candidates",
                                                   "atrium_retention_due", "atrium_webhook_backlog",
                                                   "atrium_webhook_due",
                                                   "atrium_webhook_next_due"]


async def test_policies_reading_other_tables_are_known_to_the_answer_cache(admin_engine: AsyncEngine) -> None:
    """A cached answer depends on every table its rows' visibility reads: ``READS_THROUGH_POLICY``
    must name each table a policy's condition reads (users: memberships)."""
    names = {r.relname for r in await catalog(admin_engine, """
        SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')""")}
    for policy in await catalog(admin_engine, "SELECT tablename, qual FROM pg_policies WHERE schemaname = 'public'"):
        read = {name for name in names - {policy.tablename} if re.search(rf"\b{name}\b", policy.qual or "")}
        assert read == set(READS_THROUGH_POLICY.get(policy.tablename, ())), (policy.tablename, read)


async def test_every_table_a_record_reads_has_its_writes_versioned(admin_engine: AsyncEngine) -> None:
    """Answers are cached under the data versions of the tables they read: each such table must bump
    its version on insert, update and delete."""
    triggers = await catalog(admin_engine, """
        SELECT event_object_table AS table_name, event_manipulation AS event FROM information_schema.triggers
        WHERE trigger_schema = 'public' AND action_statement = 'EXECUTE FUNCTION atrium_bump_versions()'""")
    versioned: dict[str, set[str]] = {}
    for t in triggers:
        versioned.setdefault(t.table_name, set()).add(t.event)
    read = {record.table.name for record in RECORDS}
    read |= {dependency for name in read for dependency in READS_THROUGH_POLICY.get(name, ())}
    for name in read:
        assert versioned.get(name) == {"INSERT", "UPDATE", "DELETE"}, name
