"""A scan watched while it runs, so that the faster of two exact operators runs it.

The planner chooses naive or incremental inference from the cost model's predictions,
and the model can be wrong (MobileNetV3-small at 224x224 was predicted 13% faster
incremental and ran 41% faster), as can the machine's load when the scan runs. Both
operators compute the exact map, so which one ran a position does not change its value:
:class:`OperatorTrial` times every batch of the running operator (per item, the first
batch of each part being warm-up) and hands the rest of the scan to the other one when
that one took at most :data:`~OperatorTrial.SWITCH` of its time per item. The running
part is ended with :class:`~.task.StopScan` and its positions are kept: no position is
computed twice.

What the other operator takes comes from the scan itself. On a close call (``upfront``)
it runs the first batch and the chosen one's first batch decides, both timed cold (so the
trial leans towards the planner's choice). Later, given the planner's ``expected`` seconds
per item, once the running operator has slowed past the other's prediction the other is
probed: it runs one batch, timed cold, whose positions are kept too. Probes back off
exponentially (:meth:`_Watch.suspicious`): a prediction that is simply wrong costs a few
batches.

A scan of fewer than :data:`~OperatorTrial.MIN_BATCHES` batches, and every EXPLAIN
ANALYZE (whose per-node times are the chosen plan's), runs the chosen operator alone. An
upfront trial's outcome is kept (:class:`~.layout.Kept`) for the next scan of the same
shape, unless other work competed for the CPU while it ran (:mod:`.contention`): then it
tells about that moment only. A kept outcome picks the operator that starts; the scan is
still watched. The result's ``ran`` lists every part, ``(operator name, items,
seconds)``, for the planner to learn each operator's time from.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Optional

import torch

from . import contention
from .layout import Kept
from .protocol import Operator
from .task import OcclusionResult, OcclusionTask, Progress, StopScan, joined, unordered

CHOSEN, OTHER = "chosen", "alternative"
PROBE, SWITCH = "probe", "switch"          # why a watched part was stopped


class OperatorTrial(Operator):
    SWITCH = 0.90          # the other's seconds per item over the running one's, at most
    MIN_BATCHES = 8        # of the chosen operator's batch, for watching to pay
    PROBE_LEFT = 8         # batches of the running operator left, at least, for a probe
    GROWTH = 1.5           # its slow-down since a probe that did not switch, for the next
    RECENT = 3             # its recent time per item: the median of this many batches

    def __init__(self, chosen, other, kept: Optional[Kept] = None, *, upfront: bool = True,
                 expected: Optional[tuple] = None, clock: Callable[[], float] = time.perf_counter):
        self.chosen, self.other, self.kept = chosen, other, kept
        self.upfront = upfront              # a close call: try the other on the first batch
        self.expected = None if expected is None else tuple(float(e) for e in expected)
        self.clock = clock

    @property
    def name(self) -> str:
        return self.chosen.name

    @property
    def plain_loop(self) -> bool:
        return self.chosen.plain_loop

    def approximation(self):
        return self.chosen.approximation()

    @property
    def batch_size(self) -> int:
        return self.chosen.batch_size

    @property
    def outcome(self) -> Optional[str]:
        """What an earlier scan of this shape found (CHOSEN, OTHER), or None."""
        return self.kept.layout if self.kept is not None else None

    def exact(self) -> "OperatorTrial":
        return self

    def at(self, *corners):
        """The chosen operator for patches at other corners (a drill-down's stage two)."""
        return self.chosen.at(*corners)

    def rebind(self, profile) -> "OperatorTrial":
        return OperatorTrial(self.chosen.rebind(profile), self.other.rebind(profile), self.kept,
                             upfront=self.upfront, expected=self.expected, clock=self.clock)

    def describe(self) -> dict:
        """The chosen operator's items, and the other one: tried on the first batch (or what
        an earlier scan's trial found about it), or only watched for."""
        items = dict(self.chosen.describe())
        other = self.other.name.replace("Occlusion", "").lower()
        found = self.outcome
        if not self.upfront:
            items["watch"] = other
        else:
            items["trial"] = (other if found is None else f"{other} faster (kept)"
                              if found == OTHER else f"{other} slower (kept)")
        return items

    @torch.inference_mode()
    def run(self, task: OcclusionTask, progress: Progress = None,
            timings: Optional[dict] = None) -> OcclusionResult:
        short = -(-task.count // self.chosen.batch_size) < self.MIN_BATCHES
        if timings is not None:
            return self.chosen.run(task, progress, timings)
        if short:
            began = self.clock()
            result = self.chosen.run(task, progress)
            return dataclasses.replace(
                result, ran=((self.chosen.name, task.count, self.clock() - began),))
        order = self.position_order(*task.corners)
        if order is None:
            return _Watch(self, task, progress).run()
        # Positions in the order a grouped operator scans them: every part a prefix of it.
        ordered = task.taking(order)
        return unordered(_Watch(self, ordered, progress).run(), order)

    def position_order(self, *corners):
        for op in (self.chosen, self.other):
            order = op.position_order(*corners)
            if order is not None:
                return order
        return None


class _Watch:
    """One watched scan: the parts run so far, each operator's recent time per item, and
    where the last probe (or upfront trial) left the back-off."""

    def __init__(self, trial: OperatorTrial, task: OcclusionTask, progress: Progress):
        self.trial, self.task, self.progress = trial, task, progress
        self.operators = {CHOSEN: trial.chosen, OTHER: trial.other}
        self.expected = dict(zip((CHOSEN, OTHER), trial.expected or (None, None)))
        self.device = torch.device(task.device)
        self.cuda = self.device.type == "cuda"
        self.parts, self.ran = [], []
        self.batches = 0            # run in this scan so far, by either operator
        self.recent = []            # the running operator's timed seconds per item
        self.last_probe = None      # (batches before it, the running one's time then or None)
        self.pending = None         # the upfront trial's time of the other, per item
        self.meter = None           # the CPU share over the upfront trial
        self.why = None             # why the running part was stopped (PROBE, SWITCH)

    def run(self) -> OcclusionResult:
        found = self.trial.outcome
        running, start = (OTHER if found == OTHER else CHOSEN), 0
        if found is None and self.trial.upfront:
            start = self._upfront()
        while start < self.task.count:
            start = self._run_part(running, start, self.task.count, self._judge)
            why, self.why = self.why, None
            if why == PROBE:
                start, why = self._probe(_swapped(running), start)
            if why == SWITCH:
                running, self.recent = _swapped(running), []
        return dataclasses.replace(joined(self.parts), ran=tuple(self.ran))

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)     # CUDA returns before the batch ran
        return self.trial.clock()

    def _run_part(self, role: str, start: int, stop: int, judge=None) -> int:
        """Run ``role``'s operator on ``[start, stop)``, each batch timed and passed to
        ``judge(role, seconds per item, first, done)``, which may stop it (StopScan);
        returns where it stopped."""
        operator, began = self.operators[role], self._now()
        mark = [began, start]

        def watch(done: int, total: int) -> None:
            now = self._now()
            rate, first = (now - mark[0]) / max(done - mark[1], 1), mark[1] == start
            self.batches += 1
            if self.progress is not None:
                self.progress(done, total)
            mark[:] = [self.trial.clock(), done]        # not the callback's own time
            if judge is not None and judge(role, rate, first, done):
                raise StopScan
        result = _part(operator, self.task, start, stop, watch)
        done = start + result.scores.shape[1]
        self.parts.append(result)
        self.ran.append((operator.name, done - start, self._now() - began))
        return done

    def _upfront(self) -> int:
        """The close call's trial: the other operator runs the first batch, timed; the
        chosen one's first batch decides (:meth:`_judge`). Returns where the rest starts."""
        if not self.cuda:                   # a GPU's waits say nothing of the CPU share
            self.meter = contention.CpuMeter(torch.get_num_threads()).start()
        first = self._run_part(OTHER, 0, min(self.trial.other.batch_size, self.task.count))
        _, items, seconds = self.ran[-1]
        self.pending = seconds / items
        return first

    def _judge(self, role: str, rate: float, first: bool, done: int) -> bool:
        """After each batch of the running operator: whether to stop its part, and why."""
        if self.pending is not None:            # the chosen one's first batch, after the trial
            faster = self.pending <= self.trial.SWITCH * rate
            self.pending, self.last_probe = None, (self.batches, None)    # that rate was cold
            self._keep(OTHER if faster else CHOSEN)
            self.why = SWITCH if faster else None
        elif not first:                         # the first batch of a part is warm-up
            self.recent.append(rate)
            self.why = PROBE if self.suspicious(role, done) else None
        return self.why is not None

    def suspicious(self, role: str, done: int) -> bool:
        """Whether the running operator may have become slower than the other one's
        expected time per item, and a probe may pay: with PROBE_LEFT of its batches left,
        and after a probe that did not switch only once it slowed by another GROWTH and
        twice the batches before that probe ran. (Never in the scan's first two batches:
        a part's first one is warm-up.)"""
        other = self.expected[_swapped(role)]
        left = -(-(self.task.count - done) // self.operators[role].batch_size)
        if other is None or left < self.trial.PROBE_LEFT:
            return False
        now = self._recent()
        if now * self.trial.SWITCH < other:
            return False
        if self.last_probe is not None:
            batches, then = self.last_probe
            if self.batches < 2 * batches or then is not None and now < self.trial.GROWTH * then:
                return False
        return True

    def _recent(self) -> float:
        return statistics.median(self.recent[-self.trial.RECENT:])

    def _probe(self, role: str, start: int) -> tuple:
        """One batch of ``role``'s operator at ``start``, timed cold (kept: it is exact).
        ``(where the scan goes on, SWITCH or None)``."""
        before, now = self.batches, self._recent()
        stop = min(start + self.operators[role].batch_size, self.task.count)
        stop = self._run_part(role, start, stop)
        _, items, seconds = self.ran[-1]
        faster = seconds / items <= self.trial.SWITCH * now
        self.last_probe = (before, None if faster else now)
        return stop, SWITCH if faster else None

    def _keep(self, outcome: str) -> None:
        """Keep the upfront trial's outcome, unless other work competed for the CPU while
        it ran (on CUDA the CPU share says nothing: only the load counts)."""
        if self.trial.kept is None:
            return
        if not contention.ran_contended(self.meter):
            self.trial.kept.keep(outcome)


def _swapped(role: str) -> str:
    return OTHER if role == CHOSEN else CHOSEN


def _part(operator, task: OcclusionTask, start: int, stop: int,
          progress: Progress) -> OcclusionResult:
    """``operator``'s result on the task's positions ``[start, stop)`` (its step table
    planned for them; fewer when ``progress`` stops it), reporting progress on the whole
    task."""
    part = task.taking(slice(start, stop))
    report = None if progress is None else (lambda done, _total: progress(start + done, task.count))
    return operator.at(*part.corners).run(part, report)
