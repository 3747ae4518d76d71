"""Record-level visibility (docs/visibility.md): a deal of a TEAM-audience workspace is seen by its owner,
the members of the owner's teams, those teams' managers, and admins and owners; by nobody else.

One workspace, with team East (MEMBER and ``mate``, managed by ``boss``) and ``outsider`` in no team;
a deal owned by ``mate`` (with a line item and a note), one by ``outsider``, one by the OWNER. Every
check that expects nothing also shows that somebody does see the record, so none passes vacuously;
and where a record is hidden the answer is exactly the answer for another workspace's record.

The API tests run twice (``either_client``): against the app as deployed (its filters and row-level
security), and as the superuser, for whom RLS does not apply: the application's filters alone must
hold. The RLS tests run statements without the application's filters, as the application role:
row-level security alone must hold. Subscriptions and the answer cache are checked on their own
(with plans on, whatever ``ATRIUM_PLANS`` says).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from atrium.ops.admin import add_user
from auth.tokens import issue_token
from core.clock import ManualClock
from core.settings import Settings
from models.db import Databases, TenantScope
from models.tables import DEAL_LINE_ITEMS, DEALS, NOTES, Role
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.crm import create_deal, gid, seed_crm, uuid_of
from tests.governance import archive_files, finished_export, jsonl
from tests.live import live, serve_in_process
from tests.partners import running

MakeTenant = Callable[..., Awaitable[TenantWorld]]
EXTRA = ("mate", "outsider", "boss")
"""Members beyond the one per role: ``mate`` is in team East with MEMBER, ``boss`` manages it."""

DEALS_QUERY = "{ deals(first: 50) { totalCount nodes { id } } }"
RESTRICT = "mutation { setRecordVisibility(recordType: DEAL, audience: TEAM) { recordType audience } }"
OPEN_UP = "mutation { setRecordVisibility(recordType: DEAL, audience: WORKSPACE) { recordType audience } }"


@dataclass
class Workspace:
    world: TenantWorld
    people: dict[str, uuid.UUID]
    deals: dict[str, str]
    """Deal global IDs by owner: ``mate``, ``outsider``, ``owner``."""
    company: str
    stage: str
    line_item: str
    note: str
    tag: str

    def token(self, who: str) -> str:
        if who in self.people:
            return issue_token(self.world.settings, user_id=self.people[who], tenant_id=self.world.id,
                               role=Role.MEMBER)
        return self.world.token(Role(who))

    def gid(self, who: str) -> str:
        return gid("User", self.people[who] if who in self.people else self.world.users[Role(who)])


async def workspace(make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine, *,
                    restricted: bool = True) -> Workspace:
    world = await make_tenant("vis")
    people = {name: await add_user(admin_engine, world.id, f"{name}@{world.slug}.example", name.title(), Role.MEMBER)
              for name in EXTRA}
    owner = world.token(Role.OWNER)
    crm = await seed_crm(client, owner)
    ws = Workspace(world, people, {}, crm.company["id"], crm.stage["id"], "", "", crm.tag)
    ws.deals["owner"] = crm.deal["id"]  # seed_crm's, made by the OWNER (amount 100.00)
    for who, amount in (("mate", "200.00"), ("outsider", "400.00")):
        made = await create_deal(client, owner, ws.stage, company_id=ws.company, contact_id=crm.contact["id"],
                                 owner_id=ws.gid(who), title=f"Deal of {who} {crm.tag}", amount=amount)
        ws.deals[who] = made["id"]
    product = data_or_fail(await gql(client, "mutation($i: ProductInput!) { createProduct(input: $i) { id } }", {
        "i": {"name": "Widget", "sku": uuid.uuid4().hex[:12], "unitPrice": "10.00", "currency": "USD"}},
        token=owner))["createProduct"]["id"]
    ws.line_item = data_or_fail(await gql(client, "mutation($i: DealLineItemInput!) { createDealLineItem(input: $i) "
                                                  "{ id } }", {"i": {"dealId": ws.deals["mate"], "productId": product,
                                                                     "quantity": 2}}, token=owner)
                                )["createDealLineItem"]["id"]
    ws.note = data_or_fail(await gql(client, "mutation($i: NoteInput!) { createNote(input: $i) { id } }",
                                     {"i": {"dealId": ws.deals["mate"]}}, token=owner))["createNote"]["id"]
    data_or_fail(await gql(client, "mutation($i: TeamInput!) { createTeam(input: $i) { id } }", {"i": {
        "name": "East", "managerId": ws.gid("boss"), "memberIds": [ws.gid("member"), ws.gid("mate")]}}, token=owner))
    if restricted:
        data_or_fail(await gql(client, RESTRICT, token=owner))
    return ws


async def seen(client: httpx.AsyncClient, token: str, query: str = DEALS_QUERY,
               variables: dict[str, Any] | None = None) -> set[str]:
    data = data_or_fail(await gql(client, query, variables, token=token))
    return {node["id"] for node in next(iter(data.values()))["nodes"]}


# ---- who sees what ---------------------------------------------------------------------------------

async def test_a_team_audience_shows_a_deal_to_its_owners_team_their_manager_and_admins(
        make_tenant: MakeTenant, either_client: httpx.AsyncClient, admin_engine: AsyncEngine) -> None:
    ws = await workspace(make_tenant, either_client, admin_engine)
    d = ws.deals
    expected = {
        "mate": {d["mate"]}, "member": {d["mate"]}, "boss": {d["mate"]}, "outsider": {d["outsider"]},
        "viewer": set(), "admin": set(d.values()), "owner": set(d.values()),
    }
    for who, deals in expected.items():
        answer = data_or_fail(await gql(either_client, DEALS_QUERY, token=ws.token(who)))["deals"]
        assert {n["id"] for n in answer["nodes"]} == deals, who
        assert answer["totalCount"] == len(deals), who

    # The default audience (and going back to it) shows every deal to every member.
    data_or_fail(await gql(either_client, OPEN_UP, token=ws.token("owner")))
    for who in expected:
        assert await seen(either_client, ws.token(who)) == set(d.values()), who


async def test_the_audience_is_the_workspaces_own(
        make_tenant: MakeTenant, either_client: httpx.AsyncClient, admin_engine: AsyncEngine) -> None:
    restricted = await workspace(make_tenant, either_client, admin_engine)
    other = await workspace(make_tenant, either_client, admin_engine, restricted=False)
    assert await seen(either_client, other.token("outsider")) == set(other.deals.values())
    assert await seen(either_client, restricted.token("outsider")) == {restricted.deals["outsider"]}
    listed = data_or_fail(await gql(either_client, "{ recordVisibility { recordType audience } }",
                                    token=restricted.token("viewer")))["recordVisibility"]
    assert listed == [{"recordType": "DEAL", "audience": "TEAM"}]
    listed = data_or_fail(await gql(either_client, "{ recordVisibility { recordType audience } }",
                                    token=other.token("viewer")))["recordVisibility"]
    assert listed == [{"recordType": "DEAL", "audience": "WORKSPACE"}]


BY_ID = """query($id: ID!, $line: ID!, $note: ID!) {
  deal(id: $id) { id title } node(id: $id) { id }
  line: node(id: $line) { id } note: node(id: $note) { id }
}"""


async def test_a_hidden_deal_read_by_id_answers_as_another_workspaces_deal(
        make_tenant: MakeTenant, either_client: httpx.AsyncClient, admin_engine: AsyncEngine) -> None:
    ws = await workspace(make_tenant, either_client, admin_engine)
    other = await workspace(make_tenant, either_client, admin_engine)
    ids = {"id": ws.deals["mate"], "line": ws.line_item, "note": ws.note}
    visible = data_or_fail(await gql(either_client, BY_ID, ids, token=ws.token("member")))
    assert visible["deal"]["id"] == visible["node"]["id"] == ws.deals["mate"]
    assert visible["line"] == {"id": ws.line_item} and visible["note"] == {"id": ws.note}

    hidden = await gql(either_client, BY_ID, ids, token=ws.token("outsider"))
    foreign = await gql(either_client, BY_ID, {"id": other.deals["mate"], "line": other.line_item,
                                               "note": other.note}, token=ws.token("outsider"))
    assert "errors" not in hidden and "errors" not in foreign
    assert hidden["data"] == foreign["data"] == {"deal": None, "node": None, "line": None, "note": None}


NESTED = """query($company: ID!) {
  company(id: $company) { deals(first: 10) { id } contact: contacts(first: 2) { deals(first: 10) { id } } }
  pipelines { stages { deals(first: 10) { id lineItems(first: 5) { id } } } }
  dealLineItems(first: 10) { totalCount nodes { id deal { id } } }
  activities(first: 10) { nodes { deal { id } } }
}"""


async def test_nested_lists_and_relations_leave_hidden_deals_and_what_belongs_to_them_out(
        make_tenant: MakeTenant, either_client: httpx.AsyncClient, admin_engine: AsyncEngine) -> None:
    ws = await workspace(make_tenant, either_client, admin_engine)
    for who, deals in (("member", {ws.deals["mate"]}), ("outsider", {ws.deals["outsider"]}),
                       ("admin", set(ws.deals.values()))):
        data = data_or_fail(await gql(either_client, NESTED, {"company": ws.company}, token=ws.token(who)))
        assert {d["id"] for d in data["company"]["deals"]} == deals, who
        assert {d["id"] for c in data["company"]["contact"] for d in c["deals"]} == deals, who
        staged = [d for p in data["pipelines"] for s in p["stages"] for d in s["deals"]]
        assert {d["id"] for d in staged} == deals, who
        lines = {li["id"] for d in staged for li in d["lineItems"]}
        sees_line = ws.deals["mate"] in deals
        assert lines == ({ws.line_item} if sees_line else set()), who
        assert data["dealLineItems"]["totalCount"] == (1 if sees_line else 0), who
        # An activity about a hidden deal stays (activities have no owner), its deal reads null.
        linked = {a["deal"]["id"] for a in data["activities"]["nodes"] if a["deal"]}
        assert linked <= deals, who


async def test_filters_search_and_aggregates_count_only_visible_deals(
        make_tenant: MakeTenant, either_client: httpx.AsyncClient, admin_engine: AsyncEngine) -> None:
    ws = await workspace(make_tenant, either_client, admin_engine)
    by_owner = "query($o: ID!) { deals(filter: {ownerId: $o}) { nodes { id } } }"
    assert await seen(either_client, ws.token("member"), by_owner, {"o": ws.gid("mate")}) == {ws.deals["mate"]}
    assert await seen(either_client, ws.token("outsider"), by_owner, {"o": ws.gid("mate")}) == set()
    search = "query($s: String!) { deals(filter: {search: $s}) { nodes { id } } }"
    assert await seen(either_client, ws.token("member"), search, {"s": f"Deal of mate {ws.tag}"}) == {ws.deals["mate"]}
    assert await seen(either_client, ws.token("outsider"), search, {"s": f"Deal of mate {ws.tag}"}) == set()
    assert await seen(either_client, ws.token("outsider"), search, {"s": ws.tag}) == {ws.deals["outsider"]}

    aggregate = """{ dealsAggregate(groupBy: [OWNER]) { groups { count owner { id } amount { sum } } }
                     dealLineItemsAggregate(groupBy: [DEAL]) { groups { count } } }"""
    for who, owners in (("member", {"mate"}), ("outsider", {"outsider"}), ("owner", {"mate", "outsider", "owner"})):
        data = data_or_fail(await gql(either_client, aggregate, token=ws.token(who)))
        groups = data["dealsAggregate"]["groups"]
        assert {g["owner"]["id"] for g in groups} == {ws.gid(o) for o in owners}, who
        assert all(g["count"] == 1 for g in groups), who
        assert sum(g["count"] for g in data["dealLineItemsAggregate"]["groups"]) == (1 if "mate" in owners else 0)


# ---- writes ----------------------------------------------------------------------------------------

WRITES = {
    "update": "mutation($id: ID!) { updateDeal(id: $id, input: {title: \"Taken\"}) { id } }",
    "move": "mutation($id: ID!, $s: ID!) { moveDeal(id: $id, stageId: $s) { id } }",
    "activity": "mutation($id: ID!) { createActivity(input: {kind: NOTE, subject: \"x\", dealId: $id}) { id } }",
    "note": "mutation($id: ID!) { createNote(input: {dealId: $id}) { id } }",
}


@pytest.mark.parametrize("write", sorted(WRITES))
async def test_writing_a_hidden_deal_is_not_found_like_another_workspaces(
        make_tenant: MakeTenant, either_client: httpx.AsyncClient, admin_engine: AsyncEngine, write: str) -> None:
    ws = await workspace(make_tenant, either_client, admin_engine)
    other = await workspace(make_tenant, either_client, admin_engine)
    query = WRITES[write]
    hidden = await gql(either_client, query, {"id": ws.deals["mate"], "s": ws.stage}, token=ws.token("outsider"))
    foreign = await gql(either_client, query, {"id": other.deals["mate"], "s": ws.stage}, token=ws.token("outsider"))
    assert codes(hidden) == codes(foreign) == ["NOT_FOUND"], (hidden, foreign)
    assert hidden["errors"][0]["extensions"].get("field") == foreign["errors"][0]["extensions"].get("field")
    assert hidden["data"] is None and foreign["data"] is None
    assert hidden["errors"][0]["message"].replace(ws.deals["mate"], "X").replace(str(uuid_of(ws.deals["mate"])), "X") \
        == foreign["errors"][0]["message"].replace(other.deals["mate"], "X").replace(
            str(uuid_of(other.deals["mate"])), "X")
    async with admin_engine.connect() as conn:
        row = (await conn.execute(select(DEALS.c.title, DEALS.c.deleted_at, DEALS.c.stage_id)
                                  .where(DEALS.c.id == uuid_of(ws.deals["mate"])))).one()
    assert row.title == "Deal of mate " + ws.tag and row.deleted_at is None
    # The member of the owner's team may do it.
    assert not (await gql(either_client, query, {"id": ws.deals["mate"], "s": ws.stage},
                          token=ws.token("member"))).get("errors")


async def test_a_deal_cannot_be_handed_to_an_owner_outside_ones_teams(
        make_tenant: MakeTenant, either_client: httpx.AsyncClient, admin_engine: AsyncEngine) -> None:
    ws = await workspace(make_tenant, either_client, admin_engine)
    create = "mutation($i: DealInput!) { createDeal(input: $i) { id owner { id } } }"
    given = {"title": "Mine", "amount": "1.00", "currency": "USD", "stageId": ws.stage}
    refused = await gql(either_client, create, {"i": {**given, "ownerId": ws.gid("outsider")}},
                        token=ws.token("member"))
    assert codes(refused) == ["BAD_USER_INPUT"] and refused["errors"][0]["extensions"]["field"] == "ownerId"
    made = data_or_fail(await gql(either_client, create, {"i": {**given, "ownerId": ws.gid("mate")}},
                                  token=ws.token("member")))["createDeal"]
    assert made["owner"]["id"] == ws.gid("mate")
    mine = data_or_fail(await gql(either_client, create, {"i": given}, token=ws.token("outsider")))["createDeal"]
    assert mine["owner"]["id"] == ws.gid("outsider")
    handed = await gql(either_client, "mutation($id: ID!, $o: ID!) { updateDeal(id: $id, input: {ownerId: $o}) "
                                      "{ id } }", {"id": made["id"], "o": ws.gid("outsider")}, token=ws.token("member"))
    assert codes(handed) == ["BAD_USER_INPUT"] and handed["errors"][0]["extensions"]["field"] == "ownerId"
    # An admin sees everyone's deals, so may give one to anybody.
    data_or_fail(await gql(either_client, "mutation($id: ID!, $o: ID!) { updateDeal(id: $id, input: {ownerId: $o}) "
                                          "{ id } }", {"id": made["id"], "o": ws.gid("outsider")},
                           token=ws.token("admin")))
    assert made["id"] not in await seen(either_client, ws.token("member"))
    assert made["id"] in await seen(either_client, ws.token("outsider"))


# ---- teams -----------------------------------------------------------------------------------------

TEAMS = "{ teams { id name version manager { id } members { user { id } } } }"


async def test_teams_are_managed_by_admins_and_change_who_sees_what(
        make_tenant: MakeTenant, either_client: httpx.AsyncClient, admin_engine: AsyncEngine) -> None:
    ws = await workspace(make_tenant, either_client, admin_engine)
    admin = ws.token("admin")
    [east] = data_or_fail(await gql(either_client, TEAMS, token=ws.token("viewer")))["teams"]
    assert east["name"] == "East" and east["manager"] == {"id": ws.gid("boss")}
    assert {m["user"]["id"] for m in east["members"]} == {ws.gid("member"), ws.gid("mate")}

    made = "mutation($i: TeamInput!) { createTeam(input: $i) { id name members { user { id } } } }"
    forbidden = await gql(either_client, made, {"i": {"name": "West"}}, token=ws.token("member"))
    assert codes(forbidden) == ["FORBIDDEN"]
    assert codes(await gql(either_client, RESTRICT, token=ws.token("member"))) == ["FORBIDDEN"]
    taken = await gql(either_client, made, {"i": {"name": "East"}}, token=admin)
    assert codes(taken) == ["BAD_USER_INPUT"] and taken["errors"][0]["extensions"]["field"] == "input.name"
    stranger = await make_tenant("vis-other")
    foreign = await gql(either_client, made, {"i": {"name": "West", "memberIds": [gid("User", stranger.users[
        Role.MEMBER])]}}, token=admin)
    assert codes(foreign) == ["NOT_FOUND"] and foreign["errors"][0]["extensions"]["field"] == "input.memberIds.userId"

    # Putting the outsider in East shows them the mate's deal, and East the outsider's, from the next request on.
    update = "mutation($id: ID!, $i: TeamPatch!) { updateTeam(id: $id, input: $i) { members { user { id } } } }"
    data_or_fail(await gql(either_client, update, {"id": east["id"], "i": {
        "memberIds": [ws.gid("member"), ws.gid("mate"), ws.gid("outsider")]}}, token=admin))
    assert await seen(either_client, ws.token("outsider")) == {ws.deals["mate"], ws.deals["outsider"]}
    assert await seen(either_client, ws.token("member")) == {ws.deals["mate"], ws.deals["outsider"]}
    assert await seen(either_client, ws.token("boss")) == {ws.deals["mate"], ws.deals["outsider"]}
    # Deleting the team leaves everyone their own deals only.
    data_or_fail(await gql(either_client, "mutation($id: ID!) { deleteTeam(id: $id) { deletedId } }",
                           {"id": east["id"]}, token=admin))
    assert await seen(either_client, ws.token("member")) == set()
    assert await seen(either_client, ws.token("outsider")) == {ws.deals["outsider"]}
    assert data_or_fail(await gql(either_client, TEAMS, token=admin))["teams"] == []


# ---- row-level security alone ----------------------------------------------------------------------

async def test_row_level_security_alone_hides_deals_and_what_belongs_to_them(
        make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine, settings: Settings) -> None:
    """Statements without the application's filter, as the application role: only RLS decides."""
    ws = await workspace(make_tenant, client, admin_engine)
    databases = Databases(settings.app_url, pool_size=1)
    try:
        for who, deals in (("member", {"mate"}), ("boss", {"mate"}), ("outsider", {"outsider"}),
                           ("viewer", set()), ("admin", {"mate", "outsider", "owner"})):
            user = ws.people.get(who) or ws.world.users[Role(who)]
            role = Role.MEMBER if who in ws.people else Role(who)
            scope = TenantScope(databases, ws.world.id)
            try:
                await scope.enter(user, role.value)
                rows = await scope.fetch(select(DEALS.c.id))
                lines = await scope.fetch(select(DEAL_LINE_ITEMS.c.id))
                notes = await scope.fetch(select(NOTES.c.id).where(NOTES.c.deal_id.is_not(None)))
            finally:
                await scope.close()
            assert {r.id for r in rows} == {uuid_of(ws.deals[o]) for o in deals}, who
            assert len(lines) == len(notes) == (1 if "mate" in deals else 0), who
        # A transaction that set only the tenant sees no restricted deal (it fails closed).
        async with databases.default.connect() as conn, conn.begin():
            await conn.execute(text("SELECT set_config('app.tenant_id', :t, true)"), {"t": str(ws.world.id)})
            assert (await conn.execute(select(DEALS.c.id))).all() == []
        # A token whose role is capped below the membership's sees as that role would.
        scope = TenantScope(databases, ws.world.id)
        try:
            await scope.enter(ws.world.users[Role.ADMIN], Role.MEMBER.value)
            assert await scope.fetch(select(DEALS.c.id)) == []
        finally:
            await scope.close()
    finally:
        await databases.dispose()


