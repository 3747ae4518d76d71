"""Collaborative notes: Yjs documents merged on the server, streamed to the other editors.

Through the in-process app: creation rules, merging (idempotent, invalid and premature updates
refused), the audit row, roles and tenant isolation. Through two processes: two pycrdt documents
edited at the same time by two users on two servers converge to the same text, with nothing lost.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import httpx
import pytest
from pycrdt import Doc, Text
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from models.tables import AUDIT_EVENTS, Role
from subscriptions.notes import BODY
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.crm import seed_crm, uuid_of
from tests.live import AtriumProcess, graphql, live

MakeTenant = Callable[..., Awaitable[TenantWorld]]
CREATE = "mutation($input: NoteInput!) { createNote(input: $input) { id version text deal { id } } }"
APPLY = """
mutation($n: ID!, $u: Base64!, $o: String) { applyNoteUpdate(noteId: $n, update: $u, origin: $o) { version text } }"""
NOTE = "query($id: ID!) { note(id: $id) { id version state text } }"
UPDATES = """
subscription($n: ID!, $o: String) {
  noteUpdates(noteId: $n, origin: $o) {
    __typename ... on Resync { reason } ... on NoteUpdate { update version origin author { id } }
  }
}"""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def insert_word(body: Text, *, word: str, at_start: bool) -> None:
    body.insert(0 if at_start else len(body), word)


def edit(doc: Doc[Any], change: Callable[[Text], None]) -> bytes:
    """Apply ``change`` to the document's body and return it as a Yjs update."""
    before = doc.get_state()
    change(doc.get(BODY, type=Text))
    return bytes(doc.get_update(before))


def load(state: str) -> Doc[Any]:
    doc: Doc[Any] = Doc()
    doc.apply_update(base64.b64decode(state))
    return doc


def text(doc: Doc[Any]) -> str:
    return str(doc.get(BODY, type=Text))


async def test_notes_merge_updates(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                   admin_engine: AsyncEngine) -> None:
    tenant = await make_tenant("notes")
    token = tenant.token(Role.MEMBER)
    crm = await seed_crm(client, token)
    note = data_or_fail(await gql(client, CREATE, {"input": {"dealId": crm.deal["id"]}}, token=token))["createNote"]
    assert note["version"] == 1 and note["text"] == "" and note["deal"] == {"id": crm.deal["id"]}

    doc = load(data_or_fail(await gql(client, NOTE, {"id": note["id"]}, token=token))["note"]["state"])
    first = edit(doc, lambda body: body.insert(0, "Hello"))
    merged = data_or_fail(await gql(client, APPLY, {"n": note["id"], "u": b64(first)}, token=token))
    assert merged["applyNoteUpdate"] == {"version": 2, "text": "Hello"}
    # The same update again changes nothing (CRDT merges are idempotent).
    again = data_or_fail(await gql(client, APPLY, {"n": note["id"], "u": b64(first)}, token=token))
    assert again["applyNoteUpdate"] == {"version": 2, "text": "Hello"}

    # An update building on one the server never got is refused, not half-applied.
    edit(doc, lambda body: body.insert(5, ","))
    later = edit(doc, lambda body: body.insert(6, " world"))
    body = await gql(client, APPLY, {"n": note["id"], "u": b64(later)}, token=token)
    assert codes(body) == ["BAD_USER_INPUT"] and body["errors"][0]["extensions"]["field"] == "update"
    body = await gql(client, APPLY, {"n": note["id"], "u": b64(b"not yjs")}, token=token)
    assert codes(body) == ["BAD_USER_INPUT"]

    stored = data_or_fail(await gql(client, NOTE, {"id": note["id"]}, token=token))["note"]
    assert stored["text"] == "Hello" and stored["version"] == 2
    listed = data_or_fail(await gql(client, "query($r: ID!) { notes(recordId: $r) { id } }",
                                    {"r": crm.deal["id"]}, token=token))
    assert listed == {"notes": [{"id": note["id"]}]}

    # The audit row holds the update itself, not a copy of the document.
    async with admin_engine.connect() as conn:
        rows = (await conn.execute(select(AUDIT_EVENTS.c.action, AUDIT_EVENTS.c.diff).where(
            AUDIT_EVENTS.c.tenant_id == tenant.id, AUDIT_EVENTS.c.entity_id == uuid_of(note["id"]))
            .order_by(AUDIT_EVENTS.c.occurred_at))).all()
    assert [r.action for r in rows] == ["create", "update"]
    assert rows[1].diff == {"update": b64(first), "origin": None}


