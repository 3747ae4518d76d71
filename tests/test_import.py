"""CSV import: a background job through the one write path, deduplicated, with a per-row error report,
a dry run, coded errors for files it cannot start from, and isolation between tenants."""

from __future__ import annotations

import asyncio
import csv
import io
import re
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from core.ids import to_global_id
from core.settings import Settings
from models.audit_chain import verify_chain
from models.db import Databases
from models.tables import AUDIT_EVENTS, COMPANIES, CONTACTS, DEALS, IMPORT_ERRORS, IMPORT_FILES, IMPORT_JOBS, Role
from records.custom import Definition, definitions_query
from resolvers.csv_import import (
    CHUNK,
    READ_SLICE,
    check_file,
    create_job,
    due,
    plan_for,
    read_rows,
    record_for,
    rows_of,
    run_import,
)
from tests.cli import ROOT, environment
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.crm import create_custom_field, seed_crm, uuid_of
from tests.field_rules import REMOVE as REMOVE_RULE
from tests.field_rules import SET as SET_RULE
from tests.live import AtriumProcess, error_codes, live
from tests.wire import wired_app

MakeTenant = Callable[..., Awaitable[TenantWorld]]

START = """mutation($type: ImportType!, $csv: String!, $mapping: [ImportColumn!], $dryRun: Boolean! = false) {
  startImport(type: $type, csv: $csv, mapping: $mapping, dryRun: $dryRun) { id state total processed } }"""
JOB = """query($id: ID!) { importJob(id: $id) { id type state dryRun total processed created updated errors error
  mapping { column field } } importErrors(id: $id) { row column field code message } }"""


def table(*rows: list[Any]) -> str:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue()


async def imported(client: httpx.AsyncClient, app: Starlette, token: str, type_: str, text: str,
                   mapping: dict[str, str | None] | None = None, *, dry_run: bool = False) -> dict[str, Any]:
    """Start an import, wait for its job to end; ``importJob`` and ``importErrors`` of it."""
    variables: dict[str, Any] = {"type": type_, "csv": text, "dryRun": dry_run}
    if mapping is not None:
        variables["mapping"] = [{"column": c, "field": f} for c, f in mapping.items()]
    job = data_or_fail(await gql(client, START, variables, token=token))["startImport"]
    await app.state.runtime.tasks.idle()
    return data_or_fail(await gql(client, JOB, {"id": job["id"]}, token=token))


async def count(engine: AsyncEngine, table_: Any, tenant_id: uuid.UUID, *where: Any) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table_).where(
            table_.c.tenant_id == tenant_id, *where))).scalar_one())


async def test_contacts_import_creates_then_dedupes_by_email(
    client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant, admin_engine: AsyncEngine,
) -> None:
    world = await make_tenant("imp")
    token = world.token(Role.MEMBER)
    text = table(["First name", "last_name", "E-mail", "Ignored"],
                 ["Ada", "Lovelace", "ada@example.com", "x"],
                 ["Alan", "Turing", "alan@example.com", "y"],
                 ["Ada", "King", "ADA@example.com", "z"])  # the same person again: updates row 1's record
    found = await imported(client, app, token, "CONTACTS", text, {"First name": "firstName", "E-mail": "email"})
    job = found["importJob"]
    assert job["state"] == "DONE" and job["total"] == job["processed"] == 3 and job["errors"] == 0
    assert job["created"] == 2 and job["updated"] == 1
    assert {(m["column"], m["field"]) for m in job["mapping"]} == {
        ("First name", "firstName"), ("last_name", "lastName"), ("E-mail", "email")}
    body = data_or_fail(await gql(client, "{ contacts(first: 10) { nodes { firstName lastName email } } }",
                                  token=token))
    assert sorted((n["firstName"], n["lastName"]) for n in body["contacts"]["nodes"]) == [
        ("Ada", "King"), ("Alan", "Turing")]
    # Again: every row matches a record now, nothing new is created.
    again = (await imported(client, app, token, "CONTACTS", text, {"First name": "firstName",
                                                                   "E-mail": "email"}))["importJob"]
    assert again["created"] == 0 and again["updated"] == 3
    assert await count(admin_engine, CONTACTS, world.id) == 2
    # Through the write path: an audit row per record, the chain still verifies, the file is gone.
    assert await count(admin_engine, AUDIT_EVENTS, world.id, AUDIT_EVENTS.c.entity_type == "Contact",
                       AUDIT_EVENTS.c.action == "create") == 2
    async with admin_engine.connect() as conn:
        assert (await verify_chain(conn, world.id)).ok
    assert await count(admin_engine, IMPORT_FILES, world.id) == 0


