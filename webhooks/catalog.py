"""The webhook event types, derived from the record declarations, and what an event's message holds.

For every declared record (``records.crm.RECORDS``), ``<record>.created``, ``.updated`` and
``.deleted`` exist exactly when the write path can perform that operation on it: through its derived
root fields (``Root``), as a nested child of another record's create, as the parent a rollup
recomputes, as a dependent that a delete cascades to or unlinks (``OnDelete``), or through the
hand-written mutations its declaration names (``Record.by_hand``). Each declared ``Transition``
adds ``<record>.<name>`` (``deal.moved``). Besides the records there is ``webhook_endpoint.disabled``.
A record the write path never changes (a user) has no event types.

A message's body is compact JSON, in the Standard Webhooks shape::

    {"type": "deal.moved", "timestamp": "2026-12-01T12:00:00.000000+00:00",
     "data": {"recordType": "Deal", "record": {...}, "changedFields": ["stageId", "pipelineId"],
              "actorId": "<User id>", "version": 4}}

``record`` is the record as the API shows it (field names, global ids, decimal strings; binary
documents left out): after the change, or as it was for a delete.

An endpoint's filter is an object of record fields to a value or a list of values; a record event
is sent when every field of the filter is in its record with (one of) the value(s). Events without
a record (``webhook_endpoint.disabled``) are sent whatever the filter.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from core.errors import BadUserInput
from records.crm import RECORDS, USER, rollups_into
from records.declare import AtLeastOne, ExactlyOne, OnDelete, Operation, Record, camel, snake
from records.rules import Opaque
from subscriptions.events import ChangeEvent, ChangeKind

ENDPOINT_DISABLED = "webhook_endpoint.disabled"
MAX_FILTER_KEYS = 20
MAX_FILTER_VALUES = 50

Render = Callable[[Record, Mapping[Any, Any]], dict[str, Any]]
"""How a row becomes the record a client sees (``resolvers.writes.public_record``)."""

OPERATION_OF = {ChangeKind.CREATED: Operation.CREATE, ChangeKind.UPDATED: Operation.UPDATE,
                ChangeKind.DELETED: Operation.DELETE}
SUFFIX = {Operation.CREATE: "created", Operation.UPDATE: "updated", Operation.DELETE: "deleted"}


@dataclass(frozen=True)
class EventType:
    name: str
    description: str
    record: Record | None = None


def _nested_child(record: Record) -> bool:
    return any(c.nested and c.relation.owner is record for r in RECORDS for c in r.children)


@cache
def operations(record: Record) -> frozenset[Operation]:
    """What the write path can do to ``record`` (module docstring)."""
    done = set(record.by_hand)
    if record.root.create or _nested_child(record):
        done.add(Operation.CREATE)
    if record.root.update or rollups_into(record):
        done.add(Operation.UPDATE)
    if record.root.delete:
        done.add(Operation.DELETE)
    for relation in record.relations:
        target = relation.target()
        if target is record or Operation.DELETE not in operations(target):
            continue
        if relation.on_delete is OnDelete.CASCADE:
            done.add(Operation.DELETE)
        elif relation.on_delete is OnDelete.SET_NULL:
            done.add(Operation.UPDATE)
            if any(isinstance(c, AtLeastOne | ExactlyOne) and relation.key in c.columns for c in record.checks):
                done.add(Operation.DELETE)
    return frozenset(done)


@cache
def event_types() -> tuple[EventType, ...]:
    """Every event type that can happen, in declaration order."""
    out: list[EventType] = []
    for record in RECORDS:
        done = operations(record)
        for operation in Operation:
            if operation in done:
                out.append(EventType(f"{snake(record.name)}.{SUFFIX[operation]}",
                                     f"A {record.label} was {SUFFIX[operation]}.", record))
        if Operation.UPDATE in done:
            out.extend(EventType(f"{snake(record.name)}.{t.name}", t.description, record) for t in record.transitions)
    out.append(EventType(ENDPOINT_DISABLED, "A webhook endpoint of the workspace was disabled because its "
                                            "deliveries kept failing."))
    return tuple(out)


@cache
def by_name() -> Mapping[str, EventType]:
    return {t.name: t for t in event_types()}


def names_of(record: Record, event: ChangeEvent) -> list[str]:
    """The event types one change event is: its operation's, and the transitions it makes."""
    base = snake(record.name)
    names = [f"{base}.{SUFFIX[OPERATION_OF[event.kind]]}"]
    if event.kind is ChangeKind.UPDATED:
        names += [f"{base}.{t.name}" for t in record.transitions if camel(t.column) in event.fields]
    return names


