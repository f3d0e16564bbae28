"""The physical planner: decides *how* a logical occlusion query is computed.

It lowers an :class:`~kql.planner.logical.OcclusionQuery` to a physical operator: naive,
or incremental with a crossover (the nodes past which the changed region covers so much
of the feature map that projecting the patches into full tensors is cheaper), a device
and a batch size, each chosen by predicted cost (:mod:`.cost`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch

from kql.errors import KqlModelError, KqlPlanError
from kql.operators.graph import TraceError
from kql.operators.incremental import IncrementalOcclusion
from kql.operators.naive import NaiveOcclusion
from kql.operators.profile import ModelProfile
from kql.operators.steps import INPUT, PURE, Crossover, StepTable, plan_steps
from kql.operators.task import OcclusionResult, OcclusionTask, Progress

from . import calibrate, devices, memory
from .approximate import choose_tau, task_of, tuned_candidates
from .cache import PlanCache
from .cost import PlanCost, incremental_cost, naive_cost, redundancy_ratio
from .drilldown import plan_drilldown
from .logical import OcclusionQuery
from .tuning import Choice

# Fraction 1: a patch that has grown to its whole feature map is handed on as a full
# tensor. It never costs more than pure incremental inference (the seed prototype's,
# ``SET crossover = 'none'``), which gathers full-sized contexts there instead, so the
# planner starts from it and only costs the earlier crossovers against it.
CROSSOVER_FRACTIONS = (1.0, 0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2)
# A more elaborate plan must be predicted this much cheaper than the simpler one before it
# is chosen: predictions carry ~20% error, and a wrong elaborate plan costs more than a
# wrong simple one (naive < incremental < incremental with an earlier crossover). Against
# naive the bar is higher: where incremental inference saves only a few layers (a model
# whose squeeze-excitation makes every later layer full), its bookkeeping eats the gain.
# EfficientNet-B0 is that case: predicted 10% cheaper, measured 0.87x and 0.96x of naive, as
# projecting its 112x112 maps into full tensors ran at half the calibrated copy rate.
MARGIN = 0.95
NAIVE_MARGIN = 0.85


@dataclass
class PlanContext:
    """What the planner may consult: session settings, the catalog directory, the machine."""

    settings: Mapping = field(default_factory=dict)     # a planner.settings.Settings
    directory: Optional[str] = None
    tuning_lookup: Optional[Callable] = None            # (model name, key) -> record dict or None
    cache: Optional[PlanCache] = None                   # the connection's plan cache

    def cuda_available(self) -> bool:
        return devices.cuda_available()

    @property
    def strategy(self) -> str:
        return str(self.settings.get("strategy", "auto"))

    @property
    def crossover(self):
        return self.settings.get("crossover", "auto")

    def profile(self, query, device: str) -> tuple:
        """``(profile, from the cache?)`` of the query's model on its image."""
        build = lambda: profile_model(query, device)
        if self.cache is None:
            return build(), False
        return self.cache.profile(query.model, query.model.name, query.image, device, build)

    def throughput(self, device: str):
        return calibrate.throughput(device, self.directory)