async def test_matched_rows_update_together_and_a_refused_one_is_its_rows_error(
    client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant, admin_engine: AsyncEngine,
) -> None:
    """Rows that match records are written set-based, yet a row the write path refuses (an option the
    select does not have) is that row's error: the other matched rows are updated, audited once each,
    and the refused record keeps its values and its version."""
    world = await make_tenant("impupd")
    admin, token = world.token(Role.ADMIN), world.token(Role.MEMBER)
    await create_custom_field(client, admin, "COMPANY", "tier", "SINGLE_SELECT", options=["gold", "silver"])
    first = await imported(client, app, token, "COMPANIES", table(
        ["name", "domain"], ["Acme", "acme.test"], ["Bolt", "bolt.test"], ["Cog", "cog.test"]))
    assert first["importJob"]["created"] == 3
    second = await imported(client, app, token, "COMPANIES", table(
        ["name", "domain", "custom.tier"], ["Acme", "acme.test", "gold"], ["Bolt", "bolt.test", "bronze"],
        ["Cog Ltd", "cog.test", ""]))
    job, errors = second["importJob"], second["importErrors"]
    assert (job["state"], job["created"], job["updated"], job["errors"]) == ("DONE", 0, 2, 1), second
    assert [(e["row"], e["column"], e["field"], e["code"]) for e in errors] == [
        (2, "custom.tier", "customFields.tier", "BAD_USER_INPUT")], errors  # the second data row
    read = data_or_fail(await gql(client, "{ companies(first: 10) { nodes { name domain version "
                                          "customField(key: \"tier\") { ... on SelectValue { option } } } } }",
                                  token=token))
    got = {c["domain"]: (c["name"], c["version"], c["customField"]) for c in read["companies"]["nodes"]}
    assert got == {"acme.test": ("Acme", 2, {"option": "gold"}), "bolt.test": ("Bolt", 1, {"option": None}),
                   "cog.test": ("Cog Ltd", 2, {"option": None})}, got
    assert await count(admin_engine, AUDIT_EVENTS, world.id, AUDIT_EVENTS.c.entity_type == "Company",
                       AUDIT_EVENTS.c.action == "update") == 2


async def test_deals_import_reports_each_bad_row_and_imports_the_rest(
    client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant, admin_engine: AsyncEngine,
) -> None:
    world = await make_tenant("imp")
    token = world.token(Role.MEMBER)
    crm = await seed_crm(client, token)
    stage = crm.pipeline["stages"][0]["id"]
    text = table(["title", "amount", "currency", "stageId", "externalId", "closes"],
                 ["Good", "10.50", "usd", stage, "ext-1", "2030-01-31"],
                 ["Bad amount", "ten", "USD", stage, "ext-2", ""],
                 ["Bad stage", "5", "USD", crm.deal["id"], "ext-3", ""],
                 ["Bad date", "5", "USD", stage, "ext-4", "2030-02-30"],
                 ["", "5", "USD", stage, "ext-6", ""],
                 ["Good too", "7", "EUR", stage, "ext-5", ""])
    found = await imported(client, app, token, "DEALS", text, {"closes": "expectedCloseDate"})
    job = found["importJob"]
    assert job["state"] == "DONE" and job["created"] == 2 and job["errors"] == 4 and job["processed"] == 6
    errors = [(e["row"], e["column"], e["field"], e["code"]) for e in found["importErrors"]]
    assert errors == [(2, "amount", "amount", "BAD_USER_INPUT"),
                      (3, "stageId", "stageId", "BAD_USER_INPUT"),
                      (4, "closes", "expectedCloseDate", "BAD_USER_INPUT"),
                      (5, "title", "title", "BAD_USER_INPUT")]
    assert "date" in found["importErrors"][2]["message"]
    deals = data_or_fail(await gql(client, "{ deals(first: 10) { nodes { title amount currency externalId } } }",
                                   token=token))["deals"]["nodes"]
    assert {(d["title"], d["currency"], d["externalId"]) for d in deals} == {
        ("Good", "USD", "ext-1"), ("Good too", "EUR", "ext-5"), (crm.deal["title"], "USD", None)}
    # By external id: the same file again updates the two deals and creates none.
    again = (await imported(client, app, token, "DEALS", table(
        ["title", "externalId"], ["Renamed", "ext-1"]), None))["importJob"]
    assert again["updated"] == 1 and again["created"] == 0
    assert await count(admin_engine, DEALS, world.id, DEALS.c.title == "Renamed") == 1


async def test_a_dry_run_validates_and_writes_nothing(
    client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant, admin_engine: AsyncEngine,
) -> None:
    world = await make_tenant("imp")
    token = world.token(Role.MEMBER)
    before = await count(admin_engine, AUDIT_EVENTS, world.id)
    found = await imported(client, app, token, "COMPANIES", table(
        ["name", "domain"], ["Acme", "acme.example"], ["Bad", "not a domain"]), dry_run=True)
    job = found["importJob"]
    assert job["dryRun"] and job["state"] == "DONE" and job["created"] == 1 and job["errors"] == 1
    assert [(e["row"], e["field"]) for e in found["importErrors"]] == [(2, "domain")]
    body = data_or_fail(await gql(client, "{ companies(first: 5) { nodes { id } } }", token=token))
    assert body["companies"]["nodes"] == []
    # Only the job's own audit row ("import"), none of a company.
    assert await count(admin_engine, AUDIT_EVENTS, world.id) == before + 1


