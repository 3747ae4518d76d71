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
from resolvers.csv_import import CHUNK, due, run_import
from tests.cli import ROOT, environment
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.crm import seed_crm, uuid_of
from tests.live import AtriumProcess, error_codes, live

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
