"""Drill-down that measures its own quality on the image it runs on.

Tuned drill-down (:mod:`.drilldown`) keeps a promise made on other images; a map rougher
than any seen in tuning (fine texture under a small patch, such as a star field) silently
breaks it. This operator checks the map it is making instead. Every cell it computes is a
cell of the requested grid, so nothing it computes is wasted when it has to go further:

1. a lattice of cells, every ``step``-th row and column (and the last ones), computed
   exactly; every other cell interpolated from it (bilinear, as drill-down's stage one);
2. a *check*: a few 7x7 windows of the requested grid at random places (stratified,
   seeded by the grid's shape, so a query always gives the same map), computed exactly;
   on each, the local SSIM of the interpolated values against the exact ones (the
   windows of ``skimage.metrics.structural_similarity``, whose mean over all windows is
   the map's SSIM). The windows are a random sample of that mean: its one-sided lower
   confidence bound (Student's t, :data:`CONFIDENCE`) is the quality measured;
3. bound >= target: the map is the interpolation with every exact cell in place, and
   stage two computes the fraction ``r`` of the cells where it drops most (the seed
   paper's drill-down), which brings it closer still. Otherwise the lattice is refined
   and checked again on the same windows; past the last lattice the rest of the exact
   map is computed: a map too rough to interpolate costs what the exact one does.

An even lattice is refined in two steps: first along one axis (every 4th row and every
2nd column, or the other way round, finer along the axis the map varies most along),
then to every 2nd cell. Each lattice holds the one before, so starting coarse costs
nothing when a check sends the scan on. The checks share :data:`CONFIDENCE` (Bonferroni:
three checks at 96.7% each), so the bound of the map a scan ends with holds at 90%.

The check compares against exact values, so the stages run at tau 1. With a ``checker``
(the float32 operator of a ``fine`` one that runs in reduced precision,
:mod:`.precision`), the check's windows are computed in float32 first and the lattice and
detail in the reduced precision: the bound then measures interpolation and arithmetic
together against the float32 map; a scan whose every check fails computes the whole map
in float32 (the reduced cells again too), so it ends exact as without one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .drilldown import interpolate, largest_drops
from .protocol import Approximation, Operator
from .task import OcclusionResult, OcclusionTask, Progress

WINDOW = 7              # skimage's default SSIM window: the check's unit
TILES = 8               # windows sampled per map (392 cells at most)
CONFIDENCE = 0.9        # of the bound on the map's SSIM, over all the checks a scan makes


@dataclass(frozen=True)
class Check:
    """What the map must keep: ``SSIM >= target`` against the exact map."""

    target: float
    tiles: int = TILES


def checkable(shape: tuple) -> bool:
    """Whether a map of ``shape`` (rows, cols) holds a check window and a coarser lattice."""
    return min(shape) >= WINDOW


def levels(step: int) -> list:
    """The lattices tried in turn, (rows step, columns step), ending at (1, 1): every cell,
    the exact map. An even step > 2 is refined along one axis first (``(step, 2)``: the
    finer axis is the one the map varies most along, chosen at run time), then to every
    2nd cell; an odd one goes straight to the exact map. Each lattice holds the one before.

    >>> levels(4)
    [(4, 4), (4, 2), (2, 2), (1, 1)]
    >>> levels(3), levels(2), levels(1)
    ([(3, 3), (1, 1)], [(2, 2), (1, 1)], [(1, 1)])
    """
    if step <= 1:
        return [(1, 1)]
    if step > 2 and step % 2 == 0:
        return [(step, step), (step, 2), (2, 2), (1, 1)]
    return [(step, step), (1, 1)]


def check_confidence(step: int) -> float:
    """Each check's confidence for a scan starting at ``step``: :data:`CONFIDENCE` split
    over its checks (Bonferroni), so the bound of the map it ends with holds at that.

    >>> round(check_confidence(4), 4), check_confidence(2)
    (0.9667, 0.9)
    """
    return 1.0 - (1.0 - CONFIDENCE) / max(1, len(levels(step)) - 1)


def lattice(shape: tuple, step) -> tuple:
    """Row and column indices of the lattice: every ``step``-th (an int, or (rows, cols)
    steps), and the last.

    >>> [a.tolist() for a in lattice((7, 5), 3)], [a.tolist() for a in lattice((5, 5), (4, 2))]
    ([[0, 3, 6], [0, 3, 4]], [[0, 4], [0, 2, 4]])
    """
    rows, cols = shape
    sy, sx = (step, step) if isinstance(step, int) else step
    pick = lambda n, s: np.unique(np.r_[np.arange(0, n, s), n - 1])
    return pick(rows, sy), pick(cols, sx)


def orient(grid: np.ndarray, step: int) -> tuple:
    """The one-axis refinement of lattice ``step`` whose values are ``grid`` [T, rows, cols]:
    ``(2, step)`` (every 2nd row) where the values vary more down the rows than across
    them, else ``(step, 2)``.

    >>> orient(np.array([[[0.0, 0.0], [1.0, 1.0]]]), 4), orient(np.array([[[0.0, 1.0]]]), 4)
    ((2, 4), (4, 2))
    """
    along_rows = np.abs(np.diff(grid, axis=1)).mean() if grid.shape[1] > 1 else 0.0
    along_cols = np.abs(np.diff(grid, axis=2)).mean() if grid.shape[2] > 1 else 0.0
    return (2, step) if along_rows > along_cols else (step, 2)


def label(step: tuple) -> str:
    return f"{step[0]}x{step[1]}"


def windows(shape: tuple, count: int) -> list:
    """``count`` window centres (row, col), stratified over the map; the same for a shape.

    >>> windows((20, 30), 4) == windows((20, 30), 4), len(windows((7, 7), 5))
    (True, 5)
    """
    rows, cols = shape
    half = WINDOW // 2
    rng = np.random.default_rng(rows * 100_003 + cols)
    side = max(1, math.ceil(math.sqrt(count)))
    r_edges = np.linspace(half, rows - half, side + 1)
    c_edges = np.linspace(half, cols - half, side + 1)
    strata = [(i, j) for i in range(side) for j in range(side)]
    order = rng.permutation(len(strata))
    centres = []
    for n in range(count):
        i, j = strata[order[n % len(strata)]]
        r = int(rng.integers(int(r_edges[i]), max(int(r_edges[i]) + 1, int(r_edges[i + 1]))))
        c = int(rng.integers(int(c_edges[j]), max(int(c_edges[j]) + 1, int(c_edges[j + 1]))))
        centres.append((min(r, rows - half - 1), min(c, cols - half - 1)))
    return centres


def window_mask(shape: tuple, centres: list) -> np.ndarray:
    """[rows, cols] bool: the cells of the check's windows centred at ``centres``."""
    half = WINDOW // 2
    mask = np.zeros(shape, bool)
    for r, c in centres:
        mask[r - half:r + half + 1, c - half:c + half + 1] = True
    return mask


