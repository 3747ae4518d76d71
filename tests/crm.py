"""Build CRM records through the GraphQL API, as a client would (for tests).

Every helper sends one mutation with the given bearer token, fails the test when the response has
errors, and returns the created object as the API returned it (a dict keyed by GraphQL field
names). ``seed_crm`` makes one of each record for a tenant, named after a tag so that tests can
tell tenants' rows apart by name.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from core.ids import parse_global_id, to_global_id
from tests.conftest import data_or_fail, gql

PIPELINE = """
mutation($input: PipelineInput!) {
  createPipeline(input: $input) { id name version stages { id name position probability version } }
}"""
COMPANY = "mutation($input: CompanyInput!) { createCompany(input: $input) { id name domain version } }"
CONTACT = """
mutation($input: ContactInput!) {
  createContact(input: $input) { id firstName lastName email version company { id } }
}"""
DEAL = """
mutation($input: DealInput!) {
  createDeal(input: $input) {
    id title amount currency status version stage { id } company { id } contact { id } owner { id }
  }
}"""
ACTIVITY = """
mutation($input: ActivityInput!) {
  createActivity(input: $input) { id kind subject body done dueDate version }
}"""


def gid(type_name: str, key: uuid.UUID) -> str:
    """The global ID of ``key`` as the API spells it (``User``, ``Deal``, ...)."""
    return to_global_id(type_name, key)


def uuid_of(global_id: str) -> uuid.UUID:
    """The database key behind a global ID the API returned."""
    return parse_global_id(global_id)[1]


async def _create(client: httpx.AsyncClient, token: str, document: str, field: str,
                  values: dict[str, Any]) -> dict[str, Any]:
    body = await gql(client, document, {"input": values}, token=token)
    created: dict[str, Any] = data_or_fail(body)[field]
    return created


async def create_pipeline(client: httpx.AsyncClient, token: str, *, name: str = "Sales",
                          stages: tuple[str, ...] = ("Lead", "Qualified", "Won"),
                          probability: str = "0.5") -> dict[str, Any]:
    """A pipeline with ``stages`` in order (each with ``probability``); returns it with its stages."""
    return await _create(client, token, PIPELINE, "createPipeline", {
        "name": name, "stages": [{"name": s, "probability": probability} for s in stages]})


async def create_company(client: httpx.AsyncClient, token: str, *, name: str | None = None,
                         domain: str | None = None) -> dict[str, Any]:
    return await _create(client, token, COMPANY, "createCompany", {
        "name": name or f"Company {uuid.uuid4().hex[:8]}", "domain": domain})


async def create_contact(client: httpx.AsyncClient, token: str, *, first_name: str = "Ada",
                         last_name: str | None = None, email: str | None = None,
                         company_id: str | None = None) -> dict[str, Any]:
    return await _create(client, token, CONTACT, "createContact", {
        "firstName": first_name, "lastName": last_name or f"L{uuid.uuid4().hex[:8]}", "email": email,
        "companyId": company_id})


async def create_deal(client: httpx.AsyncClient, token: str, stage_id: str, *, company_id: str | None = None,
                      contact_id: str | None = None, owner_id: str | None = None, amount: str = "100.00",
                      currency: str = "USD", title: str | None = None) -> dict[str, Any]:
    return await _create(client, token, DEAL, "createDeal", {
        "title": title or f"Deal {uuid.uuid4().hex[:8]}", "amount": amount, "currency": currency,
        "stageId": stage_id, "companyId": company_id, "contactId": contact_id, "ownerId": owner_id})


async def create_activity(client: httpx.AsyncClient, token: str, *, kind: str = "NOTE", subject: str | None = None,
                          body: str | None = None, deal_id: str | None = None, contact_id: str | None = None,
                          company_id: str | None = None, due_date: str | None = None) -> dict[str, Any]:
    """An activity on a deal, contact and/or company (at least one is required by the API)."""
    return await _create(client, token, ACTIVITY, "createActivity", {
        "kind": kind, "subject": subject or f"Activity {uuid.uuid4().hex[:8]}", "body": body,
        "dealId": deal_id, "contactId": contact_id, "companyId": company_id, "dueDate": due_date})


@dataclass(frozen=True)
class Crm:
    """One of each record of one tenant, as the API returned them."""

    tag: str
    pipeline: dict[str, Any]
    company: dict[str, Any]
    contact: dict[str, Any]
    deal: dict[str, Any]
    activity: dict[str, Any]

    @property
    def stage(self) -> dict[str, Any]:
        """The deal's stage (the pipeline's first)."""
        stage: dict[str, Any] = self.pipeline["stages"][0]
        return stage

    @property
    def names(self) -> set[str]:
        """Every distinctive text of this tenant's records (all contain ``tag``)."""
        return {self.pipeline["name"], self.company["name"], self.contact["lastName"], self.deal["title"],
                self.activity["subject"]}


async def seed_crm(client: httpx.AsyncClient, token: str, tag: str | None = None) -> Crm:
    """A pipeline (3 stages), a company, a contact of it, a deal linking them and an activity on the deal.

    Every name contains ``tag`` (a fresh unique one by default), and the contact's email is
    ``<tag>@<tag>.example``, so searches for the tag find exactly these records.
    """
    tag = tag or f"tag{uuid.uuid4().hex[:10]}"
    pipeline = await create_pipeline(client, token, name=f"Pipeline {tag}",
                                     stages=(f"Lead {tag}", f"Proposal {tag}", f"Won {tag}"))
    company = await create_company(client, token, name=f"Company {tag}", domain=f"{tag}.example")
    contact = await create_contact(client, token, first_name="Contact", last_name=f"Person {tag}",
                                   email=f"{tag}@{tag}.example", company_id=company["id"])
    deal = await create_deal(client, token, pipeline["stages"][0]["id"], company_id=company["id"],
                             contact_id=contact["id"], title=f"Deal {tag}", amount="1234.50")
    activity = await create_activity(client, token, kind="TASK", subject=f"Call {tag}", deal_id=deal["id"],
                                     contact_id=contact["id"], company_id=company["id"], due_date="2030-01-01")
    return Crm(tag=tag, pipeline=pipeline, company=company, contact=contact, deal=deal, activity=activity)


CUSTOM_FIELD = """mutation($input: CustomFieldDefinitionInput!) {
  createCustomFieldDefinition(input: $input) { id key type } }"""


async def create_custom_field(client: httpx.AsyncClient, token: str, record_type: str, key: str, type_: str,
                              **spec: Any) -> dict[str, Any]:
    """A custom field definition (``spec``: ``options``, ``required``, ``default``, ``position``...;
    the token must be an admin's or the owner's)."""
    return await _create(client, token, CUSTOM_FIELD, "createCustomFieldDefinition",
                         {"recordType": record_type, "key": key, "label": key.title(), "type": type_, **spec})
