"""Webhook deliveries keep the W3C ``traceparent`` of the change that wrote them.

The dispatcher sends it with every attempt, so a receiver's trace continues the one of the request
that made the change (issue 12, OpenTelemetry). Null when the change was not traced.

Frozen: this revision spells out its DDL and imports nothing from the application.
"""

from __future__ import annotations

from alembic import op

revision = "0013_webhook_traceparent"
down_revision = "0012_trash"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE webhook_deliveries ADD COLUMN traceparent text")


def downgrade() -> None:
    op.execute("ALTER TABLE webhook_deliveries DROP COLUMN traceparent")
