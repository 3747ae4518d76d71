"""The one Strawberry schema: root types composed from the resolvers' classes."""

from __future__ import annotations

from typing import Any

import strawberry
from graphql import GraphQLError
from strawberry.extensions import DisableIntrospection, MaxTokensLimiter, ValidationCache
from strawberry.schema.config import StrawberryConfig
from strawberry.types.execution import ExecutionContext

from resolvers.activities import ActivityMutation, ActivityQuery
from resolvers.audit import AuditQuery
from resolvers.companies import CompanyMutation, CompanyQuery
from resolvers.contacts import ContactMutation, ContactQuery
from resolvers.deals import DealMutation, DealQuery
from resolvers.pipelines import PipelineMutation, PipelineQuery
from resolvers.viewer import ViewerMutation, ViewerQuery
from schema.extensions import MAX_TOKENS, CodedParserCache, ErrorCoding, StaticLimits, log_unexpected
from schema.types import Activity, Company, Contact, Deal, Pipeline, Stage, User


@strawberry.type
class Query(ViewerQuery, DealQuery, CompanyQuery, ContactQuery, PipelineQuery, ActivityQuery, AuditQuery):
    pass


@strawberry.type
class Mutation(ViewerMutation, DealMutation, CompanyMutation, ContactMutation, PipelineMutation, ActivityMutation):
    pass


class AtriumSchema(strawberry.Schema):
    def process_errors(self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None) -> None:
        """Log only unexpected errors (with the request id); client errors are not server faults."""
        log_unexpected(errors, execution_context)


def build_schema(*, production: bool = False) -> AtriumSchema:
    """The schema; ``production`` turns off introspection and "did you mean" suggestions."""
    extensions: list[Any] = [
        lambda: CodedParserCache(maxsize=512),
        lambda: ValidationCache(maxsize=512),
        StaticLimits,
        lambda: MaxTokensLimiter(max_token_count=MAX_TOKENS),
        ErrorCoding,
    ]
    if production:
        extensions.append(DisableIntrospection)
    return AtriumSchema(
        query=Query,
        mutation=Mutation,
        types=[Deal, Company, Contact, Pipeline, Stage, Activity, User],
        extensions=extensions,
        config=StrawberryConfig(disable_field_suggestions=production),
    )


schema = build_schema()
"""The development schema (also what ``schema.graphql`` is printed from)."""
