"""The document limits every operation is validated against (requests and pushed manifests alike).

The rule classes are built once: rule classes made per request would defeat the validation cache
(STRAWBERRY.md §5).
"""

from __future__ import annotations

from strawberry.extensions.max_aliases import create_validator as alias_rule
from strawberry.extensions.query_depth_limiter import create_validator as depth_rule

MAX_DEPTH = 12
MAX_ALIASES = 30
MAX_TOKENS = 5000
LIMIT_RULES = (depth_rule(MAX_DEPTH, None, None), alias_rule(MAX_ALIASES))

MAX_BATCH = 500
"""Records one batch mutation (``createDeals``, ``updateDeals``, ...) may write; more is BAD_USER_INPUT."""
DEFAULT_GROUPS = 100
MAX_GROUPS = 1000
"""Groups one aggregate (``dealsAggregate(first:)``) returns by default and at most."""