def spread_lattice(grid: np.ndarray, lr: np.ndarray, lc: np.ndarray) -> np.ndarray:
    """A map [rows, cols] interpolated (bilinear) from its values at lattice rows ``lr``,
    columns ``lc``; the lattice cells keep their values.

    >>> spread_lattice(np.array([[0.0, 9.0, 2.0]]), np.array([0]), np.array([0, 2])).tolist()
    [[0.0, 1.0, 2.0]]
    """
    rows, cols = grid.shape
    ys, xs = np.repeat(np.arange(rows), cols), np.tile(np.arange(cols), rows)
    return interpolate(grid[np.ix_(lr, lc)], lr, lc, ys, xs).reshape(rows, cols)


def lower_bound(values, confidence: float) -> float:
    """One-sided lower confidence bound of the mean of ``values`` (Student's t).

    >>> lower_bound([0.9, 0.9, 0.9], 0.9), round(lower_bound([0.8, 0.9, 1.0], 0.9), 3)
    (0.9, 0.791)
    """
    from scipy.stats import t

    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float(values.min()) if len(values) else 0.0
    spread = values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - t.ppf(confidence, len(values) - 1) * spread)


def local_ssims(exact: np.ndarray, approx: np.ndarray, centres: list) -> list:
    """The SSIM of each window (centred at ``centres``) of two maps [rows, cols]."""
    from skimage.metrics import structural_similarity

    half = WINDOW // 2
    out = []
    for r, c in centres:
        box = (slice(r - half, r + half + 1), slice(c - half, c + half + 1))
        out.append(float(structural_similarity(exact[box].astype(np.float64),
                                               approx[box].astype(np.float64),
                                               data_range=1.0, win_size=WINDOW)))
    return out


