"""Custom field definitions: ``customFieldDefinitions(type:)`` for forms, and the admin mutations.

``createCustomFieldDefinition``, ``updateCustomFieldDefinition`` (label, required, options, default,
position: never the key or the type, which stored values and queries depend on),
``deleteCustomFieldDefinition`` (hides the field and its values at once; the key stays taken) and
``purgeCustomFieldDefinition`` (of a deleted definition: removes its values from every record of
the type, then the definition; its field rules stay, ``resolvers.field_rules``). Each writes an
audit row (before/after) in its transaction.
"""

from __future__ import annotations

import uuid
from typing import Any

import strawberry
from sqlalchemy import String, func, insert, literal, select, update
from sqlalchemy import delete as sql_delete
from strawberry.types.unset import UNSET

from auth.roles import Permission, requires
from auth.session import Info
from core.errors import BadUserInput, NotFound, VersionConflict
from core.ids import decode_id
from models.db import showing_trash
from records.crm import BY_NAME
from records.custom import (
    DEFINITIONS,
    MAX_DEFINITIONS,
    MAX_OPTIONS,
    CustomFieldType,
    CustomValueInput,
    Definition,
    check_key,
    hidden_key,
    stored,
)
from records.declare import Record
from records.rules import Text
from resolvers.writes import Change, change, jsonable, snapshot
from schema.custom_fields import CustomFieldDefinition, CustomFieldRecordType, withheld

LABEL = Text(200)
OPTION = Text(100)
SELECTS = (CustomFieldType.SINGLE_SELECT, CustomFieldType.MULTI_SELECT)
ENTITY = "CustomFieldDefinition"


@strawberry.input(description="A new custom field.")
class CustomFieldDefinitionInput:
    record_type: CustomFieldRecordType  # type: ignore[valid-type]
    key: str = strawberry.field(description="Lower-case letters, digits and '_', starting with a letter (at most 40); "
                                            "fixed once created.")
    label: str
    type: CustomFieldType
    required: bool = False
    options: list[str] = strawberry.field(default_factory=list, description="SINGLE_SELECT and MULTI_SELECT only.")
    default: CustomValueInput | None = None
    position: int | None = strawberry.field(default=None, description="Defaults to after the last field.")


@strawberry.input(description="Changes to a custom field (its key and type never change).")
class CustomFieldDefinitionPatch:
    label: str | None = UNSET
    required: bool | None = UNSET
    options: list[str] | None = UNSET
    default: CustomValueInput | None = UNSET
    position: int | None = UNSET


@strawberry.type
class PurgeCustomFieldPayload:
    purged_id: strawberry.ID
    records_cleared: int = strawberry.field(description="Records whose value of the field was removed.")


def _options(kind: CustomFieldType, given: list[str]) -> list[str]:
    if kind not in SELECTS:
        if given:
            raise BadUserInput("options", "only SINGLE_SELECT and MULTI_SELECT fields have options")
        return []
    options = [OPTION(f"options.{i}", o) for i, o in enumerate(given)]
    if not 1 <= len(options) <= MAX_OPTIONS:
        raise BadUserInput("options", f"a select needs 1 to {MAX_OPTIONS} options")
    if len(set(options)) != len(options):
        raise BadUserInput("options", "must not repeat an option")
    return [o for o in options if o is not None]


def _default(definition: Definition, given: CustomValueInput | None) -> Any:
    if given is None:
        return None
    if definition.type is CustomFieldType.USER:
        raise BadUserInput("default", "a USER field has no default")
    return stored(definition, "default", given)


def _position(value: int | None) -> int | None:
    if value is not None and not 0 <= value <= 10_000:
        raise BadUserInput("position", "must be between 0 and 10000")
    return value


async def _require(w: Change, id: uuid.UUID, *, deleted: bool = False) -> Any:
    d = DEFINITIONS
    row = (await w.conn.execute(select(d).where(d.c.tenant_id == w.tenant_id, d.c.id == id,
                                                d.c.deleted_at.is_not(None) if deleted else d.c.deleted_at.is_(None))
                                .with_for_update())).first()
    if row is None:
        raise NotFound("deleted custom field" if deleted else "custom field", id)
    return row


