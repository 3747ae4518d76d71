"""The one Strawberry schema: root types composed from the records' derived fields and the resolvers."""

from __future__ import annotations

from typing import Any

import strawberry
from graphql import GraphQLError
from strawberry.extensions import DisableIntrospection, MaxTokensLimiter, SchemaExtension, ValidationCache
from strawberry.schema.config import StrawberryConfig
from strawberry.types.execution import ExecutionContext
from strawberry.types.execution import ExecutionResult as StrawberryResult

from auth.session import Context
from core.limits import MAX_TOKENS
from partners.resolvers import PartnerMutation, PartnerQuery
from planner.execution import PlanCache, PlannedQueries, answer_prepared
from planner.plan import Planner
from records.crm import ACTIVITY, COMPANY, CONTACT, DEAL, DEAL_LINE_ITEM, PIPELINE, PRODUCT, STAGE
from resolvers.audit import AuditQuery
from resolvers.crud import batch_mutations, mutations, queries
from resolvers.custom_fields import CustomFieldMutation, CustomFieldQuery
from resolvers.deals import DealMutation, DealQuery
from resolvers.erasure import ErasureMutation
from resolvers.exports import ExportMutation, ExportQuery
from resolvers.field_rules import FieldRuleMutation, FieldRuleQuery
from resolvers.imports import ImportMutation, ImportQuery, ImportSubscription
from resolvers.live import LiveMutation, LiveSubscription
from resolvers.notes import NoteMutation, NoteQuery
from resolvers.teams import TeamMutation, TeamQuery
from resolvers.trash import TrashMutation, TrashQuery
from resolvers.viewer import ViewerMutation, ViewerQuery
from schema.cost import CostLimit, MeteredCostLimit
from schema.crm import Activity, Company, Contact, Deal, DealLineItem, Pipeline, Product, Stage, User
from schema.custom_fields import CUSTOM_VALUE_TYPES
from schema.extensions import (
    CodedParserCache,
    CodedValueChecks,
    ErrorCoding,
    OperationMetrics,
    StaticLimits,
    log_unexpected,
)
from schema.notes import Note
from schema.teams import Team, TeamMember
from schema.values import SCALARS
from webhooks.resolvers import WebhookMutation, WebhookQuery


def root(name: str, *parts: type) -> type:
    """A root type holding the fields of ``parts``, in order (each part a Strawberry type)."""
    return strawberry.type(type(name, parts, {}))


Query = root("Query", ViewerQuery, DealQuery, queries(COMPANY), queries(CONTACT), queries(PIPELINE), queries(ACTIVITY),
             AuditQuery, PartnerQuery, NoteQuery, queries(PRODUCT), queries(DEAL_LINE_ITEM), WebhookQuery,
             ExportQuery, TrashQuery, FieldRuleQuery, TeamQuery, CustomFieldQuery, ImportQuery)
Mutation = root("Mutation", ViewerMutation, DealMutation, batch_mutations(DEAL), mutations(COMPANY),
                mutations(CONTACT), mutations(PIPELINE), mutations(STAGE), mutations(ACTIVITY), PartnerMutation,
                NoteMutation, LiveMutation, mutations(PRODUCT), mutations(DEAL_LINE_ITEM), WebhookMutation,
                ExportMutation, ErasureMutation, TrashMutation, FieldRuleMutation, TeamMutation, CustomFieldMutation,
                ImportMutation)
Subscription = root("Subscription", LiveSubscription, ImportSubscription)


class AtriumSchema(strawberry.Schema):
    plans: PlanCache
    """The plans of this schema's queries (``planner``)."""

    def process_errors(self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None) -> None:
        """Log only unexpected errors (with the request id); client errors are not server faults."""
        log_unexpected(errors, execution_context)

    async def answer_prepared(self, context: Context, query: str, operation_name: str | None,
                              variables: dict[str, Any] | None) -> StrawberryResult | None:
        """A query its plan answered wholly before, answered again without the pipeline
        (``planner.execution.answer_prepared``), or None."""
        result = await answer_prepared(self._schema, self.plans, context, query, operation_name, variables)
        return None if result is None else StrawberryResult(data=result.data, errors=result.errors)

    def get_extensions(self, sync: bool = False) -> list[SchemaExtension]:
        """Synchronous execution cannot await a meter: it gets the unmetered cost limit."""
        extensions = super().get_extensions(sync)
        return [CostLimit() if sync and isinstance(e, MeteredCostLimit) else e for e in extensions]


def build_schema(*, production: bool = False) -> AtriumSchema:
    """The schema; ``production`` turns off introspection and "did you mean" suggestions."""
    extensions: list[Any] = [
        lambda: CodedParserCache(maxsize=512),
        CodedValueChecks,
        lambda: ValidationCache(maxsize=512),
        StaticLimits,
        lambda: MaxTokensLimiter(max_token_count=MAX_TOKENS),
        OperationMetrics,
        ErrorCoding,
        MeteredCostLimit,
        PlannedQueries,  # last: runs once the operation is admitted and charged
    ]
    if production:
        extensions.append(DisableIntrospection)
    built = AtriumSchema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        types=[Deal, Company, Contact, Pipeline, Stage, Activity, User, Note, Product, DealLineItem, Team, TeamMember,
               *CUSTOM_VALUE_TYPES],
        extensions=extensions,
        config=StrawberryConfig(disable_field_suggestions=production),
        scalar_overrides=SCALARS,
    )
    built.plans = PlanCache(Planner(built._schema, {"Query": Query}, built.config.name_converter))
    return built


schema = build_schema()
"""The development schema (also what ``schema.graphql`` is printed from)."""
