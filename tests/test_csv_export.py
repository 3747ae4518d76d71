"""CSV export of a filtered list (``GET /csv/<plural>``): the connection's filter, the tenant's rows
only (with row-level security and with the application's filters alone), the trash hidden, columns
derived from the declaration, coded errors for a bad filter or credential."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from sqlalchemy import func, select
from starlette.applications import Starlette

from core.ids import to_global_id
from models.db import Databases
from models.tables import Role
from records.crm import DEAL
from resolvers.csv_export import columns_of
from tests.conftest import TenantWorld, data_or_fail, gql
from tests.crm import create_company, create_custom_field, create_deal, seed_crm
from tests.field_rules import SET as SET_RULE

MakeTenant = Callable[..., Awaitable[TenantWorld]]


async def exported(client: httpx.AsyncClient, token: str | None, plural: str,
                   filter_: dict[str, Any] | None = None) -> httpx.Response:
    params = {"filter": json.dumps(filter_)} if filter_ is not None else {}
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return await client.get(f"/csv/{plural}", params=params, headers=headers)


def rows(response: httpx.Response) -> list[dict[str, str]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(response.text)))


async def test_a_filtered_deal_list_exports_as_the_connection_lists_it(
    either_client: httpx.AsyncClient, make_tenant: MakeTenant,
) -> None:
    client = either_client
    a, b = await make_tenant("csv-a"), await make_tenant("csv-b")
    token = a.token(Role.MEMBER)
    crm = await seed_crm(client, token)
    stage = crm.pipeline["stages"][0]["id"]
    big = [await create_deal(client, token, stage, title=f"Big, \"quoted\"\n{i}", amount="5000.00") for i in range(3)]
    gone = await create_deal(client, token, stage, title="Big but trashed", amount="9000.00")
    data_or_fail(await gql(client, "mutation($id: ID!) { deleteDeal(id: $id) { deletedId } }", {"id": gone["id"]},
                           token=a.token(Role.ADMIN)))
    theirs = await seed_crm(client, b.token())
    await create_deal(client, b.token(), theirs.pipeline["stages"][0]["id"], title="B's big deal", amount="7000.00")

    listed = data_or_fail(await gql(client, """{ deals(first: 50, filter: {amountMin: "2000"}) {
        nodes { id title amount } } }""", token=token))["deals"]["nodes"]
    got = rows(await exported(client, token, "deals", {"amountMin": "2000"}))
    assert [(r["id"], r["title"], r["amount"]) for r in got] == [(n["id"], n["title"], n["amount"]) for n in listed]
    assert {r["id"] for r in got} == {d["id"] for d in big}
    # Columns derived from the declaration, references as global IDs.
    assert list(got[0]) == ["id", *(f.name for f in DEAL.fields), "createdAt", "updatedAt"]
    assert got[0]["stageId"] == stage and got[0]["externalId"] == ""
    # Every list of the tenant, unfiltered: its own rows, none of B's, none in the trash.
    everything = rows(await exported(client, token, "deals"))
    assert {r["title"] for r in everything} == {crm.deal["title"], *(d["title"] for d in big)}
    assert rows(await exported(client, a.token(Role.VIEWER), "companies"))[0]["name"] == crm.company["name"]
    assert [r["name"] for r in rows(await exported(client, b.token(), "companies"))] == [theirs.company["name"]]
    await create_company(client, b.token(), name="Another of B")
    assert {r["name"] for r in rows(await exported(client, token, "companies"))} == {crm.company["name"]}


async def test_bad_requests_are_coded(either_client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    world = await make_tenant("csv-bad")
    token = world.token(Role.VIEWER)
    cases = [
        (await exported(either_client, None, "deals"), 401, "UNAUTHENTICATED", None),
        (await exported(either_client, token, "nothing"), 400, "BAD_USER_INPUT", "type"),
        (await exported(either_client, token, "deals", {"amountMin": "lots"}), 400, "BAD_USER_INPUT",
         "filter.amountMin"),
        (await exported(either_client, token, "deals", {"color": "red"}), 400, "BAD_USER_INPUT", "filter.color"),
        (await exported(either_client, token, "deals", {"status": ["NOPE"]}), 400, "BAD_USER_INPUT",
         "filter.status.0"),
        (await exported(either_client, token, "deals", {"custom": [{"op": "EQ", "text": "a"}]}), 400,
         "BAD_USER_INPUT", "filter.custom.0.key"),
        (await exported(either_client, token, "deals", {"custom": [{"key": "k", "number": "many"}]}), 400,
         "BAD_USER_INPUT", "filter.custom.0.number"),
        (await exported(either_client, token, "deals", {"custom": [{"key": "k", "colour": "red"}]}), 400,
         "BAD_USER_INPUT", "filter.custom.0.colour"),
    ]
    for response, status, code, field in cases:
        assert response.status_code == status, response.text
        error = response.json()["errors"][0]
        assert error["extensions"]["code"] == code and error["extensions"].get("field") == field, error
    bad = await either_client.get("/csv/deals", params={"filter": "{"}, headers={"authorization": f"Bearer {token}"})
    assert bad.status_code == 400 and bad.json()["errors"][0]["extensions"]["field"] == "filter"


async def test_row_level_security_alone_keeps_the_export_to_its_tenant(
    client: httpx.AsyncClient, make_tenant: MakeTenant, databases: Databases,
) -> None:
    """The export's own query naming tenant A, run in B's transaction as the application role: nothing."""
    a, b = await make_tenant("csv-rls-a"), await make_tenant("csv-rls-b")
    await seed_crm(client, a.token())
    query = DEAL.listing_query(a.id, {})
    async with databases.tenant_transaction(a.id) as conn:
        assert (await conn.execute(select(func.count()).select_from(query.subquery()))).scalar_one() == 1
    async with databases.tenant_transaction(b.id) as conn:
        assert (await conn.execute(select(func.count()).select_from(query.subquery()))).scalar_one() == 0
    assert columns_of(DEAL)[0] == "id"


CREATE = "mutation($i: DealInput!) { createDeal(input: $i) { id } }"


async def test_custom_fields_export_as_text_columns_and_import_back(
    client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant,
) -> None:
    """The workspace's live custom fields are columns ``custom.<key>`` (form order, before the
    timestamps) with their values as text; a deleted field's column and values are not exported,
    nor another workspace's fields; the export imports back into its workspace unchanged."""
    a, b = await make_tenant("csv-cf-a"), await make_tenant("csv-cf-b")
    admin, token = a.token(Role.ADMIN), a.token(Role.MEMBER)
    stage = (await seed_crm(client, token)).pipeline["stages"][0]["id"]
    await create_custom_field(client, admin, "DEAL", "tier", "SINGLE_SELECT", options=["gold", "silver"], position=1)
    await create_custom_field(client, admin, "DEAL", "budget", "MONEY", position=2)
    await create_custom_field(client, admin, "DEAL", "tags", "MULTI_SELECT", options=["x;y", "z", 'q"'], position=3)
    gone = await create_custom_field(client, admin, "DEAL", "gone", "TEXT", position=4)
    await create_custom_field(client, admin, "DEAL", "score", "NUMBER", position=5)
    await create_custom_field(client, admin, "DEAL", "signed", "BOOLEAN", position=6)
    await create_custom_field(client, admin, "DEAL", "renewal", "DATE", position=7)
    await create_custom_field(client, admin, "DEAL", "champion", "USER", position=0)
    champion = to_global_id("User", a.users[Role.MEMBER])
    data_or_fail(await gql(client, CREATE, {"i": {
        "title": "Full", "amount": "1", "currency": "USD", "stageId": stage, "externalId": "full",
        "customFields": [{"key": "tier", "option": "gold"}, {"key": "budget", "money": {"amount": "1200.5",
                                                                                     "currency": "EUR"}},
                         {"key": "tags", "options": ["z", "x;y", 'q"']}, {"key": "gone", "text": "hidden value"},
                         {"key": "score", "number": "12.50"}, {"key": "signed", "boolean": False},
                         {"key": "renewal", "date": "2030-01-31"}, {"key": "champion", "userId": champion}]}},
                           token=token))
    data_or_fail(await gql(client, CREATE, {"i": {"title": "Bare", "amount": "2", "currency": "USD",
                                                  "stageId": stage, "externalId": "bare"}}, token=token))
    data_or_fail(await gql(client, "mutation($id: ID!) { deleteCustomFieldDefinition(id: $id) { id } }",
                           {"id": gone["id"]}, token=admin))
    await create_custom_field(client, b.token(), "DEAL", "secret", "TEXT")

    response = await exported(client, token, "deals")
    assert "hidden value" not in response.text
    got = {r["externalId"]: r for r in rows(response)}
    custom = ["custom.champion", "custom.tier", "custom.budget", "custom.tags", "custom.score", "custom.signed",
              "custom.renewal"]
    assert list(got["full"]) == ["id", *(f.name for f in DEAL.fields), *custom, "createdAt", "updatedAt"]
    assert {c: got["full"][c] for c in custom} == {
        "custom.champion": champion, "custom.tier": "gold", "custom.budget": "1200.50 EUR",
        "custom.tags": 'z;"x;y";"q"""', "custom.score": "12.50", "custom.signed": "false",
        "custom.renewal": "2030-01-31"}
    assert {c: got["bare"][c] for c in custom} == dict.fromkeys(custom, "")
    # Another workspace: its own field, none of A's.
    theirs = (await exported(client, b.token(), "deals")).text.splitlines()[0].split(",")
    assert "custom.secret" in theirs and not set(custom) & set(theirs)
    assert "custom.secret" not in response.text.splitlines()[0]

    # Imported back: each row with an external id matches its deal and changes nothing (the seeded
    # deal has none: it is created again).
    job = data_or_fail(await gql(client, """mutation($csv: String!) { startImport(type: DEALS, csv: $csv) { id } }""",
                                 {"csv": response.text}, token=token))["startImport"]
    await app.state.runtime.tasks.idle()
    done = data_or_fail(await gql(client, """query($id: ID!) { importJob(id: $id) { state updated created errors }
        importErrors(id: $id) { row field message } }""", {"id": job["id"]}, token=token))
    assert done["importJob"] == {"state": "DONE", "updated": 2, "created": 1, "errors": 0}, done
    again = {r["externalId"]: r for r in rows(await exported(client, token, "deals"))}
    for key in ("full", "bare"):
        assert {c: again[key][c] for c in custom} == {c: got[key][c] for c in custom}
        assert again[key]["updatedAt"] == got[key]["updatedAt"]  # nothing changed, nothing written


