"""Helpers for the export, erasure, retention and tenant-deletion tests: a tenant with something of
everything (a note with text, an activity naming the contact), an export run to its end."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from dataclasses import dataclass
from typing import Any

import httpx
from pycrdt import Doc, Text
from starlette.applications import Starlette

from models.tables import Role
from subscriptions.notes import BODY
from tests.conftest import TenantWorld, data_or_fail, gql
from tests.crm import Crm, create_activity, seed_crm

EXPORT = "mutation { exportTenant { id status } }"
JOB = """query($id: ID!) { exportJob(id: $id) {
  id status rowsDone rowsTotal archiveBytes sha256 error downloadUrl downloadedAt expiresAt } }"""
CREATE_NOTE = "mutation($input: NoteInput!) { createNote(input: $input) { id state } }"
APPLY = "mutation($n: ID!, $u: Base64!) { applyNoteUpdate(noteId: $n, update: $u) { version text } }"


@dataclass(frozen=True)
class Filled:
    """A tenant's records (``crm``), a note on its deal and an activity on its deal naming the contact."""

    world: TenantWorld
    crm: Crm
    note: dict[str, Any]
    note_text: str
    mention: dict[str, Any]

    @property
    def person(self) -> str:
        return f"{self.crm.contact['firstName']} {self.crm.contact['lastName']}"

    @property
    def email(self) -> str:
        return str(self.crm.contact["email"])


async def write_note(client: httpx.AsyncClient, token: str, deal_id: str, words: str) -> dict[str, Any]:
    """A note on ``deal_id`` whose text is ``words``."""
    body = await gql(client, CREATE_NOTE, {"input": {"dealId": deal_id}}, token=token)
    note: dict[str, Any] = data_or_fail(body)["createNote"]
    doc: Doc[Any] = Doc()
    doc.apply_update(base64.b64decode(note["state"]))
    before = doc.get_state()
    doc.get(BODY, type=Text).insert(0, words)
    update = base64.b64encode(bytes(doc.get_update(before))).decode()
    data_or_fail(await gql(client, APPLY, {"n": note["id"], "u": update}, token=token))
    return note


async def fill(client: httpx.AsyncClient, world: TenantWorld) -> Filled:
    token = world.token(Role.OWNER)
    crm = await seed_crm(client, token)
    person = f"{crm.contact['firstName']} {crm.contact['lastName']}"
    words = f"Lunch with {person} ({crm.contact['email']}) about {crm.tag}."
    note = await write_note(client, token, crm.deal["id"], words)
    mention = await create_activity(client, token, kind="CALL", subject=f"Call {person.upper()}",
                                    body=f"Follow up with {person} tomorrow", deal_id=crm.deal["id"])
    return Filled(world=world, crm=crm, note=note, note_text=words, mention=mention)


async def finished_export(client: httpx.AsyncClient, app: Starlette, world: TenantWorld) -> dict[str, Any]:
    """Start an export as the owner and wait for its job to end; the job as ``exportJob`` shows it."""
    token = world.token(Role.OWNER)
    job = data_or_fail(await gql(client, EXPORT, token=token))["exportTenant"]
    await app.state.runtime.tasks.idle()
    found: dict[str, Any] = data_or_fail(await gql(client, JOB, {"id": job["id"]}, token=token))["exportJob"]
    return found


def archive_files(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        return {name: archive.read(name) for name in archive.namelist()}


def jsonl(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode().splitlines()]
