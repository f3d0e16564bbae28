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

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np


@dataclass(frozen=True)
class OcclusionGrid:
    height: int
    width: int
    patch: Tuple[int, int]
    stride: Tuple[int, int]
    region: Optional[Tuple[int, int, int, int]] = None   # (x, y, w, h)

    def problem(self) -> Optional[str]:
        """Why this geometry is impossible, or None."""
        (ph, pw), (sy, sx) = self.patch, self.stride
        if ph < 1 or pw < 1:
            return f"patch size must be at least 1 (got {ph}x{pw})"
        if sy < 1 or sx < 1:
            return f"stride must be at least 1 (got {sy}x{sx})"
        if ph > self.height or pw > self.width:
            return (f"patch {ph}x{pw} is larger than the image ({self.height}x{self.width} "
                    f"after the model's resize)")
        if self.region is not None:
            x, y, w, h = self.region
            if w < 1 or h < 1:
                return f"region size must be at least 1 (got {w}x{h})"
            if x < 0 or y < 0 or x + w > self.width or y + h > self.height:
                return (f"region ({x}, {y}, {w}, {h}) is not inside the image "
                        f"({self.width} wide, {self.height} high after the model's resize)")
            if ph > h or pw > w:
                return f"patch {ph}x{pw} is larger than the region ({h}x{w})"
            if self.rows_range[0] >= self.rows_range[1] or self.cols_range[0] >= self.cols_range[1]:
                return "no patch position of the stride grid lies inside the region"
        return None

    @property
    def full_shape(self) -> Tuple[int, int]:
        return ((self.height - self.patch[0]) // self.stride[0] + 1,
                (self.width - self.patch[1]) // self.stride[1] + 1)

    @property
    def rows_range(self) -> Tuple[int, int]:
        return self._range(0)

    @property
    def cols_range(self) -> Tuple[int, int]:
        return self._range(1)

    def _range(self, axis: int) -> Tuple[int, int]:
        full = self.full_shape[axis]
        if self.region is None:
            return 0, full
        start = self.region[1 - axis]          # y for rows, x for columns
        extent = self.region[3 - axis]         # h for rows, w for columns
        s, p = self.stride[axis], self.patch[axis]
        first = -(-start // s)
        last = (start + extent - p) // s       # inclusive
        return min(first, full), min(max(last + 1, first), full)

    @property
    def shape(self) -> Tuple[int, int]:
        (r0, r1), (c0, c1) = self.rows_range, self.cols_range
        return r1 - r0, c1 - c0

    @property
    def offset(self) -> Tuple[int, int]:
        """Grid index (row, column) of the map's first cell in the full grid."""
        return self.rows_range[0], self.cols_range[0]

    @property
    def count(self) -> int:
        rows, cols = self.shape
        return rows * cols

    def positions(self) -> Tuple[np.ndarray, np.ndarray]:
        """Top-left pixel (row, column) of every patch, in row-major heat-map order."""
        (r0, r1), (c0, c1) = self.rows_range, self.cols_range
        ii, jj = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
        return (ii.ravel() * self.stride[0]).astype(np.int64), (jj.ravel() * self.stride[1]).astype(np.int64)
