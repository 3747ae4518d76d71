"""Keyset pagination and filters of the list fields (deals above all).

Paging forwards (``first``/``after``) or backwards (``last``/``before``) in small pages must visit
every row exactly once, in the order of one big page, for every ordering and direction, also when
many rows share the sort value (ties are broken by id).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest

from models.tables import Role
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.crm import create_activity, create_company, create_contact, create_pipeline, gid, uuid_of

MakeTenant = Callable[..., Awaitable[TenantWorld]]

DEALS_PAGE = """
query($first: Int, $after: String, $last: Int, $before: String, $order: DealOrder, $filter: DealFilter) {
  deals(first: $first, after: $after, last: $last, before: $before, orderBy: $order, filter: $filter) {
    totalCount
    edges { cursor node { id title amount expectedCloseDate createdAt updatedAt } }
    pageInfo { hasNextPage hasPreviousPage startCursor endCursor }
  }
}"""
CREATE_DEAL = "mutation($input: DealInput!) { createDeal(input: $input) { id } }"
UPDATE_DEAL = "mutation($id: ID!, $input: DealPatch!) { updateDeal(id: $id, input: $input) { id } }"

# (title, amount, expected close date): repeated titles, amounts and dates, and missing dates.
SEED: list[tuple[str, str, str | None]] = [
    ("Alpha", "100.00", "2030-01-01"), ("Beta", "250.50", None), ("Alpha", "100.00", "2030-01-01"),
    ("Gamma", "0", "2029-12-31"), ("Beta", "100.00", None), ("Alpha", "999.99", "2030-01-01"),
    ("Delta", "250.50", "2031-06-15"), ("Epsilon", "100", "2030-01-01"), ("Zeta", "0.01", None),
    ("Eta", "250.5", "2029-12-31"), ("Theta", "12345.67", "2030-02-28"), ("Iota", "0", None),
    ("Kappa", "42.00", "2030-03-01"), ("Lambda", "42", "2030-03-01"), ("Mu", "7.77", "2032-01-01"),
    ("Nu", "100.00", None), ("Xi", "8.88", "2030-01-02"), ("Omicron", "9.99", "2030-01-02"),
    ("Pi", "3.14", "2031-03-14"), ("Rho", "100.00", "2030-01-01"), ("Sigma", "55.55", "2030-05-05"),
    ("Tau", "6.28", "2030-06-28"), ("Beta", "250.50", "2030-07-07"), ("Upsilon", "1.00", "2030-08-08"),
    ("Phi", "1.62", "2030-09-09"),
]


async def seed_deals(client: httpx.AsyncClient, tenant: TenantWorld) -> list[str]:
    """The SEED deals (created in order), then every third one updated so updated_at order differs."""
    token = tenant.token(Role.MEMBER)
    pipeline = await create_pipeline(client, token, name="Paging", stages=("Lead",))
    stage = pipeline["stages"][0]["id"]
    ids = []
    for title, amount, close in SEED:
        created = data_or_fail(await gql(client, CREATE_DEAL, {"input": {
            "title": title, "amount": amount, "currency": "USD", "stageId": stage, "expectedCloseDate": close}},
                                         token=token))
        ids.append(created["createDeal"]["id"])
    for deal_id in reversed(ids[::3]):
        data_or_fail(await gql(client, UPDATE_DEAL, {"id": deal_id, "input": {"status": "WON"}}, token=token))
    return ids


async def deals_page(client: httpx.AsyncClient, token: str, **args: Any) -> dict[str, Any]:
    connection: dict[str, Any] = data_or_fail(await gql(client, DEALS_PAGE, args, token=token))["deals"]
    return connection


def ids_of(connection: dict[str, Any]) -> list[str]:
    return [edge["node"]["id"] for edge in connection["edges"]]


def check_cursors(connection: dict[str, Any]) -> None:
    info, edges = connection["pageInfo"], connection["edges"]
    assert info["startCursor"] == (edges[0]["cursor"] if edges else None)
    assert info["endCursor"] == (edges[-1]["cursor"] if edges else None)


async def page_forwards(client: httpx.AsyncClient, token: str, size: int, **args: Any) -> list[str]:
    seen: list[str] = []
    after = None
    for number in range(100):
        page = await deals_page(client, token, first=size, after=after, **args)
        check_cursors(page)
        assert page["pageInfo"]["hasPreviousPage"] is (number > 0)
        seen += ids_of(page)
        if not page["pageInfo"]["hasNextPage"]:
            assert 1 <= len(page["edges"]) <= size
            return seen
        assert len(page["edges"]) == size
        after = page["pageInfo"]["endCursor"]
    raise AssertionError("paging forwards never ended")


async def page_backwards(client: httpx.AsyncClient, token: str, size: int, **args: Any) -> list[str]:
    seen: list[str] = []
    before = None
    for number in range(100):
        page = await deals_page(client, token, last=size, before=before, **args)
        check_cursors(page)
        assert page["pageInfo"]["hasNextPage"] is (number > 0)
        seen = ids_of(page) + seen
        if not page["pageInfo"]["hasPreviousPage"]:
            assert 1 <= len(page["edges"]) <= size
            return seen
        assert len(page["edges"]) == size
        before = page["pageInfo"]["startCursor"]
    raise AssertionError("paging backwards never ended")


def sort_value(field: str, node: dict[str, Any]) -> Any:
    if field == "AMOUNT":
        return Decimal(node["amount"])
    if field in ("CREATED_AT", "UPDATED_AT"):
        return dt.datetime.fromisoformat(node["createdAt" if field == "CREATED_AT" else "updatedAt"])
    if field == "EXPECTED_CLOSE_DATE":  # a deal without a date closes "never": after every date
        return dt.date.fromisoformat(node["expectedCloseDate"]) if node["expectedCloseDate"] else dt.date.max
    return node["title"]


@pytest.mark.parametrize("direction", ["ASC", "DESC"])
@pytest.mark.parametrize("field", ["CREATED_AT", "UPDATED_AT", "AMOUNT", "TITLE", "EXPECTED_CLOSE_DATE"])
async def test_paging_visits_every_deal_once_in_order(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                      field: str, direction: str) -> None:
    tenant = await make_tenant("page")
    created = await seed_deals(client, tenant)
    token = tenant.token(Role.VIEWER)
    order = {"field": field, "direction": direction}

    everything = await deals_page(client, token, first=100, order=order)
    full = ids_of(everything)
    assert sorted(full) == sorted(created) and len(full) == len(SEED)
    assert everything["totalCount"] == len(SEED)
    assert everything["pageInfo"]["hasNextPage"] is False and everything["pageInfo"]["hasPreviousPage"] is False

    # The big page is ordered by (value, id), both in the requested direction.
    keys = [(sort_value(field, e["node"]), uuid_of(e["node"]["id"])) for e in everything["edges"]]
    if field == "TITLE":  # collation decides between titles; equal titles must sit together, by id
        groups: dict[str, list[uuid.UUID]] = {}
        for title, key in keys:
            assert title not in groups or list(groups)[-1] == title, f"{title} is split"
            groups.setdefault(title, []).append(key)
        for members in groups.values():
            assert members == sorted(members, reverse=direction == "DESC")
    else:
        assert keys == sorted(keys, reverse=direction == "DESC")

    assert await page_forwards(client, token, 4, order=order) == full
    assert await page_backwards(client, token, 4, order=order) == full
    assert await page_forwards(client, token, 5, order=order) == full  # 25 = 5 x 5: last page exactly full
    assert await page_backwards(client, token, 7, order=order) == full


async def test_backward_page_before_a_cursor_and_forward_page_after_meet(client: httpx.AsyncClient,
                                                                         make_tenant: MakeTenant) -> None:
    tenant = await make_tenant("page")
    await seed_deals(client, tenant)
    token = tenant.token(Role.VIEWER)
    order = {"field": "AMOUNT", "direction": "ASC"}
    full = ids_of(await deals_page(client, token, first=100, order=order))
    middle = await deals_page(client, token, first=100, order=order)
    cursor = middle["edges"][10]["cursor"]

    before = await deals_page(client, token, last=4, before=cursor, order=order)
    after = await deals_page(client, token, first=4, after=cursor, order=order)
    assert ids_of(before) == full[6:10] and ids_of(after) == full[11:15]
    assert before["pageInfo"]["hasNextPage"] is True and before["pageInfo"]["hasPreviousPage"] is True
    assert after["pageInfo"]["hasNextPage"] is True and after["pageInfo"]["hasPreviousPage"] is True
    # Between two cursors: after + before together bound the page on both sides.
    between = await deals_page(client, token, first=100, after=middle["edges"][2]["cursor"],
                               before=middle["edges"][7]["cursor"], order=order)
    assert ids_of(between) == full[3:7]


async def test_paging_limits_and_bad_cursors(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    tenant = await make_tenant("page")
    await seed_deals(client, tenant)
    token = tenant.token(Role.VIEWER)

    async def error(**args: Any) -> tuple[str, str | None]:
        body = await gql(client, DEALS_PAGE, args, token=token)
        assert body["_status"] == 200
        assert body["data"] is None, body
        [err] = body["errors"]
        return err["extensions"]["code"], err["extensions"].get("field")

    amount_page = await deals_page(client, token, first=2, order={"field": "AMOUNT", "direction": "ASC"})
    cursor = amount_page["pageInfo"]["endCursor"]
    assert await error(first=2, after=cursor, order={"field": "TITLE"}) == ("BAD_USER_INPUT", "after")
    assert await error(last=2, before=cursor, order={"field": "CREATED_AT"}) == ("BAD_USER_INPUT", "before")
    assert await error(first=2, after=cursor, order={"field": "EXPECTED_CLOSE_DATE"}) == ("BAD_USER_INPUT", "after")

    junk = base64.urlsafe_b64encode(b"not json at all").decode()
    wrong_shape = base64.urlsafe_b64encode(json.dumps({"amount": 1}).encode()).decode()
    bad_value = base64.urlsafe_b64encode(json.dumps(["amount", "lots", str(uuid.uuid4())]).encode()).decode()
    bad_id = base64.urlsafe_b64encode(json.dumps(["amount", "1.00", "not-a-uuid"]).encode()).decode()
    for garbage in ("garbage", "", "!!!", junk, wrong_shape, bad_value, bad_id, cursor[:-3]):
        assert await error(first=2, after=garbage, order={"field": "AMOUNT"}) == ("BAD_USER_INPUT", "after"), garbage
        assert await error(last=2, before=garbage, order={"field": "AMOUNT"}) == ("BAD_USER_INPUT", "before"), garbage

    assert await error(first=-1) == ("BAD_USER_INPUT", "first")
    assert await error(first=101) == ("BAD_USER_INPUT", "first")
    assert await error(last=-1) == ("BAD_USER_INPUT", "last")
    assert await error(last=101) == ("BAD_USER_INPUT", "last")
    code, _ = await error(first=2, last=2)
    assert code == "BAD_USER_INPUT"

    assert len((await deals_page(client, token, first=100))["edges"]) == len(SEED)
    assert len((await deals_page(client, token))["edges"]) == 20  # the default page
    empty = await deals_page(client, token, first=0)
    assert empty["edges"] == [] and empty["totalCount"] == len(SEED)


def crafted(*parts: object) -> str:
    """A cursor as the server spells them, with chosen contents."""
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode().rstrip("=")


@pytest.mark.parametrize(("field", "cursor"), [
    ("TITLE", crafted("title", "nul\u0000byte", str(uuid.uuid4()))),
    ("AMOUNT", crafted("amount", "Infinity", str(uuid.uuid4()))),
    ("AMOUNT", crafted("amount", "1e99999", str(uuid.uuid4()))),
], ids=["nul-in-title", "infinite-amount", "huge-amount"])
async def test_crafted_cursor_values_are_bad_user_input(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                        field: str, cursor: str) -> None:
    """A cursor the server never issued is the caller's error, never an INTERNAL one."""
    tenant = await make_tenant("page")
    body = await gql(client, DEALS_PAGE, {"first": 2, "after": cursor, "order": {"field": field}},
                     token=tenant.token(Role.VIEWER))
    assert codes(body) == ["BAD_USER_INPUT"], body["errors"]
    assert body["errors"][0]["extensions"]["field"] == "after"


