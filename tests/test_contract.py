"""The schema contract (``atrium.ops.contract``): every breaking or dangerous change against the last
release is listed in CHANGELOG.md with its migration note, removals go through ``@deprecated``, and
the version follows; ``atrium schema check`` says so, and the repository's own files obey it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import httpx
import pytest
from graphql import BreakingChangeType, DangerousChangeType, build_schema

from atrium.ops.contract import COORDINATE_OF, ChangelogError, check, parse_changelog, schema_changes
from atrium.schema import schema
from core.version import VERSION
from tests.cli import atrium, environment

ROOT = Path(__file__).resolve().parent.parent

BASE = """
type Query { deal: Deal  deals(first: Int = 10, status: Status): [Deal!]!  search: Result  node: Node }
interface Node { id: ID! }
type Deal implements Node { id: ID!  title: String!  legacy: String @deprecated(reason: "Use title.")  amount: Int }
type Company { name: String }
union Result = Deal | Company
enum Status { OPEN WON LOST OLD @deprecated(reason: "Never set.") }
input DealFilter { status: Status  limit: Int = 5 }
directive @tag(name: String, old: String @deprecated(reason: "Unused.")) repeatable on FIELD | QUERY
"""

CASES = {
    # change type: (a change of BASE, the coordinate it is about)
    "TYPE_REMOVED": (("type Company { name: String }\n", ""), ("union Result = Deal | Company", "union Result = Deal")),
    "TYPE_CHANGED_KIND": (("type Company { name: String }", "input Company { name: String }"),),
    "TYPE_REMOVED_FROM_UNION": (("union Result = Deal | Company", "union Result = Deal"),),
    "TYPE_ADDED_TO_UNION": (("type Company { name: String }", "type Company { name: String } type Person { x: Int }"),
                            ("union Result = Deal | Company", "union Result = Deal | Company | Person")),
    "VALUE_REMOVED_FROM_ENUM": (("LOST OLD", "LOST"),),
    "VALUE_ADDED_TO_ENUM": (("OPEN WON", "OPEN WON PAUSED"),),
    "REQUIRED_INPUT_FIELD_ADDED": (("limit: Int = 5 }", "limit: Int = 5  owner: ID! }"),),
    "OPTIONAL_INPUT_FIELD_ADDED": (("limit: Int = 5 }", "limit: Int = 5  owner: ID }"),),
    "IMPLEMENTED_INTERFACE_REMOVED": (("type Deal implements Node {", "type Deal {"),),
    "IMPLEMENTED_INTERFACE_ADDED": (("type Company { name: String }",
                                     "type Company implements Node { id: ID! name: String }"),),
    "FIELD_REMOVED": (("amount: Int }", "}"),),
    "FIELD_CHANGED_KIND": (("amount: Int }", "amount: String }"),),
    "REQUIRED_ARG_ADDED": (("status: Status)", "status: Status, owner: ID!)"),),
    "OPTIONAL_ARG_ADDED": (("status: Status)", "status: Status, owner: ID)"),),
    "ARG_REMOVED": ((", status: Status)", ")"),),
    "ARG_CHANGED_KIND": (("status: Status)", "status: String)"),),
    "ARG_DEFAULT_VALUE_CHANGE": (("first: Int = 10", "first: Int = 20"),),
    "INPUT_FIELD_DEFAULT_VALUE_CHANGE": (("limit: Int = 5", "limit: Int = 50"),),
    "DIRECTIVE_REMOVED": (("directive @tag(name: String, old: String @deprecated(reason: \"Unused.\")) repeatable "
                           "on FIELD | QUERY", ""),),
    "DIRECTIVE_ARG_REMOVED": ((', old: String @deprecated(reason: "Unused.")', ""),),
    "REQUIRED_DIRECTIVE_ARG_ADDED": (("@tag(name: String,", "@tag(name: String, scope: String!,"),),
    "DIRECTIVE_REPEATABLE_REMOVED": ((") repeatable on", ") on"),),
    "DIRECTIVE_LOCATION_REMOVED": (("on FIELD | QUERY", "on FIELD"),),
}
COORDINATES = {
    "TYPE_REMOVED": "Company", "TYPE_CHANGED_KIND": "Company", "TYPE_REMOVED_FROM_UNION": "Result",
    "TYPE_ADDED_TO_UNION": "Result", "VALUE_REMOVED_FROM_ENUM": "Status.OLD", "VALUE_ADDED_TO_ENUM": "Status.PAUSED",
    "REQUIRED_INPUT_FIELD_ADDED": "DealFilter.owner", "OPTIONAL_INPUT_FIELD_ADDED": "DealFilter.owner",
    "IMPLEMENTED_INTERFACE_REMOVED": "Deal", "IMPLEMENTED_INTERFACE_ADDED": "Company", "FIELD_REMOVED": "Deal.amount",
    "FIELD_CHANGED_KIND": "Deal.amount", "REQUIRED_ARG_ADDED": "Query.deals(owner:)",
    "OPTIONAL_ARG_ADDED": "Query.deals(owner:)", "ARG_REMOVED": "Query.deals(status:)",
    "ARG_CHANGED_KIND": "Query.deals(status:)", "ARG_DEFAULT_VALUE_CHANGE": "Query.deals(first:)",
    "INPUT_FIELD_DEFAULT_VALUE_CHANGE": "DealFilter.limit", "DIRECTIVE_REMOVED": "@tag",
    "DIRECTIVE_ARG_REMOVED": "@tag(old:)", "REQUIRED_DIRECTIVE_ARG_ADDED": "@tag(scope:)",
    "DIRECTIVE_REPEATABLE_REMOVED": "@tag", "DIRECTIVE_LOCATION_REMOVED": "@tag",
}


def changed(*edits: tuple[str, str]) -> str:
    sdl = BASE
    for old, new in edits:
        assert old in sdl, old
        sdl = sdl.replace(old, new, 1)
    return sdl


def changelog(*items: str, version_sections: str = "## [0.1.0] - 2026-12-01\n") -> str:
    body = "\n".join(items)
    return (f"# Changelog\n\n## [Unreleased]\n\n### Schema changes\n\n{body}\n\n"
            f"### Added\n\n- Things.\n\n{version_sections}")


def test_every_change_type_graphql_core_knows_is_read() -> None:
    known = {t.name for t in (*BreakingChangeType, *DangerousChangeType)}
    assert set(CASES) == known == set(COORDINATE_OF), "a graphql-core change type without a case or a reading"


@pytest.mark.parametrize("change_type", sorted(CASES))
def test_each_change_is_found_with_its_coordinate(change_type: str) -> None:
    found = schema_changes(build_schema(BASE), build_schema(changed(*CASES[change_type])))
    assert (change_type, COORDINATES[change_type]) in {(c.type, c.coordinate) for c in found}, found


def test_no_change_is_no_problem() -> None:
    report = check(build_schema(BASE), build_schema(BASE), changelog(), "0.2.0.dev0")
    assert report.ok and report.changes == [], report.problems


def test_an_unlisted_breaking_change_fails_until_listed_with_a_migration() -> None:
    release, current = build_schema(BASE), build_schema(changed(("amount: Int }", "amount: String }")))
    unlisted = check(release, current, changelog(), "0.2.0.dev0")
    assert not unlisted.ok and [c.coordinate for c in unlisted.unlisted] == ["Deal.amount"]
    assert "breaking change not in CHANGELOG.md" in unlisted.problems[0]

    no_note = check(release, current, changelog("- `Deal.amount` FIELD_CHANGED_KIND: now a decimal string."),
                    "0.2.0.dev0")
    assert no_note.problems == ["CHANGELOG.md line 7: the breaking change Deal.amount FIELD_CHANGED_KIND needs a "
                                "migration note (Migration: ...)"]

    listed = changelog("- `Deal.amount` FIELD_CHANGED_KIND: now a decimal string.",
                       "  Migration: parse it as a decimal; `Int` values arrive as `\"12\"`.")
    assert check(release, current, listed, "0.2.0.dev0").ok


def test_a_dangerous_change_must_be_listed_but_needs_no_migration() -> None:
    release, current = build_schema(BASE), build_schema(changed(("OPEN WON", "OPEN WON PAUSED")))
    assert not check(release, current, changelog(), "0.2.0.dev0").ok
    assert check(release, current, changelog("- `Status.PAUSED` VALUE_ADDED_TO_ENUM: deals can pause."),
                 "0.1.1.dev0").ok  # not breaking: no new major needed


def test_removals_go_through_deprecation_first() -> None:
    release = build_schema(BASE)
    entry = "- `{}` {}: gone. Migration: stop asking for it."
    for coordinate, change, edit in [
        ("Deal.amount", "FIELD_REMOVED", ("amount: Int }", "}")),
        ("Query.deals(status:)", "ARG_REMOVED", (", status: Status)", ")")),
        ("Status.WON", "VALUE_REMOVED_FROM_ENUM", ("OPEN WON", "OPEN")),
    ]:
        report = check(release, build_schema(changed(edit)), changelog(entry.format(coordinate, change)), "0.2.0.dev0")
        assert report.problems == [f"{coordinate} is removed but was not deprecated in the release: mark it "
                                   "@deprecated(reason: ...) first and remove it in a later release"], coordinate
    for coordinate, change, edit in [
        ("Deal.legacy", "FIELD_REMOVED", ('legacy: String @deprecated(reason: "Use title.")', "")),
        ("Status.OLD", "VALUE_REMOVED_FROM_ENUM", ('OLD @deprecated(reason: "Never set.")', "")),
        ("@tag(old:)", "DIRECTIVE_ARG_REMOVED", (', old: String @deprecated(reason: "Unused.")', "")),
    ]:
        report = check(release, build_schema(changed(edit)), changelog(entry.format(coordinate, change)), "0.2.0.dev0")
        assert report.ok, (coordinate, report.problems)


def test_a_listed_change_that_does_not_happen_is_a_problem() -> None:
    report = check(build_schema(BASE), build_schema(BASE),
                   changelog("- `Deal.title` FIELD_REMOVED: reverted. Migration: none."), "0.2.0.dev0")
    assert report.problems == ["CHANGELOG.md line 7: `Deal.title` FIELD_REMOVED is listed but the schema makes no "
                               "such change against schema.release.graphql"]


@pytest.mark.parametrize(("version", "releases", "ok"), [
    ("0.2.0.dev0", "## [0.1.0] - 2026-12-01\n", True),
    ("0.1.1.dev0", "## [0.1.0] - 2026-12-01\n", False),   # breaking at 0.x needs a new minor
    ("1.0.0.dev3", "## [0.1.0] - 2026-12-01\n", True),
    ("2.1.0.dev0", "## [2.0.0] - 2026-12-01\n## [1.4.0] - 2026-06-01\n", False),  # after 1.0 a new major
    ("3.0.0.dev0", "## [2.0.0] - 2026-12-01\n## [1.4.0] - 2026-06-01\n", True),
])
def test_breaking_changes_need_a_new_major_version(version: str, releases: str, ok: bool) -> None:
    release, current = build_schema(BASE), build_schema(changed(("amount: Int }", "amount: String }")))
    listed = changelog("- `Deal.amount` FIELD_CHANGED_KIND: a string. Migration: parse it.", version_sections=releases)
    assert check(release, current, listed, version).ok is ok


def test_a_release_version_has_its_section_and_its_sdl() -> None:
    release = build_schema(BASE)
    sections = "## [0.2.0] - 2026-12-24\n## [0.1.0] - 2026-12-01\n"
    assert check(release, release, changelog(version_sections=sections), "0.2.0").ok
    missing = check(release, release, changelog(), "0.2.0")
    assert missing.problems == ["version 0.2.0 is a release: CHANGELOG.md's newest section must be [0.2.0]"]
    added = build_schema(changed(("amount: Int }", "amount: Int  stage: String }")))  # even a safe addition
    stale = check(release, added, changelog(version_sections=sections), "0.2.0")
    assert any("schema.release.graphql must be its SDL" in p for p in stale.problems)
    behind = check(release, release, changelog(), "0.1.0.dev4")
    assert behind.problems == ["version 0.1.0.dev4 must come after the last release, 0.1.0"]


@pytest.mark.parametrize(("text", "message"), [
    (changelog("- Deal.amount FIELD_REMOVED: no backquotes."), "line 7: a schema change reads"),
    (changelog("- `Deal.amount` FIELD_VANISHED: gone."), "line 7: FIELD_VANISHED is not a graphql-core"),
    ("## [Unreleased]\n## [0.1] - 2026-12-01\n", "line 2: a released section reads"),
    ("## [Unreleased]\n## [0.1.0]\n", "line 2: a released section reads"),
    ("## Unreleased\n", "line 1: a section heading reads"),
])
def test_a_changelog_out_of_format_names_its_line(text: str, message: str) -> None:
    with pytest.raises(ChangelogError, match=re.escape(message)):
        parse_changelog(text)


def test_comments_and_prose_hold_no_entries() -> None:
    text = changelog("<!--", "- `Deal.title` FIELD_REMOVED: an example in a comment.", "-->",
                     "Nothing else yet.")
    assert parse_changelog(text)[0].schema_changes == []


# ---- the repository ---------------------------------------------------------------------------------

def test_the_code_keeps_its_contract_with_the_last_release() -> None:
    """What CI holds every change to: the code's schema against ``schema.release.graphql``, with
    CHANGELOG.md and ``core.version.VERSION``."""
    release = build_schema((ROOT / "schema.release.graphql").read_text())
    report = check(release, build_schema(schema.as_str()), (ROOT / "CHANGELOG.md").read_text(), VERSION)
    assert report.ok, "\n".join(report.problems)


def test_the_version_is_written_once() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "core.version.VERSION"}


async def test_atrium_schema_check_and_version(tmp_path: Path) -> None:
    env = environment()
    holds = await atrium("schema", "check", env=env)
    assert holds.status == 0 and "the contract holds" in holds.stdout, holds.stderr
    # A release that had a field the code no longer has (and had not deprecated).
    release = tmp_path / "release.graphql"
    release.write_text((ROOT / "schema.release.graphql").read_text().replace(
        "type Tenant implements Node {\n  id: ID!\n", "type Tenant implements Node {\n  id: ID!\n  legacy: String\n"))
    broken = await atrium("schema", "check", "--release", str(release), env=env)
    assert broken.status == 1
    assert "Field Tenant.legacy was removed" in broken.stdout
    assert "breaking change not in CHANGELOG.md" in broken.stderr and "was not deprecated" in broken.stderr
    assert "- `Tenant.legacy` FIELD_REMOVED: Field Tenant.legacy was removed." in broken.stderr  # to paste
    version = await atrium("--version", env=env)
    assert version.status == 0 and version.stdout.strip() == f"atrium {VERSION}"


async def test_healthz_says_the_version(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok", "version": VERSION}
