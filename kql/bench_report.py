"""What ``kql bench`` prints: the engines' table (speedups, peak memory, maps against
naive), KQL's drop-ins against Captum and MONAI, the chosen plan's prediction, the FLOP
ratios and the crossover sweep."""

from __future__ import annotations

import statistics
from typing import Optional

import numpy as np

from .bench_engines import PLAIN, PURE
from .bench_libraries import CAPTUM, DROP_INS, MONAI, library_differences

LIBRARY_TOLERANCE = 1e-4     # KQL's drop-ins against Captum and MONAI (their own tests' bound)


def plan_gflops(plan) -> Optional[float]:
    """The GFLOPs the planner costed ``plan`` at (a drill-down: stage one and its fraction
    of stage two, eq 46); None when it was planned without a cost."""
    if plan.stages:
        one, two = (plan_gflops(p) for p in plan.stages)
        fraction = plan.operator.fraction
        return None if one is None or two is None else one + fraction * two
    if plan.cost is None:
        return None
    return 2 * plan.cost.macs * plan.batches / 1e9


def flop_ratio(naive, plan) -> Optional[float]:
    """Naive's GFLOPs per position over ``plan``'s (per position of ``plan``'s grid)."""
    a, b = plan_gflops(naive), plan_gflops(plan)
    if not a or not b:
        return None
    return (a / naive.query.grid.count) / (b / plan.query.grid.count)


def report(args, spec, size, plans, full, rows, times, peaks, results, thread_count, planning):
    """Print the whole report of a run; ``rows``: the band's grid rows [r0, r1)."""
    chosen = plans["chosen plan"]
    n = chosen.query.grid.count
    count = {name: plans[name].query.grid.count if name in plans else n for name in times}
    count[PLAIN] = count["naive"]
    reference = "naive" if count["naive"] == n else PURE
    _header(args, spec, size, full, rows, n, thread_count)
    if reference != "naive":
        print(f"naive timed on {count['naive']} of the positions; maps compared with {reference} (exact)")
    _engine_table(full, chosen.query.grid.shape, times, peaks, results, planning, count, reference)
    _against_libraries(results)
    _chosen_plan(args, chosen, times)
    _flop_ratios(plans)
    _crossover_table(plans, times, chosen)


def _header(args, spec, size, full, rows, n, thread_count):
    print(f"kql bench: {spec.name}, image {size[0]}x{size[1]}, patch {args.patch}, stride "
          f"{args.stride}, {n} positions (grid rows {rows[0]}..{rows[1] - 1} of "
          f"{full.full_shape[0]}x{full.full_shape[1]}), batch {args.batch}, "
          f"{thread_count} thread(s), {args.device}, {max(1, args.repeat)} round(s)")


def _engine_table(full, shape, times, peaks, results, planning, count, reference):
    """One row per engine: its rate, planning, speedups, peak memory and map vs naive."""
    n = count["chosen plan"]
    naive_rate = statistics.median(times["naive"]) / count["naive"]
    plain_rate = statistics.median(times[PLAIN]) / count[PLAIN]
    print(f"{'engine':<18} {'ms/position':>12} {'planning s':>11} {'vs plain':>9} {'full map':>9} "
          f"{'vs naive':>9} {'peak MB':>9} {'max |dp| vs naive':>18} {'SSIM vs naive':>14}")
    plain_map = plain_rate * full.count
    for name, ts in times.items():
        rate = statistics.median(ts) / count[name]
        plan_s = statistics.median(planning[name]) if name in planning else 0.0
        scan_rate = max(rate - plan_s / count[name], 1e-9)      # per position, after planning
        full_map = plain_map / (plan_s + scan_rate * full.count)
        diff, ssim = _against_reference(results[name], results[reference], n, shape)
        print(f"{name:<18} {1000 * rate:>12.2f} {plan_s:>11.2f} {plain_rate / rate:>8.2f}x "
              f"{full_map:>8.2f}x {naive_rate / rate:>8.2f}x {peaks[name] / 2**20:>9.0f} {diff:>18} "
              f"{ssim:>14}")
    print(f"ms/position and vs plain: this run's {n} positions, planning included; full map: "
          f"the ratio for all {full.count} positions (planning once, then this scan rate)")