def expected_cells(shape: tuple, step: int, fraction: float, tiles: int = TILES,
                   bounds: Optional[dict] = None, target: float = 1.0) -> float:
    """Cells a verified drill-down starting at ``step`` computes, on average over the
    tuning images whose check ``bounds`` ({step: [bound per image]}) are known; with none,
    the cells when the first check passes (what EXPLAIN calls the optimistic case). A
    lattice whose check the tuning did not record is priced as failing."""
    rows, cols = shape
    total = rows * cols
    cover = window_mask(shape, windows(shape, tiles))

    def cells_at(tried: list) -> int:
        known = cover.copy()
        for s in tried:
            lr, lc = lattice(shape, s)
            known[np.ix_(lr, lc)] = True
        done = int(known.sum())
        return min(total, done + max(1, math.ceil(fraction * total)))

    if not bounds:
        return float(cells_at([(step, step)]))
    images = len(next(iter(bounds.values())))
    spent = []
    for i in range(images):
        tried = []
        for s in levels(step):
            if s == (1, 1):
                spent.append(total)
                break
            tried.append(s)
            key = s[0] if s[0] == s[1] else (max(s), 2)     # a first check, a refinement
            if key in bounds and bounds[key][i] >= target:
                spent.append(cells_at(tried))
                break
    return float(np.mean(spent))


def check_bound(exact: np.ndarray, step: int, refine: bool = False) -> float:
    """What a verified drill-down starting at lattice ``step`` measures on ``exact``
    [rows, cols] in its first check, or with ``refine`` in its one-axis refinement (the
    same windows, orientation and bound as :meth:`VerifiedDrillDown.run`; tuning records it)."""
    lr, lc = lattice(exact.shape, step)
    if refine:
        lr, lc = lattice(exact.shape, orient(exact[np.ix_(lr, lc)][None], step))
    approx = spread_lattice(exact, lr, lc)
    return lower_bound(local_ssims(exact, approx, windows(exact.shape, TILES)), check_confidence(step))


class VerifiedDrillDown(Operator):
    """Physical operator: a lattice, a check of its interpolation, detail where it drops."""

    name = "VerifiedDrillDown"

    def __init__(self, fine, shape: tuple, step: int, fraction: float, check: Check,
                 checker=None):
        """``fine``: an operator for the requested grid (``shape`` rows x cols, row-major),
        re-targeted at the cells each round needs (:meth:`at`); ``checker``: the one the
        check's windows run on where ``fine`` is not exact arithmetic (None: ``fine``)."""
        self.fine, self.shape, self.step = fine, tuple(shape), int(step)
        self.fraction, self.check = float(fraction), check
        self.checker = checker

    def describe(self) -> dict:
        items = {"lattice": f"every {self.step}", "fraction": f"{self.fraction:.2f}",
                 "check": f"SSIM>={self.check.target:g} on {self.check.tiles} windows"}
        if self.checker is not None:
            low = self.fine.describe().get("precision", "reduced")
            items["precision"] = f"{low}, check windows in float32"
        return items

    def check_cells(self) -> int:
        """Cells of the check's windows (the float32 part of a reduced-precision scan)."""
        return int(window_mask(self.shape, windows(self.shape, self.check.tiles)).sum())

    def expected_cells(self, bounds: Optional[dict] = None) -> float:
        """Cells it is expected to compute (:func:`expected_cells`), from the tuning's
        check ``bounds`` where known."""
        return expected_cells(self.shape, self.step, self.fraction, self.check.tiles, bounds,
                              self.check.target)

    def approximation(self) -> Approximation:
        return Approximation("verified", f"verified drill-down ({self.describe()['check']})")

    def exact(self):
        return (self.checker or self.fine).exact()

    def at(self, ys, xs):
        return self.fine.at(ys, xs)

    def rebind(self, profile) -> "VerifiedDrillDown":
        checker = self.checker.rebind(profile) if self.checker is not None else None
        return VerifiedDrillDown(self.fine.rebind(profile), self.shape, self.step,
                                 self.fraction, self.check, checker)

    def run(self, task: OcclusionTask, progress: Progress = None, timings=None) -> OcclusionResult:
        scan = _Scan(self.fine, task, progress, timings, self.checker)
        centres = windows(self.shape, self.check.tiles)
        rows, cols = self.shape
        in_windows = window_mask(self.shape, centres)
        cascade = levels(self.step)
        confidence = check_confidence(self.step)
        tried, lr, lc = [], None, None
        for n, step in enumerate(cascade):
            if step == (1, 1):
                scan.compute(np.arange(rows * cols), exact=True)
                return scan.result(dict(lattice="1x1", bound=1.0, windows=len(centres),
                                        exact=True, tried=tried, target=self.check.target))
            if step[0] != step[1]:
                step = scan.oriented(step, lr, lc, self.shape)
            tried.append(label(step))
            lr, lc = lattice(self.shape, step)
            cells = (lr[:, None] * cols + lc[None, :]).ravel()
            if n:
                scan.compute(cells)
            elif self.checker is None:
                scan.compute(np.union1d(cells, np.flatnonzero(in_windows)))
            else:                                      # the check's windows exact, first
                scan.compute(np.flatnonzero(in_windows), exact=True)
                scan.compute(cells)
            approx = scan.interpolated(lr, lc, self.shape)
            exact = scan.scores.reshape(-1, rows, cols)
            bound = min(lower_bound(local_ssims(e, a, centres), confidence)
                        for e, a in zip(exact, approx))
            if bound >= self.check.target:
                values = np.where(scan.known, scan.scores, approx.reshape(len(approx), -1))
                drops = (values - scan.first.base_scores[:, None]).min(axis=0)
                drops[scan.known] = np.inf               # exact already
                todo = largest_drops(drops, self.fraction)
                scan.compute(todo[~scan.known[todo]])
                values[:, scan.known] = scan.scores[:, scan.known]
                return scan.result(dict(lattice=label(step), bound=bound, windows=len(centres),
                                        exact=False, tried=tried, target=self.check.target),
                                   values, approx_logits=scan.interpolated_logits(lr, lc, self.shape))
        raise AssertionError("levels() ends at 1")


