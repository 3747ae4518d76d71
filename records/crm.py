"""The CRM's record types, each declared once (``records.declare`` says what a declaration holds).

Field order is the order of the fields in the API's input and patch types; filter order the order of
the filter type's fields. Relations point at records declared anywhere in this module (targets are
looked up when first used).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from sqlalchemy import case, func, literal_column, select

from auth.roles import Permission
from core.errors import BadUserInput
from models.loaders import TENANT
from models.tables import (
    ACTIVITIES,
    COMPANIES,
    CONTACTS,
    DEAL_LINE_ITEMS,
    DEALS,
    MEMBERSHIPS,
    NOTES,
    PIPELINES,
    PRODUCTS,
    STAGES,
    TEAM_MEMBERS,
    TEAMS,
    USERS,
    ActivityKind,
    DealStatus,
)
from records.declare import (
    NO_ROOT,
    Access,
    Aggregation,
    AnyOf,
    AtLeastOne,
    Below,
    Children,
    Create,
    Direction,
    Equals,
    ExactlyOne,
    Field,
    Group,
    Listing,
    Measure,
    OnDelete,
    OnlyWhen,
    Operation,
    Range,
    Record,
    Rollup,
    Root,
    Search,
    Sort,
    ToOne,
    Transition,
    Writer,
)
from records.rules import (
    Choice,
    Currency,
    Day,
    Domain,
    Email,
    Flag,
    Fraction,
    Instant,
    Money,
    Opaque,
    Ref,
    Text,
    Whole,
)
from subscriptions.notes import empty_state

SKU = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

EXTERNAL_ID = Field("external_id", Text(200, required=False), unique=True,
                    description="Your own key of the record (its id in another system), unique in the workspace; "
                                "`upsert…` mutations find records by it.")
"""Every record type the API creates and updates has one (migration ``0011_external_ids``)."""


async def caller(w: Writer, values: Mapping[str, Any]) -> Any:
    """The member making the change."""
    return w.user_id


async def after_last_stage(w: Writer, values: Mapping[str, Any]) -> Any:
    """The position after the last stage of the new stage's pipeline."""
    return await w.scalar(select(func.coalesce(func.max(STAGES.c.position) + 1, 0)).where(
        STAGES.c.tenant_id == w.tenant_id, STAGES.c.pipeline_id == values["pipeline_id"]))


async def empty_note(w: Writer, values: Mapping[str, Any]) -> Any:
    return empty_state()


async def list_price(w: Writer, values: Mapping[str, Any]) -> Any:
    """The product's list price, when it is in the deal's currency (the line item's)."""
    price = await w.scalar(select(case((PRODUCTS.c.currency == values["currency"], PRODUCTS.c.unit_price))).where(
        PRODUCTS.c.tenant_id == w.tenant_id, PRODUCTS.c.id == values["product_id"]))
    if price is None:
        raise BadUserInput("unitPrice", f"the product's list price is in another currency: give a unit price "
                                        f"in the deal's currency ({values['currency']})")
    return price


USER: Record = Record(
    "User", USERS, "users",
    lookup=select(USERS.c.id, USERS.c.email, USERS.c.name, MEMBERSHIPS.c.role,
                  MEMBERSHIPS.c.id.label("membership_id"))
    .join(MEMBERSHIPS, MEMBERSHIPS.c.user_id == USERS.c.id).where(MEMBERSHIPS.c.tenant_id == TENANT),
    lookup_key=USERS.c.id,
    root=NO_ROOT,
)
"""A member of the tenant (a user of another tenant is not found); members are managed by
``resolvers.viewer``."""

MEMBERSHIP: Record = Record("Membership", MEMBERSHIPS, "memberships", root=NO_ROOT,
                            by_hand=frozenset({Operation.CREATE, Operation.UPDATE, Operation.DELETE}))

