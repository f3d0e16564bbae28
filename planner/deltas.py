"""Which convolutions run as delta convolutions (:class:`~kql.operators.graph.DeltaConv`).

A stride-1 convolution whose input hands on a patch can compute either its region's new
values from a window of its input (the seed paper's way) or the change of its output
from the change of its input, added to its view. The second does fewer multiply-adds
(the input's region, not the output's, sets the work: VGG16's 3x3 convolutions do
1.2-1.6x fewer) and gathers no read-in halo, but copies two views and adds. Each such
convolution is priced both ways by the cost model on the query's step table, and runs
as a delta convolution where that is predicted cheaper by :data:`MARGIN`.
"""

from __future__ import annotations

from kql.operators.steps import Crossover, can_delta, steps_at

from .cost import delta_seconds

# A delta convolution must be predicted this much cheaper than its window convolution:
# the two are priced from the same table, and a near tie is not worth a second code path.
MARGIN = 0.95


def choose(profile, positions: tuple, patch: tuple, tp, batch: int, setting: str = "auto",
           tau: float = 1.0, gates: str = "exact") -> frozenset:
    """The convolutions (nodes) to run as delta convolutions for patches ``patch`` at
    ``positions`` (ys, xs): those predicted cheaper ('auto'), all that can ('on'), or
    none ('off'). Decided on the step table with the crossover at fraction 1."""
    if setting == "off":
        return frozenset()
    table = steps_at(profile, positions, patch, Crossover(), tau, gates)
    able = [s for s in table if can_delta(s, table.steps)]
    if setting == "on":
        return frozenset(s.node for s in able)
    chosen = set()
    for step in able:
        window, delta = delta_seconds(profile, step, table, tp, batch)
        if delta < MARGIN * window:
            chosen.add(step.node)
    return frozenset(chosen)