def record_of(record_type: Any) -> Record:
    """The record of a ``CustomFieldRecordType`` value."""
    return BY_NAME[record_type.value]


def _diff(row: Any) -> dict[str, Any]:
    return snapshot(row._mapping)


@strawberry.type
class CustomFieldQuery:
    @strawberry.field(**requires(Permission.READ, "The workspace's custom fields of a record type, in form order "
                                                  "(with `deleted: true`, those deleted and not yet purged). The "
                                                  "default of a field hidden from your role by a field rule is a "
                                                  "value like the records' (its own fields null, FORBIDDEN)."))
    async def custom_field_definitions(self, info: Info, type: CustomFieldRecordType,  # type: ignore[valid-type]
                                       deleted: bool = False) -> list[CustomFieldDefinition]:
        session = info.context.session
        record = record_of(type)
        d = DEFINITIONS
        rows = await session.db.fetch(select(d).where(
            d.c.tenant_id == session.tenant_id, d.c.record_type == record.name,
            d.c.deleted_at.is_not(None) if deleted else d.c.deleted_at.is_(None)).order_by(d.c.position, d.c.key))
        hidden = session.hidden(record.name)
        out = []
        for row in rows:
            shown = CustomFieldDefinition.from_row(row)
            if shown.default is not None and hidden_key(row.key, hidden):  # a default is a value of the field
                shown.default = withheld(Definition.from_row(row), record, session.principal.role.value)
            out.append(shown)
        return out


