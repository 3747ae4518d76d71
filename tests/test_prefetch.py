"""What ``schema.objects.prefetch`` loads ahead, read from selections exactly as Strawberry reports them.

A schema of the test's own gives the real ``info.selected_fields`` for literal, variable, default
and out-of-range ``first`` arguments and for ``@skip``/``@include``; the relations planned are the
real ones of ``Deal`` (declared in ``records.crm``). Statement counts and the results of prefetched
pages are in tests/test_dataloaders.py.
"""

from __future__ import annotations

from typing import Any

import strawberry

from records.crm import DEAL
from schema.crm import Deal
from schema.objects import fields_of, plan, relations_of

ACTIVITIES_FIRST = DEAL.child_list("activities").first
seen: list[set[Any]] = []


@strawberry.type
class Probe:
    company: str = ""
    owner: str = ""
    title: str = ""

    @strawberry.field
    def activities(self, first: int = ACTIVITIES_FIRST) -> list[str]:
        return []


@strawberry.type
class Query:
    @strawberry.field
    def probe(self, info: strawberry.Info) -> Probe:
        selected = [f for root in info.selected_fields for f in fields_of(root.selections)]
        seen.append(set(plan(relations_of(Deal), selected)))
        return Probe()


SCHEMA = strawberry.Schema(Query)


def planned(query: str, **variables: Any) -> set[Any]:
    seen.clear()
    result = SCHEMA.execute_sync(query, variable_values=variables)
    assert not result.errors, result.errors
    [found] = seen
    return found


def test_deal_relations_are_the_declared_ones() -> None:
    assert set(relations_of(Deal)) == {"stage", "pipeline", "company", "contact", "owner", "activities", "lineItems"}


def test_literal_variable_and_default_limits_are_all_loaded_ahead() -> None:
    assert planned("query($n: Int!) { probe { title a: activities(first: 3) b: activities(first: $n) activities } }",
                   n=2) == {("activities", 3), ("activities", 2), ("activities", ACTIVITIES_FIRST)}


def test_out_of_range_limits_are_left_to_the_field() -> None:
    assert planned("{ probe { activities(first: 51) company } }") == {"company"}


def test_skipped_and_excluded_fields_are_not_loaded() -> None:
    query = """query($skip: Boolean!, $include: Boolean!) {
      probe {
        company @skip(if: $skip)
        owner @include(if: $include)
        ... on Probe { activities(first: 1) @skip(if: true) }
      }
    }"""
    assert planned(query, skip=True, include=False) == set()
    assert planned(query, skip=False, include=True) == {"company", "owner"}


def test_fragments_are_looked_through() -> None:
    query = "{ probe { ...F } } fragment F on Probe { ... on Probe { owner activities(first: 4) } }"
    assert planned(query) == {"owner", ("activities", 4)}
