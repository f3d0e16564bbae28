"""Positions in groups, each group with a step table of its own.

A patch near the image border changes a smaller region at every layer than one in the
middle, but one step table runs every position at the largest region. Grouped by bands
of rows and columns (a volume's slices too; :mod:`kql.planner.position_groups` chooses
them), each group's
table is planned for its own positions, and the border groups run smaller regions. The
map is the same, position by position: every group is exact incremental inference.

A scan runs the positions in group order (:meth:`GroupedOcclusion.position_order`), one
group after another, and hands the map back in the task's order. A watched scan
(:class:`~.trial.OperatorTrial`) orders its task so first: then a part of it is a run of
whole groups, and a part stopped early is a prefix, as the watcher expects.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from .layout import ADAPTIVE, Kept
from .protocol import Approximation, Operator
from .task import OcclusionResult, OcclusionTask, Progress, joined, unordered


class GroupedOcclusion(Operator):
    """Physical operator: incremental inference per band of each axis (rows and columns;
    a volume's slices, rows and columns)."""

    name = "IncrementalOcclusion"          # the same engine, in groups (EXPLAIN: groups=N)
    learns_layout = True

    def __init__(self, edges: tuple, members: dict, kept: Optional[Kept] = None):
        """``edges``: per axis (``(rows, columns)``, a volume's slices first), the pixel
        coordinates where a band starts (after the first); ``members``: ``{(row band, column
        band): IncrementalOcclusion}`` (a band per axis), each planned for the positions of
        its group (re-targeted when a scan's differ)."""
        self.edges = tuple(np.asarray(e, np.int64) for e in edges)
        self.members = dict(members)
        self.kept = kept
        self._largest = max(self.members.values(), key=lambda op: _cells(op.steps))

    @property
    def batch_size(self) -> int:
        return self._largest.batch_size

    @property
    def layout(self) -> str:
        return self._largest.layout

    def describe(self) -> dict:
        items = dict(self._largest.describe())
        items["groups"] = len(self.members)
        return items

    def approximation(self) -> Optional[Approximation]:
        return self._largest.approximation()

    def exact(self) -> "GroupedOcclusion":
        """Every group without its approximation (frozen gates), for EXPLAIN ANALYZE."""
        return self if self.approximation() is None else self._each(lambda op: op.exact(), self.kept)

    def rebind(self, profile) -> "GroupedOcclusion":
        return self._each(lambda op: op.rebind(profile), self.kept)

    def in_layout(self, layout: str) -> "GroupedOcclusion":
        return self._each(lambda op: op.in_layout(layout), None)

    def remembering(self, kept: Kept) -> "GroupedOcclusion":
        """Every group reads and keeps one layout trial's outcome: the first group's."""
        return GroupedOcclusion(self.edges, self.members, kept)

    def _each(self, change, kept) -> "GroupedOcclusion":
        return GroupedOcclusion(self.edges, {g: change(op) for g, op in self.members.items()}, kept)

    def groups_of(self, *corners) -> np.ndarray:
        """The group of each position, as one number (its bands in C order: row band x
        columns + column band on an image)."""
        bands = [np.searchsorted(e, np.asarray(c), side="right") for e, c in zip(self.edges, corners)]
        return np.ravel_multi_index(bands, [len(e) + 1 for e in self.edges])

    def position_order(self, *corners) -> Optional[np.ndarray]:
        """The order to scan the positions in (group by group), None when they are."""
        groups = self.groups_of(*corners)
        if np.all(groups[1:] >= groups[:-1]):
            return None
        return np.argsort(groups, kind="stable")

    def run(self, task: OcclusionTask, progress: Progress = None,
            timings: Optional[dict] = None) -> OcclusionResult:
        """Each group in turn on its positions; the map in the task's order. Stopped by
        ``progress`` (:class:`~.task.StopScan`), the positions done are a prefix of the
        task's, which is ordered by group then."""
        order = self.position_order(*task.corners)
        if order is not None:
            ordered = task.taking(order)
            return unordered(self.run(ordered, progress, timings), order)
        kept = self.kept
        if kept is None and self.layout == ADAPTIVE:
            kept = Kept({}, "groups")          # this scan's: the first trial decides for all
        groups = self.groups_of(*task.corners)
        starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
        parts, done = [], 0
        for start, stop in zip(starts, np.r_[starts[1:], len(groups)]):
            part = task.taking(slice(start, stop))
            op = self._member(groups[start], part.corners)
            report = None if progress is None else _offset(progress, done, task.count)
            result = (op.remembering(kept) if kept is not None else op).run(part, report, timings)
            parts.append(result)
            done += result.scores.shape[1]
            if done < stop:
                break                          # stopped: the positions so far
        return joined(parts)

    def _member(self, group: int, corners: tuple):
        """The group's operator for patches at ``corners``: as planned, or re-targeted."""
        key = tuple(int(b) for b in np.unravel_index(int(group), [len(e) + 1 for e in self.edges]))
        op = self.members.get(key) or self._largest
        planned = op.steps[op.profile.image_node]
        if all(np.array_equal(p, c) for p, c in zip(planned.at, corners)):
            return op
        return op.at(*corners)


def _cells(steps) -> int:
    return sum(math.prod(s.size) for s in steps if s.incremental)


def _offset(progress, done: int, total: int):
    return lambda n, _count: progress(done + n, total)