@dataclass(frozen=True)
class PhysicalPlan:
    query: OcclusionQuery
    operator: object
    batch: int
    device: str = "cpu"                       # torch device type: 'cpu' | 'cuda'
    reason: str = ""
    cost: Optional[PlanCost] = None           # predicted, per batch
    setup_seconds: float = 0.0                # predicted, before the first batch
    naive_seconds: Optional[float] = None     # predicted run of the naive plan (another plan's)
    planning_seconds: float = 0.0             # measured: binding, tracing, views, costing
    ratio: Optional[float] = None             # R, eqs 16-20
    crossover: Optional[float] = None         # chosen fraction, None = pure incremental (seed)
    memory_bytes: int = 0
    threads: Optional[int] = None             # CPU threads to run with (torch's at planning)
    approximation: Optional[Choice] = None    # tau and where it came from; None: exact, unasked
    stages: tuple = ()                        # drill-down: the stage-one and stage-two plans
    stage_seconds: Optional[float] = None     # drill-down: their predicted run, together
    cached: tuple = ()                        # what planning took from the plan cache
    exact_seconds: Optional[float] = None     # predicted run of the same plan at tau 1

    @property
    def batches(self) -> int:
        return -(-self.query.grid.count // self.batch)

    @property
    def run_seconds(self) -> Optional[float]:
        """The predicted run after planning: set-up and every batch (or the stages')."""
        if self.stages:
            return self.stage_seconds
        if self.cost is None:
            return None
        return self.setup_seconds + self.cost.seconds * self.batches

    @property
    def predicted_seconds(self) -> Optional[float]:
        """Planning (already spent, measured) plus the predicted run."""
        run = self.run_seconds
        return None if run is None else self.planning_seconds + run

    @property
    def naive_predicted_seconds(self) -> Optional[float]:
        return None if self.naive_seconds is None else self.planning_seconds + self.naive_seconds

    def exact(self) -> "PhysicalPlan":
        """The same plan computing the exact map (EXPLAIN ANALYZE compares the two)."""
        return dataclasses.replace(self, operator=self.operator.exact(), approximation=None)

    def task(self) -> OcclusionTask:
        return task_of(self.query, self.device)

    def run(self, progress: Progress = None, timings: Optional[dict] = None) -> OcclusionResult:
        """The heat map; with ``timings``, seconds per node where the operator has nodes."""
        with calibrate.threads(self.threads or torch.get_num_threads()):
            return self.operator.run(self.task(), progress, timings)

    def explain(self, actual: Optional[dict] = None) -> list[str]:
        from .explain import render

        return render(self, actual)


def plan_query(query: OcclusionQuery, ctx: PlanContext) -> PhysicalPlan:
    """Choose the operator, device and batch size for an optimized logical plan."""
    candidates = ["cuda", "cpu"] if query.device == "auto" else ["cuda" if query.device == "gpu" else "cpu"]
    plans = []
    for device in candidates:
        tp = ctx.throughput(device)
        threads = torch.get_num_threads() if device == "cpu" else None   # torch's, as a plain loop
        plans.append(_plan_on(query, ctx, device, tp, threads))
    return min(plans, key=lambda p: p.predicted_seconds if p.predicted_seconds is not None else 0.0)


def profile_model(query: OcclusionQuery, device: str) -> ModelProfile:
    """The model's profile on the query's image; TraceError when torch.fx cannot trace it."""
    try:
        return ModelProfile(query.model.composed(), query.image, device)
    except (RuntimeError, ValueError, TypeError) as exc:       # TraceError passes through
        detail = " ".join(str(exc).split())[:300]
        raise KqlModelError(f"model '{query.model.name}' failed on the "
                            f"{tuple(query.image.shape[1:])} image: {detail}") from None


def _plan_on(query: OcclusionQuery, ctx: PlanContext, device: str, tp, threads) -> PhysicalPlan:
    profile, reason, hit = None, "", False
    try:
        profile, hit = ctx.profile(query, device)
    except TraceError as exc:
        reason = _quote(str(exc))
    plan = _plan_with(query, ctx, device, tp, threads, profile, reason)
    return dataclasses.replace(plan, cached=("profile",) if hit else ())


def _plan_with(query, ctx, device, tp, threads, profile, reason) -> PhysicalPlan:
    candidates = tuned_candidates(query, ctx.settings, ctx.tuning_lookup) if profile else []
    if candidates:                             # WITH SSIM: price every tuned way to meet it
        plans = []
        for choice in candidates:
            try:
                plans.append(_plan_choice(query, ctx, device, tp, threads, profile, choice))
            except KqlPlanError:               # drill-down has no stage one on this grid
                continue
        return min(plans, key=lambda p: p.predicted_seconds)
    if query.drilldown is not None:
        return plan_drilldown(query, lambda q: _single(q, ctx, device, tp, threads, profile, reason))
    return _single(query, ctx, device, tp, threads, profile, reason)


def _plan_choice(query, ctx, device, tp, threads, profile, choice) -> PhysicalPlan:
    if choice.drilldown is None:
        return _single(query, ctx, device, tp, threads, profile, choice=choice)
    fraction, speedup = choice.drilldown
    drilled = query.replace(drilldown=fraction, speedup=speedup)
    plan = plan_drilldown(drilled, lambda q: _single(q, ctx, device, tp, threads, profile, choice=choice))
    return dataclasses.replace(plan, query=query)


def _single(query, ctx, device, tp, threads, profile, reason="", choice=None) -> PhysicalPlan:
    """The cheapest plan computing every position of the query's grid (at the
    threshold of ``choice``; by default the one the settings and the tuning give)."""
    if profile is None:                        # torch.fx cannot trace it: the plain loop
        batch = query.batch or 16
        return PhysicalPlan(query, NaiveOcclusion(batch), batch, device, reason=reason,
                            threads=threads)
    patch = query.grid.patch
    budget = memory.budget(device)
    naive_batch = query.batch or memory.naive_batch(profile, budget, device)
    naive_plan = PhysicalPlan(query, NaiveOcclusion(naive_batch), naive_batch, device,
                              cost=naive_cost(profile, tp, naive_batch),
                              setup_seconds=naive_cost(profile, tp, 1).seconds,   # the base logits
                              ratio=redundancy_ratio(profile, patch),
                              memory_bytes=memory.naive_bytes(profile, naive_batch), threads=threads)
    if ctx.strategy == "naive":
        return dataclasses.replace(naive_plan, reason="strategy=naive")
    choice = choice or choose_tau(query, ctx.settings, ctx.tuning_lookup)
    tau = choice.tau if choice is not None else 1.0
    gates = ctx.settings.get("gates", "exact")
    best = _best_incremental(query, ctx, profile, tp, budget, device, threads, tau, gates)
    approximate = tau < 1.0 or gates != "exact"
    exact = _best_incremental(query, ctx, profile, tp, budget, device, threads) if approximate else best
    best = dataclasses.replace(best, ratio=naive_plan.ratio, approximation=choice,
                               naive_seconds=naive_plan.predicted_seconds,
                               exact_seconds=exact.predicted_seconds if approximate else None)
    if ctx.strategy == "auto" and best.predicted_seconds > NAIVE_MARGIN * naive_plan.predicted_seconds:
        return dataclasses.replace(naive_plan, reason="incremental not predicted cheaper")
    return best


def crossover_candidates(profile, positions: tuple, patch: tuple, fractions,
                         tau: float = 1.0, gates: str = "exact") -> list:
    """``[StepTable, ...]``: the step table for patches at ``positions`` (ys, xs) under
    each crossover fraction, one per distinct policy (several fractions often cut the
    network at the same nodes); fraction None is pure incremental inference. ``tau``:
    the projective-field threshold of every table."""
    ys, xs = positions
    natural = plan_steps(profile, ys, xs, patch, Crossover(), tau, gates)
    tables, seen = [], set()
    for fraction in fractions:
        cross = crossover_at(profile, natural, fraction)
        if cross not in seen:
            seen.add(cross)
            same = cross == natural.crossover          # no node cut: the natural steps
            tables.append(dataclasses.replace(natural, crossover=cross) if same
                          else plan_steps(profile, ys, xs, patch, cross, tau, gates))
    return tables


def _best_incremental(query, ctx, profile, tp, budget, device, threads, tau=1.0,
                      gates="exact") -> PhysicalPlan:
    """The cheapest crossover's plan. Kept with the profile per query shape: another
    target or colour on the same grid is the same plan for another query."""
    key = ("best", query.grid, tau, gates, ctx.crossover, query.batch, id(tp), device, threads)
    if key not in profile.memo:
        profile.memo[key] = (_cheapest_crossover(query, ctx, profile, tp, budget, device, threads,
                                                 tau, gates), tp)
    return dataclasses.replace(profile.memo[key][0], query=query)


def _cheapest_crossover(query, ctx, profile, tp, budget, device, threads, tau, gates) -> PhysicalPlan:
    setting = ctx.crossover
    fractions = CROSSOVER_FRACTIONS if setting == "auto" else (
        (None,) if setting == "none" else (float(setting),))
    plans = []
    for steps in crossover_candidates(profile, query.grid.positions(), query.grid.patch,
                                      fractions, tau, gates):
        batch = query.batch or memory.incremental_batch(profile, steps, budget, device)
        # The views were materialized while planning: no set-up left to predict.
        plans.append(PhysicalPlan(query, IncrementalOcclusion(profile, steps, batch), batch, device,
                                  cost=incremental_cost(profile, steps, tp, batch),
                                  crossover=steps.crossover.fraction,
                                  memory_bytes=memory.incremental_bytes(profile, steps, batch),
                                  threads=threads))
    best = plans[0]                          # the reference: the first fraction asked for
    for plan in plans[1:]:
        bar = MARGIN if best is plans[0] else 1.0
        if plan.predicted_seconds < bar * best.predicted_seconds:
            best = plan
    return best


def crossover_at(profile, natural: StepTable, fraction: Optional[float]) -> Crossover:
    """The crossover before every node whose changed region (``natural``: the steps with
    the crossover at fraction 1) covers at least ``fraction`` of its feature map; None: pure."""
    if fraction is None:
        return PURE
    chosen = set()
    for step in natural:
        size = natural.changed_size(step.node)
        if size is None or step.mode == INPUT:
            continue
        h, w = profile.map_size(step.node)
        if size[0] * size[1] >= fraction * h * w:
            chosen.add(step.node)
    return Crossover(frozenset(chosen), fraction=fraction)


def _quote(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'
