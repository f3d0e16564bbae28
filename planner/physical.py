"""The physical planner: decides *how* a logical occlusion query is computed.

It lowers an :class:`~kql.planner.logical.OcclusionQuery` to a physical operator: naive,
or incremental with a crossover (the nodes past which the changed region covers so much
of the feature map that projecting the patches into full tensors is cheaper), a device
and a batch size, each chosen by predicted cost (:mod:`.cost`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from kql.errors import KqlModelError
from kql.operators.graph import TraceError
from kql.operators.incremental import PURE, Crossover, IncrementalModel, IncrementalOcclusion
from kql.operators.naive import NaiveOcclusion
from kql.operators.task import OcclusionResult, OcclusionTask, Progress

from . import calibrate, memory
from .cost import PlanCost, incremental_cost, naive_cost, plan_sizes, redundancy_ratio
from .logical import OcclusionQuery

# Fraction 1: a patch that has grown to its whole feature map is handed on as a full
# tensor. It never costs more than pure incremental inference (the seed prototype's,
# ``SET crossover = 'none'``), which gathers full-sized contexts there instead, so the
# planner starts from it and only costs the earlier crossovers against it.
CROSSOVER_FRACTIONS = (1.0, 0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2)
STRATEGIES = ("auto", "naive", "incremental")
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

    settings: dict = field(default_factory=dict)
    directory: Optional[str] = None

    def cuda_available(self) -> bool:
        return torch.cuda.is_available()

    @property
    def strategy(self) -> str:
        return str(self.settings.get("strategy", "auto"))

    @property
    def crossover(self):
        return self.settings.get("crossover", "auto")

    def throughput(self, device: str):
        return calibrate.throughput(device, self.directory)


@dataclass
class PhysicalPlan:
    query: OcclusionQuery
    operator: object
    batch: int
    device: str = "cpu"                       # torch device type: 'cpu' | 'cuda'
    reason: str = ""
    cost: Optional[PlanCost] = None           # predicted, per batch
    setup_seconds: float = 0.0                # predicted, before the first batch
    naive_seconds: Optional[float] = None     # predicted run of the naive plan
    planning_seconds: float = 0.0             # measured: binding, tracing, views, costing
    ratio: Optional[float] = None             # R, eqs 16-20
    crossover: Optional[float] = None         # chosen fraction, None = pure incremental (seed)
    memory_bytes: int = 0
    threads: Optional[int] = None             # CPU threads to run with (calibrated)

    @property
    def batches(self) -> int:
        return -(-self.query.grid.count // self.batch)

    @property
    def predicted_seconds(self) -> Optional[float]:
        """Planning (already spent, measured) plus the predicted run."""
        if self.cost is None:
            return None
        return self.planning_seconds + self.setup_seconds + self.cost.seconds * self.batches

    @property
    def naive_predicted_seconds(self) -> Optional[float]:
        return None if self.naive_seconds is None else self.planning_seconds + self.naive_seconds

    def task(self) -> OcclusionTask:
        q = self.query
        ys, xs = q.grid.positions()
        return OcclusionTask(model=q.model.composed(), image=q.image,
                             color=torch.tensor(q.color, dtype=torch.float32),
                             patch=q.grid.patch, ys=ys, xs=xs, target=q.target, device=self.device)

    def run(self, progress: Progress = None, profile: Optional[dict] = None) -> OcclusionResult:
        with calibrate.threads(self.threads or torch.get_num_threads()):
            if isinstance(self.operator, IncrementalOcclusion):
                return self.operator.run(self.task(), progress, profile=profile)
            return self.operator.run(self.task(), progress)

    def explain(self, actual: Optional[dict] = None) -> list[str]:
        from .explain import render

        return render(self, actual)


def plan_query(query: OcclusionQuery, ctx: PlanContext) -> PhysicalPlan:
    """Choose the operator, device and batch size for an optimized logical plan."""
    devices = ["cuda", "cpu"] if query.device == "auto" else ["cuda" if query.device == "gpu" else "cpu"]
    plans = []
    for device in devices:
        tp = ctx.throughput(device)
        with calibrate.threads(tp.threads if device == "cpu" else torch.get_num_threads()):
            plan = _plan_on(query, ctx, device, tp)
        plan.threads = tp.threads if device == "cpu" else None
        plans.append(plan)
    return min(plans, key=lambda p: p.predicted_seconds if p.predicted_seconds is not None else 0.0)


def _plan_on(query: OcclusionQuery, ctx: PlanContext, device: str, tp) -> PhysicalPlan:
    try:
        engine = IncrementalModel(query.model.composed(), query.image, device)
    except TraceError as exc:
        batch = query.batch or 16
        return PhysicalPlan(query, NaiveOcclusion(batch), batch, device, reason=_quote(str(exc)))
    except (RuntimeError, ValueError, TypeError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise KqlModelError(f"model '{query.model.name}' failed on the "
                            f"{tuple(query.image.shape[1:])} image: {detail}") from None
    patch = query.grid.patch
    budget = memory.budget(device)
    naive_batch = query.batch or memory.naive_batch(engine, budget, device)
    naive = naive_cost(engine, tp, naive_batch)
    naive_plan = PhysicalPlan(query, NaiveOcclusion(naive_batch), naive_batch, device, cost=naive,
                              setup_seconds=naive_cost(engine, tp, 1).seconds,   # the base logits
                              ratio=redundancy_ratio(engine, patch), memory_bytes=memory.naive_bytes(engine, naive_batch))
    naive_plan.naive_seconds = naive_plan.predicted_seconds
    if ctx.strategy == "naive":
        naive_plan.reason = "strategy=naive"
        return naive_plan
    best = _best_incremental(query, ctx, engine, tp, budget, device)
    best.naive_seconds = naive_plan.predicted_seconds
    best.ratio = naive_plan.ratio
    if ctx.strategy == "auto" and best.predicted_seconds > NAIVE_MARGIN * naive_plan.predicted_seconds:
        naive_plan.reason = "incremental not predicted cheaper"
        return naive_plan
    return best


def crossover_candidates(engine, patch: tuple, fractions) -> list:
    """``[(fraction, Crossover), ...]`` with one entry per distinct policy (several
    fractions often cut the network at the same nodes); fraction None is pure."""
    natural = plan_sizes(engine, patch, Crossover())
    candidates, seen = [], set()
    for fraction in fractions:
        cross = crossover_at(engine, natural, fraction)
        if cross not in seen:
            seen.add(cross)
            candidates.append((fraction, cross))
    return candidates


def _best_incremental(query, ctx, engine, tp, budget, device) -> PhysicalPlan:
    patch = query.grid.patch
    setting = ctx.crossover
    fractions = CROSSOVER_FRACTIONS if setting == "auto" else (
        (None,) if setting == "none" else (float(setting),))
    candidates = crossover_candidates(engine, patch, fractions)
    plans = []
    for fraction, cross in candidates:
        sizes = plan_sizes(engine, patch, cross)
        batch = query.batch or memory.incremental_batch(engine, sizes, budget, device)
        cost = incremental_cost(engine, tp, sizes, batch)
        # The views were materialized while planning: no set-up left to predict.
        plans.append((PhysicalPlan(query, None, batch, device, cost=cost, crossover=fraction,
                                   memory_bytes=memory.incremental_bytes(engine, sizes, batch)), cross))
    best, best_cross = plans[0]              # the reference: the first fraction asked for
    for plan, cross in plans[1:]:
        bar = MARGIN if best is plans[0][0] else 1.0
        if plan.predicted_seconds < bar * best.predicted_seconds:
            best, best_cross = plan, cross
    engine.crossover = best_cross
    best.operator = IncrementalOcclusion(best.batch, engine=engine)
    return best


def crossover_at(engine, natural: dict, fraction: Optional[float]) -> Crossover:
    """The crossover before every node whose changed region (``natural``: with the
    crossover at fraction 1) covers at least ``fraction`` of its feature map; None: pure."""
    if fraction is None:
        return PURE
    chosen = set()
    for n, size in natural.items():
        if size is None or n.op == "placeholder":
            continue
        h, w = engine.views[n].shape[2:]
        if size[0] * size[1] >= fraction * h * w:
            chosen.add(n)
    return Crossover(frozenset(chosen))


def _quote(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


def check_setting(name: str, value) -> Optional[str]:
    """Why a SET is invalid, or None."""
    if name == "strategy":
        if value not in STRATEGIES:
            return f"strategy must be 'auto', 'naive' or 'incremental', got {value!r}"
        return None
    if name == "crossover":
        if value in ("auto", "none") or (isinstance(value, (int, float)) and 0 < value <= 1):
            return None
        return f"crossover must be 'auto', 'none' or a fraction in (0, 1], got {value!r}"
    return f"unknown setting '{name}'; settings: strategy, crossover"
