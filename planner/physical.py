"""The physical planner: decides *how* a logical occlusion query is computed.

It lowers an :class:`~kql.planner.logical.OcclusionQuery` to a physical operator: naive,
or incremental with a crossover (the nodes past which the changed region covers so much
of the feature map that projecting the patches into full tensors is cheaper), a device
and a batch size, each chosen by predicted cost (:mod:`.cost`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from kql.errors import KqlPlanError
from kql.operators.graph import TraceError
from kql.operators.incremental import IncrementalOcclusion
from kql.operators.layout import CONTIGUOUS
from kql.operators.naive import NaiveOcclusion
from kql.operators.precision import FLOAT32, INT8, ReducedPrecision, quantized, runs_as
from kql.operators.trial import OperatorTrial

from . import calibrate, deltas, memory, naive_shortcut, position_groups, precision
from .approximate import choose_tau, tuned_candidates, verified_candidates
from .context import PlanContext, Planning
from .crossover import CROSSOVER_FRACTIONS, crossover_candidates
from .cost import incremental_cost, naive_cost, redundancy_ratio
from .drilldown import plan_drilldown, plan_verified
from .feedback import Learner, shape_key
from .layout_file import FILE
from .logical import OcclusionQuery
from .plan import PhysicalPlan
from .tuning import Choice
from .model_passes import scored

# A more elaborate plan must be predicted this much cheaper than the simpler one before it
# is chosen: predictions carry ~20% error, and a wrong elaborate plan costs more than a
# wrong simple one (naive < incremental < incremental with an earlier crossover). Against
# naive the bar is higher: where incremental inference saves only a few layers (a model
# whose squeeze-excitation makes every later layer full), its bookkeeping eats the gain.
MARGIN = 0.95
NAIVE_MARGIN = 0.85
# A close call between naive and incremental inference: the two predictions within this
# factor of the bar between them. The scan's first batches then try both
# (:class:`~kql.operators.trial.OperatorTrial`).
CLOSE = 1.3
# A clear decision's scan is still watched (:class:`~kql.operators.trial.OperatorTrial`,
# ``upfront=False``): from this many batches on, the alternative can be probed mid-scan.
WATCH_BATCHES = 16
# Positions grouped by region size (:mod:`.position_groups`) must be predicted this much
# cheaper than one table for all: each group adds calls and a partial batch.
GROUPS_MARGIN = MARGIN
# Images up to this many pixels are not grouped: the shape-first floor that decides small
# inputs (naive_shortcut, cost.shape_incremental_floor) prices one region for all
# positions, and grouping could bring the incremental plan under that floor.
GROUPS_MIN_PIXELS = naive_shortcut.SMALL_IMAGE
# The shape-first shortcut to the plain loop is taken only while scans have not found it
# slower than priced by more than this (they correct naive and incremental alike).
SHORTCUT_SLOWER = 1.25


def plan_query(query: OcclusionQuery, ctx: PlanContext) -> PhysicalPlan:
    """Choose the operator, device and batch size for an optimized logical plan."""
    candidates = ["cuda", "cpu"] if query.device == "auto" else ["cuda" if query.device == "gpu" else "cpu"]
    plans = [_plan_on(Planning.on_device(query, ctx, device)) for device in candidates]
    best = min(plans, key=lambda p: p.predicted_seconds if p.predicted_seconds is not None else 0.0)
    # Drill-down and verified plans are priced from the table alone: trusted as it is.
    trusted = best.correction.settled or ctx.throughput(best.device).trusted
    return dataclasses.replace(best, query=scored(best.query, ctx.base_logits(best.query, best.device)),
                               trusted=trusted)


def _shape_first(p: Planning) -> Optional[PhysicalPlan]:
    """The plain loop planned from one forward pass's shapes, without a trace or views,
    where :func:`.naive_shortcut.decide` is certain of it; None otherwise."""
    found = naive_shortcut.decide(p, NAIVE_MARGIN)
    if found is None:
        return None
    fit = found.fit
    plan = PhysicalPlan(p.query, NaiveOcclusion(fit.batch, found.summary.logits), fit.batch, p.device,
                        reason=found.reason, cost=found.cost, setup_seconds=0.0,
                        batch_note=fit.note, threads=p.threads, memory_bytes=found.memory_bytes,
                        cached=("shapes",) if found.from_cache else ())
    plan = _learned(_in_precision(plan, p), p)
    if plan.correction.factor > SHORTCUT_SLOWER:
        return None            # scans found the plain loop slower than priced: cost both
    return _in_layout(plan, p)


def _plan_on(p: Planning) -> PhysicalPlan:
    # A model that cannot be traced cannot be hooked either (TorchScript): no shapes first.
    untraceable = getattr(p.query.model, "naive_reason", None)
    shortcut = None if untraceable else _shape_first(p)
    if shortcut is not None:
        return shortcut
    hit = ""
    try:
        profile, hit = p.ctx.profile(p.query, p.device)
        p = dataclasses.replace(p, profile=profile)
    except TraceError as exc:
        p = dataclasses.replace(p, reason=_quote(str(exc)))
    plan = _plan_with(p)
    return dataclasses.replace(plan, cached=((hit,) if hit else ()) + plan.cached)


def _plan_with(p: Planning) -> PhysicalPlan:
    query, ctx = p.query, p.ctx
    candidates = tuned_candidates(query, ctx) if p.profile else []
    verified = verified_candidates(query, ctx) if p.profile else []

    def single(q):
        return _single(p.of(q))

    def single_in(arithmetic):
        return lambda q: _single(dataclasses.replace(p.of(q), precision=arithmetic))
    if candidates or verified:                 # WITH SSIM: price every way to meet it
        plans, refused = [], None
        if verified and not candidates and query.drilldown is None:
            plans.append(single(query))        # the exact map (no tuning) is one way
        # Verified scans in reduced precision check their windows in float32; in float32
        # unless the session asked for a precision.
        low = precision.for_ssim(query, ctx, p.device) if verified else None
        exact_single = single_in(FLOAT32) if low is not None else single
        if low is None:
            ways = [None]
        elif ctx.precision == "auto":
            ways = [None, low]                 # float32 and reduced, priced side by side
        else:
            ways = [low]                       # the session asked for it
        for make in ([lambda c=c: _plan_choice(p, c) for c in candidates]
                     + [lambda v=v, w=w: plan_verified(query, exact_single, *v,
                                                       low=single_in(w) if w else None)
                        for v in verified for w in ways]):
            try:
                plans.append(make())
            except KqlPlanError as exc:        # no stage one on this grid, or over memory_limit
                refused = exc
        if not plans:
            raise refused
        return min(plans, key=lambda plan: plan.predicted_seconds)
    if query.drilldown is not None:
        return plan_drilldown(query, single)
    return _single(p)


def _plan_choice(p: Planning, choice: Choice) -> PhysicalPlan:
    if choice.precision is not None:           # the exact map in a precision the tuning certified
        p = dataclasses.replace(p, precision=choice.precision)
    if choice.drilldown is None:
        return _single(p, choice)
    fraction, speedup = choice.drilldown
    drilled = p.query.replace(drilldown=fraction, speedup=speedup)
    plan = plan_drilldown(drilled, lambda q: _single(p.of(q), choice))
    return dataclasses.replace(plan, query=p.query)


def _single(p: Planning, choice: Optional[Choice] = None) -> PhysicalPlan:
    plan, other, close = _single_plan(p, choice)
    plan = _in_layout(plan, p)
    least = OperatorTrial.MIN_BATCHES if close else WATCH_BATCHES
    if other is None or plan.batches < least:
        return plan                             # no alternative, or too short a scan to watch
    other = _in_layout(other, p)
    kept = None
    if close and p.ctx.cache is not None:
        q = plan.query
        kept = p.ctx.cache.kept_operator(q.model, p.device, plan.operator.name, tuple(q.image.shape),
                                         q.grid, plan.batch, other.batch, plan.threads)
    expected = (_per_item(plan), _per_item(other))
    learner = plan.learner
    if learner is not None and other.learner is not None:
        learner = dataclasses.replace(learner, expected=learner.expected + other.learner.expected)
    return dataclasses.replace(
        plan, operator=OperatorTrial(plan.operator, other.operator, kept, upfront=close,
                                     expected=expected),
        memory_bytes=max(plan.memory_bytes, other.memory_bytes), learner=learner)


def _per_item(plan: PhysicalPlan) -> float:
    """Predicted seconds per position, corrected by earlier scans."""
    return plan.cost.seconds / plan.batch * plan.correction.factor


def _learned(plan: PhysicalPlan, p: Planning) -> PhysicalPlan:
    """``plan`` with its prediction corrected by earlier scans of its shape (or of its
    operator kind, :mod:`.feedback`), and a learner that records what its scan takes.
    A prediction is trusted when the table is, or when scans of this shape corrected it."""
    table = p.throughput
    if plan.cost is None:
        return dataclasses.replace(plan, trusted=table.trusted)
    q = plan.query
    own = sorted((k, v) for k, v in plan.operator.describe().items() if k != "layout")
    shape = shape_key(plan.operator.name, q.model.structure(), tuple(q.image.shape),
                      q.grid.patch, plan.batch, plan.device, plan.threads, own)
    # Ratios belong to the table they corrected: another table (measured again) starts afresh.
    store, device = p.ctx.feedback(), f"{calibrate.device_key(plan.device)}@{table.measured_at:.0f}"
    found = store.correction(device, plan.operator.name, shape)
    learner = Learner(store, device, ((plan.operator.name, shape, plan.cost.seconds / plan.batch,
                                       plan.batch),))
    return dataclasses.replace(plan, correction=found, learner=learner,
                               trusted=table.trusted or found.settled)


def _lent(plan: PhysicalPlan, peer: PhysicalPlan) -> PhysicalPlan:
    """``plan`` corrected as ``peer`` was, where scans timed ``peer`` (this shape, or its
    kind) and nothing timed ``plan``: a busy machine slows both, and correcting one alone
    flipped the choice at every scan (and, through the kind's median, on the next model).
    With scans of its own, a peer off its prediction is the cost model's error on that
    peer: no loan."""
    if plan.cost is None or plan.correction.scans or not peer.correction.scans:
        return plan
    return dataclasses.replace(plan, correction=peer.correction.for_peer())


def _in_layout(plan: PhysicalPlan, p: Planning) -> PhysicalPlan:
    """The plan in the session's layout (:mod:`~kql.operators.layout`); 'auto' on CPU
    leaves the choice to the operator."""
    layout, device, cache = p.ctx.layout, p.device, p.ctx.cache
    if layout == "auto" and device != "cpu":
        layout = CONTIGUOUS                     # measured on CPU only
    operator = plan.operator.in_layout(layout)
    cached = plan.cached
    if layout == "auto" and cache is not None and operator.learns_layout:
        # The trial's outcome is kept for the next scan of this shape (Kept): another
        # target, colour or image, or the next image of a many-image query.
        q = plan.query
        kept = cache.kept_layout(q.model, device, operator.name, tuple(q.image.shape),
                                 plan.batch, plan.threads, device,
                                 operator.describe().get("crossover"), q.grid.patch)
        operator = operator.remembering(kept)
        if kept.found is not None:
            cached += (FILE if kept.from_lasting else "layout",)
    return dataclasses.replace(plan, operator=operator, cached=cached)


def _single_plan(p: Planning, choice: Optional[Choice] = None) -> tuple:
    """``(plan, other, close)``: the cheapest plan computing every position of the
    query's grid (at the threshold of ``choice``; by default the one the settings and the
    tuning give) within the memory limit; for an exact plan of the default strategy the
    other of naive and incremental inference (else None), and whether the two are a close
    call. Predictions are corrected by earlier scans (:func:`_learned`) before they are
    compared. :class:`~.memory.MemoryLimitError` when no plan fits."""
    strategy = p.ctx.strategy
    if p.profile is None:                      # torch.fx cannot trace it: the plain loop
        return _learned(_untraced(p), p), None, False
    try:
        naive_plan, too_big = _learned(_naive(p), p), None
    except memory.MemoryLimitError as exc:
        naive_plan, too_big = None, exc
    if strategy == "naive":
        if too_big is not None:
            raise too_big
        return dataclasses.replace(naive_plan, reason="strategy=naive"), None, False
    try:
        best = _learned(_incremental(p, naive_plan, choice), p)
        if naive_plan is not None:
            naive_plan, best = _lent(naive_plan, best), _lent(best, naive_plan)
            best = dataclasses.replace(best, naive_seconds=naive_plan.predicted_seconds)
    except memory.MemoryLimitError as exc:
        if strategy == "incremental":
            raise
        if naive_plan is None:                 # neither fits: say what the smaller one needs
            raise min(exc, too_big, key=lambda e: e.needed) from None
        needed, allowed = memory.size_text(exc.needed), memory.size_text(p.cap)
        return dataclasses.replace(naive_plan,
                                   reason=f"incremental needs {needed} > memory_limit {allowed}"), None, False
    if naive_plan is None or strategy != "auto":
        return best, None, False
    return _naive_or_incremental(p, naive_plan, best)


def _naive_or_incremental(p: Planning, naive_plan: PhysicalPlan, best: PhysicalPlan) -> tuple:
    """Two exact plans of the default strategy: ``(chosen, other, close)``; the scan is
    watched, and a close call tried."""
    ratio = best.predicted_seconds / max(naive_plan.predicted_seconds, 1e-12)
    # Trying both mixes their positions in one map: only where both compute the same one
    # (exact, or the same reduced arithmetic: not int8's plain loop beside bfloat16).
    same = p.arithmetic != INT8
    exact = best.approximation is None and p.ctx.exact_settings and p.query.drilldown is None and same
    close = exact and NAIVE_MARGIN / CLOSE < ratio < NAIVE_MARGIN * CLOSE
    if ratio > NAIVE_MARGIN:
        # The naive map is exact: a quality asked for is met at tau 1, from the same tuning.
        how = best.approximation
        tuned = None if how is None else how if how.precision else Choice(1.0, 1.0, how.source)
        return (dataclasses.replace(naive_plan, reason="incremental not predicted cheaper",
                                    approximation=tuned), best if exact else None, close)
    return best, naive_plan if exact else None, close


def _untraced(p: Planning) -> PhysicalPlan:
    """The plain loop for a model torch.fx cannot trace: no activations to price, only the
    occluded batch is held to the limit."""
    query = p.query
    per_item = memory.occluded_bytes(query.image.shape)
    fit = memory.fit(0, per_item, p.cap, p.device, query.batch or 16, query.grid.count)
    return _in_precision(PhysicalPlan(query, NaiveOcclusion(fit.batch), fit.batch, p.device,
                                      reason=p.reason, threads=p.threads,
                                      batch_note=fit.note if query.batch else "",
                                      memory_bytes=fit.batch * per_item), p)


def _naive(p: Planning) -> PhysicalPlan:
    query, profile = p.query, p.profile
    fit = memory.naive_fit(profile, p.cap, p.device, query.batch, query.grid.count)
    return _in_precision(PhysicalPlan(
        query, NaiveOcclusion(fit.batch, profile.base_logits), fit.batch, p.device,
        cost=naive_cost(profile, p.throughput, fit.batch), batch_note=fit.note,
        ratio=redundancy_ratio(profile, query.grid.patch),
        memory_bytes=memory.naive_bytes(profile, fit.batch), threads=p.threads), p)


def _incremental(p: Planning, naive_plan: Optional[PhysicalPlan], choice: Optional[Choice]) -> PhysicalPlan:
    """The cheapest incremental plan at the chosen threshold, with what EXPLAIN compares
    it to (the naive plan, the exact plan of an approximate one)."""
    choice = choice or choose_tau(p.query, p.ctx)
    tau = choice.tau if choice is not None else 1.0
    gates = p.ctx.gates
    best = _best_incremental(p, tau, gates)
    exact_seconds = None
    if tau < 1.0 or gates != "exact":
        try:
            exact_seconds = _best_incremental(p).predicted_seconds
        except memory.MemoryLimitError:
            pass                               # the exact plan does not fit: no speedup to show
    return dataclasses.replace(
        best, ratio=redundancy_ratio(p.profile, p.query.grid.patch), approximation=choice,
        naive_seconds=naive_plan.predicted_seconds if naive_plan is not None else None,
        exact_seconds=exact_seconds)


def _best_incremental(p: Planning, tau: float = 1.0, gates: str = "exact") -> PhysicalPlan:
    """The cheapest crossover's plan. Kept with the profile per query shape: another
    target or colour on the same grid is the same plan for another query. (The key has
    the memory_limit setting, not its bytes: 'auto' reads the free memory anew each time.)"""
    query, memo = p.query, p.profile.memo
    key = ("best", query.grid, tau, gates, p.ctx.crossover, query.batch, id(p.throughput),
           p.device, p.threads, p.ctx.memory_setting, p.ctx.position_groups,
           p.ctx.delta_convolutions, p.arithmetic)
    if key not in memo:
        memo[key] = (_in_precision(_cheapest_crossover(p, tau, gates), p), p.throughput)
    return dataclasses.replace(memo[key][0], query=query)


def _cheapest_crossover(p: Planning, tau: float, gates: str) -> PhysicalPlan:
    query, profile, setting = p.query, p.profile, p.ctx.crossover
    fractions = CROSSOVER_FRACTIONS if setting == "auto" else (
        (None,) if setting == "none" else (float(setting),))
    plans, too_big = [], []
    chosen = deltas.choose(profile, query.grid.positions(), query.grid.patch, p.throughput,
                           query.batch or memory.MAX_BATCH[p.device], p.ctx.delta_convolutions,
                           tau, gates)
    for steps in crossover_candidates(profile, query.grid.positions(), query.grid.patch,
                                      fractions, tau, gates, chosen):
        try:
            fit = memory.incremental_fit(profile, steps, p.cap, p.device, query.batch, query.grid.count)
        except memory.MemoryLimitError as exc:
            too_big.append(exc)
            continue
        # The views were materialized while planning: no set-up left to predict.
        plans.append(PhysicalPlan(query, IncrementalOcclusion(profile, steps, fit.batch), fit.batch,
                                  p.device, cost=incremental_cost(profile, steps, p.throughput, fit.batch),
                                  crossover=steps.crossover.fraction, batch_note=fit.note,
                                  memory_bytes=memory.incremental_bytes(profile, steps, fit.batch),
                                  threads=p.threads))
    if not plans:
        raise min(too_big, key=lambda e: e.needed)
    best = plans[0]                          # the reference: the first fraction asked for
    for plan in plans[1:]:
        bar = MARGIN if best is plans[0] else 1.0
        if plan.predicted_seconds < bar * best.predicted_seconds:
            best = plan
    return _grouped(p, best)


def _grouped(p: Planning, plan: PhysicalPlan) -> PhysicalPlan:
    """``plan`` with its positions grouped by the region they change
    (:mod:`.position_groups`) where that is predicted cheaper by the margin."""
    query, steps = p.query, plan.operator.steps
    if p.ctx.position_groups == "off" or math.prod(query.image.shape[1:]) <= GROUPS_MIN_PIXELS:
        return plan
    corners = query.grid.positions()
    found = position_groups.group(p.profile, steps, corners, p.throughput, plan.batch)
    if found is None:
        return plan
    single = position_groups.scan_seconds(p.profile, steps, p.throughput, plan.batch, len(corners[0]))
    if found.seconds >= GROUPS_MARGIN * single:
        return plan
    return dataclasses.replace(plan, operator=found.operator, cost=found.cost)


def _in_precision(plan: PhysicalPlan, p: Planning) -> PhysicalPlan:
    """``plan`` in the session's precision (:mod:`.precision`), priced from the ratio of
    float32 to it measured on the query's own model; a precision the device
    cannot run (or int8 for a model torch.ao cannot quantize) is a stated fallback."""
    chosen, note = precision.resolve(p.arithmetic, p.device)
    if chosen == FLOAT32 and not note:
        return plan
    runs = runs_as(chosen, plan.operator.plain_loop)
    if runs != chosen:                         # int8 asked of an incremental scan
        chosen, note = runs, f"{chosen}: plain loop only"
    elif chosen == INT8:
        try:
            quantized(plan.query.model.composed(), plan.query.image)
        except Exception as exc:       # torch.ao's tracer or a layer it cannot quantize
            chosen, note = FLOAT32, "int8: " + _first_line(exc)
    operator = ReducedPrecision(plan.operator, chosen, note)
    if plan.cost is None or chosen == FLOAT32:
        return dataclasses.replace(plan, operator=operator)
    # An incremental scan runs bfloat16 or float16 over windows: the model's own ratio
    # (its mix of layers) prices it.
    factor = 1.0 / precision.speedup(chosen, p.device, plan.query.model, plan.query.image,
                                     p.ctx.directory)
    return dataclasses.replace(plan, operator=operator, cost=precision.priced(plan.cost, factor))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _quote(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'
