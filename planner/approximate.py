"""Where the projective-field threshold of a query comes from, and maps to tune it on.

``SET tau = t`` fixes it (``user``). With ``WITH SSIM >= s`` and tau 'auto', the
catalog's tuning for this model, patch, stride and colour (``CALIBRATE <model> ON ...``)
gives the fastest tau expected to keep ``s`` (:meth:`.tuning.TuningRecord.choose`), and,
with no DRILLDOWN clause, the drill-down settings expected to keep it too
(:meth:`.tuning.TuningRecord.candidates`): the planner prices each and runs the cheapest.
With no tuning the map is exact (tau 1, ``default``): nothing measured, nothing promised.
Besides these, :func:`verified_candidates` gives the verified drill-downs
(:mod:`kql.operators.verified`), which measure their quality on the image itself and need
no tuning (a tuning only tells how often each lattice's check passes).
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from kql.operators.incremental import IncrementalOcclusion
from kql.operators.steps import plan_steps
from kql.operators.task import OcclusionTask

from . import memory
from .tuning import Choice, TuningRecord, key
from .model_passes import profile_model

NO_TUNING = "default: no tuning for this model, patch, stride and colour; CALIBRATE <model> ON (...) tunes it"


def choose_tau(query, ctx) -> Optional[Choice]:
    """The threshold for ``query``, or None when the plan is exact and nobody asked.

    ``ctx``: the :class:`~.context.PlanContext` (its ``tau`` setting and its
    ``tuning_lookup(model_name, key)``, the catalog's tuning record as a dict or None).
    """
    value, lookup = ctx.tau, ctx.tuning_lookup
    record = _record(query, lookup) if query.ssim is not None or value != "auto" else None
    if value != "auto":
        tau = float(value)
        predicted = 1.0 if tau >= 1.0 else (record.predicted(tau) if record else None)
        return Choice(tau, predicted, "user")
    if query.ssim is None:
        return None
    if record is None:
        return Choice(1.0, 1.0, NO_TUNING)
    return record.choose(query.ssim)


def tuned_candidates(query, ctx) -> list:
    """The tuned ways to meet the query's SSIM target (plain map at a tau, or drill-down
    at a tau), when the planner may choose among them: WITH SSIM, no DRILLDOWN clause, tau
    'auto', a tuning in the catalog. Empty otherwise."""
    if query.ssim is None or query.drilldown is not None or ctx.tau != "auto":
        return []
    record = _record(query, ctx.tuning_lookup)
    if record is None:
        return []
    # A precision the tuning certified runs only where the session leaves it to the planner.
    return [c for c in record.candidates(query.ssim)
            if c.precision is None or ctx.precision == "auto"]


def verified_candidates(query, ctx) -> list:
    """``[(step, fraction, bounds, source), ...]``: the verified drill-downs
    (:mod:`kql.operators.verified`) that may meet the query's SSIM target: WITH SSIM, tau
    'auto', exact gates, a map that holds a check window. From the tuning, every lattice
    step it measured (priced by how often its check passed there); with none, the default
    step. With a DRILLDOWN clause, its stage-one stride and fraction, checked."""
    from kql.operators.verified import checkable

    from .drilldown import DEFAULT_STEP, VERIFIED_FRACTION, stage_strides

    if (query.ssim is None or ctx.tau != "auto" or ctx.gates != "exact"
            or not checkable(query.grid.shape)):
        return []
    record = _record(query, ctx.tuning_lookup)
    bounds = record.check_bounds() if record else {}
    source = record.source if bounds else ""
    if query.drilldown is not None:
        step = min(s1 // s for s1, s in zip(stage_strides(query), query.grid.stride))
        known = step in bounds
        found = [(step, float(query.drilldown), bounds if known else None, source if known else "")]
    elif bounds:
        found = [(step, VERIFIED_FRACTION, bounds, source)
                 for step in sorted(k for k in bounds if isinstance(k, int))]
    else:
        found = [(DEFAULT_STEP, VERIFIED_FRACTION, None, "")]
    return [f for f in found if _check_pays(query, f[0], f[1])]


# A check whose windows and lattice cover more of the map than this cannot pay for itself.
CHECK_SHARE = 0.6


def _check_pays(query, step: int, fraction: float) -> bool:
    """Whether the first lattice, the check's windows and stage two leave enough of the map
    to interpolate (on small maps the windows alone cover most of it)."""
    from kql.operators.verified import expected_cells

    return expected_cells(query.grid.shape, step, fraction) < CHECK_SHARE * query.grid.count


def _record(query, lookup) -> Optional[TuningRecord]:
    """The catalog's tuning for the query's model and geometry, if any."""
    stored = lookup(query.model.name, key(query)) if lookup is not None else None
    return TuningRecord.from_dict(stored) if stored else None


def task_of(query, device: str) -> OcclusionTask:
    *depth, ys, xs = query.grid.positions()         # a volume's first slices first
    return OcclusionTask(model=query.model.composed(), image=query.image,
                         color=torch.tensor(query.color, dtype=torch.float32),
                         patch=query.grid.patch, ys=ys, xs=xs, target=query.target, device=device,
                         targets=query.resolved or query.targets, output=query.output,
                         fill=query.fill, zs=depth[0] if depth else None)


def maps_at(query, device: str, taus, progress=None, reduced=()):
    """The exact probability map of ``query``, then one per reduced precision of
    ``reduced`` (exact arithmetic otherwise, :mod:`kql.operators.precision`), then one
    thresholded map per tau, lazily: ``(tau or precision, map, seconds)`` (tau 1 first), so
    that a caller may stop early. ``progress(done, total)``: positions done of the map
    being computed."""
    from kql.operators.precision import computing

    profile = profile_model(query, device)
    task = task_of(query, device)
    budget = memory.budget(device)
    shape = query.grid.shape
    for how in (1.0,) + tuple(reduced) + tuple(taus):
        began = time.perf_counter()
        tau = how if isinstance(how, float) else 1.0
        steps = plan_steps(profile, task.ys, task.xs, task.patch, tau=tau)
        batch = memory.incremental_fit(profile, steps, budget, device, query.batch,
                                       task.count).batch      # a BATCH asked for, held to it
        with computing(how if isinstance(how, str) else "float32", device):
            out = IncrementalOcclusion(profile, steps, batch).run(task, progress)
        yield how, np.asarray(out.probabilities).reshape(shape), time.perf_counter() - began