def shown_columns(record: Record) -> list[str]:
    """The record's fields in a message (binary documents are left out: fetch the record)."""
    hidden = {f.column for f in record.fields if isinstance(f.rule, Opaque)}
    return [c.name for c in record.table.columns if c.name != "tenant_id" and c.name not in hidden]


def record_data(record: Record, row: Mapping[Any, Any], render: Render, event: ChangeEvent) -> dict[str, Any]:
    hidden = {f.column for f in record.fields if isinstance(f.rule, Opaque)}
    shown = render(record, {k: v for k, v in row.items() if k not in hidden})
    actor = None if event.actor_id is None else render(USER, {"id": event.actor_id})["id"]
    return {"recordType": record.name, "record": shown, "changedFields": list(event.fields),
            "actorId": actor, "version": event.version}


def body(event_type: str, timestamp: dt.datetime, data: Mapping[str, Any]) -> str:
    """The exact text sent (and signed) on every attempt."""
    return json.dumps({"type": event_type, "timestamp": timestamp.isoformat(), "data": data},
                      separators=(",", ":"), ensure_ascii=False)


def _scalar(value: Any) -> bool:
    if value is None or isinstance(value, bool | str | int):
        return True
    return isinstance(value, float) and math.isfinite(value)


def matches(filter: Mapping[str, Any] | None, data: Mapping[str, Any]) -> bool:
    """Whether a message with ``data`` passes an endpoint's ``filter`` (module docstring)."""
    if not filter:
        return True
    record = data.get("record")
    if not isinstance(record, Mapping):
        return True
    for key, wanted in filter.items():
        if key not in record:
            return False
        options = wanted if isinstance(wanted, list) else [wanted]
        if record[key] not in options:
            return False
    return True


def check_event_types(given: Sequence[str], field: str) -> list[str]:
    """The event type names, each known (BAD_USER_INPUT naming the first unknown one), in order, once each."""
    if not given:
        raise BadUserInput(field, "name at least one event type (see webhookEventTypes)")
    known = by_name()
    for index, name in enumerate(given):
        if name not in known:
            raise BadUserInput(f"{field}.{index}", f"{name[:100]!r} is not an event type (see webhookEventTypes)")
    return list(dict.fromkeys(given))


def check_filter(filter: Any, event_type_names: Sequence[str], field: str) -> dict[str, Any] | None:
    """A valid filter for endpoints wanting ``event_type_names``: an object of at most 20 fields
    of the records of those types, each to a scalar or a list of at most 50 scalars."""
    if filter is None or filter == {}:
        return None
    if not isinstance(filter, dict):
        raise BadUserInput(field, "must be an object of record fields to values")
    if len(filter) > MAX_FILTER_KEYS:
        raise BadUserInput(field, f"at most {MAX_FILTER_KEYS} fields")
    known = by_name()
    fields = {camel(c) for name in event_type_names if (record := known[name].record) is not None
              for c in shown_columns(record)}
    for key, value in filter.items():
        if key not in fields:
            raise BadUserInput(f"{field}.{key[:100]}", "is not a field of the records of the chosen event types")
        values = value if isinstance(value, list) else [value]
        if len(values) > MAX_FILTER_VALUES or not all(_scalar(v) for v in values):
            raise BadUserInput(f"{field}.{key}", f"must be a value or a list of at most {MAX_FILTER_VALUES} values")
        if any(isinstance(v, str) and (len(v) > 400 or "\x00" in v) for v in values):
            raise BadUserInput(f"{field}.{key}", "values are at most 400 characters, without NUL")
    return filter
