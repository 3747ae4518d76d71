"""Input validation: every rule answers BAD_USER_INPUT naming the field, over HTTP 200, writing nothing.

"Writing nothing" is checked on the whole tenant: every row of every tenant table (audit rows
included) is the same before and after the rejected request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from models.tables import ACTIVITIES, AUDIT_EVENTS, COMPANIES, CONTACTS, DEALS, PIPELINES, STAGES, Role
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.crm import create_activity, create_company, create_contact, create_deal, create_pipeline

MakeTenant = Callable[..., Awaitable[TenantWorld]]
TABLES = (COMPANIES, CONTACTS, PIPELINES, STAGES, DEALS, ACTIVITIES, AUDIT_EVENTS)


@dataclass(frozen=True)
class World:
    tenant: TenantWorld
    pipeline: str
    stage: str
    company: str
    contact: str
    deal: str
    note: str


async def build_world(client: httpx.AsyncClient, tenant: TenantWorld) -> World:
    token = tenant.token(Role.ADMIN)
    pipeline = await create_pipeline(client, token, name="Sales", stages=("Lead", "Won"))
    company = await create_company(client, token, name="Acme", domain="acme.example")
    contact = await create_contact(client, token, first_name="Grace", last_name="Hopper", company_id=company["id"])
    deal = await create_deal(client, token, pipeline["stages"][0]["id"], company_id=company["id"],
                             contact_id=contact["id"], title="Deal")
    note = await create_activity(client, token, kind="NOTE", subject="Note", deal_id=deal["id"])
    return World(tenant=tenant, pipeline=pipeline["id"], stage=pipeline["stages"][0]["id"], company=company["id"],
                 contact=contact["id"], deal=deal["id"], note=note["id"])


async def snapshot(engine: AsyncEngine, tenant: TenantWorld) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every tenant table of ``tenant``."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    async with engine.connect() as conn:
        for table in TABLES:
            rows = (await conn.execute(select(table).where(table.c.tenant_id == tenant.id))).all()
            out[table.name] = sorted((tuple(r) for r in rows), key=repr)
    return out


CREATE_COMPANY = "mutation($input: CompanyInput!) { createCompany(input: $input) { id } }"
CREATE_CONTACT = "mutation($input: ContactInput!) { createContact(input: $input) { id } }"
CREATE_DEAL = "mutation($input: DealInput!) { createDeal(input: $input) { id } }"
CREATE_PIPELINE = "mutation($input: PipelineInput!) { createPipeline(input: $input) { id } }"
CREATE_STAGE = "mutation($p: ID!, $input: StageInput!) { createStage(pipelineId: $p, input: $input) { id } }"
CREATE_ACTIVITY = "mutation($input: ActivityInput!) { createActivity(input: $input) { id } }"
UPDATE_COMPANY = "mutation($id: ID!, $input: CompanyPatch!) { updateCompany(id: $id, input: $input) { id } }"
UPDATE_CONTACT = "mutation($id: ID!, $input: ContactPatch!) { updateContact(id: $id, input: $input) { id } }"
UPDATE_DEAL = "mutation($id: ID!, $input: DealPatch!) { updateDeal(id: $id, input: $input) { id } }"
UPDATE_PIPELINE = "mutation($id: ID!, $input: PipelinePatch!) { updatePipeline(id: $id, input: $input) { id } }"
UPDATE_STAGE = "mutation($id: ID!, $input: StagePatch!) { updateStage(id: $id, input: $input) { id } }"
UPDATE_ACTIVITY = "mutation($id: ID!, $input: ActivityPatch!) { updateActivity(id: $id, input: $input) { id } }"
MOVE_DEAL = "mutation($id: ID!, $s: ID!) { moveDeal(id: $id, stageId: $s) { id } }"
DELETE_DEAL = "mutation($id: ID!) { deleteDeal(id: $id) { deletedId } }"


def company(**kw: Any) -> dict[str, Any]:
    return {"input": {"name": "Acme", **kw}}


def contact(**kw: Any) -> dict[str, Any]:
    return {"input": {"firstName": "Ada", "lastName": "Lovelace", **kw}}


def deal(w: World, **kw: Any) -> dict[str, Any]:
    return {"input": {"title": "New deal", "amount": "10.00", "currency": "USD", "stageId": w.stage, **kw}}


def stage(**kw: Any) -> dict[str, Any]:
    return {"name": "Stage", "probability": "0.5", **kw}


def activity(w: World, **kw: Any) -> dict[str, Any]:
    return {"input": {"kind": "NOTE", "subject": "Hello", "dealId": w.deal, **kw}}


Case = tuple[str, Callable[[World], dict[str, Any]], str]

CASES: dict[str, Case] = {
    # companies
    "company-name-empty": (CREATE_COMPANY, lambda w: company(name=""), "name"),
    "company-name-blank": (CREATE_COMPANY, lambda w: company(name="   "), "name"),
    "company-name-201": (CREATE_COMPANY, lambda w: company(name="x" * 201), "name"),
    "company-domain-words": (CREATE_COMPANY, lambda w: company(domain="not a domain"), "domain"),
    "company-domain-no-dot": (CREATE_COMPANY, lambda w: company(domain="localhost"), "domain"),
    "company-domain-hyphen": (CREATE_COMPANY, lambda w: company(domain="-acme-.example"), "domain"),
    "company-domain-url": (CREATE_COMPANY, lambda w: company(domain="https://acme.example/"), "domain"),
    "company-patch-name-null": (UPDATE_COMPANY, lambda w: {"id": w.company, "input": {"name": None}}, "name"),
    "company-patch-domain-bad": (UPDATE_COMPANY, lambda w: {"id": w.company, "input": {"domain": "a..b"}}, "domain"),
    "company-patch-id-wrong-type": (UPDATE_COMPANY, lambda w: {"id": w.contact, "input": {"name": "X"}}, "id"),
    # contacts
    "contact-first-name-empty": (CREATE_CONTACT, lambda w: contact(firstName=""), "firstName"),
    "contact-first-name-101": (CREATE_CONTACT, lambda w: contact(firstName="x" * 101), "firstName"),
    "contact-last-name-blank": (CREATE_CONTACT, lambda w: contact(lastName=" "), "lastName"),
    "contact-email-no-at": (CREATE_CONTACT, lambda w: contact(email="ada.example"), "email"),
    "contact-email-no-domain": (CREATE_CONTACT, lambda w: contact(email="ada@"), "email"),
    "contact-email-no-tld": (CREATE_CONTACT, lambda w: contact(email="ada@engines"), "email"),
    "contact-email-space": (CREATE_CONTACT, lambda w: contact(email="ada love@engines.example"), "email"),
    "contact-phone-41": (CREATE_CONTACT, lambda w: contact(phone="1" * 41), "phone"),
    "contact-company-garbage": (CREATE_CONTACT, lambda w: contact(companyId="garbage"), "companyId"),
    "contact-company-is-deal": (CREATE_CONTACT, lambda w: contact(companyId=w.deal), "companyId"),
    "contact-patch-first-name-null": (UPDATE_CONTACT, lambda w: {"id": w.contact, "input": {"firstName": None}},
                                      "firstName"),
    "contact-patch-last-name-null": (UPDATE_CONTACT, lambda w: {"id": w.contact, "input": {"lastName": None}},
                                     "lastName"),
    "contact-patch-email-bad": (UPDATE_CONTACT, lambda w: {"id": w.contact, "input": {"email": "nope"}}, "email"),
    # deals
    "deal-title-empty": (CREATE_DEAL, lambda w: deal(w, title=""), "title"),
    "deal-title-201": (CREATE_DEAL, lambda w: deal(w, title="x" * 201), "title"),
    "deal-amount-negative": (CREATE_DEAL, lambda w: deal(w, amount="-0.01"), "amount"),
    "deal-amount-3-decimals": (CREATE_DEAL, lambda w: deal(w, amount="10.001"), "amount"),
    "deal-amount-too-big": (CREATE_DEAL, lambda w: deal(w, amount="10000000000000000.00"), "amount"),
    "deal-amount-nan": (CREATE_DEAL, lambda w: deal(w, amount="NaN"), "amount"),
    "deal-amount-infinity": (CREATE_DEAL, lambda w: deal(w, amount="Infinity"), "amount"),
    "deal-currency-xyz": (CREATE_DEAL, lambda w: deal(w, currency="XYZ"), "currency"),
    "deal-currency-us": (CREATE_DEAL, lambda w: deal(w, currency="us"), "currency"),
    "deal-currency-empty": (CREATE_DEAL, lambda w: deal(w, currency=""), "currency"),
    "deal-stage-garbage": (CREATE_DEAL, lambda w: deal(w, stageId="garbage"), "stageId"),
    "deal-stage-is-company": (CREATE_DEAL, lambda w: deal(w, stageId=w.company), "stageId"),
    "deal-stage-is-pipeline": (CREATE_DEAL, lambda w: deal(w, stageId=w.pipeline), "stageId"),
    "deal-company-is-contact": (CREATE_DEAL, lambda w: deal(w, companyId=w.contact), "companyId"),
    "deal-contact-garbage": (CREATE_DEAL, lambda w: deal(w, contactId="!!"), "contactId"),
    "deal-owner-is-company": (CREATE_DEAL, lambda w: deal(w, ownerId=w.company), "ownerId"),
    "deal-patch-title-null": (UPDATE_DEAL, lambda w: {"id": w.deal, "input": {"title": None}}, "title"),
    "deal-patch-amount-null": (UPDATE_DEAL, lambda w: {"id": w.deal, "input": {"amount": None}}, "amount"),
    "deal-patch-currency-null": (UPDATE_DEAL, lambda w: {"id": w.deal, "input": {"currency": None}}, "currency"),
    "deal-patch-status-null": (UPDATE_DEAL, lambda w: {"id": w.deal, "input": {"status": None}}, "status"),
    "deal-patch-amount-negative": (UPDATE_DEAL, lambda w: {"id": w.deal, "input": {"amount": "-1"}}, "amount"),
    "deal-patch-currency-bad": (UPDATE_DEAL, lambda w: {"id": w.deal, "input": {"currency": "us"}}, "currency"),
    "deal-patch-title-bad-amount-bad": (UPDATE_DEAL, lambda w: {"id": w.deal, "input": {"title": "Fine",
                                                                                         "amount": "1.999"}},
                                        "amount"),
    "deal-patch-company-wrong-type": (UPDATE_DEAL, lambda w: {"id": w.deal, "input": {"companyId": w.stage}},
                                      "companyId"),
    "deal-patch-id-garbage": (UPDATE_DEAL, lambda w: {"id": "garbage", "input": {"title": "X"}}, "id"),
    "move-deal-stage-garbage": (MOVE_DEAL, lambda w: {"id": w.deal, "s": "garbage"}, "stageId"),
    "move-deal-stage-is-deal": (MOVE_DEAL, lambda w: {"id": w.deal, "s": w.deal}, "stageId"),
    "move-deal-id-is-stage": (MOVE_DEAL, lambda w: {"id": w.stage, "s": w.stage}, "id"),
    "delete-deal-id-is-company": (DELETE_DEAL, lambda w: {"id": w.company}, "id"),
    # pipelines and stages
    "pipeline-name-empty": (CREATE_PIPELINE, lambda w: {"input": {"name": "", "stages": []}}, "name"),
    "pipeline-name-201": (CREATE_PIPELINE, lambda w: {"input": {"name": "x" * 201}}, "name"),
    "pipeline-stage-probability-above-1": (
        CREATE_PIPELINE, lambda w: {"input": {"name": "P", "stages": [stage(probability="1.0001")]}},
        "stages.0.probability"),
    "pipeline-stage-name-empty": (
        CREATE_PIPELINE, lambda w: {"input": {"name": "P", "stages": [stage(), stage(name="")]}}, "stages.1.name"),
    "pipeline-51-stages": (
        CREATE_PIPELINE, lambda w: {"input": {"name": "P", "stages": [stage(name=f"S{i}") for i in range(51)]}},
        "stages"),
    "pipeline-patch-name-null": (UPDATE_PIPELINE, lambda w: {"id": w.pipeline, "input": {"name": None}}, "name"),
    "stage-probability-negative": (CREATE_STAGE, lambda w: {"p": w.pipeline, "input": stage(probability="-0.1")},
                                   "probability"),
    "stage-probability-above-1": (CREATE_STAGE, lambda w: {"p": w.pipeline, "input": stage(probability="1.5")},
                                  "probability"),
    "stage-probability-5-decimals": (CREATE_STAGE, lambda w: {"p": w.pipeline,
                                                              "input": stage(probability="0.12345")}, "probability"),
    "stage-name-101": (CREATE_STAGE, lambda w: {"p": w.pipeline, "input": stage(name="x" * 101)}, "name"),
    "stage-position-negative": (CREATE_STAGE, lambda w: {"p": w.pipeline, "input": stage(position=-1)}, "position"),
    "stage-pipeline-is-stage": (CREATE_STAGE, lambda w: {"p": w.stage, "input": stage()}, "pipelineId"),
    "stage-patch-name-null": (UPDATE_STAGE, lambda w: {"id": w.stage, "input": {"name": None}}, "name"),
    "stage-patch-probability-null": (UPDATE_STAGE, lambda w: {"id": w.stage, "input": {"probability": None}},
                                     "probability"),
    "stage-patch-probability-above-1": (UPDATE_STAGE, lambda w: {"id": w.stage, "input": {"probability": "2"}},
                                        "probability"),
    "stage-patch-position-null": (UPDATE_STAGE, lambda w: {"id": w.stage, "input": {"position": None}}, "position"),
    # activities
    "activity-without-link": (CREATE_ACTIVITY, lambda w: activity(w, dealId=None), "dealId"),
    "activity-subject-empty": (CREATE_ACTIVITY, lambda w: activity(w, subject=""), "subject"),
    "activity-due-date-on-note": (CREATE_ACTIVITY, lambda w: activity(w, dueDate="2030-01-01"), "dueDate"),
    "activity-due-date-on-call": (CREATE_ACTIVITY, lambda w: activity(w, kind="CALL", dueDate="2030-01-01"),
                                  "dueDate"),
    "activity-naive-occurred-at": (CREATE_ACTIVITY, lambda w: activity(w, occurredAt="2025-01-01T10:00:00"),
                                   "occurredAt"),
    "activity-deal-is-company": (CREATE_ACTIVITY, lambda w: activity(w, dealId=w.company), "dealId"),
    "activity-contact-garbage": (CREATE_ACTIVITY, lambda w: activity(w, contactId="garbage"), "contactId"),
    "activity-patch-subject-null": (UPDATE_ACTIVITY, lambda w: {"id": w.note, "input": {"subject": None}},
                                    "subject"),
    "activity-patch-done-null": (UPDATE_ACTIVITY, lambda w: {"id": w.note, "input": {"done": None}}, "done"),
    "activity-patch-occurred-at-null": (UPDATE_ACTIVITY, lambda w: {"id": w.note, "input": {"occurredAt": None}},
                                        "occurredAt"),
    "activity-patch-occurred-at-naive": (UPDATE_ACTIVITY, lambda w: {"id": w.note, "input": {
        "occurredAt": "2025-01-01T10:00:00"}}, "occurredAt"),
    "activity-patch-due-date-on-note": (UPDATE_ACTIVITY, lambda w: {"id": w.note, "input": {
        "dueDate": "2030-01-01", "subject": "Renamed"}}, "dueDate"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_rule_is_bad_user_input_and_writes_nothing(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                         admin_engine: AsyncEngine, case: str) -> None:
    query, variables, field = CASES[case]
    tenant = await make_tenant("val")
    world = await build_world(client, tenant)
    before = await snapshot(admin_engine, tenant)

    body = await gql(client, query, variables(world), token=tenant.token(Role.ADMIN))

    assert body["_status"] == 200
    assert codes(body) == ["BAD_USER_INPUT"], body.get("errors")
    assert body["errors"][0]["extensions"]["field"] == field
    assert body.get("data") is None  # null, or absent when the value's type refused it before execution
    assert await snapshot(admin_engine, tenant) == before


NUL_CASES: dict[str, Case] = {
    "company-name": (CREATE_COMPANY, lambda w: company(name="Ac\u0000me"), "name"),
    "contact-last-name": (CREATE_CONTACT, lambda w: contact(lastName="Love\u0000lace"), "lastName"),
    "deal-title": (CREATE_DEAL, lambda w: deal(w, title="Deal\u0000"), "title"),
    "activity-body": (CREATE_ACTIVITY, lambda w: activity(w, body="line\u0000two"), "body"),
}


@pytest.mark.parametrize("case", list(NUL_CASES))
async def test_nul_character_in_text_is_bad_user_input(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                       admin_engine: AsyncEngine, case: str) -> None:
    """PostgreSQL text cannot hold U+0000: the input is invalid, not a server fault."""
    query, variables, field = NUL_CASES[case]
    tenant = await make_tenant("val")
    world = await build_world(client, tenant)
    before = await snapshot(admin_engine, tenant)

    body = await gql(client, query, variables(world), token=tenant.token(Role.ADMIN))

    assert await snapshot(admin_engine, tenant) == before
    assert codes(body) == ["BAD_USER_INPUT"], body.get("errors")
    assert body["errors"][0]["extensions"]["field"] == field


WRONG_TYPES: dict[str, tuple[str, dict[str, Any]]] = {
    "int-given-string": ("query($n: Int) { deals(first: $n) { totalCount } }", {"n": "ten"}),
    "decimal-given-words": (CREATE_DEAL, {"input": {"title": "T", "amount": "ten dollars", "currency": "USD",
                                                    "stageId": "x"}}),
    "enum-given-unknown": (UPDATE_DEAL, {"id": "x", "input": {"status": "MAYBE"}}),
    "non-null-given-null": (UPDATE_DEAL, {"id": None, "input": {}}),
    "required-missing": (UPDATE_DEAL, {"input": {}}),
    "date-given-garbage": (UPDATE_DEAL, {"id": "x", "input": {"expectedCloseDate": "next tuesday"}}),
}


@pytest.mark.parametrize("case", list(WRONG_TYPES))
async def test_variable_of_the_wrong_type_is_bad_user_input(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                            admin_engine: AsyncEngine, case: str) -> None:
    query, variables = WRONG_TYPES[case]
    tenant = await make_tenant("val")
    before = await snapshot(admin_engine, tenant)
    body = await gql(client, query, variables, token=tenant.token(Role.ADMIN))
    assert body["_status"] == 200
    assert body.get("data") is None
    assert codes(body) == ["BAD_USER_INPUT"], body.get("errors")
    assert await snapshot(admin_engine, tenant) == before


async def test_limits_are_inclusive(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    """The longest allowed names, the largest amount and the probability bounds are accepted."""
    tenant = await make_tenant("val")
    world = await build_world(client, tenant)
    token = tenant.token(Role.ADMIN)
    create_company_named = "mutation($input: CompanyInput!) { createCompany(input: $input) { name } }"
    created = data_or_fail(await gql(client, create_company_named, company(name="c" * 200, domain="sub.acme.example"),
                                     token=token))
    assert created["createCompany"]["name"] == "c" * 200
    data_or_fail(await gql(client, CREATE_CONTACT, contact(firstName="f" * 100, email="a.b+c@d-e.example"),
                           token=token))
    create_deal_amount = "mutation($input: DealInput!) { createDeal(input: $input) { amount currency } }"
    made = data_or_fail(await gql(client, create_deal_amount,
                                  deal(world, title="t" * 200, amount="9999999999999999.99", currency=" usd "),
                                  token=token))
    assert made["createDeal"] == {"amount": "9999999999999999.99", "currency": "USD"}
    data_or_fail(await gql(client, CREATE_PIPELINE, {"input": {"name": "p" * 200, "stages": [
        stage(probability="0"), stage(probability="1"), stage(probability="0.1234")]}}, token=token))
    data_or_fail(await gql(client, CREATE_ACTIVITY, activity(world, kind="TASK", dueDate="2030-01-01",
                                                             occurredAt="2025-01-01T10:00:00Z"), token=token))


async def test_failed_pipeline_leaves_no_pipeline_stage_or_audit(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                                 admin_engine: AsyncEngine) -> None:
    tenant = await make_tenant("val")
    await build_world(client, tenant)
    before = await snapshot(admin_engine, tenant)
    body = await gql(client, CREATE_PIPELINE, {"input": {"name": "Half", "stages": [
        stage(name="One"), stage(name="Two"), stage(name="Three", probability="1.5")]}}, token=tenant.token(Role.ADMIN))
    assert codes(body) == ["BAD_USER_INPUT"]
    assert body["errors"][0]["extensions"]["field"] == "stages.2.probability"
    assert await snapshot(admin_engine, tenant) == before


async def test_pipeline_failing_in_the_database_after_two_stages_is_rolled_back(
        client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine) -> None:
    """The third stage passes validation but PostgreSQL rejects it after the pipeline and two stages
    were inserted: the whole mutation, audit rows included, is rolled back."""
    tenant = await make_tenant("val")
    await build_world(client, tenant)
    before = await snapshot(admin_engine, tenant)
    body = await gql(client, CREATE_PIPELINE, {"input": {"name": "Half", "stages": [
        stage(name="One"), stage(name="Two"), stage(name="Th\u0000ree")]}}, token=tenant.token(Role.ADMIN))
    assert body.get("data") is None and len(body["errors"]) == 1
    assert await snapshot(admin_engine, tenant) == before
    pipelines = data_or_fail(await gql(client, "{ pipelines { name } }", token=tenant.token(Role.VIEWER)))
    assert pipelines["pipelines"] == [{"name": "Sales"}]


async def test_failed_update_leaves_the_valid_fields_unchanged(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                               admin_engine: AsyncEngine) -> None:
    """A patch whose last reference does not exist changes none of its other fields."""
    tenant = await make_tenant("val")
    world = await build_world(client, tenant)
    before = await snapshot(admin_engine, tenant)
    missing = "Q29tcGFueTowMDAwMDAwMC0wMDAwLTAwMDAtMDAwMC0wMDAwMDAwMDAwMDA"  # Company:00000000-...
    body = await gql(client, UPDATE_DEAL, {"id": world.deal, "input": {"title": "Changed", "amount": "5",
                                                                       "companyId": missing}},
                     token=tenant.token(Role.ADMIN))
    assert codes(body) == ["NOT_FOUND"] and body["errors"][0]["extensions"]["field"] == "companyId"
    assert await snapshot(admin_engine, tenant) == before