async def test_files_it_cannot_start_from_are_coded_errors(
    client: httpx.AsyncClient, make_tenant: MakeTenant,
) -> None:
    world = await make_tenant("imp")
    token = world.token(Role.MEMBER)

    async def refused(type_: str, text: str, mapping: dict[str, str] | None = None) -> tuple[str, str, str]:
        variables: dict[str, Any] = {"type": type_, "csv": text}
        if mapping:
            variables["mapping"] = [{"column": c, "field": f} for c, f in mapping.items()]
        body = await gql(client, START, variables, token=token)
        assert codes(body) == ["BAD_USER_INPUT"], body
        ext = body["errors"][0]["extensions"]
        return ext["field"], ext["reason"], body["errors"][0]["message"]

    assert (await refused("COMPANIES", ""))[:2] == ("file", "MISSING_HEADER")
    assert (await refused("COMPANIES", "\n\nname\n"))[:2] == ("file", "MISSING_HEADER")
    assert (await refused("COMPANIES", "name,name\nA,B\n"))[:2] == ("file", "DUPLICATE_HEADER")
    assert (await refused("COMPANIES", "name\nA\n", {"name": "title"}))[:2] == ("mapping.name", "UNKNOWN_FIELD")
    assert (await refused("COMPANIES", "name\nA\n", {"nom": "name"}))[:2] == ("mapping.nom", "UNKNOWN_COLUMN")
    assert (await refused("COMPANIES", "name,label\nA,B\n", {"label": "name"}))[:2] == (
        "mapping.label", "DUPLICATE_TARGET")
    assert (await refused("COMPANIES", 'name\n"unclosed\n'))[:2] == ("file", "MALFORMED")
    assert (await refused("COMPANIES", "na\x00me\nA\n"))[:2] == ("file", "MALFORMED")  # JSON text holds no NUL
    # Not UTF-8 (Latin-1 bytes), through the upload endpoint, which takes the bytes as they are.
    response = await client.post("/imports?type=companies", content="name\nCaf\xe9\n".encode("latin-1"),
                                 headers={"authorization": f"Bearer {token}", "content-type": "text/csv"})
    assert response.status_code == 400
    error = response.json()["errors"][0]
    assert error["extensions"] == {"code": "BAD_USER_INPUT", "field": "file", "reason": "NOT_UTF8"}
    # A viewer may not import.
    body = await gql(client, START, {"type": "COMPANIES", "csv": "name\nA\n"}, token=world.token(Role.VIEWER))
    assert codes(body) == ["FORBIDDEN"]


async def test_a_job_and_its_rows_belong_to_one_tenant(
    client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant, databases: Databases,
) -> None:
    a, b = await make_tenant("imp-a"), await make_tenant("imp-b")
    found = await imported(client, app, a.token(Role.MEMBER), "COMPANIES",
                           table(["name", "domain"], ["Only A's", ""], ["Bad", "not a domain"]))
    job_id = found["importJob"]["id"]
    assert found["importJob"]["errors"] == 1
    for query in (JOB, "query($id: ID!) { importErrors(id: $id) { row } }"):
        body = await gql(client, query, {"id": job_id}, token=b.token(Role.OWNER))
        assert set(codes(body)) == {"NOT_FOUND"}
    names = data_or_fail(await gql(client, "{ companies(first: 5) { nodes { name } } }", token=b.token()))
    assert names["companies"]["nodes"] == []
    # Row-level security alone: B's transaction, asking for A's rows by A's tenant id, sees none.
    key = uuid_of(job_id)
    for tenant, expected in ((a.id, 1), (b.id, 0)):
        async with databases.tenant_transaction(tenant) as conn:
            for t in (IMPORT_JOBS, IMPORT_ERRORS):
                seen = (await conn.execute(select(func.count()).select_from(t).where(
                    t.c.tenant_id == a.id, (t.c.id if t is IMPORT_JOBS else t.c.job_id) == key))).scalar_one()
                assert seen == expected, (t.name, tenant)


async def test_a_killed_import_resumes_where_it_stopped_without_duplicates(
    client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant, admin_engine: AsyncEngine,
    settings: Settings, tmp_path: Path,
) -> None:
    """``atrium import`` killed with SIGKILL mid-file: the job stays RUNNING at its last committed
    chunk, with exactly that chunk's rows written; resumed, it imports the rest, each row once.
    Companies without a domain have no dedupe key, so a row written twice would show twice."""
    world = await make_tenant("imp-kill")
    rows = 30 * CHUNK
    path = tmp_path / "companies.csv"
    path.write_text(table(["name"], *([f"Company {i:06d}"] for i in range(rows))))
    env = environment(DATABASE_URL=str(settings.database_url))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "atrium", "import", str(path), "--tenant", world.slug, "--type", "companies",
        cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    assert process.stderr is not None
    seen = b""
    try:
        async with asyncio.timeout(120):
            while not re.search(rb"\] ([2-9]\d{3}|\d{5})/", seen):  # two chunks committed, as the bar says
                piece = await process.stderr.read(4096)
                assert piece, seen.decode(errors="replace")
                seen += piece
        process.send_signal(signal.SIGKILL)
        assert await process.wait() == -signal.SIGKILL
    finally:
        if process.returncode is None:
            process.kill()
    async with admin_engine.connect() as conn:
        job = (await conn.execute(select(IMPORT_JOBS).where(IMPORT_JOBS.c.tenant_id == world.id))).one()
    assert job.state == "running" and 2 * CHUNK <= job.processed < rows and job.processed % CHUNK == 0
    assert await count(admin_engine, COMPANIES, world.id) == job.processed == job.created_count
    # A server resumes it (its resumer finds it; the lock went with the killed process's connection).
    runtime = app.state.runtime
    for _ in range(100):  # until PostgreSQL has seen the dead client's connection close
        if (world.id, job.id) not in await due(runtime.databases):
            break
        if await run_import(runtime.databases, runtime.broker, world.id, job.id):
            break
        await asyncio.sleep(0.05)
    await runtime.tasks.idle()
    found = data_or_fail(await gql(client, JOB, {"id": to_global_id("ImportJob", job.id)}, token=world.token()))
    assert found["importJob"]["state"] == "DONE" and found["importJob"]["processed"] == rows
    assert found["importJob"]["created"] == rows and found["importJob"]["errors"] == 0
    async with admin_engine.connect() as conn:
        names = (await conn.execute(select(COMPANIES.c.name, func.count()).where(COMPANIES.c.tenant_id == world.id)
                                    .group_by(COMPANIES.c.name).having(func.count() > 1))).all()
        assert names == []
        assert (await verify_chain(conn, world.id)).ok
    assert await count(admin_engine, COMPANIES, world.id) == rows