async def test_note_rules_roles_and_tenants(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    alpha, bravo = await make_tenant("notes-a"), await make_tenant("notes-b")
    crm_a = await seed_crm(client, alpha.token())
    crm_b = await seed_crm(client, bravo.token())
    for bad in ({}, {"dealId": crm_a.deal["id"], "companyId": crm_a.company["id"]}):
        assert codes(await gql(client, CREATE, {"input": bad}, token=alpha.token())) == ["BAD_USER_INPUT"]
    for parent in ({"contactId": crm_a.contact["id"]}, {"companyId": crm_a.company["id"]}):
        data_or_fail(await gql(client, CREATE, {"input": parent}, token=alpha.token()))
    note = data_or_fail(await gql(client, CREATE, {"input": {"dealId": crm_a.deal["id"]}},
                                  token=alpha.token()))["createNote"]
    update = b64(edit(Doc(), lambda body: body.insert(0, "x")))

    assert codes(await gql(client, APPLY, {"n": note["id"], "u": update},
                           token=alpha.token(Role.VIEWER))) == ["FORBIDDEN"]
    node = "query($id: ID!) { node(id: $id) { __typename id ... on Note { version } } }"
    assert data_or_fail(await gql(client, node, {"id": note["id"]}, token=alpha.token(Role.VIEWER))) == {
        "node": {"__typename": "Note", "id": note["id"], "version": 1}}
    # Bravo can neither see, change nor attach to alpha's records.
    assert data_or_fail(await gql(client, NOTE, {"id": note["id"]}, token=bravo.token())) == {"note": None}
    assert data_or_fail(await gql(client, node, {"id": note["id"]}, token=bravo.token())) == {"node": None}
    assert codes(await gql(client, APPLY, {"n": note["id"], "u": update}, token=bravo.token())) == ["NOT_FOUND"]
    assert codes(await gql(client, CREATE, {"input": {"dealId": crm_a.deal["id"]}},
                           token=bravo.token())) == ["NOT_FOUND"]
    listed = data_or_fail(await gql(client, "query($r: ID!) { notes(recordId: $r) { id } }",
                                    {"r": crm_a.deal["id"]}, token=bravo.token()))
    assert listed == {"notes": []}
    assert crm_b.deal["id"] != crm_a.deal["id"]


async def test_concurrent_editors_converge(servers: tuple[AtriumProcess, AtriumProcess],
                                          make_tenant: MakeTenant) -> None:
    a, b = servers
    tenant = await make_tenant("coedit")
    ann, ben = tenant.token(Role.OWNER), tenant.token(Role.MEMBER)
    rounds = 5
    async with a.client() as client_a, b.client() as client_b:
        crm = await seed_crm(client_a, ann)
        note = (await graphql(client_a, ann, CREATE, input={"dealId": crm.deal["id"]}))["createNote"]["id"]
        start = (await graphql(client_a, ann, NOTE, id=note))["note"]["state"]
        await graphql(client_a, ann, APPLY, n=note, u=b64(edit(load(start), lambda body: body.insert(0, "Deal notes"))))
        state = (await graphql(client_a, ann, NOTE, id=note))["note"]["state"]
        both_live = asyncio.Barrier(2)  # nobody types before both are subscribed

        async def editor(server: AtriumProcess, client: httpx.AsyncClient, token: str, mark: str,
                         at_start: bool) -> Doc[Any]:
            """Load the note, type ``rounds`` words without waiting for the other, then take in theirs."""
            origin = f"{mark}-{uuid.uuid4().hex[:6]}"
            doc = load(state)
            async with live(server.ws_url, token) as sub:
                op = await sub.live(UPDATES, {"n": note, "o": origin})
                await both_live.wait()
                for i in range(rounds):
                    word = f"<{mark}{i}>"
                    update = edit(doc, partial(insert_word, word=word, at_start=at_start))
                    await graphql(client, token, APPLY, n=note, u=b64(update), o=origin)
                for _ in range(rounds):  # exactly the other editor's updates (own ones are filtered out)
                    event = next(iter((await sub.data(op)).values()))
                    assert event["__typename"] == "NoteUpdate" and event["origin"] != origin
                    doc.apply_update(base64.b64decode(event["update"]))
            return doc

        first, second = await asyncio.gather(editor(a, client_a, ann, "A", True),
                                             editor(b, client_b, ben, "B", False))
        server = (await graphql(client_b, ben, NOTE, id=note))["note"]
        assert text(first) == text(second) == server["text"]
        assert server["version"] == 2 + 2 * rounds
        for mark in ("A", "B"):
            for i in range(rounds):
                assert f"<{mark}{i}>" in server["text"]
        assert "Deal notes" in server["text"]


@pytest.mark.parametrize("role", list(Role), ids=[r.value for r in Role])
async def test_note_writes_need_write_permission(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                 admin_engine: AsyncEngine, role: Role) -> None:
    """createNote and applyNoteUpdate: members and above, audited as the caller; viewers are refused."""
    tenant = await make_tenant("notes-role")
    crm = await seed_crm(client, tenant.token())
    note = data_or_fail(await gql(client, CREATE, {"input": {"dealId": crm.deal["id"]}},
                                  token=tenant.token()))["createNote"]["id"]
    update = b64(edit(Doc(), lambda body: body.insert(0, "by role")))
    created = await gql(client, CREATE, {"input": {"companyId": crm.company["id"]}}, token=tenant.token(role))
    applied = await gql(client, APPLY, {"n": note, "u": update}, token=tenant.token(role))
    if role is Role.VIEWER:
        assert codes(created) == codes(applied) == ["FORBIDDEN"]
        return
    new = data_or_fail(created)["createNote"]["id"]
    assert data_or_fail(applied)["applyNoteUpdate"]["text"] == "by role"
    async with admin_engine.connect() as conn:
        actors = (await conn.execute(select(AUDIT_EVENTS.c.entity_id, AUDIT_EVENTS.c.actor_id).where(
            AUDIT_EVENTS.c.tenant_id == tenant.id, AUDIT_EVENTS.c.actor_id == tenant.users[role],
            AUDIT_EVENTS.c.entity_id.in_([uuid_of(new), uuid_of(note)])))).all()
    assert {a.entity_id for a in actors} == {uuid_of(new), uuid_of(note)}
