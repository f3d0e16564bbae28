"""Grouping a query's positions by the size of the region they change.

A position's own region at each node (:attr:`~kql.operators.steps.Step.span`) depends
on its row for the height and on its column for the width (a volume's slice for the
depth), and shrinks near the border. Each axis is cut into contiguous bands by a small
dynamic programme over a proxy of the work (each band priced at its largest region,
weighted by the node's work per output cell); the best few cuts are then planned for
real, one step table per group (a band of each axis), and priced by the cost model,
batches per group included. In three dimensions the border is a larger share of the
positions, and grouping saves more.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from kql.operators.graph import Local
from kql.operators.grouped import GroupedOcclusion
from kql.operators.incremental import IncrementalOcclusion
from kql.operators.steps import COVER, Crossover, steps_at

from .cost import NodeCost, PlanCost, incremental_cost

MAX_BANDS = 4              # per axis: 16 groups at most on an image
MAX_COORDINATES = 128      # an axis with more distinct coordinates is pooled into this many
GROUP_BUDGETS = (4, 9, 16)     # the best cut of at most this many groups is planned for real
VOLUME_BUDGETS = (8, 27)       # a volume's: two or three bands per axis


@dataclass(frozen=True)
class Grouping:
    """A grouped incremental operator and its predicted cost (per batch of the plan)."""

    operator: GroupedOcclusion
    cost: PlanCost
    seconds: float             # the whole scan


def scan_seconds(profile, table, tp, batch: int, count: int) -> float:
    """Predicted seconds of ``count`` positions under ``table`` in batches of ``batch``,
    the last one partial (priced at its own size)."""
    full, rest = divmod(count, batch)
    seconds = full * incremental_cost(profile, table, tp, batch).seconds if full else 0.0
    return seconds + (incremental_cost(profile, table, tp, rest).seconds if rest else 0.0)


def group(profile, steps, corners: tuple, tp, batch: int):
    """The cheapest grouping of the positions at ``corners`` (one array per axis: ``(ys,
    xs)``, a volume's ``(zs, ys, xs)``) under ``steps`` (their one table), or None when no
    grouping is possible (a thresholded table, one coordinate per axis). Its ``seconds``
    are comparable with :func:`scan_seconds` of ``steps``."""
    sized = [s for s in steps if s.incremental]
    if not sized or any(s.span is None for s in sized):
        return None
    work = np.array([_work(profile, s) for s in sized])
    axes = [_axis(np.asarray(c), [s.span[a][1] for s in sized]) for a, c in enumerate(corners)]
    if all(len(coords) < 2 for coords, _, _ in axes):
        return None
    cuts = [_cuts(counts, sizes, work * _mean_others(axes, a, len(sized)))
            for a, (_, counts, sizes) in enumerate(axes)]
    best = None
    for budget in GROUP_BUDGETS if len(axes) == 2 else VOLUME_BUDGETS:
        bands = [k for k in itertools.product(*(range(1, len(c) + 1) for c in cuts))
                 if 1 < math.prod(k) <= budget]
        if not bands:
            continue
        # A cut that saves nothing is no cut: each group costs a little (calls, a partial batch).
        k = min(bands, key=lambda k: _proxy(axes, cuts, k, work) * (1 + 1e-3 * math.prod(k)))
        edges = tuple(axis[0][cut[n - 1]] for axis, cut, n in zip(axes, cuts, k))
        for cross in {steps.crossover, _whole_from(steps)}:
            found = _planned(profile, steps, corners, tp, batch, edges, cross)
            if best is None or found.seconds < best.seconds:
                best = found
    return best


def _work(profile, step) -> float:
    """Work per output cell of a step: multiply-adds for a window op, channels otherwise."""
    channels = profile.views[step.node].shape[1]
    op = step.op
    return float(op.macs_per_output() * channels) if isinstance(op, Local) else float(channels)


def _axis(coords: np.ndarray, sizes: list) -> tuple:
    """``(distinct coordinates, positions at each, sizes [nodes, coordinates])`` of one
    axis; a node's size at a coordinate is its largest there (one per coordinate)."""
    values, inverse, counts = np.unique(coords, return_inverse=True, return_counts=True)
    table = np.zeros((len(sizes), len(values)))
    for n, size in enumerate(sizes):
        np.maximum.at(table[n], inverse, np.asarray(size, np.float64))
    if len(values) > MAX_COORDINATES:         # pooled: each chunk at its largest
        chunks = np.array_split(np.arange(len(values)), MAX_COORDINATES)
        values = np.array([values[c[0]] for c in chunks])
        counts = np.array([counts[c].sum() for c in chunks])
        table = np.stack([table[:, c].max(axis=1) for c in chunks], axis=1)
    return values, counts, table


def _mean_others(axes: list, a: int, nodes: int) -> np.ndarray:
    """Per node, the mean extent of its region along every axis but ``a``, multiplied:
    what a cell of axis ``a``'s band weighs."""
    out = np.ones(nodes)
    for b, (_, counts, sizes) in enumerate(axes):
        if b != a and sizes.size:
            out = out * (sizes * counts).sum(axis=1) / max(counts.sum(), 1)
    return out


def _cuts(counts: np.ndarray, sizes: np.ndarray, weight: np.ndarray) -> list:
    """For k = 1 .. MAX_BANDS bands: the indices where bands start (the first band's,
    0, left out), minimising the sum over bands of its positions x its weighted largest
    sizes (``sizes``: [nodes, coordinates]).

    >>> sizes = np.array([[2.0, 3, 3, 3, 3, 2]])          # smaller at both borders
    >>> [c.tolist() for c in _cuts(np.ones(6), sizes, np.ones(1))]
    [[], [1], [1, 5], [1, 2, 5]]
    """
    m = sizes.shape[1]
    band = np.full((m, m), np.inf)              # band[i, j]: coordinates i .. j as one band
    for i in range(m):
        peak = np.maximum.accumulate(sizes[:, i:], axis=1)
        band[i, i:] = np.cumsum(counts[i:]) * (weight @ peak)
    best, starts, out = band[0], [], [np.array([], np.int64)]
    for _ in range(2, min(MAX_BANDS, m) + 1):
        before = np.r_[np.inf, best[:-1]]       # the bands before one starting at i
        cand = before[:, None] + band
        starts.append(np.argmin(cand, axis=0))
        best = cand[starts[-1], np.arange(m)]
        cut, j = [], m - 1
        for start in reversed(starts):
            cut.append(int(start[j]))
            j = cut[-1] - 1
        out.append(np.array(sorted(cut), np.int64))
    return out


def _proxy(axes, cuts, k: tuple, work: np.ndarray) -> float:
    """The work proxy of ``k`` (bands per axis): every group at its largest."""
    peaks = []
    for (_, counts, sizes), cut, n in zip(axes, cuts, k):
        bounds = np.r_[0, cut[n - 1], sizes.shape[1]]
        peaks.append([(counts[a:b].sum(), sizes[:, a:b].max(axis=1))
                      for a, b in zip(bounds[:-1], bounds[1:])])
    return sum(math.prod(c for c, _ in combo) * float(work @ math.prod(s for _, s in combo))
               for combo in itertools.product(*peaks))


def _planned(profile, steps, corners: tuple, tp, batch: int, edges: tuple, cross=None) -> Grouping:
    """One step table per group of ``edges`` (band starts per axis, pixel coordinates)
    under the crossover ``cross`` (by default that of ``steps``), priced."""
    corners = tuple(np.asarray(c) for c in corners)
    bands = [np.searchsorted(e, c, side="right") for e, c in zip(edges, corners)]
    members, costs, seconds = {}, [], 0.0
    cross = cross or steps.crossover
    for key in sorted(set(zip(*(b.tolist() for b in bands)))):
        at = np.logical_and.reduce([b == k for b, k in zip(bands, key)])
        table = steps_at(profile, tuple(c[at] for c in corners), steps.patch, cross, steps.tau,
                         steps.gates, steps.deltas)
        members[key] = IncrementalOcclusion(profile, table, batch)
        count = int(at.sum())
        costs.append((incremental_cost(profile, table, tp, batch), count / batch))
        seconds += scan_seconds(profile, table, tp, batch, count)
    return Grouping(GroupedOcclusion(edges, members),
                    _combined(costs, math.ceil(len(corners[0]) / batch)), seconds)


def _whole_from(steps) -> Crossover:
    """The crossover of ``steps`` with every node it hands on whole (its region covers the
    map) among the crossover nodes: a group's smaller region would otherwise stay a patch
    there, gathered and projected on maps of a few cells (priced both ways: ResNet18's
    7x7 maps run whole cheaper, VGG16's 14x14 ones as patches)."""
    covered = frozenset(s.node for s in steps if s.mode == COVER)
    cross = steps.crossover
    return Crossover(cross.nodes | covered, cross.covered, cross.fraction) if covered else cross


def _combined(costs: list, batches: int) -> PlanCost:
    """The groups' costs as one per batch of the whole scan (``batches`` of them): each
    node's work summed over the groups, shown at the largest group's step."""
    largest = max(costs, key=lambda c: c[0].macs)[0]
    nodes = {c.node: [c.step, 0.0, 0.0, 0.0] for c in largest.nodes}
    for cost, n in costs:
        for c in cost.nodes:
            entry = nodes.setdefault(c.node, [c.step, 0.0, 0.0, 0.0])
            entry[1] += c.macs * n / batches
            entry[2] += c.gather_bytes * n / batches
            entry[3] += c.seconds * n / batches
    out = PlanCost(gather_bytes=0.0)
    for step, macs, gathered, seconds in nodes.values():
        out.nodes.append(NodeCost(step, macs, gathered, seconds))
        out.macs += macs
        out.gather_bytes += gathered
        out.seconds += seconds
    return out