async def test_a_custom_field_hidden_from_a_role_is_no_column_of_its_export(
        client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    """The export's custom columns are those the caller may read (``records.custom.readable``): a field
    rule on ``custom.<key>`` leaves that column out for the roles it names and keeps it for the others."""
    world = await make_tenant("csv-cf-rule")
    admin = world.token(Role.ADMIN)
    await create_custom_field(client, admin, "DEAL", "margin", "NUMBER")
    await create_custom_field(client, admin, "DEAL", "region", "TEXT")
    crm = await seed_crm(client, world.token())
    data_or_fail(await gql(client, "mutation($id: ID!) { updateDeal(id: $id, input: {customFields: ["
                                   '{key: "margin", number: "7.5"}, {key: "region", text: "north"}]}) { id } }',
                           {"id": crm.deal["id"]}, token=admin))
    data_or_fail(await gql(client, SET_RULE, {"t": "Deal", "f": "custom.margin", "r": ["MEMBER"]}, token=admin))
    for role, expected in ((Role.MEMBER, {"custom.region": "north"}),
                           (Role.ADMIN, {"custom.margin": "7.5", "custom.region": "north"})):
        [row] = rows(await exported(client, world.token(role), "deals"))
        assert {k: v for k, v in row.items() if k.startswith("custom.")} == expected, (role, row)


async def test_custom_field_conditions_filter_the_export_as_they_filter_the_connection(
        client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    """``filter.custom`` takes the connection's conditions: the export lists the deals the connection
    lists for the same filter; a condition on a custom field hidden from the caller's role is
    FORBIDDEN naming it, as it is in the connection."""
    world = await make_tenant("csv-cf-filter")
    admin, token = world.token(Role.ADMIN), world.token(Role.MEMBER)
    await create_custom_field(client, admin, "DEAL", "score", "NUMBER")
    await create_custom_field(client, admin, "DEAL", "tier", "SINGLE_SELECT", options=["gold", "silver"])
    stage = (await seed_crm(client, token)).pipeline["stages"][0]["id"]
    for title, score, tier in (("Low", "3", "gold"), ("High", "40", "gold"), ("Other", "50", "silver")):
        data_or_fail(await gql(client, "mutation($i: DealInput!) { createDeal(input: $i) { id } }", {"i": {
            "title": title, "amount": "1", "currency": "USD", "stageId": stage,
            "customFields": [{"key": "score", "number": score}, {"key": "tier", "option": tier}]}}, token=token))
    conditions = [{"key": "score", "op": "GTE", "number": "10"}, {"key": "tier", "op": "EQ", "text": "gold"}]
    listed = data_or_fail(await gql(client, "query($f: DealFilter) { deals(filter: $f, first: 50) "
                                            "{ nodes { title } } }", {"f": {"custom": conditions}}, token=token))
    assert [d["title"] for d in listed["deals"]["nodes"]] == ["High"]
    assert [r["title"] for r in rows(await exported(client, token, "deals", {"custom": conditions}))] == ["High"]
    data_or_fail(await gql(client, SET_RULE, {"t": "Deal", "f": "custom.score", "r": ["MEMBER"]}, token=admin))
    refused = await exported(client, token, "deals", {"custom": conditions})
    assert refused.status_code == 403, refused.text
    ext = refused.json()["errors"][0]["extensions"]
    assert (ext["code"], ext["field"]) == ("FORBIDDEN", "filter.custom.0"), ext
    assert [r["title"] for r in rows(await exported(client, admin, "deals", {"custom": conditions}))] == ["High"]
