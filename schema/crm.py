"""The CRM's object types: what clients read. Scalars are plain attributes named after their columns
(fast to resolve); relations come from the declarations in ``records.crm`` (``schema.objects``)."""

from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import strawberry
from strawberry.scalars import JSON

from auth.session import Info
from core.ids import to_global_id
from models.tables import ActivityKind, DealStatus, Plan, Role
from records.crm import ACTIVITY, COMPANY, CONTACT, DEAL, DEAL_LINE_ITEM, PIPELINE, PRODUCT, STAGE, USER
from schema import enums as _enums  # noqa: F401 - registers the model enums as GraphQL enums
from schema.custom_fields import CustomFieldValue, custom_field, custom_fields
from schema.objects import SQL, Node, RecordObject, children, guarded, load, to_one


@strawberry.type
class Tenant(Node):
    slug: str
    name: str
    plan: Plan
    created_at: dt.datetime
    trash_retention_days: int = strawberry.field(
        description="Days a deleted record stays in the trash before a purge removes it for good.")

    @classmethod
    def from_row(cls, row: Any) -> Tenant:
        return cls(id=strawberry.ID(to_global_id("Tenant", row.id)), row=row, slug=row.slug, name=row.name,
                   plan=Plan(row.plan), created_at=row.created_at, trash_retention_days=row.trash_retention_days)


@strawberry.type(description="A person who belongs to this workspace, with their role in it.")
class User(RecordObject, Node, record=USER):
    email: str
    name: str
    role: Role


@strawberry.type
class Company(RecordObject, Node, record=COMPANY):
    name: str
    domain: str | None = guarded(COMPANY, "domain")
    version: int
    external_id: str | None = strawberry.field(description="Your own key of the record, unique in the workspace.")
    created_at: dt.datetime
    updated_at: dt.datetime
    contacts: list[Contact] = children(COMPANY, "contacts")
    deals: list[Deal] = children(COMPANY, "deals")
    activities: list[Activity] = children(COMPANY, "activities")
    custom_fields: list[CustomFieldValue] = custom_fields(COMPANY)
    custom_field: CustomFieldValue | None = custom_field(COMPANY)


@strawberry.type
class Contact(RecordObject, Node, record=CONTACT):
    first_name: str
    last_name: str
    email: str | None = guarded(CONTACT, "email")
    phone: str | None = guarded(CONTACT, "phone")
    title: str | None = guarded(CONTACT, "title")
    version: int
    external_id: str | None = strawberry.field(description="Your own key of the record, unique in the workspace.")
    created_at: dt.datetime
    updated_at: dt.datetime
    name: str = strawberry.field(resolver=lambda self: f"{self.first_name} {self.last_name}",
                                 metadata={SQL: lambda t: t.c.first_name + " " + t.c.last_name})
    company: Company | None = to_one(CONTACT, "company")
    deals: list[Deal] = children(CONTACT, "deals")
    activities: list[Activity] = children(CONTACT, "activities")
    custom_fields: list[CustomFieldValue] = custom_fields(CONTACT)
    custom_field: CustomFieldValue | None = custom_field(CONTACT)


@strawberry.type
class Pipeline(RecordObject, Node, record=PIPELINE):
    name: str
    version: int
    external_id: str | None = strawberry.field(description="Your own key of the record, unique in the workspace.")
    created_at: dt.datetime
    stages: list[Stage] = children(PIPELINE, "stages")


@strawberry.type
class Stage(RecordObject, Node, record=STAGE):
    name: str
    position: int
    probability: Decimal = strawberry.field(description="Win probability between 0 and 1.")
    version: int
    external_id: str | None = strawberry.field(description="Your own key of the record, unique in the workspace.")
    pipeline: Pipeline = to_one(STAGE, "pipeline")
    deals: list[Deal] = children(STAGE, "deals")


@strawberry.type
class Activity(RecordObject, Node, record=ACTIVITY):
    kind: ActivityKind
    subject: str
    body: str | None = guarded(ACTIVITY, "body")
    occurred_at: dt.datetime
    due_date: dt.date | None = strawberry.field(description="Tasks only.")
    done: bool
    version: int
    external_id: str | None = strawberry.field(description="Your own key of the record, unique in the workspace.")
    created_at: dt.datetime
    deal: Deal | None = to_one(ACTIVITY, "deal")
    contact: Contact | None = to_one(ACTIVITY, "contact")
    company: Company | None = to_one(ACTIVITY, "company")
    actor: User | None = to_one(ACTIVITY, "actor")


