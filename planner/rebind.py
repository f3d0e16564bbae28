"""One plan, many images: the physical plan of a query's first image carried to the next.

For a many-image query the model is traced and the plan chosen and costed once, on the
first image. Every other image of the same size (after the model's resize) gets the same
operator, step table, batch and layout, rebound to that image's own materialized views
(:meth:`ModelProfile.for_image`: one forward pass, no trace). Its output scoring and its
classes (TARGET TOP k, PREDICTED) are settled from its own unoccluded output. An image of
another size is planned from scratch.
"""

from __future__ import annotations

import dataclasses

from .logical import OcclusionQuery
from .context import PlanContext
from .plan import PhysicalPlan
from .model_passes import scored, unoccluded_logits


def same_plan_fits(plan: PhysicalPlan, query: OcclusionQuery) -> bool:
    """Whether ``plan`` (made for another image of the query's model) can run ``query``."""
    first = plan.query
    return (first.model is query.model and tuple(first.image.shape) == tuple(query.image.shape)
            and first.grid == query.grid)


def rebound(plan: PhysicalPlan, query: OcclusionQuery, ctx: PlanContext) -> PhysicalPlan:
    """``plan`` for ``query``'s image (see :func:`same_plan_fits`)."""
    profile = None
    if ctx.cache is not None:
        profile = ctx.cache.peek(plan.query.model, plan.query.image, plan.device, "profile")
    if profile is not None:
        own = profile.for_image(query.image)
        logits = own.base_logits
    else:                                   # planned without a trace: the plain loop
        own, logits = None, unoccluded_logits(query, plan.device)
    return dataclasses.replace(plan, query=scored(query, logits), operator=plan.operator.rebind(own),
                               planning_seconds=0.0, cached=("plan",))
