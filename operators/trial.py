"""A close call between two exact operators, settled on the scan's own first batches.

The planner chooses naive or incremental inference from the cost model's predictions.
Where the two come within :data:`~kql.planner.physical.CLOSE` of each other, the model's
errors decide (an element-wise layer's memory traffic in a forward pass, a grouped
convolution's rate: MobileNetV3-small at 224x224 was predicted 13% faster incremental and
ran 41% faster). :class:`OperatorTrial` then runs the scan's first batch with the
alternative, timed per item, and the rest with the chosen operator, whose first batch is
timed too: unless the alternative took at most :data:`OperatorTrial.SWITCH` of its time,
the chosen scan goes on undisturbed (its own layout trial included); else the
alternative runs the rest, that batch again. Both compute the exact map, so which one ran
a position does not change its value; the price is at most one batch with the slower
operator. The alternative runs first, so the scan's cold start counts against it: the
trial leans towards the planner's choice.

A scan of fewer than :data:`OperatorTrial.MIN_BATCHES` batches, and every EXPLAIN ANALYZE
(whose per-node times are the chosen plan's), runs the chosen operator alone. The outcome
is kept (:class:`~.layout.Kept`) for the next scan of the same shape in the connection.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import numpy as np
import torch

from .layout import Kept
from .task import OcclusionResult, OcclusionTask, Progress

CHOSEN, OTHER = "chosen", "alternative"


class OperatorTrial:
    SWITCH = 0.90          # the alternative's seconds per item over the chosen's, at most
    MIN_BATCHES = 8        # of the chosen operator's batch, for a trial to pay

    def __init__(self, chosen, other, kept: Optional[Kept] = None):
        self.chosen, self.other, self.kept = chosen, other, kept

    @property
    def name(self) -> str:
        return self.chosen.name

    @property
    def batch_size(self) -> int:
        return self.chosen.batch_size

    @property
    def outcome(self) -> Optional[str]:
        """What an earlier scan of this shape found (CHOSEN, OTHER), or None."""
        return self.kept.layout if self.kept is not None else None

    def exact(self) -> "OperatorTrial":
        return self

    def at(self, ys, xs):
        """The chosen operator for patches at other corners (a drill-down's stage two)."""
        return self.chosen.at(ys, xs)

    def rebind(self, profile) -> "OperatorTrial":
        return OperatorTrial(self.chosen.rebind(profile), self.other.rebind(profile), self.kept)

    def describe(self) -> dict:
        """The chosen operator's items, and the trial: the alternative it tries on the
        first batches, or what an earlier scan's trial found."""
        items = dict(self.chosen.describe())
        other = self.other.name.replace("Occlusion", "").lower()
        found = self.outcome
        items["trial"] = (other if found is None else
                          f"{other} faster (kept)" if found == OTHER else f"{other} slower (kept)")
        return items

    @torch.inference_mode()
    def run(self, task: OcclusionTask, progress: Progress = None,
            timings: Optional[dict] = None) -> OcclusionResult:
        found = self.outcome
        short = -(-task.count // self.chosen.batch_size) < self.MIN_BATCHES
        if timings is not None or short or found == CHOSEN:
            return self.chosen.run(task, progress, timings)
        if found == OTHER:
            return self.other.run(task, progress)
        first = min(self.other.batch_size, task.count)
        tried, seconds = _part(self.other, task, 0, first, progress)
        other_rate = seconds / first
        began = time.perf_counter()
        watched = []

        def watch(done: int, total: int) -> None:
            # After the chosen operator's first batch: go on, or hand the rest over.
            if not watched:
                watched.append(done)
                if str(task.device).startswith("cuda"):
                    torch.cuda.synchronize()          # CUDA returns before the batch ran
                chosen_rate = (time.perf_counter() - began) / (done - first)
                if other_rate <= self.SWITCH * chosen_rate:
                    raise _Switch
            if progress is not None:
                progress(done, total)
        try:
            rest, _ = _part(self.chosen, task, first, task.count, watch)
            outcome = CHOSEN
        except _Switch:               # the chosen batch is run again by the alternative
            rest, _ = _part(self.other, task, first, task.count, progress)
            outcome = OTHER
        if self.kept is not None:
            self.kept.keep(outcome)
        return _joined([tried, rest])


class _Switch(Exception):
    """The alternative took at most SWITCH of the chosen operator's time per item."""


def _part(operator, task: OcclusionTask, start: int, stop: int, progress: Progress) -> tuple:
    """``(result, seconds)`` of ``operator`` on the task's positions ``[start, stop)``
    (its step table planned for them), reporting progress on the whole task."""
    ys, xs = task.ys[start:stop], task.xs[start:stop]
    part = dataclasses.replace(task, ys=ys, xs=xs)
    report = None if progress is None else (lambda done, _total: progress(start + done, task.count))
    began = time.perf_counter()
    result = operator.at(ys, xs).run(part, report) if stop > start else None
    return result, time.perf_counter() - began


def _joined(parts: list) -> OcclusionResult:
    """One result of the parts' positions in order (the first part's targets and base)."""
    parts = [p for p in parts if p is not None]
    head = parts[0]
    return dataclasses.replace(
        head, scores=np.concatenate([p.scores for p in parts], axis=1),
        all_logits=np.concatenate([p.all_logits for p in parts], axis=1),
        halved=tuple(h for p in parts for h in p.halved))