COMPANY: Record = Record(
    "Company", COMPANIES, "companies",
    trash=True,
    custom_fields=True,
    import_key="domain",
    fields=(
        Field("name", Text(200), Create.REQUIRED),
        Field("domain", Domain(), restrictable=True),
        EXTERNAL_ID,
    ),
    children=(
        Children("contacts", lambda: CONTACT.relation("company"), ("last_name", "first_name", "id")),
        Children("deals", lambda: DEAL.relation("company"), ("-created_at", "-id")),
        Children("activities", lambda: ACTIVITY.relation("company"), ("-occurred_at", "-id"), first=10,
                 description="Latest activities first."),
    ),
    filters=(Search(("name", "domain"), description="Matches name and domain."),),
    sorts=(Sort("NAME", "name"), Sort("CREATED_AT", "created_at")),
    default_sort="NAME",
    aggregation=Aggregation(groups=(Group("CREATED_MONTH", "created_at", month=True),)),
    root=Root(descriptions={
        "delete": "Moves the company to the trash with its notes and the activities about it alone; its contacts "
                  "and deals stay, their `company` null while it is in the trash.",
        "restore": "Brings the company back from the trash with everything that went with it, links included."}),
)

CONTACT: Record = Record(
    "Contact", CONTACTS, "contacts",
    trash=True,
    custom_fields=True,
    import_key="email",
    fields=(
        Field("first_name", Text(100), Create.REQUIRED),
        Field("last_name", Text(100), Create.REQUIRED),
        Field("email", Email(), restrictable=True),
        Field("phone", Text(40, required=False), restrictable=True),
        Field("title", Text(200, required=False), restrictable=True),
        Field("company_id", Ref("Company")),
        EXTERNAL_ID,
    ),
    relations=(ToOne("company", "company_id", lambda: COMPANY, OnDelete.SET_NULL),),
    children=(
        Children("deals", lambda: DEAL.relation("contact"), ("-created_at", "-id")),
        Children("activities", lambda: ACTIVITY.relation("contact"), ("-occurred_at", "-id"), first=10,
                 description="Latest activities first."),
    ),
    filters=(Equals("company_id"),
             Search(("first_name", "last_name", "email"), description="Matches names and email.")),
    sorts=(Sort("LAST_NAME", "last_name"), Sort("CREATED_AT", "created_at")),
    default_sort="LAST_NAME",
    aggregation=Aggregation(groups=(Group("COMPANY", "company_id"), Group("CREATED_MONTH", "created_at", month=True))),
)

PIPELINE: Record = Record(
    "Pipeline", PIPELINES, "pipelines",
    fields=(Field("name", Text(200), Create.REQUIRED), EXTERNAL_ID),
    children=(
        Children("stages", lambda: STAGE.relation("pipeline"), ("position", "id"), maximum=50, nested=True,
                 first_argument=False, description="Stages in board order."),
    ),
    sorts=(Sort("NAME", "name"),),
    default_sort="NAME",
    routing={"pipeline": "id"},
    root=Root(listing=Listing.LIST, descriptions={
        "list": "All pipelines, by name.",
        "create": "Create a pipeline with its stages in the given order.",
        "delete": "Delete an empty pipeline (with its stages); fails while it has deals.",
    }),
)

STAGE: Record = Record(
    "Stage", STAGES, "stages",
    fields=(
        Field("name", Text(100), Create.REQUIRED),
        Field("probability", Fraction(), Create.REQUIRED),
        Field("position", Whole(), description="Defaults to after the last stage.", fallback=after_last_stage,
              sequential=True),
        Field("pipeline_id", Ref("Pipeline"), Create.NEVER, update=False),
        EXTERNAL_ID,
    ),
    relations=(ToOne("pipeline", "pipeline_id", lambda: PIPELINE, OnDelete.CASCADE),),
    children=(Children("deals", lambda: DEAL.relation("stage"), ("-created_at", "-id"),
                       description="Newest deals first."),),
    routing={"pipeline": "pipeline_id"},
    root=Root(listing=Listing.NONE, get=False, parent="pipeline", descriptions={
        "create": "Add a stage; without a position it goes last.",
        "delete": "Delete a stage that holds no deals.",
    }),
)


def close_date(table: Any) -> Any:
    """Deals without an expected close date sort after every date."""
    return func.coalesce(table.c.expected_close_date, literal_column("'infinity'::date"))