PROGRESS = "subscription($id: ID!) { importJobProgress(id: $id) { state processed total errors } }"


async def test_progress_streams_to_subscribers_on_another_server_until_done(
    servers: tuple[AtriumProcess, AtriumProcess], make_tenant: MakeTenant,
) -> None:
    """A job accepted by server B is followed from server A: its state after each chunk, ending DONE;
    another workspace cannot follow it."""
    a, b = servers
    world, other = await make_tenant("imp-live"), await make_tenant("imp-live-other")
    token = world.token(Role.MEMBER)
    rows = 5 * CHUNK
    async with b.client() as http:
        response = await http.post("/imports?type=companies&map=Company=name", content=table(
            ["Company", "Note"], *([f"Live {i}", "x"] for i in range(rows))).encode(),
            headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 202, response.text
    job = response.json()["data"]["startImport"]
    assert job["total"] == rows and job["type"] == "COMPANIES"
    async with live(a.ws_url, token) as session:
        op = await session.subscribe(PROGRESS, {"id": job["id"]})
        seen: list[dict[str, Any]] = []
        while not seen or seen[-1]["state"] not in ("DONE", "FAILED"):
            seen.append((await session.data(op))["importJobProgress"])
        assert (await session.message(op))["type"] == "complete"
    assert seen[-1] == {"state": "DONE", "processed": rows, "total": rows, "errors": 0}
    assert [s["processed"] for s in seen] == sorted(s["processed"] for s in seen)
    async with live(a.ws_url, other.token()) as session:
        op = await session.subscribe(PROGRESS, {"id": job["id"]})
        assert error_codes(await session.message(op)) == ["NOT_FOUND"]


async def test_an_import_sees_only_what_its_member_sees(
    client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant, admin_engine: AsyncEngine,
) -> None:
    """Under a team audience (docs/visibility.md) the job runs as the member who started it: a row
    whose external id is a deal that member cannot see neither updates nor reveals that deal."""
    world = await make_tenant("imp-vis")
    owner, member = world.token(Role.OWNER), world.token(Role.MEMBER)
    crm = await seed_crm(client, owner)
    stage = crm.pipeline["stages"][0]["id"]
    data_or_fail(await gql(client, """mutation($s: ID!) { createDeal(input: {title: "Owner's", amount: "5",
        currency: "USD", stageId: $s, externalId: "theirs"}) { id } }""", {"s": stage}, token=owner))
    data_or_fail(await gql(client, "mutation { setRecordVisibility(recordType: DEAL, audience: TEAM) { audience } }",
                           token=owner))
    found = await imported(client, app, member, "DEALS", table(
        ["title", "amount", "currency", "stageId", "externalId"],
        ["Overwritten", "1", "USD", stage, "theirs"], ["Mine", "2", "USD", stage, "mine"]))
    job = found["importJob"]
    assert job["state"] == "DONE" and job["updated"] == 0 and job["created"] == 1, found
    assert [(e["row"], e["field"]) for e in found["importErrors"]] == [(1, "externalId")]
    assert await count(admin_engine, DEALS, world.id, DEALS.c.title == "Owner's") == 1
    assert await count(admin_engine, DEALS, world.id, DEALS.c.title == "Overwritten") == 0


DEAL_FIELDS = """{ deals(first: 20) { nodes { title externalId customFields { key ... on TextValue { text }
  ... on NumberValue { number } ... on MoneyValue { amount currency } ... on DateValue { date }
  ... on BooleanValue { boolean } ... on SelectValue { option } ... on MultiSelectValue { options }
  ... on UserValue { userId } } } } }"""


async def define_deal_fields(client: httpx.AsyncClient, token: str) -> None:
    await create_custom_field(client, token, "DEAL", "tier", "SINGLE_SELECT", options=["gold", "silver", "bronze"],
                              default={"option": "bronze"})
    await create_custom_field(client, token, "DEAL", "score", "NUMBER")
    await create_custom_field(client, token, "DEAL", "budget", "MONEY")
    await create_custom_field(client, token, "DEAL", "renewal", "DATE")
    await create_custom_field(client, token, "DEAL", "signed", "BOOLEAN")
    await create_custom_field(client, token, "DEAL", "tags", "MULTI_SELECT", options=["a", "b", "c"])
    await create_custom_field(client, token, "DEAL", "champion", "USER")
    await create_custom_field(client, token, "DEAL", "region", "TEXT", required=True)


def custom_values(deal: dict[str, Any]) -> dict[str, Any]:
    """A deal's custom values by key (the one member its type has), those with a value."""
    out = {}
    for value in deal["customFields"]:
        members = {k: v for k, v in value.items() if k != "key" and v is not None}
        if members:
            out[value["key"]] = members if len(members) > 1 else next(iter(members.values()))
    return out


async def test_custom_fields_are_import_targets_checked_as_graphql_writes_check_them(
    client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant, admin_engine: AsyncEngine,
) -> None:
    """``custom.<key>`` columns (mapped, or by their own name) go through the write path's custom
    field checks: a bad value is its row's error naming the column and ``customFields.<key>``, with
    the message a GraphQL write gets; defaults and required flags apply as they do there; a matched
    record is updated with the custom values given and keeps the others."""
    world = await make_tenant("imp-cf")
    token = world.token(Role.MEMBER)
    stage = (await seed_crm(client, token)).pipeline["stages"][0]["id"]
    await define_deal_fields(client, world.token(Role.ADMIN))
    champion = to_global_id("User", world.users[Role.MEMBER])
    stranger = to_global_id("User", uuid.uuid4())
    header = ["title", "amount", "currency", "stageId", "externalId", "Tier", "custom.score", "Budget",
              "custom.renewal", "custom.signed", "custom.tags", "custom.champion", "Region"]
    mapping: dict[str, str | None] = {"Tier": "custom.tier", "Budget": "custom.budget", "Region": "custom.region"}
    good = ["A", "10", "USD", stage, "ext-a", "gold", "12.5", "1200.50 usd", "2030-01-31", "yes", "c; a", champion,
            "EMEA"]

    def row(title: str, key: str, **cells: str) -> list[str]:
        out = [title, "5", "USD", stage, key, *([""] * 7), "APAC"]
        for name, value in cells.items():
            out[header.index(name)] = value
        return out

    text = table(header, good,
                 row("B", "ext-b"),                                   # defaults: tier bronze
                 row("Bad tier", "ext-3", Tier="platinum"),
                 row("Bad currency", "ext-4", Budget="12 XXX"),
                 row("No region", "ext-5", Region=""),
                 row("Stranger", "ext-6", **{"custom.champion": stranger}),
                 row("Bad number", "ext-7", **{"custom.score": "ten"}),
                 row("Bad tags", "ext-8", **{"custom.tags": "a;a"}))
    found = await imported(client, app, token, "DEALS", text, mapping)
    job = found["importJob"]
    assert job["state"] == "DONE" and job["created"] == 2 and job["errors"] == 6, found
    assert {(m["column"], m["field"]) for m in job["mapping"]} >= {
        ("Tier", "custom.tier"), ("custom.score", "custom.score"), ("Region", "custom.region")}
    errors = [(e["row"], e["column"], e["field"], e["code"]) for e in found["importErrors"]]
    assert errors == [(3, "Tier", "customFields.tier", "BAD_USER_INPUT"),
                      (4, "Budget", "customFields.budget.currency", "BAD_USER_INPUT"),
                      (5, "Region", "customFields.region", "BAD_USER_INPUT"),
                      (6, "custom.champion", "customFields.champion", "NOT_FOUND"),
                      (7, "custom.score", "customFields.score", "BAD_USER_INPUT"),
                      (8, "custom.tags", "customFields.tags", "BAD_USER_INPUT")]
    # The same messages as the GraphQL write of the same values.
    refused = await gql(client, """mutation($i: DealInput!) { createDeal(input: $i) { id } }""", {"i": {
        "title": "T", "amount": "1", "currency": "USD", "stageId": stage,
        "customFields": [{"key": "region", "text": "X"}, {"key": "tier", "option": "platinum"}]}}, token=token)
    assert refused["errors"][0]["message"] == found["importErrors"][0]["message"] == (
        "customFields.tier: must be one of the options: gold, silver, bronze")
    assert found["importErrors"][2]["message"] == "customFields.region: is required"

    deals = {d["externalId"]: custom_values(d) for d in data_or_fail(
        await gql(client, DEAL_FIELDS, token=token))["deals"]["nodes"] if d["externalId"]}
    assert deals == {
        "ext-a": {"tier": "gold", "score": "12.5", "budget": {"amount": "1200.50", "currency": "USD"},
                  "renewal": "2030-01-31", "signed": True, "tags": ["c", "a"], "champion": champion,
                  "region": "EMEA"},
        "ext-b": {"tier": "bronze", "region": "APAC"}}
    # Audited as any create: the custom values are in the record's audit row.
    async with admin_engine.connect() as conn:
        diffs = (await conn.execute(select(AUDIT_EVENTS.c.diff).where(
            AUDIT_EVENTS.c.tenant_id == world.id, AUDIT_EVENTS.c.entity_type == "Deal",
            AUDIT_EVENTS.c.action == "create"))).scalars().all()
    assert {"tier": "bronze", "region": "APAC"} in [d["after"]["custom_fields"] for d in diffs]

    # Matched by external id: the values given change, the others stay; a bad one is the row's error.
    again = await imported(client, app, token, "DEALS", table(
        ["externalId", "custom.tier", "custom.score"], ["ext-a", "silver", ""], ["ext-b", "", "1e20"]))
    assert again["importJob"]["updated"] == 1 and again["importJob"]["errors"] == 1, again
    assert [(e["row"], e["column"], e["field"]) for e in again["importErrors"]] == [
        (2, "custom.score", "customFields.score")]
    deals = {d["externalId"]: custom_values(d) for d in data_or_fail(
        await gql(client, DEAL_FIELDS, token=token))["deals"]["nodes"] if d["externalId"]}
    assert deals["ext-a"]["tier"] == "silver" and deals["ext-a"]["score"] == "12.5"
    assert deals["ext-b"] == {"tier": "bronze", "region": "APAC"}

    # A dry run checks the custom values the same way and writes nothing.
    before = await count(admin_engine, DEALS, world.id)
    dry = await imported(client, app, token, "DEALS", table(
        ["title", "amount", "currency", "stageId", "custom.region", "custom.tier"],
        ["Dry", "1", "USD", stage, "EMEA", "gold"], ["Dry bad", "1", "USD", stage, "EMEA", "tin"],
        ["Dry required", "1", "USD", stage, "", ""]), dry_run=True)
    assert dry["importJob"]["created"] == 1 and dry["importJob"]["errors"] == 2
    assert [(e["row"], e["field"]) for e in dry["importErrors"]] == [
        (2, "customFields.tier"), (3, "customFields.region")]
    assert await count(admin_engine, DEALS, world.id) == before


async def test_a_mapping_names_only_the_workspaces_live_custom_fields(
    client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant, admin_engine: AsyncEngine,
) -> None:
    """``custom.<key>`` must be a live custom field of this workspace and record type: another
    workspace's key, a deleted field's, or a type without custom fields is UNKNOWN_FIELD before any
    job exists; an unmapped column named after another workspace's field is left out."""
    a, b = await make_tenant("imp-cf-a"), await make_tenant("imp-cf-b")
    await create_custom_field(client, b.token(), "DEAL", "secret", "TEXT")
    gone = await create_custom_field(client, a.token(), "DEAL", "gone", "TEXT")
    data_or_fail(await gql(client, "mutation($id: ID!) { deleteCustomFieldDefinition(id: $id) { id } }",
                           {"id": gone["id"]}, token=a.token()))
    await create_custom_field(client, a.token(), "COMPANY", "size", "NUMBER")
    token = a.token(Role.MEMBER)
    stage = (await seed_crm(client, token)).pipeline["stages"][0]["id"]

    async def refused(type_: str, text: str, mapping: dict[str, str]) -> tuple[str, str, str]:
        body = await gql(client, START, {"type": type_, "csv": text, "mapping": [
            {"column": c, "field": f} for c, f in mapping.items()]}, token=token)
        assert codes(body) == ["BAD_USER_INPUT"], body
        return body["errors"][0]["extensions"]["field"], body["errors"][0]["extensions"]["reason"], \
            body["errors"][0]["message"]

    deal = table(["title", "amount", "currency", "stageId", "X"], ["T", "1", "USD", stage, "x"])
    field, reason, message = await refused("DEALS", deal, {"X": "custom.secret"})
    assert (field, reason) == ("mapping.X", "UNKNOWN_FIELD") and "secret" in message
    assert (await refused("DEALS", deal, {"X": "custom.gone"}))[:2] == ("mapping.X", "UNKNOWN_FIELD")
    assert (await refused("DEALS", deal, {"X": "custom.size"}))[:2] == ("mapping.X", "UNKNOWN_FIELD")
    assert (await refused("ACTIVITIES", table(["kind", "subject", "X"], ["NOTE", "s", "x"]),
                          {"X": "custom.size"}))[:2] == ("mapping.X", "UNKNOWN_FIELD")
    # The company field is A's own: a company import takes it.
    companies = await imported(client, app, token, "COMPANIES", table(["name", "custom.size"], ["Big", "500"]))
    assert companies["importJob"]["created"] == 1 and companies["importJob"]["errors"] == 0, companies
    # Unmapped, a column named after B's field is no column of A's: left out, nothing of it stored.
    found = await imported(client, app, token, "DEALS", table(
        ["title", "amount", "currency", "stageId", "custom.secret"], ["Mine", "1", "USD", stage, "leak"]))
    assert found["importJob"]["created"] == 1 and {m["field"] for m in found["importJob"]["mapping"]} == {
        "title", "amount", "currency", "stageId"}
    async with admin_engine.connect() as conn:
        stored = (await conn.execute(select(DEALS.c.custom_fields).where(
            DEALS.c.tenant_id == a.id, DEALS.c.title == "Mine"))).scalar_one()
    assert stored == {}


async def test_a_custom_field_deleted_before_the_job_runs_fails_it(
    client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant, admin_engine: AsyncEngine,
) -> None:
    """A job (accepted, not yet run) whose mapping names a custom field deleted since ends FAILED,
    saying why, and writes nothing."""
    world = await make_tenant("imp-cf-del")
    field = await create_custom_field(client, world.token(), "COMPANY", "size", "NUMBER")
    runtime = app.state.runtime
    record = record_for("companies")
    content = table(["name", "custom.size"], ["Big", "5"]).encode()
    async with runtime.databases.tenant_transaction(world.id) as conn:
        definitions = [Definition.from_row(r) for r in (await conn.execute(
            definitions_query("Company"), {"tenant_id": world.id})).all()]
        checked = check_file(record, content, None, definitions)
        job = await create_job(conn, world.id, world.users[Role.MEMBER], record, content, checked, dry_run=False)
    assert checked.plan.mapping() == {"name": "name", "custom.size": "custom.size"}
    data_or_fail(await gql(client, "mutation($id: ID!) { deleteCustomFieldDefinition(id: $id) { id } }",
                           {"id": field["id"]}, token=world.token()))
    assert await run_import(runtime.databases, runtime.broker, world.id, job.id)
    found = data_or_fail(await gql(client, JOB, {"id": to_global_id("ImportJob", job.id)}, token=world.token()))
    assert found["importJob"]["state"] == "FAILED" and "custom.size" in found["importJob"]["error"], found
    assert await count(admin_engine, COMPANIES, world.id) == 0


async def test_the_command_line_maps_columns_to_custom_fields(
    client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine, settings: Settings,
    tmp_path: Path,
) -> None:
    """``atrium import --map COLUMN=custom.<key>`` reads the workspace's definitions as the API does:
    the values land typed, a bad one is listed with its row and column, an unknown key stops it."""
    world = await make_tenant("imp-cli-cf")
    await create_custom_field(client, world.token(), "COMPANY", "size", "NUMBER")
    path = tmp_path / "companies.csv"
    path.write_text(table(["Name", "Size"], ["Big", "500"], ["Odd", "lots"]))

    async def command(*mapping: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "atrium", "import", str(path), "--tenant", world.slug, "--type", "companies",
            *(part for m in mapping for part in ("--map", m)), cwd=ROOT,
            env=environment(DATABASE_URL=str(settings.database_url)), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await process.communicate()
        assert process.returncode is not None
        return process.returncode, (out + err).decode()

    status, said = await command("Name=name", "Size=custom.size")
    assert status == 0, said
    assert "row 2 column 'Size': BAD_USER_INPUT customFields.size:" in said and "1 created" in said
    async with admin_engine.connect() as conn:
        stored = (await conn.execute(select(COMPANIES.c.name, COMPANIES.c.custom_fields).where(
            COMPANIES.c.tenant_id == world.id))).all()
    assert [(r.name, r.custom_fields) for r in stored] == [("Big", {"size": 500})]
    status, said = await command("Name=name", "Size=custom.weight")
    assert status == 2 and "custom.weight" in said and "UNKNOWN_FIELD" in said, said


async def test_a_role_cannot_import_into_a_field_hidden_from_it(
    client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant, admin_engine: AsyncEngine,
) -> None:
    """An import writes what it maps: a column mapped to a field (declared or custom) that a field
    rule hides from the importing member's role is FORBIDDEN naming the column, through GraphQL and
    HTTP alike, and nothing is accepted; a role the field is not hidden from imports it. A rule
    made after a job was accepted fails the job when it runs, writing nothing."""
    world = await make_tenant("imp-rules")
    await create_custom_field(client, world.token(), "CONTACT", "tier", "TEXT")
    for field in ("email", "custom.tier"):
        data_or_fail(await gql(client, SET_RULE, {"t": "Contact", "f": field, "r": ["MEMBER"]},
                               token=world.token(Role.ADMIN)))
    text = table(["firstName", "lastName", "email", "custom.tier"], ["Ada", "Lovelace", "ada@example.com", "gold"])
    member = world.token(Role.MEMBER)
    for mapping, column in (({"custom.tier": None}, "email"), ({"email": None}, "custom.tier")):
        body = await gql(client, START, {"type": "CONTACTS", "csv": text, "dryRun": False,
                                         "mapping": [{"column": c, "field": f} for c, f in mapping.items()]},
                         token=member)
        assert codes(body) == ["FORBIDDEN"] and body["errors"][0]["extensions"]["field"] == f"mapping.{column}", body
    response = await client.post("/imports?type=contacts", content=text.encode(),
                                 headers={"authorization": f"Bearer {member}", "content-type": "text/csv"})
    assert response.status_code == 403 and response.json()["errors"][0]["extensions"] == {
        "code": "FORBIDDEN", "field": "mapping.email"}, response.text
    assert await count(admin_engine, IMPORT_JOBS, world.id) == 0
    # Unmapped, the hidden columns are left alone; the admin, whom no rule hides them from, imports them.
    done = await imported(client, app, member, "CONTACTS", text, {"email": None, "custom.tier": None})
    assert (done["importJob"]["state"], done["importJob"]["created"]) == ("DONE", 1), done["importJob"]["error"]
    done = await imported(client, app, world.token(Role.ADMIN), "CONTACTS",
                          table(["firstName", "lastName", "email", "custom.tier"], ["Bo", "B", "bo@example.com", "x"]))
    assert (done["importJob"]["state"], done["importJob"]["created"]) == ("DONE", 1), done["importJob"]["error"]

    # Accepted while the field was visible to the member, run after it was hidden: FAILED, nothing written.
    data_or_fail(await gql(client, REMOVE_RULE, {"t": "Contact", "f": "email"}, token=world.token(Role.ADMIN)))
    runtime = app.state.runtime
    content = table(["firstName", "lastName", "email"], ["Cy", "C", "cy@example.com"]).encode()
    async with runtime.databases.tenant_transaction(world.id) as conn:
        job = await create_job(conn, world.id, world.users[Role.MEMBER], record_for("contacts"), content,
                               check_file(record_for("contacts"), content, None), dry_run=False)
    data_or_fail(await gql(client, SET_RULE, {"t": "Contact", "f": "email", "r": ["MEMBER"]},
                           token=world.token(Role.ADMIN)))
    assert await run_import(runtime.databases, runtime.broker, world.id, job.id)
    found = data_or_fail(await gql(client, JOB, {"id": to_global_id("ImportJob", job.id)}, token=world.token()))
    assert found["importJob"]["state"] == "FAILED" and "mapping.email" in found["importJob"]["error"], found
    assert await count(admin_engine, CONTACTS, world.id) == 2


async def test_a_chunk_runs_the_write_paths_checks_once_and_reports_each_refused_row(
    settings: Settings, make_tenant: MakeTenant, admin_engine: AsyncEngine,
) -> None:
    """The rows of a chunk are checked by the write path itself (``create_many`` and ``update_rows``
    handing each refused row over instead of failing the chunk): a reference to a record the
    workspace does not have, an external id a deal in the trash still holds and a custom value
    outside the options are each their row's error, the others are written, and each relation's
    references are looked up in one statement for the chunk's creates and one for its matched rows
    (not once for the report and again for the write)."""
    world = await make_tenant("imp-once")
    token = world.token(Role.MEMBER)
    async with wired_app(settings) as app, httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as client:
        crm = await seed_crm(client, token)
        stage = crm.pipeline["stages"][0]["id"]
        await create_custom_field(client, world.token(Role.ADMIN), "DEAL", "tier", "SINGLE_SELECT",
                                  options=["gold", "silver"])
        held = data_or_fail(await gql(client, """mutation($i: DealInput!) { createDeal(input: $i) { id } }""",
                                      {"i": {"title": "Held", "amount": "1", "currency": "USD", "stageId": stage,
                                             "externalId": "held"}}, token=token))["createDeal"]["id"]
        data_or_fail(await gql(client, "mutation($id: ID!) { deleteDeal(id: $id) { deletedId } }", {"id": held},
                               token=world.token(Role.ADMIN)))
        text = table(["title", "amount", "currency", "stageId", "companyId", "externalId", "custom.tier"],
                     ["Good", "1", "USD", stage, crm.company["id"], "once-1", "gold"],
                     ["No such company", "1", "USD", stage, to_global_id("Company", uuid.uuid4()), "once-2", ""],
                     ["Held", "1", "USD", stage, "", "held", ""],
                     ["Bad tier", "1", "USD", stage, "", "once-3", "platinum"],
                     ["Good too", "2", "USD", stage, crm.company["id"], "once-4", "silver"])
        with app.state.wire.recording() as statements:
            found = await imported(client, app, token, "DEALS", text)
    job = found["importJob"]
    assert job["state"] == "DONE" and job["created"] == 2 and job["errors"] == 3, found
    assert [(e["row"], e["column"], e["field"], e["code"]) for e in found["importErrors"]] == [
        (2, "companyId", "companyId", "NOT_FOUND"),
        (3, "externalId", "externalId", "BAD_USER_INPUT"),
        (4, "custom.tier", "customFields.tier", "BAD_USER_INPUT")]
    assert "already used" in found["importErrors"][1]["message"]
    assert await count(admin_engine, DEALS, world.id, DEALS.c.external_id.like("once-%")) == 2
    looked_up = [s for s in statements if "JOIN LATERAL" in s and "FROM companies" in s]
    assert len(looked_up) == 1, looked_up
    assert sum("INSERT INTO deals" in s for s in statements) == 1, statements
    # Matched rows the same way (``update_rows``): a bad reference is its row's error, the rest updated.
    async with wired_app(settings) as app, httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as client:
        with app.state.wire.recording() as statements:
            again = await imported(client, app, token, "DEALS", table(
                ["title", "companyId", "externalId"],
                ["Renamed", "", "once-1"],
                ["Moved away", to_global_id("Company", uuid.uuid4()), "once-4"]))
    assert again["importJob"]["updated"] == 1 and again["importJob"]["errors"] == 1, again
    assert [(e["row"], e["field"], e["code"]) for e in again["importErrors"]] == [(2, "companyId", "NOT_FOUND")]
    assert len([s for s in statements if "JOIN LATERAL" in s and "FROM companies" in s]) == 1, statements
    assert await count(admin_engine, DEALS, world.id, DEALS.c.title == "Renamed") == 1
    assert await count(admin_engine, DEALS, world.id, DEALS.c.title == "Good too") == 1


async def test_a_chunk_is_read_a_slice_at_a_time_giving_other_tasks_turns() -> None:
    """``read_rows`` (the next chunk, read while the current one is written) lets the event loop run
    other tasks between slices of ``READ_SLICE`` rows, and reads every row as a single pass would."""
    record = record_for("deals")
    header, data = rows_of(table(["title", "amount", "currency", "externalId"],
                                 *(["Deal", f"{i}.50", "USD", f"slice-{i}"] for i in range(CHUNK))).encode())
    plan = plan_for(record, header, None)
    rows = list(data)
    turns = 0

    async def tick() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)  # one turn of the loop each, counted

    ticking = asyncio.create_task(tick())
    try:
        read = await read_rows(plan, rows)
    finally:
        ticking.cancel()
    assert turns >= CHUNK // READ_SLICE - 1
    assert read.done == CHUNK and read.errors == [] and len(read.parsed) == CHUNK
    assert read.parsed[7].values == {"title": "Deal", "amount": Decimal("7.50"), "currency": "USD",
                                     "external_id": "slice-7"}
