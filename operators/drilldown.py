"""Adaptive drill-down (seed paper 000, section 4.3): a coarse map first, detail where it matters.

Stage one computes the map at the coarser stage-one stride over the whole region; its
values are interpolated (bilinear, in pixel coordinates) onto the requested grid. Stage
two then computes, at the requested stride, only the fraction ``r`` of the requested
cells where the interpolated map drops most below the unoccluded probability; every
other cell keeps the interpolated value. Both stages are operators the planner chose
(naive, incremental or thresholded); the stage-two positions of the image run batched
together through one operator re-targeted at them (:meth:`at`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .protocol import Approximation, Operator
from .task import OcclusionResult, OcclusionTask, Progress


def stage_one_stride(stride: int, fraction: float, speedup: float) -> int:
    """S1 = sqrt(speedup / (1 - r speedup)) S2 (eq 47), rounded up to a multiple of S2 (at
    least 2 S2): stage one's cells are then cells of the requested grid, whose values
    stage two reuses, and eq 46's speedup is at least the one asked for.

    >>> stage_one_stride(4, 0.25, 3.0), round(speedup_of((16, 16), (4, 4), 0.25), 2)   # eq 47: 13.9
    (16, 3.2)
    >>> stage_one_stride(4, 1e-320, 0.75 / 1e-320)        # eq 47 overflows: one coarse cell
    2147483644
    """
    share = fraction * speedup          # a tiny fraction's default speedup may overflow
    steps = math.sqrt(speedup / (1.0 - share)) if share < 1.0 and math.isfinite(speedup) else math.inf
    # Past 2**31 - 1 pixels every stride leaves one coarse cell: capped there, never inf or NaN.
    steps = min(steps, max(2, (2**31 - 1) // stride))
    return stride * max(2, int(math.ceil(steps - 1e-9)))


def speedup_of(s1: tuple, s2: tuple, fraction: float) -> float:
    """Positions of the plain map over those of drill-down (eq 46, per dimension).

    >>> round(speedup_of((14, 14), (4, 4), 0.25), 2)
    3.02
    """
    return (s1[0] * s1[1]) / (s2[0] * s2[1] + fraction * s1[0] * s1[1])


def interpolate(coarse: np.ndarray, cy: np.ndarray, cx: np.ndarray, ys: np.ndarray,
                xs: np.ndarray) -> np.ndarray:
    """Bilinear values of ``coarse`` [rows, cols] (cells at pixel rows ``cy``, columns
    ``cx``) at the pixel positions ``ys, xs``; positions past the coarse grid take its edge.

    >>> c = np.array([[0.0, 1.0], [2.0, 3.0]])
    >>> interpolate(c, np.array([0, 10]), np.array([0, 10]), np.array([5, 10, 20]),
    ...             np.array([5, 0, 20])).tolist()
    [1.5, 2.0, 3.0]
    """
    def axis(grid, at):
        at = np.clip(at, grid[0], grid[-1]).astype(np.float64)
        if len(grid) == 1:                     # one coarse row (column): constant along it
            zero = np.zeros(len(at), np.int64)
            return zero, zero, np.zeros(len(at))
        hi = np.clip(np.searchsorted(grid, at, side="right"), 1, len(grid) - 1)
        lo = hi - 1
        return lo, hi, (at - grid[lo]) / (grid[hi] - grid[lo])
    r0, r1, ty = axis(np.asarray(cy), np.asarray(ys))
    c0, c1, tx = axis(np.asarray(cx), np.asarray(xs))
    top = coarse[r0, c0] * (1 - tx) + coarse[r0, c1] * tx
    bottom = coarse[r1, c0] * (1 - tx) + coarse[r1, c1] * tx
    return top * (1 - ty) + bottom * ty


class DrillDownOcclusion(Operator):
    """Physical operator: stage one on a coarse grid, stage two on the cells that matter."""

    name = "DrillDownOcclusion"

    def __init__(self, stage_one, stage_two, coarse: tuple, fraction: float):
        """``coarse``: (ys, xs, rows, cols) of the stage-one grid; ``stage_two`` an operator
        for the requested grid that :meth:`at` re-targets at the chosen cells."""
        self.stage_one, self.stage_two = stage_one, stage_two
        self.coarse_ys, self.coarse_xs, self.rows, self.cols = coarse
        self.fraction = float(fraction)

    def describe(self) -> dict:
        return {"fraction": f"{self.fraction:.2f}", "stage_one": f"{self.rows}x{self.cols}"}

    def approximation(self) -> Approximation:
        return Approximation("drilldown", f"drill-down fraction {self.fraction:.2f}")

    def exact(self):
        return self.stage_two.exact()

    def at(self, ys, xs):
        return self.stage_two.at(ys, xs)

    def rebind(self, profile) -> "DrillDownOcclusion":
        """Both stages on another image (see the stages' ``rebind``)."""
        coarse = (self.coarse_ys, self.coarse_xs, self.rows, self.cols)
        return DrillDownOcclusion(self.stage_one.rebind(profile), self.stage_two.rebind(profile),
                                  coarse, self.fraction)

    def run(self, task: OcclusionTask, progress: Progress = None, timings=None) -> OcclusionResult:
        coarse_task = dataclasses.replace(task, ys=self.coarse_ys, xs=self.coarse_xs)
        first = self.stage_one.run(coarse_task, None, None)
        grid = (self.coarse_ys, self.coarse_xs, self.rows, self.cols)
        spread_rows = [spread(row, grid, task.ys, task.xs) for row in first.scores]
        scores = np.stack([values for values, _ in spread_rows])
        known = spread_rows[0][1]
        logits = np.stack([spread(row, grid, task.ys, task.xs)[0] for row in first.all_logits])
        # Where any target's map drops most below its unoccluded score (one target: eq 48's).
        drops = (scores - first.base_scores[:, None]).min(axis=0)
        chosen = largest_drops(drops, self.fraction)
        todo = chosen[~np.isin(chosen, known)]            # stage one's own cells are done
        halved = first.halved
        if len(todo):
            ys, xs = task.ys[todo], task.xs[todo]
            fine_task = dataclasses.replace(task, ys=ys, xs=xs, targets=first.targets,
                                            output=first.output)
            second = self.stage_two.at(ys, xs).run(fine_task, None, timings)
            scores[:, todo] = second.scores
            logits[:, todo] = second.all_logits
            halved += second.halved
        if progress is not None:
            progress(task.count, task.count)
        return dataclasses.replace(first, scores=scores, all_logits=logits, halved=halved)


def spread(coarse_values: np.ndarray, grid: tuple, ys: np.ndarray, xs: np.ndarray) -> tuple:
    """Stage one's values over the requested cells (at ``ys, xs``): its own where a cell
    is one of its positions, bilinear elsewhere. Returns ``(float32 values, indices of the
    cells stage one computed)``.

    >>> g = (np.array([0, 0, 8, 8]), np.array([0, 8, 0, 8]), 2, 2)
    >>> ys, xs = np.repeat([0, 4, 8], 3), np.tile([0, 4, 8], 3)
    >>> values, known = spread(np.array([1.0, 1.0, 1.0, 0.0]), g, ys, xs)
    >>> values.reshape(3, 3).tolist(), known.tolist(), largest_drops(values, 0.2).tolist()
    ([[1.0, 1.0, 1.0], [1.0, 0.75, 0.5], [1.0, 0.5, 0.0]], [0, 2, 6, 8], [5, 8])
    """
    cys, cxs, rows, cols = grid
    cy, cx = cys.reshape(rows, cols)[:, 0], cxs.reshape(rows, cols)[0, :]
    coarse_values = np.asarray(coarse_values, np.float64)
    values = interpolate(coarse_values.reshape(rows, cols), cy, cx, ys, xs)
    at, hit = _cells_of(ys, xs, cys, cxs)
    values[at[hit]] = coarse_values[hit]
    return values.astype(np.float32), np.sort(at[hit])


def largest_drops(values: np.ndarray, fraction: float) -> np.ndarray:
    """Indices (sorted) of the fraction of cells with the lowest values: stage two's."""
    keep = max(1, int(math.ceil(fraction * len(values))))
    return np.sort(np.argsort(values, kind="stable")[:keep])


def _cells_of(ys, xs, cys, cxs) -> tuple:
    """For each coarse position, its index among the positions ``ys, xs`` and whether it
    is one of them."""
    width = int(max(xs.max(), cxs.max())) + 1
    key = ys.astype(np.int64) * width + xs
    coarse_key = cys.astype(np.int64) * width + cxs
    order = np.argsort(key)
    at = order[np.searchsorted(key, coarse_key, sorter=order).clip(0, len(key) - 1)]
    return at, key[at] == coarse_key


def simulate(fine_values: np.ndarray, ys: np.ndarray, xs: np.ndarray, grid: tuple,
             fraction: float) -> np.ndarray:
    """The map drill-down would give if both stages computed ``fine_values`` (a whole map
    over ``ys, xs``, of which stage one's cells ``grid`` are a subset): what tuning
    measures without running drill-down."""
    fine_values = np.asarray(fine_values)
    at, _ = _cells_of(ys, xs, grid[0], grid[1])
    values, _ = spread(fine_values[at], grid, ys, xs)
    chosen = largest_drops(values, fraction)
    values[chosen] = fine_values[chosen]
    return values
