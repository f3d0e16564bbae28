"""The physical operator protocol: what the planner, EXPLAIN and the executor ask of an
operator, and nothing else (DataFusion's ``ExecutionPlan``: each node explains itself).

Every operator (:mod:`.naive`, :mod:`.incremental`, :mod:`.drilldown`, :mod:`.verified`,
:mod:`.trial`) computes the map of an :class:`~.task.OcclusionTask` and agrees with the
naive one where it says it is exact. :class:`Operator` gives the defaults an operator that
has no layout to choose and no image-specific state keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import numpy as np

from .task import OcclusionResult, OcclusionTask, Progress


@dataclass(frozen=True)
class Approximation:
    """How an operator's map differs from the exact one: ``kind`` ('tau', 'frozen_gates',
    'drilldown', 'verified') and the words EXPLAIN prints."""

    kind: str
    text: str


@runtime_checkable
class OcclusionOperator(Protocol):
    name: str               # EXPLAIN's operator name
    plain_loop: bool        # one full inference per position (what other plans are priced against)
    learns_layout: bool     # tries layouts on its first batches; the outcome can be kept

    def describe(self) -> dict:
        """Its own EXPLAIN items, ``key: value`` in a fixed order, no object ids."""

    def approximation(self) -> Optional[Approximation]:
        """How its map is approximate; None when it is the exact map."""

    def exact(self) -> "OcclusionOperator":
        """The same plan computing the exact map (EXPLAIN ANALYZE compares the two)."""

    def at(self, *corners) -> "OcclusionOperator":
        """The same operator for patches at other corners (``ys, xs``, or ``zs, ys, xs``
        for a volume): a drill-down's stage two."""

    def rebind(self, profile) -> "OcclusionOperator":
        """The same operator for another image (``profile``: its profile, or None)."""

    def in_layout(self, layout: str) -> "OcclusionOperator":
        """The same operator in a memory layout ('auto': tried on the first batches)."""

    def remembering(self, kept) -> "OcclusionOperator":
        """The same operator, its layout trial kept in (and read from) ``kept``."""

    def position_order(self, *corners) -> Optional[np.ndarray]:
        """The order it scans positions in where that is not the task's (a permutation of
        their indices), so that a watched scan stopped early has done a prefix; None."""

    def run(self, task: OcclusionTask, progress: Progress = None,
            timings: Optional[dict] = None) -> OcclusionResult:
        """The heat map; with ``timings``, seconds per node where it has nodes."""


class Operator:
    """Defaults of the protocol: exact, no layout of its own, nothing bound to an image."""

    name = "Operator"
    plain_loop = False
    learns_layout = False

    def approximation(self) -> Optional[Approximation]:
        return None

    def exact(self):
        return self

    def at(self, *corners):
        return self

    def rebind(self, profile):
        return self

    def in_layout(self, layout: str):
        return self

    def remembering(self, kept):
        return self

    def position_order(self, *corners):
        return None
