"""Field rules (docs/field-rules.md): a tenant hides fields from roles, and no read path tells them.

Every test runs against the real PostgreSQL, with plans on and off (``planned``/``executed`` apps);
each leak path is checked as the role the field is hidden from (null + FORBIDDEN, or FORBIDDEN
naming the field) and as a role it is not hidden from (the value), so removing the rule, or the
check of one path, fails the test.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from starlette.applications import Starlette

from core.clock import ManualClock
from core.settings import Settings
from models.tables import Role
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.crm import Crm, seed_crm
from tests.field_rules import REMOVE, SET
from tests.live import live, serve_in_process

MakeTenant = Callable[..., Awaitable[TenantWorld]]
DEALS = "{ deals { edges { node { id title amount currency } } } }"
LIVE_PORT = 18510
"""The in-process server of the subscription test (this branch's port range)."""


async def hide(client: httpx.AsyncClient, tenant: TenantWorld, record_type: str, field: str,
               *roles: Role) -> None:
    data_or_fail(await gql(client, SET, {"t": record_type, "f": field, "r": [r.name for r in roles]},
                           token=tenant.token(Role.ADMIN)))


async def seeded(client: httpx.AsyncClient, make_tenant: MakeTenant) -> tuple[TenantWorld, Crm]:
    tenant = await make_tenant("rules")
    return tenant, await seed_crm(client, tenant.token(Role.OWNER))


def forbidden(body: dict[str, Any]) -> list[tuple[tuple[Any, ...], str | None]]:
    """``(path, extensions.field)`` of each FORBIDDEN error."""
    return [(tuple(e.get("path") or ()), e["extensions"].get("field")) for e in body.get("errors") or []
            if e["extensions"]["code"] == "FORBIDDEN"]


# ---- managing rules -------------------------------------------------------------------------------

async def test_rules_are_managed_by_admins_and_validated(api: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    tenant = await make_tenant("manage")
    admin = tenant.token(Role.ADMIN)
    made = data_or_fail(await gql(api, SET, {"t": "Deal", "f": "amount", "r": ["MEMBER", "VIEWER", "MEMBER"]},
                                  token=admin))["setFieldRule"]
    assert made == {"recordType": "Deal", "field": "amount", "hiddenFrom": ["VIEWER", "MEMBER"]}
    again = data_or_fail(await gql(api, SET, {"t": "Deal", "f": "amount", "r": ["VIEWER"]}, token=admin))
    assert again["setFieldRule"]["hiddenFrom"] == ["VIEWER"]  # replaced, not added
    listed = data_or_fail(await gql(api, "{ fieldRules { recordType field hiddenFrom } }",
                                    token=tenant.token(Role.VIEWER)))["fieldRules"]
    assert listed == [{"recordType": "Deal", "field": "amount", "hiddenFrom": ["VIEWER"]}]

    assert codes(await gql(api, SET, {"t": "Deal", "f": "amount", "r": ["VIEWER"]},
                           token=tenant.token(Role.MEMBER))) == ["FORBIDDEN"]
    for variables, field in (({"t": "Nope", "f": "amount", "r": ["VIEWER"]}, "recordType"),
                             ({"t": "Deal", "f": "title", "r": ["VIEWER"]}, "field"),
                             ({"t": "Deal", "f": "notAField", "r": ["VIEWER"]}, "field"),
                             ({"t": "Company", "f": "name", "r": ["VIEWER"]}, "field"),  # orders companies
                             ({"t": "Deal", "f": "amount", "r": ["OWNER"]}, "hiddenFrom"),  # exports stay whole
                             ({"t": "Deal", "f": "amount", "r": []}, "hiddenFrom")):
        body = await gql(api, SET, variables, token=admin)
        assert codes(body) == ["BAD_USER_INPUT"] and body["errors"][0]["extensions"]["field"] == field, variables

    assert data_or_fail(await gql(api, REMOVE, {"t": "Deal", "f": "amount"}, token=admin)) == {"removeFieldRule": True}
    assert data_or_fail(await gql(api, REMOVE, {"t": "Deal", "f": "amount"}, token=admin)) == {"removeFieldRule": False}
    assert data_or_fail(await gql(api, "{ fieldRules { field } }", token=admin))["fieldRules"] == []
    audit = data_or_fail(await gql(api, '{ auditEvents(first: 10) { nodes { action entityType diff } } }',
                                   token=tenant.token(Role.OWNER)))["auditEvents"]["nodes"]
    assert [(e["action"], e["entityType"]) for e in audit] == [
        ("delete", "FieldRule"), ("update", "FieldRule"), ("create", "FieldRule")]


# ---- reads ----------------------------------------------------------------------------------------

async def test_hidden_field_reads_null_with_one_forbidden_error_at_its_path(
        api: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    tenant, crm = await seeded(api, make_tenant)
    await hide(api, tenant, "Deal", "amount", Role.MEMBER)
    query = ("query($id: ID!, $c: ID!) { deals { edges { node { title amount currency } } } deal(id: $id) "
             "{ title amount } node(id: $id) { ... on Deal { amount } } company(id: $c) { deals { amount title } } }")
    variables = {"id": crm.deal["id"], "c": crm.company["id"]}
    body = await gql(api, query, variables, token=tenant.token(Role.MEMBER))
    data = body["data"]
    assert data["deals"]["edges"] == [{"node": {"title": crm.deal["title"], "amount": None, "currency": "USD"}}]
    assert data["deal"] == {"title": crm.deal["title"], "amount": None}
    assert data["node"] == {"amount": None}
    assert data["company"]["deals"] == [{"amount": None, "title": crm.deal["title"]}]
    assert sorted(forbidden(body)) == sorted([
        (("deals", "edges", 0, "node", "amount"), "amount"), (("deal", "amount"), "amount"),
        (("node", "amount"), "amount"), (("company", "deals", 0, "amount"), "amount")])
    assert len(body["errors"]) == 4
    for role in (Role.VIEWER, Role.ADMIN, Role.OWNER):  # hidden from members only
        seen = data_or_fail(await gql(api, query, variables, token=tenant.token(role)))
        assert seen["deal"]["amount"] == "1234.50" and seen["node"]["amount"] == "1234.50", role


async def test_a_mutations_payload_hides_the_field_too(api: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    tenant, crm = await seeded(api, make_tenant)
    await hide(api, tenant, "Deal", "amount", Role.MEMBER)
    body = await gql(api, 'mutation($id: ID!) { updateDeal(id: $id, input: {title: "Renamed"}) { title amount } }',
                     {"id": crm.deal["id"]}, token=tenant.token(Role.MEMBER))
    assert body["data"]["updateDeal"] == {"title": "Renamed", "amount": None}
    assert forbidden(body) == [(("updateDeal", "amount"), "amount")]


async def test_filters_and_orderings_on_a_hidden_field_are_forbidden(api: httpx.AsyncClient,
                                                                      make_tenant: MakeTenant) -> None:
    tenant, crm = await seeded(api, make_tenant)
    await hide(api, tenant, "Deal", "amount", Role.MEMBER)
    await hide(api, tenant, "Deal", "expectedCloseDate", Role.MEMBER)
    member, owner = tenant.token(Role.MEMBER), tenant.token(Role.OWNER)
    cases = [('{ deals(filter: {amountMin: "1000"}) { totalCount } }', "filter.amountMin"),
             ('{ deals(filter: {amountMax: "2000"}) { totalCount } }', "filter.amountMax"),
             ('{ deals(filter: {closeDateFrom: "2000-01-01"}) { totalCount } }', "filter.closeDateFrom"),
             ("{ deals(orderBy: {field: AMOUNT}) { edges { cursor node { id } } } }", "orderBy.field"),
             ("{ deals(orderBy: {field: EXPECTED_CLOSE_DATE}) { totalCount } }", "orderBy.field"),
             ('{ products(orderBy: {field: UNIT_PRICE}) { totalCount } }', None)]
    for query, field in cases:
        body = await gql(api, query, token=member)
        if field is None:
            assert not body.get("errors"), body  # another record's field: not hidden
            continue
        assert body["data"] is None and forbidden(body) == [((query.split("(")[0].strip("{ "),), field)], query
        assert data_or_fail(await gql(api, query, token=owner)), query
    # Other filters still work, and the owner filters by the amount.
    assert data_or_fail(await gql(api, '{ deals(filter: {currency: "USD"}) { totalCount } }',
                                  token=member))["deals"]["totalCount"] == 1
    assert data_or_fail(await gql(api, '{ deals(filter: {amountMin: "1234.50"}) { totalCount } }',
                                  token=owner))["deals"]["totalCount"] == 1
    del crm


async def test_search_leaves_hidden_columns_out(api: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    """A deal's search matches its contact's email: not for a role the email is hidden from."""
    tenant, crm = await seeded(api, make_tenant)
    await hide(api, tenant, "Contact", "email", Role.VIEWER)
    search = "query($s: String!) { deals(filter: {search: $s}) { totalCount } contacts(filter: {search: $s}) " \
             "{ totalCount } }"
    by_email = {"s": f"{crm.tag}.example"}  # only in the email
    by_name = {"s": f"Person {crm.tag}"}
    viewer, member = tenant.token(Role.VIEWER), tenant.token(Role.MEMBER)
    assert data_or_fail(await gql(api, search, by_email, token=viewer)) == {
        "deals": {"totalCount": 0}, "contacts": {"totalCount": 0}}
    assert data_or_fail(await gql(api, search, by_email, token=member)) == {
        "deals": {"totalCount": 1}, "contacts": {"totalCount": 1}}
    assert data_or_fail(await gql(api, search, by_name, token=viewer)) == {
        "deals": {"totalCount": 1}, "contacts": {"totalCount": 1}}


async def test_aggregates_never_measure_or_group_by_a_hidden_field(api: httpx.AsyncClient,
                                                                    make_tenant: MakeTenant) -> None:
    tenant, crm = await seeded(api, make_tenant)
    await hide(api, tenant, "Deal", "amount", Role.MEMBER)
    await hide(api, tenant, "Deal", "expectedCloseDate", Role.MEMBER)
    member, admin = tenant.token(Role.MEMBER), tenant.token(Role.ADMIN)
    measured = "{ dealsAggregate { groups { count amount { currency sum } } } }"
    grouped = "{ dealsAggregate(groupBy: [CLOSE_MONTH]) { groups { count closeMonth } } }"
    filtered = '{ dealsAggregate(filter: {amountMin: "1"}) { groups { count } } }'
    summary = "query($p: ID!) { pipelineSummary(pipelineId: $p) { total } }"
    for query, field in ((measured, "groups.amount"), (grouped, "groupBy"), (filtered, "filter.amountMin")):
        body = await gql(api, query, token=member)
        assert body["data"] is None and forbidden(body) == [(("dealsAggregate",), field)], query
        assert data_or_fail(await gql(api, query, token=admin)), query
    counted = data_or_fail(await gql(api, "{ dealsAggregate(groupBy: [STAGE]) { groups { count } } }", token=member))
    assert counted["dealsAggregate"]["groups"] == [{"count": 1}]
    body = await gql(api, summary, {"p": crm.pipeline["id"]}, token=member)
    assert forbidden(body) == [(("pipelineSummary",), "pipelineId")]
    assert data_or_fail(await gql(api, summary, {"p": crm.pipeline["id"]}, token=admin))["pipelineSummary"] == [
        {"total": "1234.50"}]


async def test_audit_reads_redact_hidden_values(api: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    tenant, crm = await seeded(api, make_tenant)
    owner = tenant.token(Role.OWNER)
    data_or_fail(await gql(api, 'mutation($id: ID!) { updateDeal(id: $id, input: {amount: "99.00", title: "T"}) '
                                "{ id } }", {"id": crm.deal["id"]}, token=owner))
    await hide(api, tenant, "Deal", "amount", Role.ADMIN)
    query = "query($id: ID!) { auditEvents(entityId: $id) { nodes { action diff } } }"
    admin = data_or_fail(await gql(api, query, {"id": crm.deal["id"]}, token=tenant.token(Role.ADMIN)))
    full = data_or_fail(await gql(api, query, {"id": crm.deal["id"]}, token=owner))
    update = next(e["diff"] for e in admin["auditEvents"]["nodes"] if e["action"] == "update")
    create = next(e["diff"] for e in admin["auditEvents"]["nodes"] if e["action"] == "create")
    assert update["before"]["amount"] is None and update["after"]["amount"] is None and update["hidden"] == ["amount"]
    assert update["after"]["title"] == "T"
    assert create["after"]["amount"] is None and create["after"]["currency"] == "USD"
    owner_update = next(e["diff"] for e in full["auditEvents"]["nodes"] if e["action"] == "update")
    assert owner_update["before"]["amount"] == "1234.50" and owner_update["after"]["amount"] == "99.00"
    assert "hidden" not in owner_update


# ---- writes ---------------------------------------------------------------------------------------

async def test_writing_a_hidden_field_is_forbidden_and_writes_nothing(api: httpx.AsyncClient,
                                                                       make_tenant: MakeTenant) -> None:
    tenant, crm = await seeded(api, make_tenant)
    await hide(api, tenant, "Deal", "amount", Role.MEMBER)
    await hide(api, tenant, "Contact", "phone", Role.MEMBER)
    member, owner = tenant.token(Role.MEMBER), tenant.token(Role.OWNER)
    stage = crm.stage["id"]
    attempts = [
        ("mutation($s: ID!) { createDeal(input: {title: \"X\", amount: \"1\", currency: \"USD\", stageId: $s}) "
         "{ id } }", {"s": stage}, "amount"),
        ('mutation($id: ID!) { updateDeal(id: $id, input: {title: "Y", amount: "5"}) { id } }',
         {"id": crm.deal["id"]}, "amount"),
        ("mutation($s: ID!) { createDeals(input: [{title: \"A\", amount: \"1\", currency: \"USD\", stageId: $s}]) "
         "{ id } }", {"s": stage}, "input.0.amount"),
        ('mutation($id: ID!) { updateDeals(input: [{id: $id, title: "Z"}, {id: $id, amount: "2"}]) { id } }',
         {"id": crm.deal["id"]}, "input.1.amount"),
        ('mutation($id: ID!) { updateContact(id: $id, input: {phone: null}) { id } }',
         {"id": crm.contact["id"]}, "phone"),  # clearing is writing
        ('mutation { createContact(input: {firstName: "A", lastName: "B", phone: "1"}) { id } }', {}, "phone"),
    ]
    before = data_or_fail(await gql(api, "{ deals { totalCount } contacts { totalCount } }", token=owner))
    for document, variables, field in attempts:
        body = await gql(api, document, variables, token=member)
        assert body["data"] is None and [e["extensions"] for e in body["errors"]] == [
            {"code": "FORBIDDEN", "field": field, **({"index": int(field.split(".")[1])} if "." in field else {})}
        ], (document, body)
    after = data_or_fail(await gql(api, "query($id: ID!) { deals { totalCount } contacts { totalCount } "
                                        "deal(id: $id) { title amount version } }", {"id": crm.deal["id"]},
                                   token=owner))
    assert after["deals"] == before["deals"] and after["contacts"] == before["contacts"]
    assert after["deal"] == {"title": crm.deal["title"], "amount": "1234.50", "version": 1}
    # What the member may write still works; the admin writes the amount.
    data_or_fail(await gql(api, 'mutation($id: ID!) { updateDeal(id: $id, input: {title: "Ok"}) { id } }',
                           {"id": crm.deal["id"]}, token=member))
    data_or_fail(await gql(api, 'mutation($id: ID!) { updateDeal(id: $id, input: {amount: "7"}) { amount } }',
                           {"id": crm.deal["id"]}, token=tenant.token(Role.ADMIN)))


async def test_a_version_conflict_does_not_tell_the_hidden_value(api: httpx.AsyncClient,
                                                                 make_tenant: MakeTenant) -> None:
    tenant, crm = await seeded(api, make_tenant)
    await hide(api, tenant, "Deal", "amount", Role.MEMBER)
    stale = 'mutation($id: ID!) { updateDeal(id: $id, input: {title: "T"}, expectedVersion: 7) { id } }'
    member = (await gql(api, stale, {"id": crm.deal["id"]}, token=tenant.token(Role.MEMBER)))["errors"][0]
    admin = (await gql(api, stale, {"id": crm.deal["id"]}, token=tenant.token(Role.ADMIN)))["errors"][0]
    assert member["extensions"]["code"] == admin["extensions"]["code"] == "VERSION_CONFLICT"
    assert "amount" not in member["extensions"]["current"] and member["extensions"]["current"]["title"]
    assert admin["extensions"]["current"]["amount"] == "1234.50"


# ---- isolation, cache ----------------------------------------------------------------------------

async def test_one_tenants_rules_leave_another_alone(api: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    a, _ = await seeded(api, make_tenant)
    b, b_crm = await seeded(api, make_tenant)
    await hide(api, a, "Deal", "amount", Role.MEMBER)
    seen = data_or_fail(await gql(api, DEALS, token=b.token(Role.MEMBER)))
    assert seen["deals"]["edges"][0]["node"]["amount"] == "1234.50"
    assert data_or_fail(await gql(api, "{ fieldRules { field } }", token=b.token(Role.ADMIN)))["fieldRules"] == []
    assert codes(await gql(api, DEALS, token=a.token(Role.MEMBER))) == ["FORBIDDEN"]
    del b_crm


async def test_a_rule_change_is_seen_by_the_next_request_cached_or_not(apps: dict[str, Starlette],
                                                                       make_tenant: MakeTenant) -> None:
    """Answers are cached by role and data versions (plans on, ``Atrium-Cache: on``): the rules'
    version is one of them, so a cached answer never outlives a rule change either way."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=apps["plans-on"]),
                                 base_url="http://rules.test") as client:
        tenant, _ = await seeded(client, make_tenant)
        headers = {"authorization": f"Bearer {tenant.token(Role.MEMBER)}", "Atrium-Cache": "on"}

        async def ask() -> tuple[str, Any, list[str]]:
            answer = await client.post("/graphql", json={"query": DEALS}, headers=headers)
            body = answer.json()
            return answer.headers["atrium-cache"], body["data"]["deals"]["edges"][0]["node"]["amount"], codes(body)

        assert await ask() == ("miss", "1234.50", [])
        assert await ask() == ("hit", "1234.50", [])
        await hide(client, tenant, "Deal", "amount", Role.MEMBER)
        assert await ask() == ("uncacheable", None, ["FORBIDDEN"])  # the executor answers it
        data_or_fail(await gql(client, REMOVE, {"t": "Deal", "f": "amount"}, token=tenant.token(Role.ADMIN)))
        assert await ask() == ("miss", "1234.50", [])  # a new rules version: not the first answer's key
        # A rule of another field changes the version too: the query is planned and cached afresh.
        await hide(client, tenant, "Contact", "email", Role.MEMBER)
        assert await ask() == ("miss", "1234.50", [])
        plain = await client.post("/graphql", json={"query": "{ deals { edges { node { title currency } } } }"},
                                  headers=headers)
        assert plain.headers["atrium-cache"] == "miss"  # a plan reading no hidden field is still planned


async def test_rules_apply_without_plans_or_cache_alike(api: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    tenant, _ = await seeded(api, make_tenant)
    await hide(api, tenant, "Deal", "amount", Role.MEMBER)
    for _ in range(2):
        body = await gql(api, DEALS, token=tenant.token(Role.MEMBER))
        assert body["data"]["deals"]["edges"][0]["node"]["amount"] is None and codes(body) == ["FORBIDDEN"]


# ---- subscriptions --------------------------------------------------------------------------------

async def test_change_events_leave_hidden_fields_out(settings: Settings, make_tenant: MakeTenant) -> None:
    subscription = """subscription($id: ID!) { recordChanged(id: $id) { __typename
        ... on RecordChange { changedFields record { ... on Deal { title amount } } } ... on Resync { reason } } }"""
    async with serve_in_process(settings, ManualClock(), port=LIVE_PORT) as server, server.client() as client:
        tenant, crm = await seeded(client, make_tenant)
        await hide(client, tenant, "Deal", "amount", Role.MEMBER)
        async with live(server.ws_url, tenant.token(Role.MEMBER)) as member, \
                live(server.ws_url, tenant.token(Role.VIEWER)) as viewer:
            hidden_op = await member.live(subscription, {"id": crm.deal["id"]})
            seen_op = await viewer.live(subscription, {"id": crm.deal["id"]})
            data_or_fail(await gql(client, 'mutation($id: ID!) { updateDeal(id: $id, input: {amount: "5", '
                                           'title: "New"}) { id } }', {"id": crm.deal["id"]},
                                   token=tenant.token(Role.OWNER)))
            message = await member.message(hidden_op)
            change = message["payload"]["data"]["recordChanged"]
            assert change["changedFields"] == ["title"]
            assert change["record"] == {"title": "New", "amount": None}
            assert [(e["path"], e["extensions"]["code"]) for e in message["payload"]["errors"]] == [
                (["recordChanged", "record", "amount"], "FORBIDDEN")]
            other = (await viewer.data(seen_op))["recordChanged"]
            assert sorted(other["changedFields"]) == ["amount", "title"]
            assert other["record"] == {"title": "New", "amount": "5.00"}


def test_every_restrictable_field_is_guarded_and_nullable() -> None:
    """The declaration says which fields a tenant may hide; each one's object field must be the
    guarded one (so no read path skips the rule) and nullable (so hiding it nulls only itself)."""
    from graphql import GraphQLNonNull

    from atrium.schema import build_schema
    from records.crm import RECORDS
    from schema.objects import GUARDED, RecordObject

    sdl = build_schema()._schema
    restrictable = [(record, f) for record in RECORDS for f in record.restrictable().values()]
    assert len(restrictable) >= 8
    for record, f in restrictable:
        kind = RecordObject.type_of(record)
        sfield = next(x for x in kind.__strawberry_definition__.fields  # type: ignore[attr-defined]
                      if x.python_name == f.column)
        assert sfield.metadata.get(GUARDED) == f.column, (record.name, f.name)
        graphql_type = sdl.get_type(record.name)
        assert not isinstance(graphql_type.fields[f.name].type, GraphQLNonNull), (record.name, f.name)  # type: ignore[union-attr]


async def test_a_csv_export_leaves_hidden_fields_out_and_refuses_filtering_by_them(
        api: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    tenant, crm = await seeded(api, make_tenant)
    await hide(api, tenant, "Deal", "amount", Role.VIEWER)

    def exported(token: str, filter_: str | None = None) -> Any:
        return api.get("/csv/deals", params={"filter": filter_} if filter_ else {},
                       headers={"authorization": f"Bearer {token}"})

    viewer = await exported(tenant.token(Role.VIEWER))
    assert viewer.status_code == 200, viewer.text
    header, row = viewer.text.splitlines()[:2]
    assert "amount" not in header.split(",") and "title" in header.split(",")
    assert crm.deal["amount"] not in row.split(",")
    member = await exported(tenant.token(Role.MEMBER))
    assert "amount" in member.text.splitlines()[0].split(",")
    refused = await exported(tenant.token(Role.VIEWER), '{"amountMin": "1"}')
    assert refused.status_code == 403
    assert [(e["extensions"]["code"], e["extensions"]["field"]) for e in refused.json()["errors"]] == [
        ("FORBIDDEN", "filter.amountMin")]
