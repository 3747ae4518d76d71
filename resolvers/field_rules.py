"""Field rules as the API manages them: ``fieldRules``, ``setFieldRule``, ``removeFieldRule`` (docs/field-rules.md).

A rule names a record type (its GraphQL type name, ``Deal``), one of its fields and the roles it is
hidden from. The field is either one the declaration lets a tenant restrict (``Field(...,
restrictable=True)``, listed by ``Record.restrictable``), by its API name (``amount``), or, on a
record type with custom fields (``Record.custom_fields``), one of the tenant's custom fields of
that type as ``custom.<key>`` (``records.custom.rule_name``; the prefix keeps a custom key that
spells a standard field's name apart from it). ``rule_field`` is the one place a name is checked:
a custom key against the tenant's definitions, in the change's transaction. A custom field's rule
outlives the field (deleted or purged): its values stay hidden in the records' audit history, and
a later field of the same key is hidden alike until the rule is lifted (fail closed). The owner
sees every field, so it can never be named. Every change is audited (``FieldRule``), and bumps the
rules' data version in its transaction, so the next request of the tenant reads the new rules and
no cached answer outlives them (``auth.fields``).
"""

from __future__ import annotations

import uuid
from typing import Annotated

import strawberry
from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert

from auth.roles import Permission, requires
from auth.session import Info
from core.errors import BadUserInput
from models.tables import FIELD_RULES, Role
from records.crm import BY_NAME
from records.custom import DEFINITIONS, KEY, custom_key, rule_name
from records.declare import Record
from resolvers.writes import Change, change
from schema.field_rules import FieldRule

T = FIELD_RULES
FIELD = ("A restrictable field's API name (`amount`), or `custom.<key>` for one of the workspace's custom fields "
         "(`custom.tier`).")


def rule_record(record_type: str) -> Record:
    """The record type a rule names; BAD_USER_INPUT naming ``recordType`` unless it has restrictable
    fields or custom fields."""
    record = BY_NAME.get(record_type)
    if record is None or not restricts(record):
        choices = ", ".join(sorted(r.name for r in BY_NAME.values() if restricts(r)))
        raise BadUserInput("recordType", f"must be a record type with restrictable or custom fields ({choices})")
    return record


def restricts(record: Record) -> bool:
    """Whether a rule may name fields of ``record``: restrictable ones, or custom ones."""
    return bool(record.restrictable()) or record.custom_fields


async def rule_field(w: Change, record: Record, field: str, *, lifting: bool = False) -> str:
    """The field a rule names, checked against the declaration, or for ``custom.<key>`` against the
    tenant's live custom fields of the record type (``lifting`` a rule: any field of the key, deleted
    or purged, that still has one); BAD_USER_INPUT naming ``field`` otherwise."""
    key = custom_key(field) if record.custom_fields else None
    if key is not None:
        d = DEFINITIONS
        defined = select(d.c.key).where(d.c.tenant_id == w.tenant_id, d.c.record_type == record.name, d.c.key == key)
        if lifting:
            ruled = select(T.c.field).where(T.c.tenant_id == w.tenant_id, T.c.record_type == record.name,
                                            T.c.field == field)
            found = select(defined.union_all(ruled).exists())
        else:
            found = select(defined.where(d.c.deleted_at.is_(None)).exists())
        if KEY.match(key) and await w.scalar(found):
            return field
        raise BadUserInput("field", f"{key!r} is not a custom field of {record.plural_label} "
                                    "(`customFieldDefinitions` lists them)")
    if field not in record.restrictable():
        choices = sorted(record.restrictable())
        if record.custom_fields:
            choices.append(f"{rule_name('<key>')} of a custom field")
        raise BadUserInput("field", f"must be a restrictable field of {record.name} ({', '.join(choices)})")
    return field


def rule_roles(hidden_from: list[Role]) -> list[str]:
    if not hidden_from:
        raise BadUserInput("hiddenFrom", "must name at least one role (removeFieldRule lifts a rule)")
    if Role.OWNER in hidden_from:
        raise BadUserInput("hiddenFrom", "the owner sees every field")
    return sorted({role.value for role in hidden_from}, key=lambda r: Role(r).rank)


@strawberry.type
class FieldRuleQuery:
    @strawberry.field(**requires(Permission.READ, "The workspace's field rules (of `recordType` only, when "
                                                  "given), by record type and field."))
    async def field_rules(self, info: Info, record_type: str | None = None) -> list[FieldRule]:
        session = info.context.session
        query = select(T).where(T.c.tenant_id == session.tenant_id).order_by(T.c.record_type, T.c.field)
        if record_type is not None:
            query = query.where(T.c.record_type == rule_record(record_type).name)
        return [FieldRule.from_row(row) for row in await session.db.fetch(query)]


@strawberry.type
class FieldRuleMutation:
    @strawberry.mutation(**requires(Permission.MANAGE_FIELDS,
                                    "Hide a field of a record type from roles (replacing the field's rule): they "
                                    "read it as null (FORBIDDEN), cannot filter, sort, group or measure by it, "
                                    "and cannot write it. The owner sees every field."))
    async def set_field_rule(self, info: Info, record_type: str,
                             field: Annotated[str, strawberry.argument(description=FIELD)],
                             hidden_from: list[Role]) -> FieldRule:
        record = rule_record(record_type)
        roles = rule_roles(hidden_from)
        async with change(info) as w:
            name = await rule_field(w, record, field)
            before = (await w.conn.execute(select(T.c.hidden_from).where(
                T.c.tenant_id == w.tenant_id, T.c.record_type == record.name, T.c.field == name))).scalar()
            statement = insert(T).values(tenant_id=w.tenant_id, id=uuid.uuid4(), record_type=record.name, field=name,
                                         hidden_from=roles, created_by=w.user_id)
            row = (await w.conn.execute(statement.on_conflict_do_update(
                constraint="field_rules_field_key",
                set_={"hidden_from": roles, "version": T.c.version + 1, "updated_at": w.now},
            ).returning(T))).one()
            await w.audit("FieldRule", "create" if before is None else "update", row.id, {
                "before": None if before is None else {"record_type": record.name, "field": name,
                                                       "hidden_from": list(before)},
                "after": {"record_type": record.name, "field": name, "hidden_from": roles}})
        return FieldRule.from_row(row)

    @strawberry.mutation(**requires(Permission.MANAGE_FIELDS,
                                    "Lift the rule of a field: every role sees it again. False when it had none."))
    async def remove_field_rule(self, info: Info, record_type: str,
                                field: Annotated[str, strawberry.argument(description=FIELD)]) -> bool:
        record = rule_record(record_type)
        async with change(info) as w:
            name = await rule_field(w, record, field, lifting=True)
            row = (await w.conn.execute(delete(T).where(
                T.c.tenant_id == w.tenant_id, T.c.record_type == record.name, T.c.field == name).returning(T))).first()
            if row is not None:
                await w.audit("FieldRule", "delete", row.id, {"before": {
                    "record_type": record.name, "field": name, "hidden_from": list(row.hidden_from)}})
        return row is not None
