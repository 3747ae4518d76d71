"""eraseContact: a person's personal data leaves every table of the database (the contact, activities'
text naming them, note text and CRDT state, audit diffs, stored mutation answers), the audit chain
still verifies, and one chained ``erase`` event says it happened, without the data."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from core.ids import to_global_id
from models.audit_chain import verify_chain
from models.tables import ACTIVITIES, AUDIT_EVENTS, CONTACTS, DEALS, EXPORT_JOBS, NOTES, WEBHOOK_DELIVERIES, Role
from subscriptions.notes import text_of
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.crm import create_activity, create_contact, create_deal, seed_crm, uuid_of
from tests.governance import Filled, fill, finished_export

MakeTenant = Callable[..., Awaitable[TenantWorld]]
ERASE = """mutation($id: ID!) { eraseContact(id: $id) {
  contactId erasureEventId auditEventsRedacted activitiesRewritten notesRewritten storedAnswersRemoved exportsPurged
} }"""
UPDATE_CONTACT = "mutation($id: ID!, $p: String) { updateContact(id: $id, input: {phone: $p}) { id phone } }"
CREATE_ACTIVITY = "mutation($i: ActivityInput!) { createActivity(input: $i) { id subject } }"
CREATE_ENDPOINT = "mutation($i: WebhookEndpointInput!) { createWebhookEndpoint(input: $i) { secret } }"

ALL_TABLES = text("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                  "WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY 1")


async def rows_mentioning(engine: AsyncEngine, *terms: str) -> dict[str, int]:
    """Per table of the whole database, the rows whose text (every column, bytea as hex) contains a term."""
    found: dict[str, int] = {}
    async with engine.connect() as conn:
        for name in (await conn.execute(ALL_TABLES)).scalars():
            for term in terms:
                count = (await conn.execute(text(
                    f'SELECT count(*) FROM "{name}" t WHERE t::text ILIKE :pattern'), {"pattern": f"%{term}%"})
                ).scalar_one()
                if count:
                    found[name] = found.get(name, 0) + count
    return found


async def personal(client: httpx.AsyncClient, filled: Filled) -> None:
    """More places the person ends up: a change of their phone (audited before/after) and a mutation
    answer stored for retries (Idempotency-Key) that names them."""
    token = filled.world.token()
    data_or_fail(await gql(client, UPDATE_CONTACT, {"id": filled.crm.contact["id"], "p": "+44 20 7946 0999"},
                           token=token))
    response = await client.post("/graphql", json={"query": CREATE_ACTIVITY, "variables": {"i": {
        "kind": "EMAIL", "subject": f"Mail to {filled.email}", "contactId": filled.crm.contact["id"]}}},
        headers={"authorization": f"Bearer {token}", "idempotency-key": f'"{uuid.uuid4()}"'})
    assert response.status_code == 200 and filled.email in response.text


async def test_erasure_removes_the_person_from_every_table(
    client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant, admin_engine: AsyncEngine,
) -> None:
    world = await make_tenant("erase")
    # A webhook endpoint: every change below also waits in the outbox (no dispatcher runs here).
    data_or_fail(await gql(client, CREATE_ENDPOINT, {"i": {"url": "http://127.0.0.1:9/hooks", "eventTypes": [
        "contact.created", "contact.updated", "contact.deleted", "activity.created", "activity.updated"]}},
        token=world.token(Role.ADMIN)))
    filled = await fill(client, world)
    await personal(client, filled)
    bystander = await fill(client, await make_tenant("erase-other"))
    pending_export = await finished_export(client, app, world)
    terms = (filled.person, filled.email, "7946 0999", filled.crm.contact["lastName"])
    assert {"contacts", "activities", "audit_events", "idempotency_keys", "webhook_deliveries"} <= set(
        await rows_mentioning(admin_engine, *terms))

    body = await gql(client, ERASE, {"id": filled.crm.contact["id"]}, token=world.token())
    erased = data_or_fail(body)["eraseContact"]
    assert erased["contactId"] == filled.crm.contact["id"]
    assert erased["activitiesRewritten"] >= 1 and erased["notesRewritten"] == 1
    assert erased["storedAnswersRemoved"] >= 1 and erased["exportsPurged"] == 1
    assert erased["auditEventsRedacted"] > 0

    # Nowhere in the database, in any table, is the person any more; the bystander is untouched.
    assert await rows_mentioning(admin_engine, *terms) == {}
    assert await rows_mentioning(admin_engine, bystander.person, bystander.email)
    async with admin_engine.connect() as conn:
        assert (await conn.execute(select(CONTACTS.c.id).where(
            CONTACTS.c.id == uuid_of(filled.crm.contact["id"])))).first() is None
        (state,) = (await conn.execute(select(NOTES.c.state).where(
            NOTES.c.id == uuid_of(filled.note["id"])))).one()
        status = (await conn.execute(select(EXPORT_JOBS.c.status).where(
            EXPORT_JOBS.c.id == uuid_of(pending_export["id"])))).scalar_one()
    # The note keeps its other words; its CRDT state holds nothing of the erased text (not even deleted).
    assert text_of(bytes(state)) == filled.note_text.replace(filled.person, "[erased]").replace(filled.email,
                                                                                               "[erased]")
    for term in terms:
        assert term.encode() not in bytes(state)
    assert status == "purged"
    # Their endpoint still hears of the erasure: the contact's deletion, without the person in it.
    async with admin_engine.connect() as conn:
        kinds = (await conn.execute(select(WEBHOOK_DELIVERIES.c.event_type).where(
            WEBHOOK_DELIVERIES.c.tenant_id == world.id))).scalars().all()
    assert "contact.deleted" in kinds and "activity.updated" in kinds
    # The activity that named them is kept, rewritten.
    mention = data_or_fail(await gql(client, "query($id: ID!) { node(id: $id) { ... on Activity { subject body } } }",
                                     {"id": filled.mention["id"]}, token=world.token()))["node"]
    assert mention == {"subject": "Call [erased]", "body": "Follow up with [erased] tomorrow"}

    # The chain still verifies, and one chained event records the erasure, without the data.
    async with admin_engine.connect() as conn:
        await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            chain = await verify_chain(conn, world.id)
            event = (await conn.execute(select(AUDIT_EVENTS).where(
                AUDIT_EVENTS.c.id == uuid_of(erased["erasureEventId"])))).one()
            redacted = (await conn.execute(select(AUDIT_EVENTS.c.id, AUDIT_EVENTS.c.diff).where(
                AUDIT_EVENTS.c.tenant_id == world.id, AUDIT_EVENTS.c.salt.is_(None)))).all()
    assert chain.ok, chain.broken
    assert (event.action, event.entity_type, event.entity_id) == ("erase", "Contact",
                                                                  uuid_of(filled.crm.contact["id"]))
    assert event.actor_id == world.users[Role.OWNER]
    assert sorted(event.diff["redacted"]) == sorted(str(r.id) for r in redacted)
    assert len(redacted) == erased["auditEventsRedacted"]
    assert all(r.diff == {"redacted": True, "erasure": str(event.id)} for r in redacted)
    assert not any(term in json.dumps(event.diff) for term in terms)


async def test_another_tenants_owner_cannot_erase(
    client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine,
) -> None:
    world, other = await make_tenant("erase-a"), await make_tenant("erase-b")
    filled = await fill(client, world)
    assert codes(await gql(client, ERASE, {"id": filled.crm.contact["id"]}, token=other.token())) == ["NOT_FOUND"]
    for role in (Role.VIEWER, Role.MEMBER, Role.ADMIN):
        assert codes(await gql(client, ERASE, {"id": filled.crm.contact["id"]}, token=world.token(role))) == \
            ["FORBIDDEN"]
    assert codes(await gql(client, ERASE, {"id": to_global_id("Contact", uuid.uuid4())},
                           token=world.token())) == ["NOT_FOUND"]
    assert codes(await gql(client, ERASE, {"id": filled.crm.deal["id"]}, token=world.token())) == ["BAD_USER_INPUT"]
    assert (await rows_mentioning(admin_engine, filled.email)).get("contacts") == 1


async def test_a_redacted_event_changed_afterwards_breaks_the_chain(
    client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine,
) -> None:
    world = await make_tenant("erase-tamper")
    filled = await fill(client, world)
    erased = data_or_fail(await gql(client, ERASE, {"id": filled.crm.contact["id"]}, token=world.token()))
    erasure = uuid_of(erased["eraseContact"]["erasureEventId"])
    async with admin_engine.begin() as conn:
        # Someone marks another, unredacted event as redacted by the same erasure: it is not on its list.
        victim = (await conn.execute(select(AUDIT_EVENTS.c.id, AUDIT_EVENTS.c.seq).where(
            AUDIT_EVENTS.c.tenant_id == world.id, AUDIT_EVENTS.c.salt.is_not(None),
            AUDIT_EVENTS.c.action == "create").order_by(AUDIT_EVENTS.c.seq).limit(1))).one()
        await conn.execute(AUDIT_EVENTS.update().where(AUDIT_EVENTS.c.id == victim.id).values(
            salt=None, diff={"redacted": True, "erasure": str(erasure)}))
    async with admin_engine.connect() as conn:
        chain = await verify_chain(conn, world.id)
    assert chain.broken is not None and chain.broken.seq == victim.seq
    assert "the erasure" in chain.broken.reason and "does not list it" in chain.broken.reason


async def test_bare_names_are_erased_only_where_they_are_about_the_person(
    client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine,
) -> None:
    """The rule of docs/export.md#erasure: the full name (either order), e-mail and phone anywhere,
    as whole words; the first or last name alone only in the records that point at the contact; a
    relative with the same surname, a colleague with the same first name, ``Adam`` and ``<surname>s``
    keep their text; deal titles and records in the trash are rewritten too."""
    world = await make_tenant("erase-rule")
    token = world.token()
    crm = await seed_crm(client, token)
    last = f"Quill{uuid.uuid4().hex[:6]}"
    company, stage = crm.company["id"], crm.pipeline["stages"][0]["id"]
    ada = await create_contact(client, token, first_name="Ada", last_name=last, email=f"ada@{last}.example",
                               company_id=company)
    bob = await create_contact(client, token, first_name="Bob", last_name=last, company_id=company)
    hers = await create_deal(client, token, stage, company_id=company, contact_id=ada["id"], title=f"{last} renewal")
    named = await create_deal(client, token, stage, company_id=company, title=f"Onboarding for ada {last.upper()}")
    his = await create_deal(client, token, stage, contact_id=bob["id"], title=f"{last} family plan")
    about_her = await create_activity(client, token, subject="Call Ada", deal_id=hers["id"], contact_id=ada["id"],
                                      body=f"{last} wants a quote; Adam from {last}s Ltd too")
    colleague = await create_activity(client, token, subject="Lunch with Ada from accounting",
                                      body=f"Bob {last} joins", company_id=company)
    reversed_name = await create_activity(client, token, subject=f"Met {last}, Ada at the fair", company_id=company)
    trashed = await create_activity(client, token, subject=f"Old: ada@{last}.example wrote", company_id=company)
    data_or_fail(await gql(client, "mutation($id: ID!) { deleteActivity(id: $id) { deletedId } }",
                           {"id": trashed["id"]}, token=token))

    erased = data_or_fail(await gql(client, ERASE.replace("activitiesRewritten", "activitiesRewritten dealsRewritten"),
                                    {"id": ada["id"]}, token=token))["eraseContact"]
    assert erased["dealsRewritten"] == 2 and erased["activitiesRewritten"] == 3

    async def row(table: Any, gid: str) -> Any:
        async with admin_engine.connect() as conn:
            return (await conn.execute(select(table).where(table.c.id == uuid_of(gid)))).one()

    assert (await row(DEALS, hers["id"])).title == "[erased] renewal"  # hers: the surname alone
    assert (await row(DEALS, named["id"])).title == "Onboarding for [erased]"  # the full name, any case
    assert (await row(DEALS, his["id"])).title == f"{last} family plan"  # her relative's
    mine = await row(ACTIVITIES, about_her["id"])
    assert (mine.subject, mine.body) == ("Call [erased]", f"[erased] wants a quote; Adam from {last}s Ltd too")
    kept = await row(ACTIVITIES, colleague["id"])
    assert (kept.subject, kept.body, kept.version) == ("Lunch with Ada from accounting", f"Bob {last} joins", 1)
    assert (await row(ACTIVITIES, reversed_name["id"])).subject == "Met [erased] at the fair"
    binned = await row(ACTIVITIES, trashed["id"])
    assert binned.subject == "Old: [erased] wrote" and binned.deleted_at is not None  # still in the trash
    # The relative's and the colleague's audit trail is untouched; the chain verifies.
    async with admin_engine.connect() as conn:
        untouched = (await conn.execute(select(AUDIT_EVENTS.c.salt).where(
            AUDIT_EVENTS.c.entity_id.in_([uuid_of(his["id"]), uuid_of(colleague["id"]), uuid_of(bob["id"])])))).all()
    async with admin_engine.connect() as conn:
        await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            assert (await verify_chain(conn, world.id)).ok
    assert untouched and all(r.salt is not None for r in untouched)
    assert await rows_mentioning(admin_engine, f"ada@{last}.example", f"Ada {last}", f"{last}, Ada") == {}
