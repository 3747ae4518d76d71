"""Object types of CSV imports (``resolvers.imports``): the job, its per-row errors, its inputs."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

import strawberry

from core.ids import to_global_id
from records.crm import RECORDS

JOB_TYPE = "ImportJob"

_make_enum: Any = enum.Enum
ImportType: type[enum.Enum] = strawberry.enum(
    _make_enum("ImportType", {record.plural.upper(): record.plural for record in RECORDS if record.importable}),
    description="A record type CSV imports create (every declared type the API creates).")


@strawberry.enum(description="QUEUED until a server takes the job, RUNNING while its rows are imported (a job "
                             "interrupted by a restart goes on where it stopped), then DONE or FAILED.")
class ImportState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@strawberry.input(description="One column of the CSV and the field it goes to.")
class ImportColumn:
    column: str = strawberry.field(description="The column's name in the header row.")
    field: str | None = strawberry.field(description="The field, as the API names it (`amount`, `stageId`); "
                                                     "null leaves the column out.")


@strawberry.type(description="A row the import refused, and why.")
class ImportRowError:
    row: int = strawberry.field(description="1 is the first row after the header (blank lines are skipped).")
    column: str | None = strawberry.field(description="The CSV column, when the error is about one.")
    field: str | None = strawberry.field(description="The field, as the API names it.")
    code: str = strawberry.field(description="The error code the same value would get from the API "
                                             "(`BAD_USER_INPUT`, `NOT_FOUND`).")
    message: str

    @classmethod
    def from_row(cls, row: Any) -> ImportRowError:
        return cls(row=row.row_number, column=row.column_name, field=row.field, code=row.code, message=row.message)


@strawberry.type(description="A CSV import (docs/import.md).")
class ImportJob:
    id: strawberry.ID
    type: ImportType  # type: ignore[valid-type]
    state: ImportState
    dry_run: bool = strawberry.field(description="Validates every row and writes none.")
    total: int = strawberry.field(description="Data rows in the file.")
    processed: int = strawberry.field(description="Rows done (written, or refused).")
    created: int
    updated: int = strawberry.field(description="Rows that matched an existing record (by email, domain or "
                                                "external id) and updated it.")
    errors: int = strawberry.field(description="Rows refused (see `errorReport`).")
    mapping: list[ImportColumnMapping]
    error: str | None = strawberry.field(description="Why a FAILED job stopped.")
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None

    @classmethod
    def from_row(cls, row: Any) -> ImportJob:
        return cls(id=strawberry.ID(to_global_id(JOB_TYPE, row.id)), type=ImportType(row.record_type),
                   state=ImportState(row.state), dry_run=row.dry_run, total=row.total, processed=row.processed,
                   created=row.created_count, updated=row.updated_count, errors=row.error_count,
                   mapping=[ImportColumnMapping(column=k, field=v) for k, v in row.mapping.items() if v],
                   error=row.error, created_at=row.created_at, started_at=row.started_at,
                   finished_at=row.finished_at)


@strawberry.type(description="A CSV column and the field it goes to.")
class ImportColumnMapping:
    column: str
    field: str
