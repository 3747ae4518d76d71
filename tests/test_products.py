"""Products and deal line items, through the API, exactly as every other record type is tested.

The rule for a deal's amount: while a deal has line items, its ``amount`` is the sum of their line
totals (``quantity x unitPrice x (1 - discountPercent / 100)``, rounded to the cent, computed by
PostgreSQL), recomputed through the write path whenever a line item is created, changed or deleted
(the deal's version bumps, it gets an audit row and a change event), so ``amountMin``/``amountMax``
and ``pipelineSummary`` see it like any amount. Meanwhile the deal's ``amount`` and ``currency``
cannot be set directly. With its last line item deleted, a deal keeps the amount and may be edited
again. A line item is in its deal's currency; its unit price defaults to the product's list price
only when that is in the same currency. Only active products can be added.

Isolation runs twice, like tests/test_isolation.py: against the deployed app and against the app
connected as the superuser (RLS off: the application's filters alone must hold).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from atrium.ops.demo import demo_password_hash, seed_tenant
from models.tables import AUDIT_EVENTS, DEAL_LINE_ITEMS, PRODUCTS, Role
from subscriptions.events import ChangeEvent, record_channel
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.crm import create_deal, create_pipeline, uuid_of

MakeTenant = Callable[..., Awaitable[TenantWorld]]

PRODUCT = "id name sku unitPrice currency active version"
CREATE_PRODUCT = f"mutation($i: ProductInput!) {{ createProduct(input: $i) {{ {PRODUCT} }} }}"
UPDATE_PRODUCT = (f"mutation($id: ID!, $i: ProductPatch!, $v: Int) {{ updateProduct(id: $id, input: $i, "
                  f"expectedVersion: $v) {{ {PRODUCT} }} }}")
DELETE_PRODUCT = "mutation($id: ID!) { deleteProduct(id: $id) { deletedId } }"
ITEM = "id quantity unitPrice discountPercent currency lineTotal version deal { id amount version } product { id }"
CREATE_ITEM = f"mutation($i: DealLineItemInput!) {{ createDealLineItem(input: $i) {{ {ITEM} }} }}"
UPDATE_ITEM = f"mutation($id: ID!, $i: DealLineItemPatch!) {{ updateDealLineItem(id: $id, input: $i) {{ {ITEM} }} }}"
DELETE_ITEM = "mutation($id: ID!) { deleteDealLineItem(id: $id) { deletedId } }"
DEAL = "query($id: ID!) { deal(id: $id) { amount currency version lineItems { id lineTotal product { sku } } } }"
UPDATE_DEAL = "mutation($id: ID!, $i: DealPatch!) { updateDeal(id: $id, input: $i) { amount currency } }"


async def product(client: httpx.AsyncClient, token: str, **values: Any) -> dict[str, Any]:
    given = {"name": "Widget", "sku": f"W-{uuid.uuid4().hex[:8]}", "unitPrice": "10.00", "currency": "USD",
             **values}
    created: dict[str, Any] = data_or_fail(await gql(client, CREATE_PRODUCT, {"i": given}, token=token))[
        "createProduct"]
    return created


async def deal(client: httpx.AsyncClient, token: str, currency: str = "USD", amount: str = "0.00") -> dict[str, Any]:
    pipeline = await create_pipeline(client, token, stages=("Open",))
    return await create_deal(client, token, pipeline["stages"][0]["id"], currency=currency, amount=amount)


async def item(client: httpx.AsyncClient, token: str, deal_id: str, product_id: str,
               **values: Any) -> dict[str, Any]:
    body = await gql(client, CREATE_ITEM, {"i": {"dealId": deal_id, "productId": product_id, "quantity": 1,
                                                  **values}}, token=token)
    created: dict[str, Any] = data_or_fail(body)["createDealLineItem"]
    return created


async def audit_actions(engine: AsyncEngine, entity_id: uuid.UUID) -> list[str]:
    async with engine.connect() as conn:
        rows = (await conn.execute(select(AUDIT_EVENTS.c.action).where(AUDIT_EVENTS.c.entity_id == entity_id)
                                   .order_by(AUDIT_EVENTS.c.occurred_at, AUDIT_EVENTS.c.id))).scalars()
        return list(rows)


# ---- products -------------------------------------------------------------------------------------

async def test_product_crud_with_versions_and_audit(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                    admin_engine: AsyncEngine) -> None:
    world = await make_tenant("prod")
    token = world.token(Role.ADMIN)
    made = await product(client, token, name="  Seat licence ", sku="SEAT-1", unitPrice="49.90", currency="eur")
    assert made | {"id": None} == {"id": None, "name": "Seat licence", "sku": "SEAT-1", "unitPrice": "49.90",
                                   "currency": "EUR", "active": True, "version": 1}
    node = data_or_fail(await gql(client, "query($id: ID!) { node(id: $id) { ... on Product { sku } } }",
                                  {"id": made["id"]}, token=token))
    assert node == {"node": {"sku": "SEAT-1"}}
    stale = await gql(client, UPDATE_PRODUCT, {"id": made["id"], "i": {"active": False}, "v": 7}, token=token)
    assert codes(stale) == ["VERSION_CONFLICT"] and stale["errors"][0]["extensions"]["current"]["sku"] == "SEAT-1"
    changed = data_or_fail(await gql(client, UPDATE_PRODUCT, {"id": made["id"], "i": {"active": False}, "v": 1},
                                     token=token))["updateProduct"]
    assert (changed["active"], changed["version"]) == (False, 2)
    assert data_or_fail(await gql(client, DELETE_PRODUCT, {"id": made["id"]}, token=token)) == {
        "deleteProduct": {"deletedId": made["id"]}}
    assert await audit_actions(admin_engine, uuid_of(made["id"])) == ["create", "update", "delete"]
    gone = await gql(client, "query($id: ID!) { product(id: $id) { id } }", {"id": made["id"]}, token=token)
    assert data_or_fail(gone) == {"product": None}


@pytest.mark.parametrize(("values", "field"), [
    ({"sku": "has space"}, "sku"),
    ({"sku": "-leading"}, "sku"),
    ({"sku": "x" * 65}, "sku"),
    ({"name": "  "}, "name"),
    ({"unitPrice": "-1"}, "unitPrice"),
    ({"unitPrice": "1.001"}, "unitPrice"),
    ({"unitPrice": "NaN"}, "unitPrice"),
    ({"currency": "XYZ"}, "currency"),
])
async def test_product_rules_name_the_field_and_write_nothing(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                              admin_engine: AsyncEngine, values: dict[str, Any],
                                                              field: str) -> None:
    world = await make_tenant("prule")
    given = {"name": "Widget", "sku": "OK-1", "unitPrice": "1.00", "currency": "USD", **values}
    body = await gql(client, CREATE_PRODUCT, {"i": given}, token=world.token(Role.MEMBER))
    assert codes(body) == ["BAD_USER_INPUT"] and body["errors"][0]["extensions"]["field"] == field
    async with admin_engine.connect() as conn:
        count = (await conn.execute(select(func.count()).select_from(PRODUCTS)
                                    .where(PRODUCTS.c.tenant_id == world.id))).scalar_one()
    assert count == 0


async def test_sku_is_unique_per_tenant_only(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    a, b = await make_tenant("sku-a"), await make_tenant("sku-b")
    first = await product(client, a.token(), sku="SAME")
    again = await gql(client, CREATE_PRODUCT, {"i": {"name": "Other", "sku": "SAME", "unitPrice": "1",
                                                     "currency": "USD"}}, token=a.token())
    assert codes(again) == ["BAD_USER_INPUT"] and again["errors"][0]["extensions"]["field"] == "sku"
    other = await product(client, a.token(), sku="OTHER")
    renamed = await gql(client, UPDATE_PRODUCT, {"id": other["id"], "i": {"sku": "SAME"}}, token=a.token())
    assert codes(renamed) == ["BAD_USER_INPUT"]
    assert (await gql(client, UPDATE_PRODUCT, {"id": first["id"], "i": {"sku": "SAME"}}, token=a.token()))[
        "data"]["updateProduct"]["version"] == 1  # unchanged: its own SKU
    assert (await product(client, b.token(), sku="SAME"))["sku"] == "SAME"  # another tenant may use it


async def test_products_connection_filters_orders_and_pages(client: httpx.AsyncClient,
                                                            make_tenant: MakeTenant) -> None:
    world = await make_tenant("plist")
    token = world.token()
    catalogue = [("Alpha", "30.00", "USD", True), ("Bravo", "10.00", "USD", True),
                 ("Charlie", "20.00", "EUR", False), ("Delta", "10.00", "USD", True)]
    for i, (name, price, currency, active) in enumerate(catalogue):
        await product(client, token, name=name, sku=f"S{i}", unitPrice=price, currency=currency, active=active)
    query = """query($f: ProductFilter, $o: ProductOrder, $first: Int, $after: String) {
      products(filter: $f, orderBy: $o, first: $first, after: $after) {
        totalCount edges { cursor node { name } } pageInfo { hasNextPage endCursor } } }"""

    async def names(**variables: Any) -> list[str]:
        page = data_or_fail(await gql(client, query, variables, token=token))["products"]
        return [e["node"]["name"] for e in page["edges"]]

    assert await names() == ["Alpha", "Bravo", "Charlie", "Delta"]
    assert await names(f={"active": True, "currency": "USD"}) == ["Alpha", "Bravo", "Delta"]
    assert await names(f={"search": "s2"}) == ["Charlie"]  # the SKU
    by_price = await names(o={"field": "UNIT_PRICE", "direction": "DESC"})
    assert by_price[:2] == ["Alpha", "Charlie"] and set(by_price[2:]) == {"Bravo", "Delta"}  # a tie: by id
    seen: list[str] = []
    after = None
    while True:  # keyset pages over equal prices: no duplicates, no gaps
        page = data_or_fail(await gql(client, query, {"o": {"field": "UNIT_PRICE"}, "first": 1, "after": after},
                                      token=token))["products"]
        seen += [e["node"]["name"] for e in page["edges"]]
        if not page["pageInfo"]["hasNextPage"]:
            break
        after = page["pageInfo"]["endCursor"]
    assert sorted(seen) == ["Alpha", "Bravo", "Charlie", "Delta"] and len(set(seen)) == 4
    bad = await gql(client, query, {"f": {"currency": "nope"}}, token=token)
    assert codes(bad) == ["BAD_USER_INPUT"] and bad["errors"][0]["extensions"]["field"] == "filter.currency"


async def test_roles_are_those_the_schema_declares(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    world = await make_tenant("prole")
    made = await product(client, world.token(Role.MEMBER))
    denied = await gql(client, CREATE_PRODUCT, {"i": {"name": "X", "sku": "X1", "unitPrice": "1", "currency": "USD"}},
                       token=world.token(Role.VIEWER))
    assert codes(denied) == ["FORBIDDEN"]
    assert codes(await gql(client, DELETE_PRODUCT, {"id": made["id"]}, token=world.token(Role.MEMBER))) == [
        "FORBIDDEN"]
    assert not (await gql(client, DELETE_PRODUCT, {"id": made["id"]}, token=world.token(Role.ADMIN))).get("errors")


# ---- line items and the deal's amount ---------------------------------------------------------------

async def test_line_items_derive_the_deal_amount(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                 admin_engine: AsyncEngine) -> None:
    world = await make_tenant("lines")
    token = world.token(Role.MEMBER)
    widget = await product(client, token, sku="W", unitPrice="19.99")
    gadget = await product(client, token, sku="G", unitPrice="5.00")
    target = await deal(client, token, amount="1000.00")
    first = await item(client, token, target["id"], widget["id"], quantity=3, discountPercent="10")
    assert (first["unitPrice"], first["currency"], first["lineTotal"]) == ("19.99", "USD", "53.97")
    assert (first["deal"]["amount"], first["deal"]["version"]) == ("53.97", 2)  # 3 x 19.99 x 0.9 = 53.973
    second = await item(client, token, target["id"], gadget["id"], quantity=2, unitPrice="4.50")
    assert (second["lineTotal"], second["deal"]["amount"]) == ("9.00", "62.97")
    changed = data_or_fail(await gql(client, UPDATE_ITEM, {"id": first["id"], "i": {"quantity": 1,
                                                                                   "discountPercent": "0"}},
                                     token=token))["updateDealLineItem"]
    assert (changed["lineTotal"], changed["deal"]["amount"]) == ("19.99", "28.99")
    shown = data_or_fail(await gql(client, DEAL, {"id": target["id"]}, token=token))["deal"]
    assert [(i["product"]["sku"], i["lineTotal"]) for i in shown["lineItems"]] == [("W", "19.99"), ("G", "9.00")]

    # While it has line items, the amount and the currency are derived: not set directly.
    for patch, field in (({"amount": "1.00"}, "amount"), ({"currency": "EUR"}, "currency")):
        refused = await gql(client, UPDATE_DEAL, {"id": target["id"], "i": patch}, token=token)
        assert codes(refused) == ["BAD_USER_INPUT"] and refused["errors"][0]["extensions"]["field"] == field
    assert not (await gql(client, UPDATE_DEAL, {"id": target["id"], "i": {"title": "Renamed"}}, token=token)).get(
        "errors")

    # Filters and the pipeline summary see the derived amount.
    found = data_or_fail(await gql(client, "{ deals(filter: {amountMin: \"28.99\", amountMax: \"28.99\"}) "
                                           "{ nodes { id } } }", token=token))
    assert [d["id"] for d in found["deals"]["nodes"]] == [target["id"]]

    # The last line item gone, the deal keeps its amount and may be edited again.
    for line in (first, second):
        assert not (await gql(client, DELETE_ITEM, {"id": line["id"]}, token=token)).get("errors")
    after = data_or_fail(await gql(client, DEAL, {"id": target["id"]}, token=token))["deal"]
    assert (after["amount"], after["lineItems"]) == ("9.00", [])
    assert data_or_fail(await gql(client, UPDATE_DEAL, {"id": target["id"], "i": {"amount": "5.00"}},
                                  token=token))["updateDeal"]["amount"] == "5.00"
    # Each recomputation went through the write path: audited like any change of the deal.
    assert (await audit_actions(admin_engine, uuid_of(target["id"]))).count("update") >= 6


async def test_pipeline_summary_follows_line_items(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    world = await make_tenant("lsum")
    token = world.token()
    pipeline = await create_pipeline(client, token, stages=("Open",))
    target = await create_deal(client, token, pipeline["stages"][0]["id"], amount="0.00")
    widget = await product(client, token, unitPrice="250.00")
    await item(client, token, target["id"], widget["id"], quantity=4)
    summary = data_or_fail(await gql(client, "query($p: ID!) { pipelineSummary(pipelineId: $p) { count total } }",
                                     {"p": pipeline["id"]}, token=token))
    assert summary == {"pipelineSummary": [{"count": 1, "total": "1000.00"}]}


async def test_line_item_rules(client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine) -> None:
    world = await make_tenant("lrule")
    token = world.token()
    usd = await product(client, token, currency="USD")
    eur = await product(client, token, currency="EUR", unitPrice="8.00")
    inactive = await product(client, token, active=False)
    target = await deal(client, token)

    async def refused(values: dict[str, Any]) -> tuple[list[str], str | None]:
        body = await gql(client, CREATE_ITEM, {"i": {"dealId": target["id"], "productId": usd["id"], "quantity": 1,
                                                     **values}}, token=token)
        return codes(body), (body.get("errors") or [{}])[0].get("extensions", {}).get("field")

    assert await refused({"quantity": 0}) == (["BAD_USER_INPUT"], "quantity")
    assert await refused({"discountPercent": "100.01"}) == (["BAD_USER_INPUT"], "discountPercent")
    assert await refused({"discountPercent": "1.234"}) == (["BAD_USER_INPUT"], "discountPercent")
    assert await refused({"unitPrice": "-0.01"}) == (["BAD_USER_INPUT"], "unitPrice")
    assert await refused({"productId": inactive["id"]}) == (["BAD_USER_INPUT"], "productId")
    assert await refused({"productId": eur["id"]}) == (["BAD_USER_INPUT"], "unitPrice")  # list price in EUR
    assert await refused({"productId": target["id"]}) == (["BAD_USER_INPUT"], "productId")  # not a Product id
    assert await refused({"dealId": usd["id"]}) == (["BAD_USER_INPUT"], "dealId")
    # A unit price in the deal's currency makes the EUR product usable on a USD deal.
    line = await item(client, token, target["id"], eur["id"], unitPrice="9.00")
    assert (line["currency"], line["lineTotal"]) == ("USD", "9.00")
    patched = await gql(client, UPDATE_ITEM, {"id": line["id"], "i": {"quantity": None}}, token=token)
    assert codes(patched) == ["BAD_USER_INPUT"] and patched["errors"][0]["extensions"]["field"] == "quantity"
    # A product on a deal cannot be deleted; deactivating it keeps the line items as they are.
    in_use = await gql(client, DELETE_PRODUCT, {"id": eur["id"]}, token=world.token(Role.ADMIN))
    assert codes(in_use) == ["BAD_USER_INPUT"]
    async with admin_engine.connect() as conn:
        lines = (await conn.execute(select(func.count()).select_from(DEAL_LINE_ITEMS)
                                    .where(DEAL_LINE_ITEMS.c.tenant_id == world.id))).scalar_one()
    assert lines == 1


async def test_deleting_a_deal_deletes_its_line_items_through_the_write_path(
        client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine) -> None:
    """Into the trash with the deal, and out of the database with it when it is purged."""
    world = await make_tenant("ldel")
    token = world.token(Role.ADMIN)
    target = await deal(client, token)
    line = await item(client, token, target["id"], (await product(client, token))["id"])
    assert not (await gql(client, "mutation($id: ID!) { deleteDeal(id: $id) { deletedId } }", {"id": target["id"]},
                          token=token)).get("errors")
    assert await audit_actions(admin_engine, uuid_of(line["id"])) == ["create", "trash"]
    assert not (await gql(client, "mutation($id: ID!) { purgeTrash(id: $id) { purged } }", {"id": target["id"]},
                          token=token)).get("errors")
    assert await audit_actions(admin_engine, uuid_of(line["id"])) == ["create", "trash", "purge"]


async def test_concurrent_line_items_sum_exactly(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    """Line items added at once to one deal: every recomputation sees the others (the deal is locked first)."""
    world = await make_tenant("lconc")
    token = world.token()
    target = await deal(client, token)
    widget = await product(client, token, unitPrice="1.00")
    await asyncio.gather(*(item(client, token, target["id"], widget["id"], quantity=n) for n in range(1, 13)))
    shown = data_or_fail(await gql(client, DEAL, {"id": target["id"]}, token=token))["deal"]
    assert Decimal(shown["amount"]) == sum(range(1, 13)) and len(shown["lineItems"]) == 12


async def test_line_item_changes_are_published_after_commit(app: Starlette, client: httpx.AsyncClient,
                                                            make_tenant: MakeTenant) -> None:
    world = await make_tenant("levt")
    token = world.token()
    target = await deal(client, token)
    widget = await product(client, token)
    broker = app.state.runtime.broker
    async with broker.subscribe(record_channel(world.id, uuid_of(target["id"]))) as queue:
        await item(client, token, target["id"], widget["id"], quantity=2)
        event = await asyncio.wait_for(queue.get(), 5)
    assert isinstance(event, ChangeEvent) and event.entity_type == "Deal" and event.fields == ("amount",)
    assert event.committed_at is not None


async def test_line_items_cost_like_any_list(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    world = await make_tenant("lcost")
    heavy = ("{ deals(first: 100) { edges { node { lineItems(first: 100) { deal { lineItems(first: 5) { id } } } } } } "
             "}")
    body = await gql(client, heavy, token=world.token())
    assert codes(body) == ["QUERY_TOO_COMPLEX"] and body["errors"][0]["extensions"]["cost"] > 50_000


async def test_demo_deals_with_line_items_are_their_total(database_url: str, admin_engine: AsyncEngine) -> None:
    """Demo data follows the rule too: a seeded deal with line items has their total as its amount."""
    tenant = await seed_tenant(database_url, f"demo-{uuid.uuid4().hex[:8]}", "Demo", deals=120, seed=7,
                               password_hash=await demo_password_hash())
    async with admin_engine.connect() as conn:
        rows = (await conn.execute(text(
            "SELECT d.amount, d.currency, sum(l.line_total) AS total, bool_and(l.currency = d.currency) AS same "
            "FROM deals d JOIN deal_line_items l ON l.tenant_id = d.tenant_id AND l.deal_id = d.id "
            "WHERE d.tenant_id = :t GROUP BY d.tenant_id, d.id"), {"t": tenant.tenant_id})).all()
    assert rows and all(r.amount == r.total and r.same for r in rows)


# ---- isolation ------------------------------------------------------------------------------------

async def test_another_tenant_never_reaches_products_or_line_items(either_client: httpx.AsyncClient,
                                                                   make_tenant: MakeTenant,
                                                                   admin_engine: AsyncEngine) -> None:
    client = either_client
    a, b = await make_tenant("piso-a"), await make_tenant("piso-b")
    tag = f"secret{uuid.uuid4().hex[:8]}"
    own = await product(client, a.token(), name=f"Product {tag}", sku=tag)
    own_deal = await deal(client, a.token())
    own_line = await item(client, a.token(), own_deal["id"], own["id"])
    b_deal = await deal(client, b.token())
    b_product = await product(client, b.token())

    reads = [
        ("query($id: ID!) { product(id: $id) { name } }", {"id": own["id"]}, "product"),
        ("query($id: ID!) { dealLineItem(id: $id) { lineTotal } }", {"id": own_line["id"]}, "dealLineItem"),
        ("query($id: ID!) { node(id: $id) { id } }", {"id": own["id"]}, "node"),
        ("query($id: ID!) { node(id: $id) { id } }", {"id": own_line["id"]}, "node"),
    ]
    for query, variables, field in reads:
        assert data_or_fail(await gql(client, query, variables, token=a.token()))[field] is not None
        assert data_or_fail(await gql(client, query, variables, token=b.token()))[field] is None
    lists = await gql(client, f'{{ products(filter: {{search: "{tag}"}}) {{ totalCount }} '
                              f'dealLineItems(filter: {{dealId: "{own_deal["id"]}"}}) {{ totalCount }} }}',
                      token=b.token())
    assert data_or_fail(lists) == {"products": {"totalCount": 0}, "dealLineItems": {"totalCount": 0}}
    assert tag not in json.dumps(await gql(client, "{ products { nodes { name sku } } }", token=b.token()))

    # Writes naming A's records: NOT_FOUND, nothing written anywhere.
    attempts = [
        (CREATE_ITEM, {"i": {"dealId": b_deal["id"], "productId": own["id"], "quantity": 1}}, "productId"),
        (CREATE_ITEM, {"i": {"dealId": own_deal["id"], "productId": b_product["id"], "quantity": 1}}, "dealId"),
        (UPDATE_PRODUCT, {"id": own["id"], "i": {"name": "Stolen"}}, "id"),
        (DELETE_PRODUCT, {"id": own["id"]}, "id"),
        (UPDATE_ITEM, {"id": own_line["id"], "i": {"quantity": 9}}, "id"),
        (DELETE_ITEM, {"id": own_line["id"]}, "id"),
    ]
    for document, variables, field in attempts:
        body = await gql(client, document, variables, token=b.token(Role.OWNER))
        assert codes(body) == ["NOT_FOUND"] and body["errors"][0]["extensions"]["field"] == field, body
    async with admin_engine.connect() as conn:
        row = (await conn.execute(select(PRODUCTS.c.name, PRODUCTS.c.version)
                                  .where(PRODUCTS.c.id == uuid_of(own["id"])))).one()
        b_lines = (await conn.execute(select(func.count()).select_from(DEAL_LINE_ITEMS)
                                      .where(DEAL_LINE_ITEMS.c.tenant_id == b.id))).scalar_one()
    assert (row.name, row.version, b_lines) == (f"Product {tag}", 1, 0)
    shown = data_or_fail(await gql(client, DEAL, {"id": own_deal["id"]}, token=a.token()))["deal"]
    assert [line["id"] for line in shown["lineItems"]] == [own_line["id"]]