class _Scan:
    """The cells computed so far, over the requested grid: by ``fine``, or where asked for
    exact ones by ``checker`` (None: ``fine``, whose cells are exact)."""

    def __init__(self, fine, task: OcclusionTask, progress, timings, checker=None):
        self.fine, self.task, self.progress, self.timings = fine, task, progress, timings
        self.checker = checker
        self.known = np.zeros(task.count, bool)
        self.reduced = np.zeros(task.count, bool)    # computed by fine where it is not exact
        self.first: Optional[OcclusionResult] = None
        self.scores = self.logits = None
        self.halved: tuple = ()          # batch sizes that ran out of memory (scan's)

    def compute(self, cells: np.ndarray, exact: bool = False) -> None:
        """Compute ``cells`` not known yet; with ``exact`` (and a checker), in exact
        arithmetic, the reduced ones computed before included."""
        cells = np.asarray(cells, np.int64)
        by_checker = exact and self.checker is not None
        cells = cells[~self.known[cells] | (self.reduced[cells] if by_checker else False)]
        if not len(cells):
            return
        operator = self.checker if by_checker else self.fine
        ys, xs = self.task.ys[cells], self.task.xs[cells]
        task = dataclasses.replace(self.task, ys=ys, xs=xs)
        if self.first is not None:
            task = dataclasses.replace(task, targets=self.first.targets, output=self.first.output)
        out = operator.at(ys, xs).run(task, None, self.timings)
        if self.first is None:
            self.first = out
            shape = (len(out.targets), self.task.count)
            self.scores = np.zeros(shape, np.float32)
            self.logits = np.zeros(shape, np.float32)
        self.scores[:, cells] = out.scores
        self.logits[:, cells] = out.all_logits
        self.known[cells] = True
        self.reduced[cells] = self.checker is not None and not by_checker
        self.halved += out.halved
        if self.progress is not None:
            self.progress(int(self.known.sum()), self.task.count)

    def oriented(self, step: tuple, lr, lc, shape) -> tuple:
        """``(step, 2)`` or ``(2, step)``: finer along the axis the map, on the lattice
        ``lr, lc`` computed so far, varies most along (summed over the targets)."""
        rows, cols = shape
        return orient(self.scores.reshape(len(self.scores), rows, cols)[:, lr][:, :, lc], max(step))

    def interpolated(self, lr, lc, shape) -> np.ndarray:
        """[T, rows, cols]: every target's map interpolated from the lattice's cells."""
        return self._spread(self.scores, lr, lc, shape)

    def interpolated_logits(self, lr, lc, shape) -> np.ndarray:
        return self._spread(self.logits, lr, lc, shape).reshape(len(self.logits), -1)

    @staticmethod
    def _spread(values, lr, lc, shape) -> np.ndarray:
        return np.stack([spread_lattice(g, lr, lc)
                         for g in values.reshape(len(values), *shape)]).astype(np.float32)

    def result(self, check: dict, values=None, approx_logits=None) -> OcclusionResult:
        scores, logits = self.scores, self.logits
        if values is not None:
            scores = values.astype(np.float32)
            logits = np.where(self.known, self.logits, approx_logits).astype(np.float32)
        check["cells"], check["of"] = int(self.known.sum()), self.task.count
        if self.progress is not None:
            self.progress(self.task.count, self.task.count)
        return dataclasses.replace(self.first, scores=scores, all_logits=logits, check=check,
                                   halved=self.halved)