async def test_companies_and_contacts_page_through_ties(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    tenant = await make_tenant("page")
    token = tenant.token(Role.MEMBER)
    for i in range(9):
        company = await create_company(client, token, name=f"Same {i % 3}")
        await create_contact(client, token, first_name=f"F{i}", last_name=f"Last {i % 2}", company_id=company["id"])
    for kind, order_field in (("companies", "NAME"), ("contacts", "LAST_NAME"), ("companies", "CREATED_AT"),
                              ("contacts", "CREATED_AT")):
        for direction in ("ASC", "DESC"):
            query = f"""query($first: Int, $after: String, $last: Int, $before: String) {{
                {kind}(first: $first, after: $after, last: $last, before: $before,
                       orderBy: {{field: {order_field}, direction: {direction}}}) {{
                  edges {{ cursor node {{ id }} }} pageInfo {{ hasNextPage hasPreviousPage startCursor endCursor }}
                }} }}"""
            full = [e["node"]["id"] for e in data_or_fail(await gql(client, query, {"first": 100}, token=token)
                                                          )[kind]["edges"]]
            assert len(set(full)) == 9
            forwards: list[str] = []
            after = None
            while True:
                page = data_or_fail(await gql(client, query, {"first": 2, "after": after}, token=token))[kind]
                forwards += [e["node"]["id"] for e in page["edges"]]
                if not page["pageInfo"]["hasNextPage"]:
                    break
                after = page["pageInfo"]["endCursor"]
            backwards: list[str] = []
            before = None
            while True:
                page = data_or_fail(await gql(client, query, {"last": 2, "before": before}, token=token))[kind]
                backwards = [e["node"]["id"] for e in page["edges"]] + backwards
                if not page["pageInfo"]["hasPreviousPage"]:
                    break
                before = page["pageInfo"]["startCursor"]
            assert forwards == full == backwards, (kind, order_field, direction)


# ---- filters -------------------------------------------------------------------------------------

class FilterWorld:
    """Five deals over two pipelines, two owners, two companies and two contacts."""

    def __init__(self, tenant: TenantWorld) -> None:
        self.tenant = tenant
        self.ids: dict[str, str] = {}

    async def build(self, client: httpx.AsyncClient) -> None:
        token = self.tenant.token(Role.MEMBER)
        board = await create_pipeline(client, token, name="Board", stages=("Lead", "Won"))
        other = await create_pipeline(client, token, name="Other", stages=("Elsewhere",))
        acme = await create_company(client, token, name="ACME Corp", domain="acme.example")
        globex = await create_company(client, token, name="Globex", domain="globex.example")
        grace = await create_contact(client, token, first_name="Grace", last_name="Hopper",
                                     email="grace@navy.example", company_id=globex["id"])
        ada = await create_contact(client, token, first_name="Ada", last_name="Lovelace", email="ada@engines.example")
        self.ids.update(lead=board["stages"][0]["id"], won=board["stages"][1]["id"], board=board["id"],
                        other=other["id"], acme=acme["id"], globex=globex["id"], grace=grace["id"], ada=ada["id"])
        owner, member = gid("User", self.tenant.users[Role.OWNER]), gid("User", self.tenant.users[Role.MEMBER])
        self.ids.update(owner=owner, member=member)
        deals = [
            ("Discount 50% off", "100.00", "USD", board["stages"][0]["id"], owner, acme["id"], None, "2030-01-10",
             None),
            ("Discount 500 off", "200.00", "USD", board["stages"][0]["id"], member, None, grace["id"], "2030-02-10",
             None),
            ("snake_case deal", "300.00", "EUR", board["stages"][1]["id"], member, None, None, None, "WON"),
            ("snakeXcase deal", "400.00", "USD", other["stages"][0]["id"], owner, None, ada["id"], "2030-03-10",
             "LOST"),
            ("Plain", "500.00", "USD", board["stages"][0]["id"], owner, globex["id"], None, "2030-01-10", None),
        ]
        for title, amount, currency, stage, owner_id, company, contact, close, status in deals:
            created = data_or_fail(await gql(client, CREATE_DEAL, {"input": {
                "title": title, "amount": amount, "currency": currency, "stageId": stage, "ownerId": owner_id,
                "companyId": company, "contactId": contact, "expectedCloseDate": close}}, token=token))
            self.ids[title] = created["createDeal"]["id"]
            if status:
                data_or_fail(await gql(client, UPDATE_DEAL, {"id": self.ids[title], "input": {"status": status}},
                                       token=token))


@pytest.fixture
async def filter_world(client: httpx.AsyncClient, make_tenant: MakeTenant) -> FilterWorld:
    world = FilterWorld(await make_tenant("filter"))
    await world.build(client)
    return world


async def test_deal_filters(client: httpx.AsyncClient, filter_world: FilterWorld) -> None:
    token = filter_world.tenant.token(Role.VIEWER)
    ids = filter_world.ids

    async def titles(flt: dict[str, Any]) -> set[str]:
        page = await deals_page(client, token, first=100, filter=flt)
        found = {e["node"]["title"] for e in page["edges"]}
        assert page["totalCount"] == len(found), flt
        limited = await deals_page(client, token, first=1, filter=flt)
        assert limited["totalCount"] == len(found), flt  # ignores paging
        return found

    assert await titles({}) == {"Discount 50% off", "Discount 500 off", "snake_case deal", "snakeXcase deal", "Plain"}
    assert await titles({"stageId": ids["lead"]}) == {"Discount 50% off", "Discount 500 off", "Plain"}
    assert await titles({"pipelineId": ids["other"]}) == {"snakeXcase deal"}
    assert await titles({"ownerId": ids["member"]}) == {"Discount 500 off", "snake_case deal"}
    assert await titles({"companyId": ids["acme"]}) == {"Discount 50% off"}
    assert await titles({"contactId": ids["grace"]}) == {"Discount 500 off"}
    assert await titles({"status": ["WON", "LOST"]}) == {"snake_case deal", "snakeXcase deal"}
    assert await titles({"status": ["OPEN"]}) == {"Discount 50% off", "Discount 500 off", "Plain"}
    assert await titles({"amountMin": "200", "amountMax": "400.00"}) == {
        "Discount 500 off", "snake_case deal", "snakeXcase deal"}
    assert await titles({"amountMin": "500"}) == {"Plain"}
    assert await titles({"amountMax": "99.99"}) == set()
    assert await titles({"amountMin": "300", "amountMax": "300"}) == {"snake_case deal"}
    assert await titles({"currency": "eur"}) == {"snake_case deal"}
    assert await titles({"closeDateFrom": "2030-01-10", "closeDateTo": "2030-02-10"}) == {
        "Discount 50% off", "Discount 500 off", "Plain"}
    assert await titles({"closeDateTo": "2030-01-31"}) == {"Discount 50% off", "Plain"}
    assert await titles({"closeDateFrom": "2030-02-11"}) == {"snakeXcase deal"}
    assert await titles({"stageId": ids["lead"], "ownerId": ids["owner"], "amountMin": "150"}) == {"Plain"}

    # Search: title, company name, contact first/last name and email; case-insensitive; wildcards literal.
    assert await titles({"search": "DISCOUNT"}) == {"Discount 50% off", "Discount 500 off"}
    assert await titles({"search": "acme"}) == {"Discount 50% off"}
    assert await titles({"search": "gLoBeX"}) == {"Plain"}
    assert await titles({"search": "grace"}) == {"Discount 500 off"}
    assert await titles({"search": "HOPPER"}) == {"Discount 500 off"}
    assert await titles({"search": "navy.example"}) == {"Discount 500 off"}
    assert await titles({"search": "@ENGINES"}) == {"snakeXcase deal"}
    assert await titles({"search": "50%"}) == {"Discount 50% off"}
    assert await titles({"search": "%"}) == {"Discount 50% off"}
    assert await titles({"search": "_case"}) == {"snake_case deal"}
    assert await titles({"search": "_"}) == {"snake_case deal"}
    assert await titles({"search": "  plain  "}) == {"Plain"}
    assert await titles({"search": "nothing like it"}) == set()
    assert await titles({"search": "discount", "ownerId": ids["owner"]}) == {"Discount 50% off"}

    # Filters and paging together.
    order = {"field": "AMOUNT", "direction": "DESC"}
    flt = {"status": ["OPEN"]}
    first = await deals_page(client, token, first=2, filter=flt, order=order)
    second = await deals_page(client, token, first=2, after=first["pageInfo"]["endCursor"], filter=flt, order=order)
    assert [e["node"]["title"] for e in first["edges"] + second["edges"]] == [
        "Plain", "Discount 500 off", "Discount 50% off"]
    assert second["pageInfo"]["hasNextPage"] is False and second["totalCount"] == 3


async def test_bad_deal_filters(client: httpx.AsyncClient, filter_world: FilterWorld) -> None:
    token = filter_world.tenant.token(Role.VIEWER)
    for flt, field in (({"amountMin": "300", "amountMax": "200"}, "filter.amountMin"),
                       ({"closeDateFrom": "2030-02-01", "closeDateTo": "2030-01-01"}, "filter.closeDateFrom"),
                       ({"stageId": filter_world.ids["acme"]}, "filter.stageId"),
                       ({"ownerId": "garbage"}, "filter.ownerId"),
                       ({"currency": "XYZ"}, "filter.currency"),
                       ({"search": "x" * 101}, "filter.search")):
        body = await gql(client, DEALS_PAGE, {"first": 10, "filter": flt}, token=token)
        assert body["_status"] == 200
        assert codes(body) == ["BAD_USER_INPUT"], (flt, body)
        assert body["errors"][0]["extensions"]["field"] == field, flt



@pytest.mark.parametrize("root", ["deals", "companies", "contacts"])
async def test_nul_character_in_search_is_bad_user_input(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                         root: str) -> None:
    """PostgreSQL text cannot hold U+0000: such a search term is the caller's error, not an INTERNAL one."""
    tenant = await make_tenant("filter")
    body = await gql(client, f"query($s: String) {{ {root}(filter: {{search: $s}}) {{ totalCount }} }}",
                     {"s": "ac\u0000me"}, token=tenant.token(Role.VIEWER))
    assert codes(body) == ["BAD_USER_INPUT"], body.get("errors")
    assert body["errors"][0]["extensions"]["field"] == "filter.search"

async def test_company_and_contact_search(client: httpx.AsyncClient, filter_world: FilterWorld) -> None:
    token = filter_world.tenant.token(Role.VIEWER)
    companies = """query($f: CompanyFilter) { companies(filter: $f, first: 10) { totalCount nodes { name } } }"""
    contacts = """query($f: ContactFilter) { contacts(filter: $f, first: 10) { totalCount nodes { lastName } } }"""

    async def names(query: str, flt: dict[str, Any], key: str, field: str) -> list[str]:
        connection = data_or_fail(await gql(client, query, {"f": flt}, token=token))[key]
        found = [node[field] for node in connection["nodes"]]
        assert connection["totalCount"] == len(found)
        return found

    assert await names(companies, {}, "companies", "name") == ["ACME Corp", "Globex"]
    assert await names(companies, {"search": "acme"}, "companies", "name") == ["ACME Corp"]
    assert await names(companies, {"search": "GLOBEX.EXAMPLE"}, "companies", "name") == ["Globex"]
    assert await names(companies, {"search": ".example"}, "companies", "name") == ["ACME Corp", "Globex"]
    assert await names(companies, {"search": "%"}, "companies", "name") == []
    assert await names(companies, {"search": "_"}, "companies", "name") == []

    assert await names(contacts, {}, "contacts", "lastName") == ["Hopper", "Lovelace"]
    assert await names(contacts, {"search": "grace"}, "contacts", "lastName") == ["Hopper"]
    assert await names(contacts, {"search": "LOVELACE"}, "contacts", "lastName") == ["Lovelace"]
    assert await names(contacts, {"search": "engines.EXAMPLE"}, "contacts", "lastName") == ["Lovelace"]
    assert await names(contacts, {"search": "%"}, "contacts", "lastName") == []
    assert await names(contacts, {"companyId": filter_world.ids["globex"]}, "contacts", "lastName") == ["Hopper"]
    assert await names(contacts, {"companyId": filter_world.ids["acme"]}, "contacts", "lastName") == []
    assert await names(contacts, {"companyId": filter_world.ids["globex"], "search": "ada"}, "contacts",
                       "lastName") == []


async def test_activity_filters(client: httpx.AsyncClient, filter_world: FilterWorld) -> None:
    member = filter_world.tenant.token(Role.MEMBER)
    ids = filter_world.ids
    await create_activity(client, member, kind="NOTE", subject="note d1", deal_id=ids["Discount 50% off"])
    done_task = await create_activity(client, member, kind="TASK", subject="task d1", deal_id=ids["Discount 50% off"],
                                      due_date="2030-01-01")
    data_or_fail(await gql(client, "mutation($id: ID!) { updateActivity(id: $id, input: {done: true}) { id } }",
                           {"id": done_task["id"]}, token=member))
    await create_activity(client, member, kind="TASK", subject="task d2", deal_id=ids["Discount 500 off"],
                          due_date="2030-06-01")
    await create_activity(client, member, kind="CALL", subject="call grace", contact_id=ids["grace"])
    await create_activity(client, member, kind="EMAIL", subject="mail acme", company_id=ids["acme"])
    query = """query($f: ActivityFilter, $first: Int) {
        activities(filter: $f, first: $first) { totalCount nodes { subject } } }"""
    token = filter_world.tenant.token(Role.VIEWER)

    async def subjects(flt: dict[str, Any]) -> set[str]:
        connection = data_or_fail(await gql(client, query, {"f": flt, "first": 100}, token=token))["activities"]
        found = {n["subject"] for n in connection["nodes"]}
        assert connection["totalCount"] == len(found)
        limited = data_or_fail(await gql(client, query, {"f": flt, "first": 1}, token=token))["activities"]
        assert limited["totalCount"] == len(found)
        return found

    assert await subjects({}) == {"note d1", "task d1", "task d2", "call grace", "mail acme"}
    assert await subjects({"kind": ["TASK"]}) == {"task d1", "task d2"}
    assert await subjects({"kind": ["NOTE", "CALL"]}) == {"note d1", "call grace"}
    assert await subjects({"done": True}) == {"task d1"}
    assert await subjects({"done": False}) == {"note d1", "task d2", "call grace", "mail acme"}
    assert await subjects({"kind": ["TASK"], "done": False}) == {"task d2"}
    assert await subjects({"dealId": ids["Discount 50% off"]}) == {"note d1", "task d1"}
    assert await subjects({"contactId": ids["grace"]}) == {"call grace"}
    assert await subjects({"companyId": ids["acme"]}) == {"mail acme"}
    assert await subjects({"dueBefore": "2030-03-01"}) == {"task d1"}