def _against_reference(result, reference, n, shape) -> tuple:
    """max |dp| and SSIM of an engine's map against the reference's, as printed; '-' for
    an engine with no map of the ``n`` positions."""
    from .planner.tuning import heatmap_ssim

    mine = getattr(result, "probabilities", None)
    if mine is None or len(mine) != n:
        return "-", "-"
    ref = reference.probabilities
    return (f"{np.abs(mine - ref).max():.1e}",
            f"{heatmap_ssim(ref.reshape(shape), mine.reshape(shape)):.3f}")


def _against_libraries(results):
    """With ``--captum`` / ``--monai``: how far KQL's drop-ins' outputs are from the
    libraries' on the same windows."""
    differences = library_differences(results)
    if not differences:
        return
    what = {CAPTUM: "attribution", MONAI: "occlusion map"}
    print(f"against the libraries (same windows, same forward; target max |diff| <= {LIBRARY_TOLERANCE:g}):")
    for library, diff in differences.items():
        verdict = "ok" if diff <= LIBRARY_TOLERANCE else "OVER THE TARGET"
        print(f"  {DROP_INS[library]} vs {library}: max |{what[library]} diff| {diff:.1e} ({verdict})")


def _chosen_plan(args, chosen, times):
    """The chosen plan: its operator, predicted against actual seconds, approximation, R."""
    actual = statistics.median(times["chosen plan"])
    own = "".join(f", {k} {v}" for k, v in chosen.operator.describe().items())
    if chosen.batch != args.batch:
        own += f", batch {chosen.batch}"
    print(f"chosen plan: {chosen.operator.name}{own}; predicted {chosen.predicted_seconds:.2f}s, actual {actual:.2f}s "
          f"(predicted/actual {chosen.predicted_seconds / actual:.2f})")
    if chosen.approximation is not None:
        a = chosen.approximation
        bound = "unknown" if a.predicted_ssim is None else f"{a.predicted_ssim:.3f}"
        print(f"approximation: tau {a.tau:.2f} ({a.source}), predicted SSIM >= {bound}")
    ratio = "not computed (planned without tracing)" if chosen.ratio is None else f"{chosen.ratio:.2f}"
    print(f"theoretical R = Q/Q_inc (eqs 16-20, patch at the centre): {ratio}")


def _flop_ratios(plans):
    bounds = {name: flop_ratio(plans["naive"], plans[name]) for name in ("chosen plan", PURE)}
    if all(b is not None for b in bounds.values()):
        print(f"FLOP ratio vs the plain loop (its GFLOPs / the plan's, per position, as costed): "
              f"chosen plan {bounds['chosen plan']:.2f}x, {PURE} {bounds[PURE]:.2f}x: what each "
              f"plan's speedup is at equal GFLOP/s (a compute-bound CPU cannot go far past it)")


def _crossover_table(plans, times, chosen):
    """With ``--crossovers``: each crossover's nodes, predicted and actual seconds."""
    swept = [PURE] + [name for name in times if name.startswith("crossover ")]
    if len(swept) <= 1:
        return
    pure = statistics.median(times[PURE])
    print(f"{'crossover':<18} {'nodes':>6} {'predicted s':>12} {'actual s':>9} {'vs pure':>8}")
    for name in swept:
        plan = plans[name]
        crossover = plan.operator.steps.crossover
        label = "none (pure)" if crossover.fraction is None else crossover.label
        if chosen.operator.describe().get("crossover") == crossover.label:
            label += " (chosen)"
        t = statistics.median(times[name])
        print(f"{label:<18} {len(crossover.nodes):>6} "
              f"{plan.predicted_seconds:>12.2f} {t:>9.2f} {pure / t:>7.2f}x")
