"""The schema contract: what the code's schema may change against the SDL of the last release.

``schema.release.graphql`` is the SDL of the latest release, ``CHANGELOG.md`` says what changed
since, and ``core.version.VERSION`` which version is being made. ``check`` compares the release's
schema with the code's through graphql-core's ``find_breaking_changes`` and
``find_dangerous_changes`` and holds them to these rules (``atrium schema check`` prints the
problems and exits 1; ``tests/test_schema.py`` fails on them):

1. Every breaking and every dangerous change is listed in the ``[Unreleased]`` section's
   ``### Schema changes``, and every breaking one there has a migration note. Entries that name
   no actual change are problems too (a change that was reverted must leave the changelog).
2. Nothing is removed that the release had not deprecated: a field, input field, argument, enum
   value or directive argument goes through ``@deprecated(reason: "...")`` in one release and may
   be removed in a later one (still listed, as a breaking change, with its migration note).
3. Breaking changes need a new major version (a new minor one while the major is 0) over the last
   release. A ``X.Y.Z.devN`` version is after the last release and has no section yet; a release
   version ``X.Y.Z`` is the changelog's newest section, and then the release SDL is the code's.

The changelog's format, which ``parse_changelog`` reads (anything else in the file is prose)::

    ## [Unreleased]
    ### Schema changes
    - `Deal.legacyAmount` FIELD_REMOVED: deprecated in 0.2.0 in favour of `Deal.amount`.
      Migration: select `amount`; it has held the same value since 0.1.0.
    - `ActivityKind.SMS` VALUE_ADDED_TO_ENUM: text messages are activities.
      Migration: treat unknown kinds as `NOTE`.

    ## [0.1.0] - 2026-12-01

Each item names a schema coordinate in backquotes (``Type``, ``Type.field``, ``Enum.VALUE``,
``Type.field(arg:)``, ``@directive``, ``@directive(arg:)``) and the change type as graphql-core
names it (``BreakingChangeType`` / ``DangerousChangeType``); lines indented under an item continue
it, and ``Migration:`` starts its note. ``changelog_entry`` writes the item for a change.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from graphql import (
    BreakingChangeType,
    DangerousChangeType,
    GraphQLEnumType,
    GraphQLInputObjectType,
    GraphQLInterfaceType,
    GraphQLObjectType,
    GraphQLSchema,
    find_breaking_changes,
    find_dangerous_changes,
    print_schema,
)

_NAME = r"[_A-Za-z]\w*"
_FIELD = rf"{_NAME}\.{_NAME}"
_ARG = rf"(?:@{_NAME}|{_FIELD})\({_NAME}:\)"
COORDINATE_OF: dict[str, re.Pattern[str]] = {name: re.compile(pattern) for name, pattern in {
    "TYPE_REMOVED": rf"^(?:Standard scalar )?(?P<c>{_NAME}) was removed",
    "TYPE_CHANGED_KIND": rf"^(?P<c>{_NAME}) changed from",
    "TYPE_REMOVED_FROM_UNION": rf"^{_NAME} was removed from union type (?P<c>{_NAME})\.",
    "TYPE_ADDED_TO_UNION": rf"^{_NAME} was added to union type (?P<c>{_NAME})\.",
    "VALUE_REMOVED_FROM_ENUM": rf"^Enum value (?P<c>{_FIELD}) was removed",
    "VALUE_ADDED_TO_ENUM": rf"^Enum value (?P<c>{_FIELD}) was added",
    "REQUIRED_INPUT_FIELD_ADDED": rf"^A required field (?P<c>{_FIELD}) was added",
    "OPTIONAL_INPUT_FIELD_ADDED": rf"^An optional field (?P<c>{_FIELD}) was added",
    "IMPLEMENTED_INTERFACE_REMOVED": rf"^(?P<c>{_NAME}) no longer implements interface",
    "IMPLEMENTED_INTERFACE_ADDED": rf"^{_NAME} added to interfaces implemented by (?P<c>{_NAME})\.",
    "FIELD_REMOVED": rf"^Field (?P<c>{_FIELD}) was removed",
    "FIELD_CHANGED_KIND": rf"^Field (?P<c>{_FIELD}) changed type",
    "REQUIRED_ARG_ADDED": rf"^A required argument (?P<c>{_ARG}) was added",
    "OPTIONAL_ARG_ADDED": rf"^An optional argument (?P<c>{_ARG}) was added",
    "ARG_REMOVED": rf"^Argument (?P<c>{_ARG}) was removed",
    "ARG_CHANGED_KIND": rf"^Argument (?P<c>{_ARG}) has changed type",
    "ARG_DEFAULT_VALUE_CHANGE": rf"^(?P<c>{_ARG}) (?:has changed defaultValue|defaultValue was removed)",
    "INPUT_FIELD_DEFAULT_VALUE_CHANGE": rf"^(?P<c>{_FIELD}) (?:has changed defaultValue|defaultValue was removed)",
    "DIRECTIVE_REMOVED": rf"^Directive (?P<c>@{_NAME}) was removed",
    "DIRECTIVE_ARG_REMOVED": rf"^Argument (?P<c>@{_NAME}\({_NAME}:\)) was removed",
    "REQUIRED_DIRECTIVE_ARG_ADDED": rf"^A required argument (?P<c>@{_NAME}\({_NAME}:\)) was added",
    "DIRECTIVE_REPEATABLE_REMOVED": rf"^Repeatable flag was removed from (?P<c>@{_NAME})\.",
    "DIRECTIVE_LOCATION_REMOVED": rf"^{_NAME} was removed from (?P<c>@{_NAME})\.",
}.items()}
"""How to read the schema coordinate out of graphql-core's description of each change type (a test
holds this table to every member of both enums)."""

REMOVALS = frozenset({"FIELD_REMOVED", "ARG_REMOVED", "VALUE_REMOVED_FROM_ENUM", "DIRECTIVE_ARG_REMOVED"})
"""Changes that remove something that can be deprecated first (types and directives cannot)."""

CHANGE_TYPES = frozenset(t.name for t in (*BreakingChangeType, *DangerousChangeType))
UNRELEASED = "Unreleased"
SCHEMA_HEADING = "Schema changes"
VERSION_FORMAT = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:\.dev(\d+))?$")
SECTION = re.compile(r"^## \[(?P<version>[^\]]+)\](?: - (?P<date>\d{4}-\d{2}-\d{2}))?\s*$")
ENTRY = re.compile(r"^- `(?P<coordinate>[^`]+)` (?P<type>[A-Z_]+): (?P<summary>.+?)(?: Migration: (?P<migration>.+))?$")


@dataclass(frozen=True)
class Change:
    """One breaking or dangerous change, with the schema coordinate it is about."""

    kind: Literal["breaking", "dangerous"]
    type: str
    coordinate: str
    description: str


@dataclass(frozen=True)
class Entry:
    """One item of a ``Schema changes`` list."""

    coordinate: str
    type: str
    summary: str
    migration: str | None
    line: int


@dataclass
class Section:
    """One ``## [version]`` section (``version`` is ``Unreleased`` for the next release's)."""

    version: str
    date: str | None
    line: int
    schema_changes: list[Entry] = field(default_factory=list)


