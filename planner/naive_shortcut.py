"""Cheap decisions first: when one forward pass's shapes already say the plain loop.

Before the physical planner pays for a torch.fx trace and the materialized views, it can
run the model once with module hooks (:mod:`kql.operators.shapes`) and decide from that
pass alone. :func:`decide` says when that is certain; the planner then builds the naive
plan from what it found, reusing the pass's logits.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Optional

from kql.operators.shapes import ShapeSummary, may_have_gate

from . import memory
from .cost import PlanCost, shape_incremental_floor, shape_naive_cost, shape_ratio_bound

LARGE_IMAGE = 1 << 20      # pixels; above it the views are sized before they are built
# Pixels; up to it (112x112 and 64-160 px inputs alike) the incremental plan is first
# priced from the shapes, as its trace and views can cost as much as the whole scan.
SMALL_IMAGE = 160 * 160


@dataclass(frozen=True)
class NaiveFromShapes:
    """Why the plain loop, and what its plan needs: the pass, its batch, its price."""

    reason: str
    summary: ShapeSummary
    from_cache: bool
    fit: memory.Fit
    cost: PlanCost          # per batch
    memory_bytes: int


def decide(p, margin: float) -> Optional[NaiveFromShapes]:
    """The plain loop from the shapes (a) when a global gate early in the network caps
    what exact incremental inference could save below what it must save to be chosen
    (``margin``), for the exact plan of the default strategy; (b) for that plan too, when
    the image is small and even a low estimate of the incremental plan's run
    (:func:`~.cost.shape_incremental_floor`) is not that much cheaper than the plain loop;
    (c) when the image is large and its materialized views would not fit the memory limit
    (building them could exhaust the machine), for any exact query (SET strategy =
    'incremental' is then refused). None when none of them is certain. ``p``: the
    :class:`~.context.Planning` of the query on its device."""
    query, ctx, device, tp = p.query, p.ctx, p.device, p.throughput
    plain = query.ssim is None and query.drilldown is None
    default = plain and ctx.exact_settings and ctx.strategy == "auto"
    gated = default and may_have_gate(query.model.composed())
    pixels = math.prod(query.image.shape[1:])           # a volume's voxels
    small = default and pixels <= SMALL_IMAGE
    large = plain and pixels > LARGE_IMAGE
    if not (gated or small or large):
        return None
    summary, hit = ctx.shapes(query, device)
    cap = p.cap
    views = 2 * summary.activation_bytes                  # the views and their padded copies
    per_item = 3 * summary.peak_bytes + memory.occluded_bytes(query.image.shape)

    def fit():
        return memory.fit(0, per_item, cap, device, query.batch, query.grid.count, "the naive plan")
    fitted = cost = None
    if large and views > cap:
        if ctx.strategy == "incremental":
            raise memory.MemoryLimitError(
                f"the incremental plan needs its materialized views, {memory.size_text(views)}, "
                f"but memory_limit is {memory.size_text(cap)}; occlude a smaller image", views)
        reason = (f"materialized views would need {memory.size_text(views)} > memory_limit "
                  f"{memory.size_text(cap)} (planned without tracing)")
    elif gated and (bound := shape_ratio_bound(summary, tp, tp.batch)) * margin < 1.0:
        reason = (f"global gate {summary.gate} caps incremental at {bound:.2f}x "
                  f"(planned without tracing)")
    elif small:
        try:
            fitted = fit()
        except memory.MemoryLimitError:         # the full planner says what fits
            return None
        batches = -(-query.grid.count // fitted.batch)
        cost = shape_naive_cost(summary, tp, fitted.batch, query.image.shape)
        naive = cost.seconds * batches
        floor = shape_incremental_floor(summary, query.grid.patch, tp, fitted.batch)
        if floor is None:
            return None
        floor = floor * batches + summary.seconds    # the views alone are one more forward pass
        if floor <= margin * naive:
            return None
        reason = (f"small input: incremental at least {floor:.2f}s against naive {naive:.2f}s "
                  f"(planned without tracing)")
    else:
        return None
    fitted = fitted or fit()
    cost = cost or shape_naive_cost(summary, tp, fitted.batch, query.image.shape)
    return NaiveFromShapes(reason, summary, hit, fitted, cost, fitted.batch * per_item)