@strawberry.type
class CustomFieldMutation:
    @strawberry.mutation(**requires(Permission.MANAGE_FIELDS, "Define a custom field on a record type."))
    async def create_custom_field_definition(self, info: Info,
                                             input: CustomFieldDefinitionInput) -> CustomFieldDefinition:
        record = record_of(input.record_type)
        key = check_key("key", input.key)
        label = LABEL("label", input.label)
        kind = CustomFieldType(input.type)
        options = _options(kind, input.options)
        position = _position(input.position)
        draft = Definition(uuid.uuid4(), record.name, key, label or "", kind, input.required, tuple(options), None, 0)
        default = _default(draft, input.default)
        d = DEFINITIONS
        async with change(info) as w:
            taken = await w.scalar(select(d.c.deleted_at.is_not(None)).where(
                d.c.tenant_id == w.tenant_id, d.c.record_type == record.name, d.c.key == key))
            if taken is not None:
                raise BadUserInput("key", "is already used" + (" by a deleted field (purge it first)" if taken
                                                               else f" by another custom field of {record.plural}"))
            live = await w.scalar(select(func.count()).where(
                d.c.tenant_id == w.tenant_id, d.c.record_type == record.name, d.c.deleted_at.is_(None)))
            if live >= MAX_DEFINITIONS:
                raise BadUserInput("recordType", f"at most {MAX_DEFINITIONS} custom fields per record type")
            if position is None:
                position = await w.scalar(select(func.coalesce(func.max(d.c.position) + 1, 0)).where(
                    d.c.tenant_id == w.tenant_id, d.c.record_type == record.name))
            row = (await w.conn.execute(insert(d).values(
                tenant_id=w.tenant_id, id=draft.id, record_type=record.name, key=key, label=label, type=kind.value,
                required=input.required, options=options, default_value=default, position=position,
            ).returning(d))).one()
            await w.audit(ENTITY, "create", row.id, {"after": _diff(row)})
        return CustomFieldDefinition.from_row(row)

    @strawberry.mutation(**requires(Permission.MANAGE_FIELDS, "Change a custom field's label, required flag, "
                                                              "options, default or position."))
    async def update_custom_field_definition(self, info: Info, id: strawberry.ID, input: CustomFieldDefinitionPatch,
                                             expected_version: int | None = None) -> CustomFieldDefinition:
        key = decode_id(id, ENTITY)
        d = DEFINITIONS
        async with change(info) as w:
            before = await _require(w, key)
            if expected_version is not None and before.version != expected_version:
                raise VersionConflict("custom field", before.version, {"id": id, "version": before.version})
            current = Definition.from_row(before)
            changes: dict[str, Any] = {}
            if input.label is not UNSET:
                changes["label"] = LABEL("label", input.label or "")
            if input.required is not UNSET:
                if input.required is None:
                    raise BadUserInput("required", "must not be null")
                changes["required"] = input.required
            if input.options is not UNSET:
                changes["options"] = _options(current.type, input.options or [])
            if input.position is not UNSET:
                if input.position is None:
                    raise BadUserInput("position", "must not be null")
                changes["position"] = _position(input.position)
            after = Definition(current.id, current.record_type, current.key, changes.get("label", current.label),
                               current.type, current.required, tuple(changes.get("options", current.options)),
                               None, 0)
            if input.default is not UNSET:
                changes["default_value"] = _default(after, input.default)
            elif "options" in changes and current.default is not None:
                _default(after, _as_input(current))  # the default must stay one of the options
            changed = {k: v for k, v in changes.items() if before._mapping[k] != v}
            if not changed:
                return CustomFieldDefinition.from_row(before)
            row = (await w.conn.execute(update(d).where(d.c.tenant_id == w.tenant_id, d.c.id == key).values(
                **changed, version=d.c.version + 1, updated_at=func.now()).returning(d))).one()
            await w.audit(ENTITY, "update", key, {"before": snapshot(before._mapping, changed),
                                                  "after": snapshot(row._mapping, changed)})
        return CustomFieldDefinition.from_row(row)

    @strawberry.mutation(**requires(Permission.MANAGE_FIELDS, "Delete a custom field: it and its values are hidden "
                                                              "at once; `purgeCustomFieldDefinition` removes them."))
    async def delete_custom_field_definition(self, info: Info, id: strawberry.ID) -> CustomFieldDefinition:
        key = decode_id(id, ENTITY)
        d = DEFINITIONS
        async with change(info) as w:
            await _require(w, key)
            row = (await w.conn.execute(update(d).where(d.c.tenant_id == w.tenant_id, d.c.id == key).values(
                deleted_at=w.now, version=d.c.version + 1, updated_at=func.now()).returning(d))).one()
            await w.audit(ENTITY, "delete", key, {"after": snapshot(row._mapping, ("deleted_at",))})
        return CustomFieldDefinition.from_row(row)

    @strawberry.mutation(**requires(Permission.MANAGE_FIELDS, "Remove a deleted custom field's values from every "
                                                              "record, then the field itself (its key is free again)."))
    async def purge_custom_field_definition(self, info: Info, id: strawberry.ID) -> PurgeCustomFieldPayload:
        key = decode_id(id, ENTITY)
        d = DEFINITIONS
        async with change(info) as w:
            row = await _require(w, key, deleted=True)
            record = BY_NAME[row.record_type]
            t = record.table
            holding = t.c.custom_fields.op("?")(literal(row.key, String()))
            async with showing_trash(w.conn):  # records in the trash lose the value too
                old = (await w.conn.execute(select(t.c.id, t.c.custom_fields[row.key].label("value")).where(
                    t.c.tenant_id == w.tenant_id, holding).order_by(t.c.id).with_for_update())).all()
                without = t.c.custom_fields.op("-")(literal(row.key, String()))
                cleared = (await w.conn.execute(update(t).where(t.c.tenant_id == w.tenant_id, holding).values(
                    custom_fields=without, version=t.c.version + 1, updated_at=func.now()).returning(t.c.id))).all()
            await w.audit_records(record, "update", [
                (r.id, {"before": {"custom_fields": {row.key: jsonable(r.value)}}, "after": {"custom_fields": {}}})
                for r in old])
            await w.conn.execute(sql_delete(d).where(d.c.tenant_id == w.tenant_id, d.c.id == key))
            await w.audit(ENTITY, "purge", key, {"before": _diff(row), "recordsCleared": len(cleared)})
        return PurgeCustomFieldPayload(purged_id=id, records_cleared=len(cleared))


def _as_input(definition: Definition) -> CustomValueInput:
    """A stored default as the input that would give it (to check it against changed options)."""
    value = definition.default
    if definition.type is CustomFieldType.SINGLE_SELECT:
        return CustomValueInput(option=value)
    return CustomValueInput(options=value)
