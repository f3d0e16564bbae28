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
import torch

TAUS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
COVERAGE = 0.9
CONFIDENCE = 0.9
ONE_IMAGE_MARGIN = 0.05


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
    color = "mean" if query.color_label == "mean" else ",".join(f"{c:.4f}" for c in query.color)
    return "patch={}x{};stride={}x{};color={}".format(*query.grid.patch, *query.grid.stride, color)


@dataclass(frozen=True)
class Choice:
    tau: float
    predicted_ssim: float       # the conservative bound at tau (1.0 for the exact map)
    source: str                 # 'tuned on N images', 'user', 'default (...)'


@dataclass(frozen=True)
class TuningRecord:
    """SSIM of the thresholded map at every tau of ``taus`` on every sample image."""

    taus: tuple
    ssims: tuple                # [len(taus)][images]
    images: int
    seconds: float = 0.0

    def bound(self, i: int) -> float:
        """The conservative SSIM bound at ``taus[i]``."""
        values = np.asarray(self.ssims[i], np.float64)
        if len(values) == 1:
            return float(values[0] - ONE_IMAGE_MARGIN)
        k = tolerance_factor(len(values))
        return float(min(values.min(), values.mean() - k * values.std(ddof=1)))

    def choose(self, target: float) -> Choice:
        """The smallest tau whose bound, and every larger tau's, reaches ``target``;
        tau 1 (exact) when none does.

        >>> r = TuningRecord((0.9, 0.5), ((0.99, 0.98, 0.99), (0.9, 0.7, 0.95)), 3)
        >>> r.choose(0.8).tau, r.choose(0.99).tau
        (0.9, 1.0)
        """
        best = Choice(1.0, 1.0, self.source)
        for i in sorted(range(len(self.taus)), key=lambda j: -self.taus[j]):
            bound = self.bound(i)
            if bound < target:
                break
            best = Choice(float(self.taus[i]), bound, self.source)
        return best

    def predicted(self, tau: float) -> Optional[float]:
        """The bound at a tau of the grid (None off the grid)."""
        for i, t in enumerate(self.taus):
            if abs(t - tau) < 1e-9:
                return self.bound(i)
        return None

    @property
    def source(self) -> str:
        return f"tuned on {self.images} image{'s' if self.images != 1 else ''}"

    def summary(self) -> str:
        parts = [f"tau {t:.1f}: SSIM >= {self.bound(i):.3f}" for i, t in enumerate(self.taus)]
        return f"{self.source} in {self.seconds:.1f}s; " + ", ".join(parts)

    def to_dict(self) -> dict:
        return {"taus": list(self.taus), "ssims": [list(s) for s in self.ssims],
                "images": self.images, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: dict) -> "TuningRecord":
        return cls(tuple(float(t) for t in d["taus"]),
                   tuple(tuple(float(v) for v in s) for s in d["ssims"]),
                   int(d["images"]), float(d.get("seconds", 0.0)))


def tune(queries: list, settings=None, directory=None, progress=None,
         taus: tuple = TAUS) -> TuningRecord:
    """Exact and thresholded maps of every query (one per sample image); their SSIMs."""
    from kql.errors import KqlPlanError
    from kql.operators.graph import TraceError

    from . import calibrate, devices
    from .approximate import exact_and_thresholded

    start = time.perf_counter()
    device = "cuda" if devices.cuda_available() else "cpu"
    threads = calibrate.throughput(device, directory).threads if device == "cpu" else None
    ssims = [[] for _ in taus]
    for done, query in enumerate(queries):
        try:
            with calibrate.threads(threads or torch.get_num_threads()):
                exact, approx = exact_and_thresholded(query, device, taus)
        except TraceError as exc:
            raise KqlPlanError(f"CALIBRATE: model '{query.model.name}' cannot run "
                               f"incrementally, so thresholding does not apply ({exc})") from None
        for i, a in enumerate(approx):
            ssims[i].append(heatmap_ssim(exact, a))
        if progress is not None:
            progress(done + 1, len(queries))
    return TuningRecord(tuple(taus), tuple(tuple(s) for s in ssims), len(queries),
                        time.perf_counter() - start)