@strawberry.type
class Deal(RecordObject, Node, record=DEAL):
    title: str
    amount: Decimal | None = guarded(DEAL, "amount", "In `currency`; the total of the deal's line items while it "
                                                     "has any. Null (FORBIDDEN) when hidden from your role.")
    currency: str = strawberry.field(description="ISO 4217 code of `amount`.")
    status: DealStatus
    expected_close_date: dt.date | None = guarded(DEAL, "expected_close_date")
    version: int
    external_id: str | None = strawberry.field(description="Your own key of the record, unique in the workspace.")
    created_at: dt.datetime
    updated_at: dt.datetime
    stage: Stage = to_one(DEAL, "stage")
    pipeline: Pipeline = to_one(DEAL, "pipeline")
    company: Company | None = to_one(DEAL, "company")
    contact: Contact | None = to_one(DEAL, "contact")
    owner: User | None = to_one(DEAL, "owner")
    activities: list[Activity] = children(DEAL, "activities")
    line_items: list[DealLineItem] = children(DEAL, "line_items")
    custom_fields: list[CustomFieldValue] = custom_fields(DEAL)
    custom_field: CustomFieldValue | None = custom_field(DEAL)


@strawberry.type(description="Something the workspace sells, at a list price.")
class Product(RecordObject, Node, record=PRODUCT):
    name: str
    sku: str = strawberry.field(description="Stock-keeping unit, unique in the workspace.")
    unit_price: Decimal | None = guarded(PRODUCT, "unit_price", "List price, in `currency`. Null (FORBIDDEN) when "
                                                                "hidden from your role.")
    currency: str = strawberry.field(description="ISO 4217 code of `unitPrice`.")
    active: bool = strawberry.field(description="Only active products can be added to deals.")
    version: int
    external_id: str | None = strawberry.field(description="Your own key of the record, unique in the workspace.")
    created_at: dt.datetime
    updated_at: dt.datetime


@strawberry.type(description="A quantity of one product on one deal.")
class DealLineItem(RecordObject, Node, record=DEAL_LINE_ITEM):
    quantity: int
    unit_price: Decimal = strawberry.field(description="In `currency`.")
    discount_percent: Decimal = strawberry.field(description="0 to 100.")
    currency: str = strawberry.field(description="The deal's currency.")
    line_total: Decimal = strawberry.field(description="quantity x unitPrice x (1 - discountPercent / 100), "
                                                       "rounded to the cent.")
    version: int
    external_id: str | None = strawberry.field(description="Your own key of the record, unique in the workspace.")
    created_at: dt.datetime
    updated_at: dt.datetime
    deal: Deal = to_one(DEAL_LINE_ITEM, "deal")
    product: Product = to_one(DEAL_LINE_ITEM, "product")


@strawberry.type(description="One change of one record, written in the same transaction as the change.")
class AuditEvent:
    id: strawberry.ID
    occurred_at: dt.datetime
    action: str
    entity_type: str
    entity_id: strawberry.ID
    diff: JSON
    request_id: str | None
    actor_id: strawberry.Private[uuid.UUID | None]

    @classmethod
    def from_row(cls, row: Any) -> AuditEvent:
        return cls(id=strawberry.ID(to_global_id("AuditEvent", row.id)), occurred_at=row.occurred_at,
                   action=row.action, entity_type=row.entity_type,
                   entity_id=strawberry.ID(to_global_id(row.entity_type, row.entity_id)), diff=row.diff,
                   request_id=row.request_id, actor_id=row.actor_id)

    @strawberry.field
    async def actor(self, info: Info) -> User | None:
        return await load(info, USER, self.actor_id)  # type: ignore[no-any-return]


@strawberry.type(description="The first broken link of a workspace's audit chain.")
class AuditChainBreak:
    seq: int | None = strawberry.field(description="The event's sequence number; null when the break is at "
                                                   "the chain's end or anchor rather than at one event.")
    event_id: strawberry.ID | None = strawberry.field(description="The event's id (an AuditEvent global id).")
    reason: str


@strawberry.type(description="The result of verifying a workspace's audit hash chain (docs/audit.md).")
class AuditChainVerification:
    ok: bool
    checked: int = strawberry.field(description="Events read and checked.")
    first_seq: int | None
    last_seq: int | None
    head_seq: int = strawberry.field(description="Where the chain's head says it ends.")
    head_hash: str = strawberry.field(description="SHA-256 of the last event, hex: publish it to detect a "
                                                  "rewrite of the whole chain later.")
    anchor_seq: int = strawberry.field(description="The last event retention removed (0: none); "
                                                   "verification starts after it.")
    broken: AuditChainBreak | None


@strawberry.type(description="Deals (of every status) in one stage and one currency.")
class StageTotal:
    stage: Stage
    currency: str
    count: int
    total: Decimal
    weighted_total: Decimal = strawberry.field(description="total x stage win probability.")


@strawberry.type
class DeletePayload:
    deleted_id: strawberry.ID


@strawberry.input(description="One record of a batch delete (`deleteDeals`, ...).")
class DeleteInput:
    id: strawberry.ID
    expected_version: int | None = None


@strawberry.type
class BatchDeletePayload:
    deleted_ids: list[strawberry.ID] = strawberry.field(description="In the order given.")


@strawberry.type
class LoginPayload:
    token: str
    expires_at: dt.datetime
    user: User
    tenant: Tenant
