"""Planning adaptive drill-down (seed paper 000, sections 4.3 and 4.4).

``DRILLDOWN r SPEEDUP s`` asks for stage two on the fraction ``r`` of the map and a
speedup ``s`` over the plain map; the stage-one stride follows from eq 47 (without
SPEEDUP, ``s`` = :data:`DEFAULT_SHARE` / ``r``: 3x for the paper's default r = 0.25).
Both stages are planned by the same planner as any query (naive, incremental or
thresholded, whichever is cheapest): stage one on the coarse grid, stage two on the
requested grid, priced at the fraction of it that runs.

With WITH SSIM, drill-down is verified instead (:func:`plan_verified`,
:mod:`kql.operators.verified`): one plan for the requested grid computes the lattice, the
check's windows and stage two, priced at the cells it is expected to compute
(:meth:`~kql.operators.verified.VerifiedDrillDown.expected_cells`).
"""

from __future__ import annotations

import dataclasses

from kql.operators.drilldown import DrillDownOcclusion, speedup_of, stage_one_stride

DEFAULT_SHARE = 0.75          # SPEEDUP = 0.75 / r when the query gives none (< 1 / r, eq 48)


def stage_strides(query) -> tuple:
    """The stage-one stride per dimension (eq 47)."""
    fraction = query.drilldown
    speedup = query.speedup or DEFAULT_SHARE / fraction
    return tuple(stage_one_stride(s, fraction, speedup) for s in query.grid.stride)


def plan_drilldown(query, plan_single):
    """The drill-down plan of ``query``; ``plan_single(q)`` plans one stage's query."""
    from .logical import fail

    s1 = stage_strides(query)
    coarse = dataclasses.replace(query.grid, stride=s1)
    if coarse.problem() or coarse.count < 1:
        raise fail(query.statement, "drilldown",
                   f"DRILLDOWN: the stage-one stride {s1[0]}x{s1[1]} leaves no patch position "
                   f"in the image or region; ask for a lower SPEEDUP")
    one = plan_single(query.replace(grid=coarse, drilldown=None, speedup=None))
    two = plan_single(query.replace(drilldown=None, speedup=None))
    fraction = float(query.drilldown)
    ys, xs = coarse.positions()
    rows, cols = coarse.shape
    operator = DrillDownOcclusion(one.operator, two.operator, (ys, xs, rows, cols), fraction)
    seconds = None
    if one.run_seconds is not None and two.run_seconds is not None:
        seconds = one.run_seconds + fraction * (two.run_seconds - two.setup_seconds)
    return dataclasses.replace(
        two, operator=operator, stages=(one, two), stage_seconds=seconds, cost=None,
        exact_seconds=two.exact_seconds or two.run_seconds,
        reason=f"stage-one stride {s1[0]}x{s1[1]}, positions {coarse.count} + "
               f"{max(1, round(fraction * query.grid.count))} of {query.grid.count}, "
               f"eq 46 speedup {speedup_of(s1, query.grid.stride, fraction):.2f}")


# Verified drill-down (operators/verified.py): the lattice step used with no tuning (every
# 4th cell, refined to every 2nd when its check fails, at no extra cost) and its
# stage-two fraction.
DEFAULT_STEP = 4
VERIFIED_FRACTION = 0.02


def plan_verified(query, plan_single, step: int, fraction: float, bounds=None, source: str = "",
                  low=None):
    """The verified drill-down plan of ``query`` (WITH SSIM) from lattice ``step``; with
    ``low`` (a ``plan_single`` in reduced precision), its lattice and detail run in that
    and the check's windows in ``plan_single``'s float32."""
    from kql.operators.verified import Check, VerifiedDrillDown

    from .tuning import Choice

    whole = query.replace(drilldown=None, speedup=None)
    fine = plan_single(whole)
    quick = low(whole) if low is not None else None
    check = Check(float(query.ssim))
    shape = query.grid.shape
    operator = VerifiedDrillDown((quick or fine).operator, shape, step, fraction, check,
                                 checker=fine.operator if quick is not None else None)
    cells = operator.expected_cells(bounds)
    seconds = None
    runs = fine if quick is None else quick
    if runs.run_seconds is not None and fine.run_seconds is not None:
        total = query.grid.count
        per_cell = (runs.run_seconds - runs.setup_seconds) / total
        if quick is None:
            seconds = runs.setup_seconds + per_cell * cells
        else:                                  # the windows in float32, the rest reduced
            windows = min(cells, operator.check_cells())
            exact_cell = (fine.run_seconds - fine.setup_seconds) / total
            seconds = runs.setup_seconds + exact_cell * windows + per_cell * (cells - windows)
    how = (f"expected {cells:.0f} of {query.grid.count} cells ({source})" if bounds
           else f"{cells:.0f} of {query.grid.count} cells if the first check passes, "
                f"all {query.grid.count} if every check fails")
    choice = Choice(1.0, check.target,
                    f"checked on {check.tiles} windows of this map"
                    + (" in float32" if quick is not None else "")
                    + (f"; {source}" if source else ""))
    return dataclasses.replace(
        runs, operator=operator,
        stages=(dataclasses.replace(runs, approximation=None),), stage_seconds=seconds,
        cost=None, approximation=choice,
        exact_seconds=fine.run_seconds,
        reason=f"lattice every {step} cells, {how}")
