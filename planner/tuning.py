"""Tuning the projective-field threshold to a quality target (seed paper 000, section 4.4).

Quality is the SSIM between the exact and the approximate heat map
(``skimage.metrics.structural_similarity`` on the probability maps, ``data_range=1``,
the window the largest odd size <= 7 that fits the map). ``CALIBRATE <model> ON (...)``
computes, on every sample image, the exact map and one thresholded map per tau of
:data:`TAUS`, and keeps every SSIM. For ``WITH SSIM >= s`` the planner then takes the
smallest tau (the fastest) whose *conservative bound* reaches ``s``, at that tau and at
every larger one of the grid.

The seed paper fits a degree-2 curve to the mean SSIM and meets its target in about 80%
of cases. The bound here is a one-sided normal tolerance bound instead: with 90%
confidence, 90% of images lie above it (``mean - k sd``, ``k`` from the noncentral t
distribution for the sample size), and never above the lowest SSIM seen. One image gives
no spread: its SSIM less :data:`ONE_IMAGE_MARGIN`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

TAUS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
# Drill-down settings (fraction r, SPEEDUP) tuned besides plain maps, at tau 1 and every tau.
DRILLDOWNS = ((0.25, 3.0), (0.1, 6.0))
# Lattice steps whose verified drill-down check tuning records (planner/drilldown.py).
VERIFIED_STEPS = (2, 3, 4)
COVERAGE = 0.9
CONFIDENCE = 0.9
ONE_IMAGE_MARGIN = 0.05
# CALIBRATE's cost per image, in exact maps: the exact one and thresholded ones up to this.
BUDGET = 3.0
# A thresholded map below this SSIM ends its image's thresholded maps (smaller taus keep less).
FLOOR = 0.5
NOT_MEASURED = -1.0         # the SSIM recorded for a tau not computed: never chosen
TIGHT = 5                   # images from which the bound is called tight


def heatmap_ssim(exact: np.ndarray, approx: np.ndarray) -> float:
    """SSIM of two probability maps; 1.0 for identical maps.

    >>> m = np.linspace(0, 1, 48, dtype=np.float32).reshape(6, 8)
    >>> heatmap_ssim(m, m), round(heatmap_ssim(m, m[::-1].copy()), 3) < 1
    (1.0, True)
    """
    from skimage.metrics import structural_similarity

    exact = np.asarray(exact, np.float64)
    approx = np.asarray(approx, np.float64)
    side = min(exact.shape)
    if side < 3:                       # too small for a window: fall back to 1 - max error
        return float(1.0 - np.abs(exact - approx).max())
    win = min(7, side if side % 2 else side - 1)
    return float(structural_similarity(exact, approx, data_range=1.0, win_size=win))


def tolerance_factor(n: int) -> float:
    """k of the one-sided normal tolerance bound ``mean - k sd`` (COVERAGE, CONFIDENCE).

    >>> round(tolerance_factor(30), 2), round(tolerance_factor(5), 2)
    (1.66, 2.74)
    """
    from scipy.stats import nct, norm

    z = norm.ppf(COVERAGE)
    return float(nct.ppf(CONFIDENCE, df=n - 1, nc=z * math.sqrt(n)) / math.sqrt(n))


def key(query) -> str:
    """What a tuning is valid for: patch, stride and colour (the model is the catalog's key).

    The SSIM a threshold keeps depends on how large the patch is against the maps, how
    dense the grid is and what the patch paints."""
    named = query.color_label == "mean" or query.fill is not None   # the image's own pixels
    color = query.color_label if named else ",".join(f"{c:.4f}" for c in query.color)
    return "patch={}x{};stride={}x{};color={}".format(*query.grid.patch, *query.grid.stride, color)


@dataclass(frozen=True)
class Choice:
    tau: float
    predicted_ssim: float       # the conservative bound at tau (1.0 for the exact map)
    source: str                 # 'tuned on N images', 'user', 'default (...)'
    drilldown: Optional[tuple] = None    # (fraction, SPEEDUP) when drill-down was tuned in
    precision: Optional[str] = None      # the exact map in this arithmetic (bfloat16), tuned


@dataclass(frozen=True)
class TuningRecord:
    """SSIM of the thresholded map at every tau of ``taus`` on every sample image."""

    taus: tuple
    ssims: tuple                # [len(taus)][images]
    images: int
    seconds: float = 0.0
    drills: tuple = ()          # ((fraction, speedup, ssims[1 + len(taus)][images]), ...): tau 1, taus
    checks: tuple = ()          # ((step, bounds[images]), ...): a verified drill-down's first check per lattice step
    refined: tuple = ()         # ((step, bounds[images]), ...): its one-axis refinement of an even step > 2
    precisions: tuple = ()      # ((precision, ssims[images]), ...): the exact map in it against float32

    def bound(self, i: int) -> float:
        """The conservative SSIM bound at ``taus[i]``."""
        return conservative(self.ssims[i])

    def choose(self, target: float) -> Choice:
        """The smallest tau whose bound, and every larger tau's, reaches ``target``;
        tau 1 (exact) when none does.

        >>> r = TuningRecord((0.9, 0.5), ((0.99, 0.98, 0.99), (0.9, 0.7, 0.95)), 3)
        >>> r.choose(0.8).tau, r.choose(0.99).tau
        (0.9, 1.0)
        """
        return _smallest(self.taus, self.ssims, target, Choice(1.0, 1.0, self.source),
                         lambda tau, bound: Choice(tau, bound, self.source))

    def candidates(self, target: float) -> list:
        """Every way to meet ``target`` the tuning measured: the plain map at its
        :meth:`choose` tau, and each drill-down setting at its smallest tau (if any)."""
        found = [self.choose(target)]
        for fraction, speedup, ssims in self.drills:
            pick = _smallest((1.0,) + tuple(self.taus), ssims, target, None,
                             lambda tau, bound: Choice(tau, bound, self.source, (fraction, speedup)))
            if pick is not None:
                found.append(pick)
        for name, values in self.precisions:
            bound = conservative(values)
            if NOT_MEASURED not in values and bound >= target:
                found.append(Choice(1.0, bound, self.source, precision=name))
        return found

    def predicted(self, tau: float) -> Optional[float]:
        """The bound at a tau of the grid (None off the grid, or where it was not
        measured on every image)."""
        for i, t in enumerate(self.taus):
            if abs(t - tau) < 1e-9:
                return None if NOT_MEASURED in self.ssims[i] else self.bound(i)
        return None

    @property
    def source(self) -> str:
        return f"tuned on {self.images} image{'s' if self.images != 1 else ''}"

    def summary(self) -> str:
        parts = [f"tau {t:.1f}: SSIM >= {self.bound(i):.3f}" for i, t in enumerate(self.taus)
                 if NOT_MEASURED not in self.ssims[i]]
        skipped = [f"{t:.1f}" for i, t in enumerate(self.taus) if NOT_MEASURED in self.ssims[i]]
        if skipped:
            parts.append(f"tau {', '.join(skipped)}: not measured on every image (a larger tau "
                         f"fell below SSIM {FLOOR:g} or used the budget of {BUDGET:g} exact maps)")
        for r, sp, ssims in self.drills:
            parts.append(f"DRILLDOWN {r:g} SPEEDUP {sp:g} exact: SSIM >= {conservative(ssims[0]):.3f}")
        for name, values in self.precisions:
            parts.append(f"{name}: SSIM >= {conservative(values):.3f}")
        for step, b in self.checks:
            parts.append(f"checked lattice every {step}: median bound {np.median(b):.3f}")
        return f"{self.source} in {self.seconds:.1f}s; " + ", ".join(parts)

    def to_dict(self) -> dict:
        return {"taus": list(self.taus), "ssims": [list(s) for s in self.ssims],
                "images": self.images, "seconds": self.seconds,
                "drills": [[r, sp, [list(v) for v in ssims]] for r, sp, ssims in self.drills],
                "checks": [[step, list(b)] for step, b in self.checks],
                "refined": [[step, list(b)] for step, b in self.refined],
                "precisions": [[name, list(v)] for name, v in self.precisions]}

    @classmethod
    def from_dict(cls, d: dict) -> "TuningRecord":
        table = lambda rows: tuple(tuple(float(v) for v in row) for row in rows)
        drills = tuple((float(r), float(sp), table(ssims)) for r, sp, ssims in d.get("drills", ()))
        steps = lambda rows: tuple((int(step), tuple(float(v) for v in b)) for step, b in rows)
        precisions = tuple((str(name), tuple(float(v) for v in values))
                           for name, values in d.get("precisions", ()))
        return cls(tuple(float(t) for t in d["taus"]), table(d["ssims"]), int(d["images"]),
                   float(d.get("seconds", 0.0)), drills, steps(d.get("checks", ())),
                   steps(d.get("refined", ())), precisions)

    def check_bounds(self) -> dict:
        """The verified drill-down's check on each tuning image: ``{step: [bound, ...]}`` for
        a scan's first lattice, ``{(step, 2): [...]}`` for its one-axis refinement."""
        bounds = {step: list(b) for step, b in self.checks}
        bounds.update({(step, 2): list(b) for step, b in self.refined})
        return bounds


def conservative(values) -> float:
    """The one-sided tolerance bound of a sample of SSIMs (see the module docstring)."""
    values = np.asarray(values, np.float64)
    if len(values) == 1:
        return float(values[0] - ONE_IMAGE_MARGIN)
    k = tolerance_factor(len(values))
    return float(min(values.min(), values.mean() - k * values.std(ddof=1)))


def _smallest(taus, ssims, target, fallback, make):
    """Walk the taus down from the largest; the last whose bound (and every larger tau's)
    reaches ``target``, or ``fallback``."""
    best = fallback
    for i in sorted(range(len(taus)), key=lambda j: -taus[j]):
        bound = conservative(ssims[i])
        if bound < target:
            break
        best = make(float(taus[i]), bound)
    return best


def tune(queries: list, settings=None, directory=None, progress=None,
         taus: tuple = TAUS, drilldowns: tuple = DRILLDOWNS, budget: float = BUDGET,
         reduced: Optional[tuple] = None) -> TuningRecord:
    """Exact and thresholded maps of every query (one per sample image); their SSIMs.

    Per image, the exact map once; drill-down and the verified checks are simulated from
    it and from the thresholded maps. The thresholded maps go from the largest tau down
    and stop where nothing smaller can be of use: once a map's SSIM falls below
    :data:`FLOOR` (a smaller tau keeps less), or once they have taken ``budget - 1`` times
    the exact map's time. A tau not computed is recorded as :data:`NOT_MEASURED` (never
    chosen). Before the thresholded maps, the exact map in each precision of ``reduced``
    (default: bfloat16 where the device runs it, :func:`reduced_precisions`), whose SSIM
    against float32 lets ``WITH SSIM`` run the exact map in it where the bound reaches
    the target. ``progress(done, total)`` counts positions over every map planned, a map
    skipped counting as done, so the bar's rate and ETA hold."""
    from kql.errors import KqlPlanError
    from kql.operators.graph import TraceError
    from kql.operators.verified import check_bound, checkable

    from . import devices
    from .approximate import maps_at

    start = time.perf_counter()
    device = "cuda" if devices.cuda_available() else "cpu"
    reduced = reduced_precisions(device) if reduced is None else tuple(reduced)
    lower = {name: [] for name in reduced}
    ssims = [[] for _ in taus]
    drilled = [[[] for _ in (1.0,) + tuple(taus)] for _ in drilldowns]
    checked = {step: [] for step in VERIFIED_STEPS}
    refined = {step: [] for step in VERIFIED_STEPS if step > 2 and step % 2 == 0}
    bar = _Positions(progress, queries[0].grid.count if queries else 0,
                     len(queries) * (1 + len(reduced) + len(taus)))
    for query in queries:
        maps = maps_at(query, device, taus, progress=bar, reduced=reduced)
        try:
            exact, spent, measured, in_reduced = None, 0.0, [], set()
            for how, found, seconds in maps:
                bar.map_done()
                if exact is None:
                    exact, allowed = found, (budget - 1.0) * seconds
                    continue
                ssim = heatmap_ssim(exact, found)
                if isinstance(how, str):                 # the exact map in reduced precision
                    lower[how].append(ssim)
                    in_reduced.add(how)
                    spent += seconds
                    continue
                ssims[len(measured)].append(ssim)
                measured.append(found)
                spent += seconds
                if ssim < FLOOR or spent >= allowed:
                    break
        except TraceError as exc:
            raise KqlPlanError(f"CALIBRATE: model '{query.model.name}' cannot run "
                               f"incrementally, so thresholding does not apply ({exc})") from None
        finally:
            maps.close()
        for name in set(reduced) - in_reduced:
            lower[name].append(NOT_MEASURED)
        for i in range(len(measured), len(taus)):
            ssims[i].append(NOT_MEASURED)
        for d, (fraction, speedup) in enumerate(drilldowns):
            for i, a in enumerate([exact] + measured):
                drilled[d][i].append(heatmap_ssim(exact, drilled_map(query, a, fraction, speedup)))
            for i in range(1 + len(measured), 1 + len(taus)):
                drilled[d][i].append(NOT_MEASURED)
        if checkable(exact.shape):
            for step in VERIFIED_STEPS:
                checked[step].append(check_bound(exact, step))
            for step in refined:
                refined[step].append(check_bound(exact, step, refine=True))
        bar.skip(len(taus) - len(measured))
    drills = tuple((r, sp, tuple(tuple(v) for v in table))
                   for (r, sp), table in zip(drilldowns, drilled))
    checks = tuple((step, tuple(b)) for step, b in checked.items() if b)
    refinements = tuple((step, tuple(b)) for step, b in refined.items() if b)
    return TuningRecord(tuple(taus), tuple(tuple(s) for s in ssims), len(queries),
                        time.perf_counter() - start, drills, checks, refinements,
                        tuple((name, tuple(v)) for name, v in lower.items()))


def reduced_precisions(device: str) -> tuple:
    """The reduced precisions tuning measures on ``device``: bfloat16 where it runs it."""
    from kql.operators.precision import BFLOAT16, unsupported

    return (BFLOAT16,) if unsupported(BFLOAT16, device) is None else ()


class _Positions:
    """CALIBRATE's progress: positions over every map it plans (``maps`` of ``count``
    positions), the map being computed reporting its own; a map skipped counts as done."""

    def __init__(self, progress, count: int, maps: int):
        self.progress, self.count, self.total = progress, count, count * maps
        self.done = 0                        # positions of the maps finished or skipped

    def __call__(self, done: int, _total: int) -> None:
        if self.progress is not None:
            self.progress(min(self.total, self.done + done), self.total)

    def map_done(self) -> None:
        self.skip(1)

    def skip(self, maps: int) -> None:
        self.done += maps * self.count
        self(0, 0)


def what_it_can_promise(images: int) -> str:
    """What a tuning on ``images`` images can promise, said before it runs.

    >>> what_it_can_promise(3)[:60]
    'tuning on 3 images: the bound is the lowest SSIM seen and me'
    """
    if images <= 1:
        return (f"tuning on 1 image: the bound is its SSIM less {ONE_IMAGE_MARGIN:g} (no spread "
                f"to measure); {TIGHT} or more images give a bound with a stated confidence")
    k = tolerance_factor(images)
    tail = ("" if images >= TIGHT else
            f"; with {TIGHT} images {tolerance_factor(TIGHT):.2f}, with 10 "
            f"{tolerance_factor(10):.2f}: add images for a tighter bound")
    return (f"tuning on {images} images: the bound is the lowest SSIM seen and mean - "
            f"{k:.2f} sd of the SSIMs ({COVERAGE:.0%} of images above it, {CONFIDENCE:.0%} "
            f"confidence){tail}")


def drilled_map(query, fine: np.ndarray, fraction: float, speedup: float) -> np.ndarray:
    """What ``DRILLDOWN fraction SPEEDUP speedup`` gives when both stages compute ``fine``."""
    import dataclasses

    from kql.operators.drilldown import simulate, stage_one_stride

    s1 = tuple(stage_one_stride(s, fraction, speedup) for s in query.grid.stride)
    coarse = dataclasses.replace(query.grid, stride=s1)
    if coarse.problem() or coarse.count < 1:
        return np.zeros_like(fine)           # no stage one here: never a candidate
    ys, xs = query.grid.positions()
    cys, cxs = coarse.positions()
    values = simulate(fine.ravel(), ys, xs, (cys, cxs, *coarse.shape), fraction)
    return values.reshape(fine.shape)
