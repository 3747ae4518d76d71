"""Products and deal line items.

Frozen: this revision spells out its DDL and imports nothing from the application.

- ``products``: a tenant's catalogue; ``sku`` unique per tenant; list price and currency.
- ``deal_line_items``: a product on a deal (composite foreign keys keep both in the tenant), with
  quantity, unit price (in the deal's currency, copied from the deal), discount percent and the line
  total as a stored generated column, so the database is the one place that computes it. Deleting
  a deal deletes its line items (the application does it first, through its write path); a product
  on any line item cannot be deleted.

Revision ID: 0004_products
Revises: 0003_partners
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0004_products"
down_revision = "0003_partners"
branch_labels = None
depends_on = None

APP_ROLE = "atrium_app"
CURRENT_TENANT = "(SELECT NULLIF(current_setting('app.tenant_id', true), '')::uuid)"

TENANT_TABLES = ("products", "deal_line_items")

SCHEMA = """
CREATE TABLE products (
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id         uuid NOT NULL,
    name       varchar(200) NOT NULL,
    sku        varchar(64) NOT NULL,
    unit_price numeric(18, 2) NOT NULL,
    currency   char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    active     boolean NOT NULL DEFAULT true,
    version    integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT products_sku_key UNIQUE (tenant_id, sku),
    CONSTRAINT products_unit_price_non_negative CHECK (unit_price >= 0)
);
CREATE INDEX products_name_idx ON products (tenant_id, name, id);
CREATE INDEX products_created_idx ON products (tenant_id, created_at, id);
CREATE INDEX products_unit_price_idx ON products (tenant_id, unit_price, id);

CREATE TABLE deal_line_items (
    tenant_id        uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id               uuid NOT NULL,
    deal_id          uuid NOT NULL,
    product_id       uuid NOT NULL,
    quantity         integer NOT NULL,
    unit_price       numeric(18, 2) NOT NULL CHECK (unit_price >= 0),
    discount_percent numeric(5, 2) NOT NULL DEFAULT 0,
    currency         char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    line_total       numeric(18, 2) GENERATED ALWAYS AS (round(quantity * unit_price * (100 - discount_percent) / 100, 2)) STORED,
    version          integer NOT NULL DEFAULT 1,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, deal_id) REFERENCES deals (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, product_id) REFERENCES products (tenant_id, id),
    CONSTRAINT deal_line_items_quantity_positive CHECK (quantity > 0),
    CONSTRAINT deal_line_items_discount_range CHECK (discount_percent >= 0 AND discount_percent <= 100)
);
CREATE INDEX deal_line_items_deal_idx ON deal_line_items (tenant_id, deal_id, created_at, id);
CREATE INDEX deal_line_items_product_idx ON deal_line_items (tenant_id, product_id);
CREATE INDEX deal_line_items_created_idx ON deal_line_items (tenant_id, created_at, id)
"""


def upgrade() -> None:
    # asyncpg runs one statement per call.
    for statement in SCHEMA.split(";\n"):
        if statement.strip():
            op.execute(statement)
    for name in TENANT_TABLES:
        op.execute(f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY tenant_isolation ON {name} TO {APP_ROLE} "
            f"USING (tenant_id = {CURRENT_TENANT}) WITH CHECK (tenant_id = {CURRENT_TENANT})"
        )
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {name} TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DROP TABLE deal_line_items")
    op.execute("DROP TABLE products")