# ---- shared work: the answer cache and subscription groups -----------------------------------------

async def test_a_cached_answer_is_never_served_to_another_scope(
        make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine, settings: Settings) -> None:
    async with running(dataclasses.replace(settings, plans=True, answer_cache=True), redis=None) as (app, cached):
        ws = await workspace(make_tenant, cached, admin_engine)
        answers = app.state.runtime.answers
        headers = {"Atrium-Cache": "on"}
        query = "query Deals { deals(first: 50) { totalCount nodes { id title } } }"

        async def ask(who: str) -> set[str]:
            response = await cached.post("/graphql", json={"query": query}, headers={
                "authorization": f"Bearer {ws.token(who)}", **headers})
            return {n["id"] for n in data_or_fail(response.json())["deals"]["nodes"]}

        assert await ask("member") == {ws.deals["mate"]}
        hits = answers.hits
        assert await ask("member") == {ws.deals["mate"]}
        assert answers.hits == hits + 1  # the same scope shares its answer
        assert await ask("mate") == {ws.deals["mate"]}  # a teammate sees the same deals: the same scope
        assert answers.hits == hits + 2
        assert await ask("outsider") == {ws.deals["outsider"]}
        assert await ask("viewer") == set()
        assert await ask("admin") == set(ws.deals.values())
        assert answers.hits == hits + 2
        # Changing a team changes the scope of its members: no answer of the old one is served.
        [east] = data_or_fail(await gql(cached, "{ teams { id } }", token=ws.token("admin")))["teams"]
        data_or_fail(await gql(cached, "mutation($id: ID!) { updateTeam(id: $id, input: {memberIds: []}) { id } }",
                               {"id": east["id"]}, token=ws.token("admin")))
        assert await ask("member") == set()


