"""The crossover: where incremental inference hands patches on as full tensors, and the
step tables of each fraction the planner prices (seed paper 000, section 4.1)."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from kql.operators.steps import INPUT, PURE, Crossover, StepTable, steps_at

# Fraction 1: a patch that has grown to its whole feature map is handed on as a full
# tensor. It never costs more than pure incremental inference (the seed prototype's,
# ``SET crossover = 'none'``), which gathers full-sized contexts there instead, so the
# planner starts from it and only costs the earlier crossovers against it.
CROSSOVER_FRACTIONS = (1.0, 0.9, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2)


def crossover_candidates(profile, positions: tuple, patch: tuple, fractions,
                         tau: float = 1.0, gates: str = "exact",
                         deltas: frozenset = frozenset()) -> list:
    """``[StepTable, ...]``: the step table for patches at ``positions`` (ys, xs; a
    volume's zs, ys, xs) under
    each crossover fraction, one per distinct policy (several fractions often cut the
    network at the same nodes); fraction None is pure incremental inference. ``tau``:
    the projective-field threshold of every table; ``deltas``: its delta convolutions."""
    natural = steps_at(profile, positions, patch, Crossover(), tau, gates, deltas)
    tables, seen = [], set()
    for fraction in fractions:
        cross = crossover_at(profile, natural, fraction)
        if cross not in seen:
            seen.add(cross)
            same = cross == natural.crossover          # no node cut: the natural steps
            tables.append(dataclasses.replace(natural, crossover=cross) if same
                          else steps_at(profile, positions, patch, cross, tau, gates, deltas))
    return tables


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
        # fraction x h x w, multiplied in that order (as plans have always been cut)
        if math.prod(size) >= math.prod(profile.map_size(step.node), start=fraction):
            chosen.add(step.node)
    return Crossover(frozenset(chosen), fraction=fraction)