DEAL: Record = Record(
    "Deal", DEALS, "deals",
    trash=True,
    owner="owner_id",
    custom_fields=True,
    fields=(
        Field("title", Text(200), Create.REQUIRED),
        Field("amount", Money(), Create.REQUIRED, restrictable=True),
        Field("currency", Currency(), Create.REQUIRED),
        Field("stage_id", Ref("Stage"), Create.REQUIRED, update=False),
        Field("company_id", Ref("Company")),
        Field("contact_id", Ref("Contact")),
        Field("owner_id", Ref("User"), description="Defaults to the caller.", fallback=caller),
        Field("expected_close_date", Day(), restrictable=True),
        Field("status", Choice(DealStatus), Create.NEVER),
        Field("pipeline_id", Ref("Pipeline"), Create.NEVER, update=False),
        EXTERNAL_ID,
    ),
    relations=(
        ToOne("stage", "stage_id", lambda: STAGE, OnDelete.RESTRICT, copies=("pipeline_id",)),
        ToOne("pipeline", "pipeline_id", lambda: PIPELINE, OnDelete.RESTRICT),
        ToOne("company", "company_id", lambda: COMPANY, OnDelete.SET_NULL),
        ToOne("contact", "contact_id", lambda: CONTACT, OnDelete.SET_NULL, description="The primary contact."),
        ToOne("owner", "owner_id", lambda: USER, OnDelete.SET_NULL),
    ),
    children=(
        Children("activities", lambda: ACTIVITY.relation("deal"), ("-occurred_at", "-id"), first=10,
                 description="Latest activities first."),
        Children("line_items", lambda: DEAL_LINE_ITEM.relation("deal"), ("created_at", "id"), first=50, maximum=100,
                 description="The products on the deal, in the order they were added."),
    ),
    filters=(
        Equals("pipeline_id"), Equals("stage_id"), Equals("owner_id"), Equals("company_id"), Equals("contact_id"),
        AnyOf("status"),
        Range("amount", "amount_min", "amount_max"),
        Equals("currency"),
        Range("expected_close_date", "close_date_from", "close_date_to"),
        Search(("title",), related=(("company", ("name",)), ("contact", ("first_name", "last_name", "email"))),
               description="Matches the title, the company's name and the contact's name and email."),
    ),
    sorts=(
        Sort("CREATED_AT", "created_at"),
        Sort("UPDATED_AT", "updated_at"),
        Sort("AMOUNT", "amount"),
        Sort("TITLE", "title"),
        Sort("EXPECTED_CLOSE_DATE", "expected_close_date", cursor="closeDate", expression=close_date),
    ),
    default_sort="CREATED_AT",
    default_direction=Direction.DESC,
    routing={"pipeline": "pipeline_id"},
    transitions=(Transition("moved", "stage_id", "A deal moved to another stage (`moveDeal`)."),),
    aggregation=Aggregation(
        groups=(Group("PIPELINE", "pipeline_id"), Group("STAGE", "stage_id"), Group("OWNER", "owner_id"),
                Group("COMPANY", "company_id"), Group("STATUS", "status"), Group("CURRENCY", "currency"),
                Group("CLOSE_MONTH", "expected_close_date", month=True),
                Group("CREATED_MONTH", "created_at", month=True)),
        measures=(Measure("amount", currency="currency"),),
    ),
)

ACTIVITY: Record = Record(
    "Activity", ACTIVITIES, "activities",
    trash=True,
    fields=(
        Field("kind", Choice(ActivityKind), Create.REQUIRED, update=False),
        Field("subject", Text(200), Create.REQUIRED),
        Field("body", Text(20_000, required=False), restrictable=True),
        Field("deal_id", Ref("Deal"), update=False),
        Field("contact_id", Ref("Contact"), update=False),
        Field("company_id", Ref("Company"), update=False),
        Field("occurred_at", Instant(), description="Defaults to now."),
        Field("due_date", Day()),
        Field("done", Flag(), default=False),
        Field("actor_id", Ref("User"), Create.NEVER, update=False, fallback=caller),
        EXTERNAL_ID,
    ),
    relations=(
        ToOne("deal", "deal_id", lambda: DEAL, OnDelete.SET_NULL),
        ToOne("contact", "contact_id", lambda: CONTACT, OnDelete.SET_NULL),
        ToOne("company", "company_id", lambda: COMPANY, OnDelete.SET_NULL),
        ToOne("actor", "actor_id", lambda: USER, OnDelete.SET_NULL),
    ),
    checks=(
        AtLeastOne(("deal_id", "contact_id", "company_id"), "dealId",
                   "an activity needs a dealId, contactId or companyId"),
        OnlyWhen("due_date", "kind", (ActivityKind.TASK.value,), "only tasks have a due date"),
    ),
    filters=(
        AnyOf("kind"), Equals("deal_id"), Equals("contact_id"), Equals("company_id"), Equals("done"),
        Below("due_date", "due_before"),
    ),
    sorts=(Sort("OCCURRED_AT", "occurred_at"),),
    default_sort="OCCURRED_AT",
    default_direction=Direction.DESC,
    aggregation=Aggregation(groups=(Group("KIND", "kind"), Group("DONE", "done"), Group("ACTOR", "actor_id"),
                                    Group("DEAL", "deal_id"), Group("CONTACT", "contact_id"),
                                    Group("COMPANY", "company_id"),
                                    Group("OCCURRED_MONTH", "occurred_at", month=True))),
    root=Root(get=False),
)