BOARD = """subscription($p: ID!) { dealBoard(pipelineId: $p) { __typename ... on Resync { reason }
  ... on DealChange { recordId } } }"""
TOTALS = """subscription($p: ID!) { pipelineSummary(pipelineId: $p) { totals { count total currency } } }"""
RENAME = "mutation($id: ID!, $t: String!) { updateDeal(id: $id, input: {title: $t}) { id } }"


async def test_subscribers_get_only_events_of_deals_they_see_and_never_share_an_execution_across_scopes(
        make_tenant: MakeTenant, admin_engine: AsyncEngine, settings: Settings) -> None:
    async with serve_in_process(settings, ManualClock(), port=18417) as server, server.client() as http:
        ws = await workspace(make_tenant, http, admin_engine)
        pipeline = data_or_fail(await gql(http, "query($id: ID!) { node(id: $id) { ... on Stage { pipeline { id } } "
                                                "} }", {"id": ws.stage}, token=ws.token("owner")))
        p = pipeline["node"]["pipeline"]["id"]
        async with (live(server.ws_url, ws.token("member")) as member, live(server.ws_url, ws.token("outsider")) as out,
                    live(server.ws_url, ws.token("owner")) as owner):
            # One document, one set of variables: only the scope tells the subscribers apart.
            ops = {name: await conn.live(BOARD, {"p": p}) for name, conn in
                   (("member", member), ("outsider", out), ("owner", owner))}
            totals = {name: await conn.subscribe(TOTALS, {"p": p}) for name, conn in
                      (("member", member), ("outsider", out))}
            # Live totals (one shared execution per scope) count the deals each sees.
            first = {name: (await conn.data(totals[name]))["pipelineSummary"]["totals"] for name, conn in
                     (("member", member), ("outsider", out))}
            assert [(t["count"], t["total"]) for t in first["member"]] == [(1, "20.00")], first  # its line items' total
            assert [(t["count"], t["total"]) for t in first["outsider"]] == [(1, "400.00")], first

            order = ("mate", "outsider", "mate", "outsider")
            for n, who in enumerate(order):
                data_or_fail(await gql(http, RENAME, {"id": ws.deals[who], "t": f"Renamed {who} {n}"},
                                       token=ws.token("owner")))
            # Each gets only the events of the deal they see (a leak would be their second event); the
            # owner gets all of them, in order.
            for name, conn, who in (("member", member, "mate"), ("outsider", out, "outsider")):
                events = [(await conn.data(ops[name]))["dealBoard"] for _ in range(2)]
                assert events == [{"__typename": "DealChange", "recordId": ws.deals[who]}] * 2, name
            assert [(await owner.data(ops["owner"]))["dealBoard"]["recordId"] for _ in order] == [
                ws.deals[who] for who in order]

            # recordChanged of a hidden deal is NOT_FOUND, as another workspace's.
            op = await out.subscribe("subscription($id: ID!) { recordChanged(id: $id) { __typename } }",
                                     {"id": ws.deals["mate"]})
            message = await out.message(op)
            errors = message["payload"] if message["type"] == "error" else message["payload"].get("errors")
            assert [e["extensions"]["code"] for e in errors] == ["NOT_FOUND"], json.dumps(message)


