"""The physical planner: decides *how* a logical occlusion query is computed.

It lowers an :class:`~kql.planner.logical.OcclusionQuery` to a physical operator: naive,
or incremental with a crossover (the nodes past which the changed region covers so much
of the feature map that projecting the patches into full tensors is cheaper), a device
and a batch size, each chosen by predicted cost (:mod:`.cost`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch

from kql.errors import KqlPlanError
from kql.operators.graph import TraceError
from kql.operators.incremental import IncrementalOcclusion
from kql.operators.layout import CONTIGUOUS
from kql.operators.naive import NaiveOcclusion
from kql.operators.pacing import paced
from kql.operators.steps import INPUT, PURE, Crossover, StepTable, plan_steps
from kql.operators.task import OcclusionResult, OcclusionTask, Progress
from kql.operators.trial import OperatorTrial

from . import calibrate, devices, memory, shape_first
from .approximate import choose_tau, task_of, tuned_candidates, verified_candidates
from .cache import PlanCache
from .cost import PlanCost, incremental_cost, naive_cost, redundancy_ratio
from .drilldown import plan_drilldown, plan_verified
from .feedback import Correction, Feedback, Learner, shape_key
from .lasting import FILE
from .logical import OcclusionQuery
from .tuning import Choice
from .unoccluded import profile_model, scored, summarize_model, unoccluded_logits

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
MARGIN = 0.95
NAIVE_MARGIN = 0.85
# A close call between naive and incremental inference: the two predictions within this
# factor of the bar between them. The scan's first batches then try both
# (:class:`~kql.operators.trial.OperatorTrial`).
CLOSE = 1.3
# A clear decision's scan is still watched (:class:`~kql.operators.trial.OperatorTrial`,
# ``upfront=False``): from this many batches on, the alternative can be probed mid-scan.
WATCH_BATCHES = 16
# The shape-first shortcut to the plain loop is taken only while scans have not found it
# slower than priced by more than this (they correct naive and incremental alike).
SHORTCUT_SLOWER = 1.25


@dataclass
class PlanContext:
    """What the planner may consult: session settings, the catalog directory, the machine."""

    settings: Mapping = field(default_factory=dict)     # a kql.settings.Settings (read by name)
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

    @property
    def exact_settings(self) -> bool:
        """Whether no setting asks for an approximate map: tau 1 or left to the query
        ('auto'), global gates computed exactly."""
        return (self.settings.get("tau", "auto") in ("auto", 1, 1.0)
                and self.settings.get("gates", "exact") == "exact")

    def memory_limit(self, device: str) -> int:
        """Bytes a plan (and planning's own passes) may use on ``device``."""
        return memory.allowed(self.settings.get("memory_limit", "auto"), device)

    def profile(self, query, device: str) -> tuple:
        """``(profile, what came from the cache)``: of the query's model on its image;
        ``"profile"`` when all of it, ``"graph"`` when only its trace (another image)."""
        limit = self.memory_limit(device)
        if self.cache is None:
            return profile_model(query, device, limit=limit), ""
        cache, model = self.cache, query.model
        traced = cache.has_graph(model, device)

        def keep_graph(build):
            return cache.graph(model, model.name, device, build)[0]
        build = lambda: profile_model(query, device, keep_graph, limit)     # noqa: E731
        profile, hit = self._kept(query, device, "profile", build)
        if hit and profile.shapes_only and (limit is None or profile.shapes_only <= limit):
            self.cache.drop(model, query.image, device, "profile")    # views fit now: build them
            profile, hit = self._kept(query, device, "profile", build)
        return profile, "profile" if hit else ("graph" if traced else "")

    def shapes(self, query, device: str) -> tuple:
        """``(shape summary, from the cache?)`` of one forward pass of the query's model."""
        limit = self.memory_limit(device)
        return self._kept(query, device, "shapes", lambda: summarize_model(query, device, limit))

    def base_logits(self, query, device: str) -> torch.Tensor:
        """The model's output on the unoccluded image: planning's, else one forward pass."""
        if self.cache is not None:
            for kind, field_name in (("profile", "base_logits"), ("shapes", "logits")):
                found = self.cache.peek(query.model, query.image, device, kind)
                if found is not None:
                    return getattr(found, field_name)
        limit = self.memory_limit(device)
        return self._kept(query, device, "logits", lambda: unoccluded_logits(query, device, limit))[0]

    def _kept(self, query, device: str, kind: str, build) -> tuple:
        if self.cache is None:
            return build(), False
        return self.cache.profile(query.model, query.model.name, query.image, device, build, kind)

    def throughput(self, device: str):
        return calibrate.throughput(device, self.directory)

    def feedback(self) -> Feedback:
        """Observed/predicted ratios of earlier scans, kept with the calibration."""
        if "_feedback" not in self.__dict__:
            learning = self.cache.learning if self.cache is not None else True
            self.__dict__["_feedback"] = Feedback(calibrate.folder_of(self.directory), learning)
        return self.__dict__["_feedback"]


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
    batch_note: str = ""                      # why the BATCH asked for was lowered (memory)
    threads: Optional[int] = None             # CPU threads to run with (torch's at planning)
    approximation: Optional[Choice] = None    # tau and where it came from; None: exact, unasked
    stages: tuple = ()                        # drill-down: the stage-one and stage-two plans
    stage_seconds: Optional[float] = None     # drill-down: their predicted run, together
    cached: tuple = ()                        # what planning took from the plan cache
    exact_seconds: Optional[float] = None     # predicted run of the same plan at tau 1
    correction: Correction = Correction()     # earlier scans' observed/predicted (feedback)
    trusted: bool = True                      # from a trusted calibration, or this shape's scans
    learner: Optional[Learner] = None         # records what the scan took against the prediction

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
        return (self.setup_seconds + self.cost.seconds * self.batches) * self.correction.factor

    @property
    def run_range(self) -> Optional[tuple]:
        """``(low, high)`` seconds the run may take: the spread of the ratios earlier scans
        of this shape observed, else half to twice the prediction."""
        run = self.run_seconds
        if run is None:
            return None
        c = self.correction
        if c.scope == "shape" and c.scans >= 2:
            return run * c.low / c.factor, run * c.high / c.factor
        return run / 2, run * 2

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
            # Fewer threads while other work holds the cores, for this scan only.
            pacer = (None if timings is not None or self.stages else
                     paced(torch.get_num_threads(), self.batches, self.device, progress))
            began = time.perf_counter()
            result = self.operator.run(self.task(), pacer or progress, timings)
            seconds = time.perf_counter() - began
        if pacer is not None and pacer.history:
            result = dataclasses.replace(result, paced=tuple(pacer.history))
        if self.learner is not None and timings is None:     # EXPLAIN ANALYZE's hooks cost
            self.learner.learn(getattr(result, "ran", ()), seconds, self.query.grid.count)
        return result

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
    best = min(plans, key=lambda p: p.predicted_seconds if p.predicted_seconds is not None else 0.0)
    # Drill-down and verified plans are priced from the table alone: trusted as it is.
    trusted = best.correction.settled or ctx.throughput(best.device).trusted
    return dataclasses.replace(best, query=scored(best.query, ctx.base_logits(best.query, best.device)),
                               trusted=trusted)


def _shape_first(query, ctx, device, tp, threads) -> Optional[PhysicalPlan]:
    """The plain loop planned from one forward pass's shapes, without a trace or views,
    where :func:`.shape_first.decide` is certain of it; None otherwise."""
    found = shape_first.decide(query, ctx, device, tp, NAIVE_MARGIN)
    if found is None:
        return None
    fit = found.fit
    plan = PhysicalPlan(query, NaiveOcclusion(fit.batch, found.summary.logits), fit.batch, device,
                        reason=found.reason, cost=found.cost, setup_seconds=0.0,
                        batch_note=fit.note, threads=threads, memory_bytes=found.memory_bytes,
                        cached=("shapes",) if found.from_cache else ())
    plan = _learned(plan, ctx, tp)
    if plan.correction.factor > SHORTCUT_SLOWER:
        return None            # scans found the plain loop slower than priced: cost both
    return _in_layout(plan, ctx, device)


def _plan_on(query: OcclusionQuery, ctx: PlanContext, device: str, tp, threads) -> PhysicalPlan:
    # A model that cannot be traced cannot be hooked either (TorchScript): no shapes first.
    untraceable = getattr(query.model, "naive_reason", None)
    shortcut = None if untraceable else _shape_first(query, ctx, device, tp, threads)
    if shortcut is not None:
        return shortcut
    profile, reason, hit = None, "", ""
    try:
        profile, hit = ctx.profile(query, device)
    except TraceError as exc:
        reason = _quote(str(exc))
    plan = _plan_with(query, ctx, device, tp, threads, profile, reason)
    return dataclasses.replace(plan, cached=((hit,) if hit else ()) + plan.cached)


def _plan_with(query, ctx, device, tp, threads, profile, reason) -> PhysicalPlan:
    candidates = tuned_candidates(query, ctx.settings, ctx.tuning_lookup) if profile else []
    verified = verified_candidates(query, ctx.settings, ctx.tuning_lookup) if profile else []
    if candidates or verified:                 # WITH SSIM: price every way to meet it
        plans, refused = [], None
        single = lambda q: _single(q, ctx, device, tp, threads, profile, reason)
        if verified and not candidates and query.drilldown is None:
            plans.append(single(query))        # the exact map (no tuning) is one way
        for make in ([lambda c=c: _plan_choice(query, ctx, device, tp, threads, profile, c)
                      for c in candidates]
                     + [lambda v=v: plan_verified(query, single, *v) for v in verified]):
            try:
                plans.append(make())
            except KqlPlanError as exc:        # no stage one on this grid, or over memory_limit
                refused = exc
        if not plans:
            raise refused
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
    plan, other, close = _single_plan(query, ctx, device, tp, threads, profile, reason, choice)
    plan = _in_layout(plan, ctx, device)
    least = OperatorTrial.MIN_BATCHES if close else WATCH_BATCHES
    if other is None or plan.batches < least:
        return plan                             # no alternative, or too short a scan to watch
    other = _in_layout(other, ctx, device)
    kept = None
    if close and ctx.cache is not None:
        q = plan.query
        kept = ctx.cache.kept_operator(q.model, device, plan.operator.name, tuple(q.image.shape),
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


def _learned(plan: PhysicalPlan, ctx: PlanContext, tp) -> PhysicalPlan:
    """``plan`` with its prediction corrected by earlier scans of its shape (or of its
    operator kind, :mod:`.feedback`), and a learner that records what its scan takes.
    A prediction is trusted when the table is, or when scans of this shape corrected it."""
    if plan.cost is None:
        return dataclasses.replace(plan, trusted=tp.trusted)
    q = plan.query
    own = sorted((k, v) for k, v in plan.operator.describe().items() if k != "layout")
    shape = shape_key(plan.operator.name, q.model.structure(), tuple(q.image.shape),
                      q.grid.patch, plan.batch, plan.device, plan.threads, own)
    # Ratios belong to the table they corrected: another table (measured again) starts afresh.
    store, device = ctx.feedback(), f"{calibrate.device_key(plan.device)}@{tp.measured_at:.0f}"
    found = store.correction(device, plan.operator.name, shape)
    learner = Learner(store, device, ((plan.operator.name, shape, plan.cost.seconds / plan.batch,
                                       plan.batch),))
    return dataclasses.replace(plan, correction=found, learner=learner,
                               trusted=tp.trusted or found.settled)


def _lent(plan: PhysicalPlan, peer: PhysicalPlan) -> PhysicalPlan:
    """``plan`` corrected as ``peer`` was, where scans timed ``peer`` (this shape, or its
    kind) and nothing timed ``plan``: a busy machine slows both, and correcting one alone
    flipped the choice at every scan (and, through the kind's median, on the next model).
    With scans of its own, a peer off its prediction is the cost model's error on that
    peer: no loan."""
    if plan.cost is None or plan.correction.scans or not peer.correction.scans:
        return plan
    return dataclasses.replace(plan, correction=peer.correction.for_peer())


def _in_layout(plan: PhysicalPlan, ctx: PlanContext, device: str) -> PhysicalPlan:
    """The plan in the session's layout (:mod:`~kql.operators.layout`); 'auto' on CPU
    leaves the choice to the operator."""
    layout = ctx.settings.get("layout", "auto")
    if layout == "auto" and device != "cpu":
        layout = CONTIGUOUS                     # measured on CPU only
    operator = plan.operator.in_layout(layout)
    cached = plan.cached
    if layout == "auto" and ctx.cache is not None and hasattr(operator, "remembering"):
        # The trial's outcome is kept for the next scan of this shape (Kept): another
        # target, colour or image, or the next image of a many-image query.
        q = plan.query
        kept = ctx.cache.kept_layout(q.model, device, operator.name, tuple(q.image.shape),
                                     plan.batch, plan.threads, device,
                                     operator.describe().get("crossover"), q.grid.patch)
        operator = operator.remembering(kept)
        if kept.found is not None:
            cached += (FILE if kept.from_lasting else "layout",)
    return dataclasses.replace(plan, operator=operator, cached=cached)


def _single_plan(query, ctx, device, tp, threads, profile, reason="", choice=None) -> tuple:
    """``(plan, other, close)``: the cheapest plan computing every position of the
    query's grid (at the threshold of ``choice``; by default the one the settings and the
    tuning give) within the memory limit; for an exact plan of the default strategy the
    other of naive and incremental inference (else None), and whether the two are a close
    call. Predictions are corrected by earlier scans (:func:`_learned`) before they are
    compared. :class:`~.memory.MemoryLimitError` when no plan fits."""
    cap = ctx.memory_limit(device)
    if profile is None:                        # torch.fx cannot trace it: the plain loop
        return _learned(_untraced(query, device, threads, reason, cap), ctx, tp), None, False
    try:
        naive_plan, too_big = _learned(_naive(query, profile, tp, device, threads, cap), ctx, tp), None
    except memory.MemoryLimitError as exc:
        naive_plan, too_big = None, exc
    if ctx.strategy == "naive":
        if too_big is not None:
            raise too_big
        return dataclasses.replace(naive_plan, reason="strategy=naive"), None, False
    try:
        best = _learned(_incremental(query, ctx, profile, tp, cap, device, threads, naive_plan,
                                     choice), ctx, tp)
        if naive_plan is not None:
            naive_plan, best = _lent(naive_plan, best), _lent(best, naive_plan)
            best = dataclasses.replace(best, naive_seconds=naive_plan.predicted_seconds)
    except memory.MemoryLimitError as exc:
        if ctx.strategy == "incremental":
            raise
        if naive_plan is None:                 # neither fits: say what the smaller one needs
            raise min(exc, too_big, key=lambda e: e.needed) from None
        needed, allowed = memory.size_text(exc.needed), memory.size_text(cap)
        return dataclasses.replace(naive_plan,
                                   reason=f"incremental needs {needed} > memory_limit {allowed}"), None, False
    if naive_plan is None or ctx.strategy != "auto":
        return best, None, False
    # Two exact plans of the default strategy: the scan is watched, and a close call tried.
    ratio = best.predicted_seconds / max(naive_plan.predicted_seconds, 1e-12)
    exact = best.approximation is None and ctx.exact_settings and query.drilldown is None
    close = exact and NAIVE_MARGIN / CLOSE < ratio < NAIVE_MARGIN * CLOSE
    if ratio > NAIVE_MARGIN:
        # The naive map is exact: a quality asked for is met at tau 1, from the same tuning.
        tuned = Choice(1.0, 1.0, best.approximation.source) if best.approximation else None
        return (dataclasses.replace(naive_plan, reason="incremental not predicted cheaper",
                                    approximation=tuned), best if exact else None, close)
    return best, naive_plan if exact else None, close



def _untraced(query, device, threads, reason, cap) -> PhysicalPlan:
    """The plain loop for a model torch.fx cannot trace: no activations to price, only the
    occluded batch is held to the limit."""
    per_item = memory.occluded_bytes(query.image.shape)
    fit = memory.fit(0, per_item, cap, device, query.batch or 16, query.grid.count)
    return PhysicalPlan(query, NaiveOcclusion(fit.batch), fit.batch, device, reason=reason,
                        threads=threads, batch_note=fit.note if query.batch else "",
                        memory_bytes=fit.batch * per_item)


def _naive(query, profile, tp, device, threads, cap) -> PhysicalPlan:
    fit = memory.naive_fit(profile, cap, device, query.batch, query.grid.count)
    return PhysicalPlan(query, NaiveOcclusion(fit.batch, profile.base_logits), fit.batch, device,
                        cost=naive_cost(profile, tp, fit.batch), batch_note=fit.note,
                        ratio=redundancy_ratio(profile, query.grid.patch),
                        memory_bytes=memory.naive_bytes(profile, fit.batch), threads=threads)


def _incremental(query, ctx, profile, tp, cap, device, threads, naive_plan, choice) -> PhysicalPlan:
    """The cheapest incremental plan at the chosen threshold, with what EXPLAIN compares
    it to (the naive plan, the exact plan of an approximate one)."""
    choice = choice or choose_tau(query, ctx.settings, ctx.tuning_lookup)
    tau = choice.tau if choice is not None else 1.0
    gates = ctx.settings.get("gates", "exact")
    best = _best_incremental(query, ctx, profile, tp, cap, device, threads, tau, gates)
    exact_seconds = None
    if tau < 1.0 or gates != "exact":
        try:
            exact_seconds = _best_incremental(query, ctx, profile, tp, cap, device,
                                              threads).predicted_seconds
        except memory.MemoryLimitError:
            pass                               # the exact plan does not fit: no speedup to show
    return dataclasses.replace(
        best, ratio=redundancy_ratio(profile, query.grid.patch), approximation=choice,
        naive_seconds=naive_plan.predicted_seconds if naive_plan is not None else None,
        exact_seconds=exact_seconds)


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


def _best_incremental(query, ctx, profile, tp, cap, device, threads, tau=1.0,
                      gates="exact") -> PhysicalPlan:
    """The cheapest crossover's plan. Kept with the profile per query shape: another
    target or colour on the same grid is the same plan for another query. (The key has
    the memory_limit setting, not its bytes: 'auto' reads the free memory anew each time.)"""
    key = ("best", query.grid, tau, gates, ctx.crossover, query.batch, id(tp), device, threads,
           ctx.settings.get("memory_limit", "auto"))
    if key not in profile.memo:
        profile.memo[key] = (_cheapest_crossover(query, ctx, profile, tp, cap, device, threads,
                                                 tau, gates), tp)
    return dataclasses.replace(profile.memo[key][0], query=query)


def _cheapest_crossover(query, ctx, profile, tp, cap, device, threads, tau, gates) -> PhysicalPlan:
    setting = ctx.crossover
    fractions = CROSSOVER_FRACTIONS if setting == "auto" else (
        (None,) if setting == "none" else (float(setting),))
    plans, too_big = [], []
    for steps in crossover_candidates(profile, query.grid.positions(), query.grid.patch,
                                      fractions, tau, gates):
        try:
            fit = memory.incremental_fit(profile, steps, cap, device, query.batch, query.grid.count)
        except memory.MemoryLimitError as exc:
            too_big.append(exc)
            continue
        # The views were materialized while planning: no set-up left to predict.
        plans.append(PhysicalPlan(query, IncrementalOcclusion(profile, steps, fit.batch), fit.batch,
                                  device, cost=incremental_cost(profile, steps, tp, fit.batch),
                                  crossover=steps.crossover.fraction, batch_note=fit.note,
                                  memory_bytes=memory.incremental_bytes(profile, steps, fit.batch),
                                  threads=threads))
    if not plans:
        raise min(too_big, key=lambda e: e.needed)
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
