"""Input, patch, filter and order types. Validation raises ``BadUserInput`` naming the field.

``Input.values()`` returns validated column values for an insert; ``Patch.changes()`` returns only
the fields the caller set (``null`` clears a nullable field); ids are decoded and type-checked.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
import uuid
from decimal import Decimal
from typing import Any

import strawberry
from strawberry.types.unset import UNSET

from core.errors import BadUserInput
from core.ids import decode_id
from models.tables import ActivityKind, DealStatus, Role
from schema.currencies import ISO_4217
from schema.enums import OrderDirection

LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
EMAIL = re.compile(rf"^[^@\s]{{1,64}}@{LABEL}(?:\.{LABEL})+$")
DOMAIN = re.compile(rf"^(?=.{{1,253}}$){LABEL}(?:\.{LABEL})+$")
MAX_AMOUNT = Decimal("9999999999999999.99")


def text(field: str, value: str, max_length: int) -> str:
    """A required text: stripped, non-empty, at most ``max_length`` characters, no NUL."""
    value = value.strip()
    if "\x00" in value:
        raise BadUserInput(field, "must not contain NUL characters")
    if not value:
        raise BadUserInput(field, "must not be empty")
    if len(value) > max_length:
        raise BadUserInput(field, f"must be at most {max_length} characters")
    return value


def optional_text(field: str, value: str | None, max_length: int) -> str | None:
    if value is None or not value.strip():
        return None
    return text(field, value, max_length)


def email(field: str, value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    value = value.strip()
    if "\x00" in value or len(value) > 320 or not EMAIL.match(value):
        raise BadUserInput(field, "must be an email address")
    return value


def domain(field: str, value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    value = value.strip().lower()
    if not DOMAIN.match(value):
        raise BadUserInput(field, "must be a domain name such as example.com")
    return value


def amount(field: str, value: Decimal) -> Decimal:
    if not value.is_finite():
        raise BadUserInput(field, "must be a number")
    if value < 0:
        raise BadUserInput(field, "must not be negative")
    if value > MAX_AMOUNT:
        raise BadUserInput(field, f"must be at most {MAX_AMOUNT}")
    if value != value.quantize(Decimal("0.01")):
        raise BadUserInput(field, "must have at most 2 decimal places")
    return value.quantize(Decimal("0.01"))


def currency(field: str, value: str) -> str:
    code = value.strip().upper()
    if code not in ISO_4217:
        raise BadUserInput(field, "must be an ISO 4217 currency code such as USD")
    return code


def probability(field: str, value: Decimal) -> Decimal:
    if not value.is_finite() or not Decimal(0) <= value <= Decimal(1):
        raise BadUserInput(field, "must be between 0 and 1")
    if value != value.quantize(Decimal("0.0001")):
        raise BadUserInput(field, "must have at most 4 decimal places")
    return value


def ref(field: str, value: strawberry.ID | None, type_name: str) -> uuid.UUID | None:
    return None if value is None else decode_id(value, type_name, field=field)


def set_fields(obj: object) -> dict[str, Any]:
    """The attributes of a patch that the caller set (UNSET ones left out)."""
    return {k: v for k, v in vars(obj).items() if v is not UNSET}


# ---- companies -----------------------------------------------------------------------------------

@strawberry.input
class CompanyInput:
    name: str
    domain: str | None = None

    def values(self) -> dict[str, Any]:
        return {"name": text("name", self.name, 200), "domain": domain("domain", self.domain)}


@strawberry.input
class CompanyPatch:
    name: str | None = UNSET
    domain: str | None = UNSET

    def changes(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in set_fields(self).items():
            if key == "name":
                out["name"] = text("name", value or "", 200)
            else:
                out["domain"] = domain("domain", value)
        return out


# ---- contacts ------------------------------------------------------------------------------------

@strawberry.input
class ContactInput:
    first_name: str
    last_name: str
    email: str | None = None
    phone: str | None = None
    title: str | None = None
    company_id: strawberry.ID | None = None

    def values(self) -> dict[str, Any]:
        return {
            "first_name": text("firstName", self.first_name, 100),
            "last_name": text("lastName", self.last_name, 100),
            "email": email("email", self.email),
            "phone": optional_text("phone", self.phone, 40),
            "title": optional_text("title", self.title, 200),
            "company_id": ref("companyId", self.company_id, "Company"),
        }


@strawberry.input
class ContactPatch:
    first_name: str | None = UNSET
    last_name: str | None = UNSET
    email: str | None = UNSET
    phone: str | None = UNSET
    title: str | None = UNSET
    company_id: strawberry.ID | None = UNSET

    def changes(self) -> dict[str, Any]:
        rules = {
            "first_name": lambda v: text("firstName", v or "", 100),
            "last_name": lambda v: text("lastName", v or "", 100),
            "email": lambda v: email("email", v),
            "phone": lambda v: optional_text("phone", v, 40),
            "title": lambda v: optional_text("title", v, 200),
            "company_id": lambda v: ref("companyId", v, "Company"),
        }
        return {key: rules[key](value) for key, value in set_fields(self).items()}


# ---- pipelines and stages ------------------------------------------------------------------------

@strawberry.input
class StageInput:
    name: str
    probability: Decimal
    position: int | None = strawberry.field(default=None, description="Defaults to after the last stage.")

    def values(self, field: str = "") -> dict[str, Any]:
        out = {"name": text(f"{field}name", self.name, 100),
               "probability": probability(f"{field}probability", self.probability)}
        if self.position is not None:
            if self.position < 0:
                raise BadUserInput(f"{field}position", "must not be negative")
            out["position"] = self.position
        return out


@strawberry.input
class StagePatch:
    name: str | None = UNSET
    probability: Decimal | None = UNSET
    position: int | None = UNSET

    def changes(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in set_fields(self).items():
            if value is None:
                raise BadUserInput(key, "must not be null")
            if key == "name":
                out[key] = text("name", value, 100)
            elif key == "probability":
                out[key] = probability("probability", value)
            else:
                if value < 0:
                    raise BadUserInput("position", "must not be negative")
                out[key] = value
        return out


@strawberry.input
class PipelineInput:
    name: str
    stages: list[StageInput] = strawberry.field(default_factory=list)

    def values(self) -> dict[str, Any]:
        if len(self.stages) > 50:
            raise BadUserInput("stages", "at most 50 stages")
        return {"name": text("name", self.name, 200)}


@strawberry.input
class PipelinePatch:
    name: str | None = UNSET

    def changes(self) -> dict[str, Any]:
        fields = set_fields(self)
        return {"name": text("name", fields["name"] or "", 200)} if "name" in fields else {}


# ---- deals ---------------------------------------------------------------------------------------

@strawberry.input
class DealInput:
    title: str
    amount: Decimal
    currency: str
    stage_id: strawberry.ID
    company_id: strawberry.ID | None = None
    contact_id: strawberry.ID | None = None
    owner_id: strawberry.ID | None = strawberry.field(default=None, description="Defaults to the caller.")
    expected_close_date: dt.date | None = None

    def values(self) -> dict[str, Any]:
        return {
            "title": text("title", self.title, 200),
            "amount": amount("amount", self.amount),
            "currency": currency("currency", self.currency),
            "stage_id": decode_id(self.stage_id, "Stage", field="stageId"),
            "company_id": ref("companyId", self.company_id, "Company"),
            "contact_id": ref("contactId", self.contact_id, "Contact"),
            "owner_id": ref("ownerId", self.owner_id, "User"),
            "expected_close_date": self.expected_close_date,
        }


@strawberry.input
class DealPatch:
    title: str | None = UNSET
    amount: Decimal | None = UNSET
    currency: str | None = UNSET
    company_id: strawberry.ID | None = UNSET
    contact_id: strawberry.ID | None = UNSET
    owner_id: strawberry.ID | None = UNSET
    expected_close_date: dt.date | None = UNSET
    status: DealStatus | None = UNSET

    def changes(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in set_fields(self).items():
            if value is None and key in ("title", "amount", "currency", "status"):
                raise BadUserInput(key, "must not be null")
            if key == "title":
                out[key] = text("title", value, 200)
            elif key == "amount":
                out[key] = amount("amount", value)
            elif key == "currency":
                out[key] = currency("currency", value)
            elif key == "status":
                out[key] = DealStatus(value).value
            elif key in ("company_id", "contact_id", "owner_id"):
                camel = {"company_id": "companyId", "contact_id": "contactId", "owner_id": "ownerId"}[key]
                out[key] = ref(camel, value, {"company_id": "Company", "contact_id": "Contact",
                                              "owner_id": "User"}[key])
            else:
                out[key] = value
        return out


# ---- activities ----------------------------------------------------------------------------------

@strawberry.input
class ActivityInput:
    kind: ActivityKind
    subject: str
    body: str | None = None
    deal_id: strawberry.ID | None = None
    contact_id: strawberry.ID | None = None
    company_id: strawberry.ID | None = None
    occurred_at: dt.datetime | None = strawberry.field(default=None, description="Defaults to now.")
    due_date: dt.date | None = None
    done: bool = False

    def values(self) -> dict[str, Any]:
        out = {
            "kind": ActivityKind(self.kind).value,
            "subject": text("subject", self.subject, 200),
            "body": optional_text("body", self.body, 20_000),
            "deal_id": ref("dealId", self.deal_id, "Deal"),
            "contact_id": ref("contactId", self.contact_id, "Contact"),
            "company_id": ref("companyId", self.company_id, "Company"),
            "due_date": self.due_date,
            "done": self.done,
        }
        if out["deal_id"] is None and out["contact_id"] is None and out["company_id"] is None:
            raise BadUserInput("dealId", "an activity needs a dealId, contactId or companyId")
        if self.due_date is not None and self.kind != ActivityKind.TASK:
            raise BadUserInput("dueDate", "only tasks have a due date")
        if self.occurred_at is not None:
            out["occurred_at"] = utc("occurredAt", self.occurred_at)
        return out


@strawberry.input
class ActivityPatch:
    subject: str | None = UNSET
    body: str | None = UNSET
    occurred_at: dt.datetime | None = UNSET
    due_date: dt.date | None = UNSET
    done: bool | None = UNSET

    def changes(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in set_fields(self).items():
            if value is None and key in ("subject", "occurred_at", "done"):
                raise BadUserInput({"occurred_at": "occurredAt"}.get(key, key), "must not be null")
            if key == "subject":
                out[key] = text("subject", value, 200)
            elif key == "body":
                out[key] = optional_text("body", value, 20_000)
            elif key == "occurred_at":
                out[key] = utc("occurredAt", value)
            else:
                out[key] = value
        return out


def utc(field: str, value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        raise BadUserInput(field, "must include a time zone offset")
    return value.astimezone(dt.UTC)


# ---- members -------------------------------------------------------------------------------------

@strawberry.input
class MemberInput:
    email: str
    name: str
    role: Role
    password: str | None = strawberry.field(default=None, description="Lets the user sign in with login().")

    def values(self) -> dict[str, Any]:
        address = email("email", self.email)
        if address is None:
            raise BadUserInput("email", "must not be empty")
        if self.password is not None and not 12 <= len(self.password) <= 200:
            raise BadUserInput("password", "must be 12 to 200 characters")
        return {"email": address, "name": text("name", self.name, 200), "role": Role(self.role),
                "password": self.password}


# ---- filters and orderings -----------------------------------------------------------------------

@strawberry.input
class DealFilter:
    pipeline_id: strawberry.ID | None = None
    stage_id: strawberry.ID | None = None
    owner_id: strawberry.ID | None = None
    company_id: strawberry.ID | None = None
    contact_id: strawberry.ID | None = None
    status: list[DealStatus] | None = None
    amount_min: Decimal | None = None
    amount_max: Decimal | None = None
    currency: str | None = None
    close_date_from: dt.date | None = None
    close_date_to: dt.date | None = None
    search: str | None = strawberry.field(
        default=None, description="Matches the title, the company's name and the contact's name and email.")


@strawberry.input
class CompanyFilter:
    search: str | None = strawberry.field(default=None, description="Matches name and domain.")


@strawberry.input
class ContactFilter:
    company_id: strawberry.ID | None = None
    search: str | None = strawberry.field(default=None, description="Matches names and email.")


@strawberry.input
class ActivityFilter:
    kind: list[ActivityKind] | None = None
    deal_id: strawberry.ID | None = None
    contact_id: strawberry.ID | None = None
    company_id: strawberry.ID | None = None
    done: bool | None = None
    due_before: dt.date | None = None


@strawberry.enum
class DealOrderField(enum.Enum):
    CREATED_AT = "created_at"
    UPDATED_AT = "updated_at"
    AMOUNT = "amount"
    TITLE = "title"
    EXPECTED_CLOSE_DATE = "expected_close_date"


@strawberry.input
class DealOrder:
    field: DealOrderField = DealOrderField.CREATED_AT
    direction: OrderDirection = OrderDirection.DESC


@strawberry.enum
class CompanyOrderField(enum.Enum):
    NAME = "name"
    CREATED_AT = "created_at"


@strawberry.input
class CompanyOrder:
    field: CompanyOrderField = CompanyOrderField.NAME
    direction: OrderDirection = OrderDirection.ASC


@strawberry.enum
class ContactOrderField(enum.Enum):
    LAST_NAME = "last_name"
    CREATED_AT = "created_at"


@strawberry.input
class ContactOrder:
    field: ContactOrderField = ContactOrderField.LAST_NAME
    direction: OrderDirection = OrderDirection.ASC


@strawberry.enum
class ActivityOrderField(enum.Enum):
    OCCURRED_AT = "occurred_at"


@strawberry.input
class ActivityOrder:
    field: ActivityOrderField = ActivityOrderField.OCCURRED_AT
    direction: OrderDirection = OrderDirection.DESC
