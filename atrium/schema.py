"""The one Strawberry schema: root types composed from the resolvers' classes."""

from __future__ import annotations

from typing import Any

import strawberry
from graphql import GraphQLError
from strawberry.extensions import DisableIntrospection, MaxTokensLimiter, SchemaExtension, ValidationCache
from strawberry.schema.config import StrawberryConfig
from strawberry.types.execution import ExecutionContext

from partners.resolvers import PartnerMutation, PartnerQuery
from resolvers.activities import ActivityMutation, ActivityQuery
from resolvers.audit import AuditQuery
from resolvers.companies import CompanyMutation, CompanyQuery
from resolvers.contacts import ContactMutation, ContactQuery
from resolvers.deals import DealMutation, DealQuery
from resolvers.live import LiveMutation, LiveSubscription
from resolvers.notes import NoteMutation, NoteQuery
from resolvers.pipelines import PipelineMutation, PipelineQuery
from resolvers.viewer import ViewerMutation, ViewerQuery
from schema.cost import CostLimit, MeteredCostLimit
from schema.extensions import (
    MAX_TOKENS,
    CodedParserCache,
    ErrorCoding,
    OperationMetrics,
    StaticLimits,
    log_unexpected,
)
from schema.types import Activity, Company, Contact, Deal, Note, Pipeline, Stage, User


@strawberry.type
class Query(ViewerQuery, DealQuery, CompanyQuery, ContactQuery, PipelineQuery, ActivityQuery, AuditQuery,
            PartnerQuery, NoteQuery):
    pass


@strawberry.type
class Mutation(ViewerMutation, DealMutation, CompanyMutation, ContactMutation, PipelineMutation, ActivityMutation,
               PartnerMutation, NoteMutation, LiveMutation):
    pass


@strawberry.type
class Subscription(LiveSubscription):
    pass


class AtriumSchema(strawberry.Schema):
    def process_errors(self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None) -> None:
        """Log only unexpected errors (with the request id); client errors are not server faults."""
        log_unexpected(errors, execution_context)

    def get_extensions(self, sync: bool = False) -> list[SchemaExtension]:
        """Synchronous execution cannot await a meter: it gets the unmetered cost limit."""
        extensions = super().get_extensions(sync)
        return [CostLimit() if sync and isinstance(e, MeteredCostLimit) else e for e in extensions]


def build_schema(*, production: bool = False) -> AtriumSchema:
    """The schema; ``production`` turns off introspection and "did you mean" suggestions."""
    extensions: list[Any] = [
        lambda: CodedParserCache(maxsize=512),
        lambda: ValidationCache(maxsize=512),
        StaticLimits,
        lambda: MaxTokensLimiter(max_token_count=MAX_TOKENS),
        OperationMetrics,
        ErrorCoding,
        MeteredCostLimit,
    ]
    if production:
        extensions.append(DisableIntrospection)
    return AtriumSchema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        types=[Deal, Company, Contact, Pipeline, Stage, Activity, User, Note],
        extensions=extensions,
        config=StrawberryConfig(disable_field_suggestions=production),
    )


schema = build_schema()
"""The development schema (also what ``schema.graphql`` is printed from)."""
