"""How close an approximate heat map is to the exact one, as its reader relies on it.

SSIM (:func:`~.tuning.heatmap_ssim`) judges the map's structure as a picture; a reader
of an occlusion map relies on two more things: the order of the cells (which region
matters more than which: Spearman's rank correlation of the cells) and where the
strongest drops are (the overlap, intersection over union, of the cells with the largest
10% of drops in each map: the part a clinician looks at, and what drill-down and the
verified check rely on being right). Deletion curves (RISE) and localisation metrics
(Quantus) are built on the same two readings.
"""

from __future__ import annotations

import math

import numpy as np

from .tuning import heatmap_ssim

TOP_FRACTION = 0.1


def spearman(exact: np.ndarray, approx: np.ndarray) -> float:
    """Spearman's rank correlation of the cells of two maps (ties ranked by their mean);
    1.0 where both are constant alike, 0.0 where only one is.

    >>> m = np.array([[0.9, 0.5], [0.2, 0.7]])
    >>> spearman(m, m ** 2), spearman(m, 1 - m)
    (1.0, -1.0)
    """
    from scipy.stats import rankdata

    a = rankdata(np.asarray(exact, np.float64).ravel())
    b = rankdata(np.asarray(approx, np.float64).ravel())
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 1.0 if np.ptp(a) == np.ptp(b) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def top_cells(heatmap: np.ndarray, fraction: float = TOP_FRACTION) -> np.ndarray:
    """Indices of the ``ceil(fraction x cells)`` cells with the lowest probability (the
    largest drops), ties broken by position.

    >>> top_cells(np.array([[0.9, 0.1], [0.5, 0.3]]), 0.5).tolist()
    [1, 3]
    """
    flat = np.asarray(heatmap, np.float64).ravel()
    k = max(1, math.ceil(fraction * flat.size))
    return np.sort(np.argsort(flat, kind="stable")[:k])


def top_overlap(exact: np.ndarray, approx: np.ndarray, fraction: float = TOP_FRACTION) -> float:
    """Intersection over union of the two maps' strongest-drop cells (:func:`top_cells`).

    >>> m = np.arange(20, dtype=float).reshape(4, 5)
    >>> top_overlap(m, m), top_overlap(m, m[::-1])
    (1.0, 0.0)
    """
    a, b = set(top_cells(exact, fraction).tolist()), set(top_cells(approx, fraction).tolist())
    return len(a & b) / len(a | b)


def map_quality(exact: np.ndarray, approx: np.ndarray) -> dict:
    """``{'ssim', 'spearman', 'top10_iou'}`` of ``approx`` against ``exact`` (same shape)."""
    exact, approx = np.asarray(exact), np.asarray(approx)
    return {"ssim": heatmap_ssim(exact, approx), "spearman": spearman(exact, approx),
            "top10_iou": top_overlap(exact, approx)}
