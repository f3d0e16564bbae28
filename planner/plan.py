"""The physical plan: one operator, its device, batch and threads, and what the planner
predicted of it (cost, memory, the correction earlier scans give). Built once by
:mod:`.physical`; the executor runs it, EXPLAIN prints it (:mod:`.explain`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

import torch

from kql.operators.pacing import paced
from kql.operators.task import OcclusionResult, OcclusionTask, Progress

from . import calibrate
from .approximate import task_of
from .cost import PlanCost
from .feedback import Correction, Learner
from .logical import OcclusionQuery
from .tuning import Choice


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