class ChangelogError(ValueError):
    """CHANGELOG.md does not follow the format (the message names the line)."""


def coordinate_of(change_type: str, description: str) -> str:
    """The schema coordinate graphql-core's ``description`` of a ``change_type`` change is about.

    Raises ``ValueError`` for a description this graphql-core wording is not known for.
    """
    pattern = COORDINATE_OF.get(change_type)
    match = pattern.match(description) if pattern else None
    if match is None:
        raise ValueError(f"cannot tell what {change_type} change this is about: {description!r}")
    return match.group("c")


def schema_changes(release: GraphQLSchema, current: GraphQLSchema) -> list[Change]:
    """Every breaking, then every dangerous change from ``release`` to ``current``, as graphql-core finds them."""
    breaking = [Change("breaking", c.type.name, coordinate_of(c.type.name, c.description), c.description)
                for c in find_breaking_changes(release, current)]
    dangerous = [Change("dangerous", c.type.name, coordinate_of(c.type.name, c.description), c.description)
                 for c in find_dangerous_changes(release, current)]
    return breaking + dangerous


def parse_changelog(text: str) -> list[Section]:
    """The sections of a changelog (module docstring), newest first as written; ``ChangelogError``
    names the first line that does not fit (an item of ``Schema changes`` that cannot be read, an
    unknown change type, a version or date in another form)."""
    sections: list[Section] = []
    in_schema = False
    item: list[tuple[int, str]] = []

    def close_item() -> None:
        if not item:
            return
        number, first = item[0]
        joined = " ".join([first, *(line.strip() for _, line in item[1:])])
        match = ENTRY.match(joined)
        if match is None:
            raise ChangelogError(f"CHANGELOG.md line {number}: a schema change reads "
                                 "- `Type.field` CHANGE_TYPE: what changed. Migration: what clients do")
        if match.group("type") not in CHANGE_TYPES:
            raise ChangelogError(f"CHANGELOG.md line {number}: {match.group('type')} is not a graphql-core "
                                 "breaking or dangerous change type")
        sections[-1].schema_changes.append(Entry(match.group("coordinate"), match.group("type"),
                                                 match.group("summary"), match.group("migration"), number))
        item.clear()

    in_comment = False
    for number, line in enumerate(text.splitlines(), start=1):
        if in_comment or line.lstrip().startswith("<!--"):  # HTML comments hold no entries
            in_comment = "-->" not in line
            continue
        if line.startswith("## "):
            close_item()
            heading = SECTION.match(line)
            if heading is None:
                raise ChangelogError(f"CHANGELOG.md line {number}: a section heading reads "
                                     "## [Unreleased] or ## [X.Y.Z] - YYYY-MM-DD")
            version, date = heading.group("version"), heading.group("date")
            if version != UNRELEASED and (not VERSION_FORMAT.match(version) or ".dev" in version or date is None):
                raise ChangelogError(f"CHANGELOG.md line {number}: a released section reads ## [X.Y.Z] - YYYY-MM-DD")
            sections.append(Section(version, date, number))
            in_schema = False
        elif line.startswith("### "):
            close_item()
            in_schema = bool(sections) and line[4:].strip() == SCHEMA_HEADING
        elif in_schema and line.startswith("- "):
            close_item()
            item.append((number, line))
        elif in_schema and item and line.startswith((" ", "\t")) and line.strip():
            item.append((number, line))
        elif in_schema and line.strip():
            close_item()
    close_item()
    return sections