NOTE: Record = Record(
    "Note", NOTES, "notes",
    trash=True,
    fields=(
        Field("deal_id", Ref("Deal"), update=False),
        Field("contact_id", Ref("Contact"), update=False),
        Field("company_id", Ref("Company"), update=False),
        Field("state", Opaque(), Create.NEVER, update=False, fallback=empty_note),
    ),
    relations=(
        ToOne("deal", "deal_id", lambda: DEAL, OnDelete.CASCADE),
        ToOne("contact", "contact_id", lambda: CONTACT, OnDelete.CASCADE),
        ToOne("company", "company_id", lambda: COMPANY, OnDelete.CASCADE),
    ),
    checks=(ExactlyOne(("deal_id", "contact_id", "company_id"), "input",
                       "give exactly one of dealId, contactId, companyId"),),
    root=Root(listing=Listing.NONE, update=False, delete=False, descriptions={
        "create": "An empty note on exactly one deal, contact or company.",
        "input": "Where a new note goes: exactly one of the three.",
    }),
    by_hand=frozenset({Operation.UPDATE}),  # applyNoteUpdate (resolvers.notes)
)

PRODUCT: Record = Record(
    "Product", PRODUCTS, "products",
    fields=(
        Field("name", Text(200), Create.REQUIRED),
        Field("sku", Text(64, pattern=SKU, expected="letters, digits, '.', '_' or '-'"), Create.REQUIRED,
              description="Stock-keeping unit, unique in the workspace.", unique=True),
        Field("unit_price", Money(), Create.REQUIRED, description="List price, in `currency`.", restrictable=True),
        Field("currency", Currency(), Create.REQUIRED),
        Field("active", Flag(), default=True, description="Only active products can be added to deals."),
        EXTERNAL_ID,
    ),
    filters=(Equals("active"), Equals("currency"), Search(("name", "sku"), description="Matches name and SKU.")),
    sorts=(Sort("NAME", "name"), Sort("SKU", "sku"), Sort("UNIT_PRICE", "unit_price"),
           Sort("CREATED_AT", "created_at")),
    default_sort="NAME",
    aggregation=Aggregation(groups=(Group("ACTIVE", "active"), Group("CURRENCY", "currency")),
                            measures=(Measure("unit_price", currency="currency"),)),
    root=Root(descriptions={"delete": "Delete a product that is on no deal (deactivate it instead)."}),
)

DEAL_LINE_ITEM: Record = Record(
    "DealLineItem", DEAL_LINE_ITEMS, "deal_line_items",
    trash=True,
    fields=(
        Field("deal_id", Ref("Deal"), Create.REQUIRED, update=False),
        Field("product_id", Ref("Product"), Create.REQUIRED, update=False),
        Field("quantity", Whole(minimum=1), Create.REQUIRED),
        Field("unit_price", Money(), description="In the deal's currency; defaults to the product's list price "
                                                 "when that is in the deal's currency.", fallback=list_price),
        Field("discount_percent", Fraction(Decimal(0), Decimal(100), places=2), description="0 to 100 (default 0)."),
        Field("currency", Currency(), Create.NEVER, update=False),
        EXTERNAL_ID,
    ),
    relations=(
        ToOne("deal", "deal_id", lambda: DEAL, OnDelete.CASCADE, copies=("currency",)),
        ToOne("product", "product_id", lambda: PRODUCT, OnDelete.RESTRICT,
              requires=("active", True, "this product is not active")),
    ),
    rollups=(Rollup("deal", "amount", "line_total", locks=("currency",)),),
    access=Access(delete=Permission.WRITE),
    filters=(Equals("deal_id"), Equals("product_id")),
    aggregation=Aggregation(groups=(Group("PRODUCT", "product_id"), Group("DEAL", "deal_id"),
                                    Group("CURRENCY", "currency")),
                            measures=(Measure("quantity"), Measure("line_total", currency="currency"))),
    sorts=(Sort("CREATED_AT", "created_at"),),
    default_sort="CREATED_AT",
    root=Root(descriptions={
        "create": "Add a product to a deal. While a deal has line items, its amount is their total."}),
)

