"""What happens to the records that point at a record being deleted.

Links to the deleted record are cleared (deals and contacts of a company, deals of a contact) and
activities that were only about it are deleted, all through the write path, so each affected record
gets its version bump, audit row and change event. The database's ON DELETE rules stay as the
backstop, but never act unseen.
"""

from __future__ import annotations

import uuid

from sqlalchemy import func

from models.tables import ACTIVITIES
from resolvers.entities import ACTIVITY, CONTACT, DEAL
from resolvers.writes import Change, Entity

LINKS = ("deal_id", "contact_id", "company_id")
DEPENDENTS: dict[str, tuple[tuple[Entity, str], ...]] = {
    "company_id": ((CONTACT, "company_id"), (DEAL, "company_id")),
    "contact_id": ((DEAL, "contact_id"),),
    "deal_id": (),
}


async def release(w: Change, column: str, target: uuid.UUID) -> None:
    """Before deleting the record ``target`` (referenced as ``column``): unlink and clean up."""
    for entity, link in DEPENDENTS[column]:
        table = entity.table
        await w.update_where(entity, table.c[link] == target, {link: None}, before={link: target})
    only_about_it = func.num_nonnulls(*(ACTIVITIES.c[c] for c in LINKS)) == 1
    await w.delete_where(ACTIVITY, (ACTIVITIES.c[column] == target) & only_about_it)
    await w.update_where(ACTIVITY, ACTIVITIES.c[column] == target, {column: None}, before={column: target})