def _parsed(version: str) -> tuple[int, int, int, int | None]:
    match = VERSION_FORMAT.match(version)
    if match is None:
        raise ValueError(f"version {version!r} is not X.Y.Z or X.Y.Z.devN")
    major, minor, patch, dev = match.groups()
    return int(major), int(minor), int(patch), int(dev) if dev is not None else None


def deprecated_in(schema: GraphQLSchema, coordinate: str) -> bool:
    """Whether the element at ``coordinate`` (a field, input field, enum value, argument or directive
    argument) is deprecated in ``schema``."""
    match = re.fullmatch(rf"(?P<owner>@?{_NAME})(?:\.(?P<member>{_NAME}))?(?:\((?P<arg>{_NAME}):\))?", coordinate)
    if match is None:
        return False
    owner, member, arg = match.group("owner"), match.group("member"), match.group("arg")
    if owner.startswith("@"):
        directive = schema.get_directive(owner[1:])
        found = directive.args.get(arg) if directive and arg else None
        return found is not None and found.deprecation_reason is not None
    named = schema.get_type(owner)
    if member is None:
        return False
    if isinstance(named, GraphQLEnumType):
        value = named.values.get(member)
        return value is not None and value.deprecation_reason is not None
    if isinstance(named, GraphQLObjectType | GraphQLInterfaceType | GraphQLInputObjectType):
        member_field = named.fields.get(member)
        if member_field is None:
            return False
        if arg is None:
            return member_field.deprecation_reason is not None
        argument = getattr(member_field, "args", {}).get(arg)
        return argument is not None and argument.deprecation_reason is not None
    return False