# ---- exports ---------------------------------------------------------------------------------------

async def test_a_workspace_export_is_complete_whatever_the_audience(
        make_tenant: MakeTenant, client: httpx.AsyncClient, app: Starlette, admin_engine: AsyncEngine) -> None:
    """Exports are the owners' (who see everything) and run as the system: every deal is in the archive."""
    ws = await workspace(make_tenant, client, admin_engine)
    job = await finished_export(client, app, ws.world)
    assert job["status"] == "DONE", job
    link = urlsplit(job["downloadUrl"])
    files = archive_files((await client.get(f"{link.path}?{link.query}")).content)
    assert {row["id"] for row in jsonl(files["deals.jsonl"])} == {str(uuid_of(d)) for d in ws.deals.values()}
    assert len(jsonl(files["deal_line_items.jsonl"])) == 1
    assert {row["record_type"] for row in jsonl(files["record_visibility.jsonl"])} == {"Deal"}


async def test_a_csv_export_lists_only_the_deals_its_caller_sees(
        make_tenant: MakeTenant, either_client: httpx.AsyncClient, admin_engine: AsyncEngine) -> None:
    """``GET /csv/deals`` reads as the caller (their view, in the application's filter and in RLS),
    not as the system: a member exports their team's deals, an admin every one."""
    ws = await workspace(make_tenant, either_client, admin_engine)
    d = ws.deals
    for who, deals in {"mate": {d["mate"]}, "outsider": {d["outsider"]}, "viewer": set(),
                       "admin": set(d.values())}.items():
        answer = await either_client.get("/csv/deals", headers={"authorization": f"Bearer {ws.token(who)}"})
        assert answer.status_code == 200, answer.text
        assert {row["id"] for row in csv.DictReader(io.StringIO(answer.text))} == deals, who


