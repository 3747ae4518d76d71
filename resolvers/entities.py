"""The writable record types (``writes.Entity``): GraphQL name, table and event routing keys."""

from __future__ import annotations

from models.tables import (
    ACTIVITIES,
    COMPANIES,
    CONTACTS,
    DEALS,
    MEMBERSHIPS,
    NOTES,
    PIPELINES,
    STAGES,
    TENANTS,
)
from resolvers.writes import Entity

COMPANY = Entity("Company", COMPANIES)
CONTACT = Entity("Contact", CONTACTS)
PIPELINE = Entity("Pipeline", PIPELINES, scope=lambda row: {"pipeline": str(row["id"])})
STAGE = Entity("Stage", STAGES, scope=lambda row: {"pipeline": str(row["pipeline_id"])})
DEAL = Entity("Deal", DEALS, scope=lambda row: {"pipeline": str(row["pipeline_id"])})
ACTIVITY = Entity("Activity", ACTIVITIES)
MEMBERSHIP = Entity("Membership", MEMBERSHIPS)
TENANT = Entity("Tenant", TENANTS)
NOTE = Entity("Note", NOTES)
