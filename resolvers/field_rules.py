"""Field rules as the API manages them: ``fieldRules``, ``setFieldRule``, ``removeFieldRule`` (docs/field-rules.md).

A rule names a record type (its GraphQL type name, ``Deal``), one of its fields (the API's name,
``amount``) and the roles it is hidden from. The field must be one the declaration lets a tenant
restrict (``Field(..., restrictable=True)``, listed by ``Record.restrictable``): ``rule_field`` is
the one place a name is checked, so custom fields (string keys of the tenant's definitions) join
by being looked up there too. The owner sees every field, so it can never be named. Every change
is audited (``FieldRule``), and bumps the rules' data version in its transaction, so the next
request of the tenant reads the new rules and no cached answer outlives them (``auth.fields``).
"""

from __future__ import annotations

import uuid

import strawberry
from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert

from auth.roles import Permission, requires
from auth.session import Info
from core.errors import BadUserInput
from models.tables import FIELD_RULES, Role
from records.crm import BY_NAME
from records.declare import Record
from resolvers.writes import change
from schema.field_rules import FieldRule

T = FIELD_RULES


def rule_record(record_type: str) -> Record:
    """The record type a rule names; BAD_USER_INPUT naming ``recordType`` unless it has restrictable fields."""
    record = BY_NAME.get(record_type)
    if record is None or not record.restrictable():
        choices = ", ".join(sorted(r.name for r in BY_NAME.values() if r.restrictable()))
        raise BadUserInput("recordType", f"must be a record type with restrictable fields ({choices})")
    return record


def rule_field(record: Record, field: str) -> str:
    """The field a rule names, checked against the declaration; BAD_USER_INPUT naming ``field``."""
    if field not in record.restrictable():
        raise BadUserInput("field", f"must be a restrictable field of {record.name} "
                                    f"({', '.join(sorted(record.restrictable()))})")
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
    async def set_field_rule(self, info: Info, record_type: str, field: str, hidden_from: list[Role]) -> FieldRule:
        record = rule_record(record_type)
        name = rule_field(record, field)
        roles = rule_roles(hidden_from)
        async with change(info) as w:
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
    async def remove_field_rule(self, info: Info, record_type: str, field: str) -> bool:
        record = rule_record(record_type)
        name = rule_field(record, field)
        async with change(info) as w:
            row = (await w.conn.execute(delete(T).where(
                T.c.tenant_id == w.tenant_id, T.c.record_type == record.name, T.c.field == name).returning(T))).first()
            if row is not None:
                await w.audit("FieldRule", "delete", row.id, {"before": {
                    "record_type": record.name, "field": name, "hidden_from": list(row.hidden_from)}})
        return row is not None
