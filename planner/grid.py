"""Patch-position geometry of an occlusion experiment (the contract of the heat map).

For patch ``h x w`` and stride ``sy x sx`` on an ``H x W`` image, the heat map has
``(H - h) // sy + 1`` rows and ``(W - w) // sx + 1`` columns; cell ``(i, j)`` is the patch
covering rows ``i*sy .. i*sy+h-1`` and columns ``j*sx .. j*sx+w-1``. A region keeps the
cells whose patch lies inside it: the map is then a window of the full grid.

>>> g = OcclusionGrid(10, 12, (4, 4), (3, 3))
>>> g.shape, g.positions()[0].tolist()[:4], g.positions()[1].tolist()[:4]
((3, 3), [0, 0, 0, 3], [0, 3, 6, 0])
>>> OcclusionGrid(10, 12, (4, 4), (3, 3), region=(3, 0, 8, 10)).shape
(3, 2)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np


@dataclass(frozen=True)
class OcclusionGrid:
    """The grid of an image (``height`` x ``width``) or, with ``depth``, of a volume
    (``depth`` x ``height`` x ``width``): ``patch`` and ``stride`` have one entry per axis
    in that order, ``region`` is ``(x, y, w, h)`` or ``(x, y, z, w, h, d)``. Every rule
    is the same per axis.

    >>> g = OcclusionGrid(10, 12, (2, 4, 4), (2, 3, 3), depth=5)
    >>> g.shape, [a.tolist()[:3] for a in g.positions()]
    ((2, 3, 3), [[0, 0, 0], [0, 0, 0], [0, 3, 6]])
    """

    height: int
    width: int
    patch: Tuple[int, ...]
    stride: Tuple[int, ...]
    region: Optional[Tuple[int, ...]] = None   # (x, y, w, h); a volume's (x, y, z, w, h, d)
    depth: Optional[int] = None

    @property
    def dims(self) -> Tuple[int, ...]:
        """The image's size per axis: (height, width), or (depth, height, width)."""
        return (self.height, self.width) if self.depth is None else (self.depth, self.height, self.width)

    def problem(self) -> Optional[str]:
        """Why this geometry is impossible, or None."""
        dims, n = self.dims, len(self.dims)
        x = "x".join
        for keyword, sizes in (("PATCH", self.patch), ("STRIDE", self.stride)):
            if len(sizes) != n:
                what = "a volume takes d x h x w" if n == 3 else "an image takes h x w"
                return f"{keyword} needs {n} sizes here ({what}, or one number), got {x(map(str, sizes))}"
        if min(self.patch) < 1:
            return f"patch size must be at least 1 (got {x(map(str, self.patch))})"
        if min(self.stride) < 1:
            return f"stride must be at least 1 (got {x(map(str, self.stride))})"
        what = "image" if n == 2 else "volume"
        if any(p > d for p, d in zip(self.patch, dims)):
            return (f"patch {x(map(str, self.patch))} is larger than the {what} "
                    f"({x(map(str, dims))} after the model's resize)")
        if self.region is not None:
            if len(self.region) != 2 * n:
                return f"REGION takes {2 * n} numbers for this {what}, got {len(self.region)}"
            first, extent = self._region_axes()
            if min(extent) < 1:
                return f"region size must be at least 1 (got {x(map(str, extent[::-1]))})"
            if any(f < 0 or f + e > d for f, e, d in zip(first, extent, dims)):
                return (f"region {tuple(self.region)} is not inside the {what} "
                        f"({self.width} wide, {self.height} high"
                        + (f", {self.depth} deep" if n == 3 else "") + " after the model's resize)")
            if any(p > e for p, e in zip(self.patch, extent)):
                return f"patch {x(map(str, self.patch))} is larger than the region ({x(map(str, extent))})"
            if any(lo >= hi for lo, hi in map(self._range, range(n))):
                return "no patch position of the stride grid lies inside the region"
        return None

    def _region_axes(self) -> tuple:
        """The region's first index and extent per axis, in the image's axis order."""
        n = len(self.dims)
        first = tuple(self.region[n - 1 - a] for a in range(n))
        extent = tuple(self.region[2 * n - 1 - a] for a in range(n))
        return first, extent

    @property
    def full_shape(self) -> Tuple[int, ...]:
        return tuple((d - p) // s + 1 for d, p, s in zip(self.dims, self.patch, self.stride))

    @property
    def rows_range(self) -> Tuple[int, int]:
        return self._range(len(self.dims) - 2)

    @property
    def cols_range(self) -> Tuple[int, int]:
        return self._range(len(self.dims) - 1)

    def _range(self, axis: int) -> Tuple[int, int]:
        full = self.full_shape[axis]
        if self.region is None:
            return 0, full
        first, extent = self._region_axes()
        start, size = first[axis], extent[axis]
        s, p = self.stride[axis], self.patch[axis]
        lo = -(-start // s)
        last = (start + size - p) // s       # inclusive
        return min(lo, full), min(max(last + 1, lo), full)

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(hi - lo for lo, hi in map(self._range, range(len(self.dims))))

    @property
    def offset(self) -> Tuple[int, ...]:
        """Grid index (row, column; a volume's slice first) of the map's first cell."""
        return tuple(lo for lo, _ in map(self._range, range(len(self.dims))))

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    def positions(self) -> Tuple[np.ndarray, ...]:
        """The first pixel (row, column; a volume's slice first) of every patch, in
        row-major heat-map order."""
        ranges = [np.arange(lo, hi) for lo, hi in map(self._range, range(len(self.dims)))]
        grids = np.meshgrid(*ranges, indexing="ij")
        return tuple((g.ravel() * s).astype(np.int64) for g, s in zip(grids, self.stride))