def changelog_entry(change: Change) -> str:
    """The ``Schema changes`` item for ``change``, to be completed by hand."""
    note = "what clients must do" if change.kind == "breaking" else "what clients should check"
    return f"- `{change.coordinate}` {change.type}: {change.description}\n  Migration: {note}."


@dataclass(frozen=True)
class Report:
    """What ``check`` found: every change, and the problems among them (none: the contract holds)."""

    changes: list[Change]
    problems: list[str]
    unlisted: list[Change]

    @property
    def ok(self) -> bool:
        return not self.problems


def check(release: GraphQLSchema, current: GraphQLSchema, changelog: str, version: str) -> Report:
    """Hold the change from ``release`` to ``current`` to the rules (module docstring), with
    ``changelog`` the text of CHANGELOG.md and ``version`` the code's version."""
    changes = schema_changes(release, current)
    problems: list[str] = []
    try:
        sections = parse_changelog(changelog)
    except ChangelogError as exc:
        return Report(changes, [str(exc)], [])
    unreleased = next((s for s in sections if s.version == UNRELEASED), None)
    releases = [s for s in sections if s.version != UNRELEASED]
    entries = unreleased.schema_changes if unreleased else []
    listed = {(e.type, e.coordinate): e for e in entries}

    unlisted = [c for c in changes if (c.type, c.coordinate) not in listed]
    for change in unlisted:
        problems.append(f"{change.kind} change not in CHANGELOG.md ({UNRELEASED}, {SCHEMA_HEADING}): "
                        f"{change.description}")
    for change in changes:
        entry = listed.get((change.type, change.coordinate))
        if change.kind == "breaking" and entry is not None and not (entry.migration or "").strip():
            problems.append(f"CHANGELOG.md line {entry.line}: the breaking change {change.coordinate} "
                            f"{change.type} needs a migration note (Migration: ...)")
        if change.type in REMOVALS and not deprecated_in(release, change.coordinate):
            problems.append(f"{change.coordinate} is removed but was not deprecated in the release: mark it "
                            "@deprecated(reason: ...) first and remove it in a later release")
    happening = {(c.type, c.coordinate) for c in changes}
    for entry in entries:
        if (entry.type, entry.coordinate) not in happening:
            problems.append(f"CHANGELOG.md line {entry.line}: `{entry.coordinate}` {entry.type} is listed but the "
                            "schema makes no such change against schema.release.graphql")
    problems += _version_problems(version, releases, unreleased, any(c.kind == "breaking" for c in changes),
                                  print_schema(release) != print_schema(current))
    return Report(changes, problems, unlisted)


def _version_problems(version: str, releases: Sequence[Section], unreleased: Section | None, breaking: bool,
                      changed: bool) -> list[str]:
    try:
        major, minor, patch, dev = _parsed(version)
    except ValueError as exc:
        return [str(exc)]
    if not releases:
        return ["CHANGELOG.md has no released section (## [X.Y.Z] - YYYY-MM-DD)"]
    released = [_parsed(s.version)[:3] for s in releases]
    if released != sorted(released, reverse=True) or len(set(released)) != len(released):
        return ["CHANGELOG.md's released sections are not newest first, each once"]
    latest = released[0]
    base = (major, minor, patch)
    problems: list[str] = []
    if dev is None:
        if base != latest:
            problems.append(f"version {version} is a release: CHANGELOG.md's newest section must be [{version}]")
        if changed:  # any difference at all, safe additions included
            problems.append(f"version {version} is a release: schema.release.graphql must be its SDL "
                            "(atrium export-schema --output schema.release.graphql)")
        if unreleased is not None and unreleased.schema_changes:
            problems.append(f"version {version} is a release: move the {UNRELEASED} schema changes into its section")
        previous = released[1] if len(released) > 1 else None
    else:
        if base <= latest:
            problems.append(f"version {version} must come after the last release, {'.'.join(map(str, latest))}")
        previous = latest
    if breaking and previous is not None:
        new_major = base[0] > previous[0] or (previous[0] == 0 and base[:2] > previous[:2])
        if not new_major:
            problems.append(f"breaking schema changes need a new major version (a new minor one while the major "
                            f"is 0) after {'.'.join(map(str, previous))}, not {version}")
    return problems