TEAM: Record = Record(
    "Team", TEAMS, "teams",
    fields=(
        Field("name", Text(100), Create.REQUIRED, unique=True, description="Unique in the workspace."),
        Field("manager_id", Ref("User"), description="Sees the records of every member of the team."),
    ),
    relations=(ToOne("manager", "manager_id", lambda: USER, OnDelete.SET_NULL),),
    children=(Children("members", lambda: TEAM_MEMBER.relation("team"), ("created_at", "id"), first=200,
                       maximum=200, first_argument=False),),
    root=NO_ROOT,
    by_hand=frozenset({Operation.CREATE, Operation.UPDATE, Operation.DELETE}),  # resolvers.teams
)
"""A group of members with a manager: who sees records of a type whose audience is ``team``
(``docs/visibility.md``). Managed by admins through ``resolvers.teams``."""

TEAM_MEMBER: Record = Record(
    "TeamMember", TEAM_MEMBERS, "team_members",
    fields=(
        Field("team_id", Ref("Team"), Create.REQUIRED, update=False),
        Field("user_id", Ref("User"), Create.REQUIRED, update=False),
    ),
    relations=(ToOne("team", "team_id", lambda: TEAM, OnDelete.CASCADE),
               ToOne("user", "user_id", lambda: USER, OnDelete.CASCADE)),
    root=NO_ROOT,
    by_hand=frozenset({Operation.CREATE, Operation.DELETE}),  # resolvers.teams
)

RECORDS: tuple[Record, ...] = (USER, MEMBERSHIP, COMPANY, CONTACT, PIPELINE, STAGE, DEAL, ACTIVITY, NOTE, PRODUCT,
                               DEAL_LINE_ITEM, TEAM, TEAM_MEMBER)
"""Every record type. Node lookup, dependents on delete and the isolation tests go over this tuple."""

BY_NAME = {record.name: record for record in RECORDS}

OWNED: tuple[Record, ...] = tuple(record for record in RECORDS if record.owned)
"""The record types a tenant may restrict to their owners' teams (``Record.owner``)."""


def check_trash(records: tuple[Record, ...]) -> None:
    """A record that goes to the trash takes its CASCADE dependents with it, and the SET_NULL ones it
    would leave without a link: they must be trashable too (a row cannot be hidden otherwise)."""
    for record in records:
        for relation in record.relations:
            target = relation.target()
            linked = relation.on_delete is OnDelete.CASCADE or any(
                relation.key in check.columns for check in record.checks if isinstance(check, AtLeastOne | ExactlyOne))
            if target.trash and linked and not record.trash:
                raise TypeError(f"{record.name}.{relation.name}: {target.name} is trashable, so {record.name} "
                                "must be too (declare trash=True)")


check_trash(RECORDS)


def check_restrictable(records: tuple[Record, ...]) -> None:
    """A field a tenant may hide orders no list by default (its order would tell its values to a role
    that cannot see it): not a record's default sort, not a child list's order."""
    for record in records:
        columns = {f.column for f in record.restrictable().values()}
        default = [s.column for s in record.sorts if s.name == record.default_sort]
        orders = [c.lstrip("-") for other in records for spec in other.children
                  if spec.relation.owner is record for c in spec.order]
        for column in sorted(columns & {*default, *orders}):
            raise TypeError(f"{record.name}.{column} is restrictable, so no default ordering may use it")


check_restrictable(RECORDS)


def dependents(target: Record) -> list[ToOne]:
    """Every relation (of any record) pointing at ``target``, in declaration order."""
    return [r for record in RECORDS for r in record.relations if r.target() is target]


def rollups_into(target: Record) -> list[tuple[Record, Rollup]]:
    """Every rollup (of any record) into ``target``, with the record it rolls up."""
    return [(record, rollup) for record in RECORDS for rollup in record.rollups
            if record.relation(rollup.via).target() is target]