async def test_a_unique_value_a_hidden_deal_holds_is_taken_for_those_who_cannot_see_it(
        make_tenant: MakeTenant, either_client: httpx.AsyncClient, admin_engine: AsyncEngine) -> None:
    """An external id is unique in the workspace: one held by a deal the caller cannot see answers
    BAD_USER_INPUT naming the field (as a value in the trash does), never the database's constraint
    as an internal error, and never updates or shows that deal; one and batch creates alike."""
    ws = await workspace(make_tenant, either_client, admin_engine)
    owner, outsider = ws.token("owner"), ws.token("outsider")
    data_or_fail(await gql(either_client, "mutation($id: ID!) { updateDeal(id: $id, input: {externalId: \"crm-1\"}) "
                                          "{ id } }", {"id": ws.deals["owner"]}, token=owner))
    deal = {"title": "Mine", "amount": "1", "currency": "USD", "stageId": ws.stage, "externalId": "crm-1"}
    one = await gql(either_client, "mutation($i: DealInput!) { createDeal(input: $i) { id } }", {"i": deal},
                    token=outsider)
    assert [(e["extensions"]["code"], e["extensions"].get("field")) for e in one["errors"]] == [
        ("BAD_USER_INPUT", "externalId")], one
    many = await gql(either_client, "mutation($i: [DealInput!]!) { createDeals(input: $i) { id } }",
                     {"i": [deal]}, token=outsider)
    assert codes(many) == ["BAD_USER_INPUT"], many
    async with admin_engine.connect() as conn:
        titles = (await conn.execute(select(DEALS.c.title).where(DEALS.c.tenant_id == ws.world.id,
                                                                 DEALS.c.external_id == "crm-1"))).scalars().all()
    assert titles == [data_or_fail(await gql(either_client, "query($id: ID!) { deal(id: $id) { title } }",
                                             {"id": ws.deals["owner"]}, token=owner))["deal"]["title"]]
