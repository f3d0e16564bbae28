"""From the user's pixels to the model's: ``RESIZE squash | crop | pad``.

A model trained on square inputs sees a photo of another shape in one of three ways:

* ``squash`` (the default): the whole photo resized to the model's size, aspect ratio
  not kept. Every pixel of the photo is explained.
* ``crop``: resized so that its shorter side fits, then the centre cut out (torchvision's
  evaluation transform). The cut-off borders are not explained.
* ``pad``: resized so that its longer side fits, then centred on a border of the model's
  neutral colour (its normalisation mean: zero after normalisation; grey without one).
  The aspect ratio is kept and every pixel is explained; the border is occluded too.

A :class:`Frame` maps between the two coordinate systems: ``original = model * scale +
offset`` per axis. ``REGION`` is written in the original photo's pixels and the map's
cells are reported there too.

>>> f = Frame.fitting((300, 600), (100, 100), "pad")
>>> f.resized, f.border, f.scale
((50, 100), (25, 0), (6.0, 6.0))
>>> f.to_original(25, 0), f.to_model(300, 600)
((0.0, 0.0), (75.0, 100.0))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

RESIZES = ("squash", "crop", "pad")
DEFAULT_RESIZE = "squash"


@dataclass(frozen=True)
class Frame:
    """How an ``original`` (h, w) photo became the model's ``size`` (h, w) input."""

    original: Tuple[int, int]
    size: Tuple[int, int]
    mode: str = DEFAULT_RESIZE
    resized: Tuple[int, int] = (0, 0)      # the photo's size after resizing, before crop/pad
    border: Tuple[int, int] = (0, 0)       # rows, columns: cut off (crop) or added (pad) before

    @classmethod
    def fitting(cls, original: tuple, size: tuple, mode: str = DEFAULT_RESIZE) -> "Frame":
        (h, w), (th, tw) = original, size
        if mode == "squash" or (h, w) == (th, tw):
            return cls((h, w), (th, tw), mode, (th, tw), (0, 0))
        grow = max(th / h, tw / w) if mode == "crop" else min(th / h, tw / w)
        rh, rw = max(1, round(h * grow)), max(1, round(w * grow))
        if mode == "crop":
            rh, rw = max(rh, th), max(rw, tw)
            border = ((rh - th) // 2, (rw - tw) // 2)
        else:
            rh, rw = min(rh, th), min(rw, tw)
            border = ((th - rh) // 2, (tw - rw) // 2)
        return cls((h, w), (th, tw), mode, (rh, rw), border)

    @property
    def scale(self) -> Tuple[float, float]:
        """Original pixels per model pixel, per axis."""
        return self.original[0] / self.resized[0], self.original[1] / self.resized[1]

    @property
    def offset(self) -> Tuple[float, float]:
        sign = 1 if self.mode == "crop" else -1
        return (sign * self.border[0] * self.scale[0], sign * self.border[1] * self.scale[1])

    @property
    def identity(self) -> bool:
        return self.original == self.size and self.border == (0, 0)

    def to_original(self, y: float, x: float) -> Tuple[float, float]:
        (sy, sx), (oy, ox) = self.scale, self.offset
        return y * sy + oy, x * sx + ox

    def to_model(self, y: float, x: float) -> Tuple[float, float]:
        (sy, sx), (oy, ox) = self.scale, self.offset
        return (y - oy) / sy, (x - ox) / sx

    def region_in_model(self, region: tuple) -> tuple:
        """``(x, y, w, h)`` in original pixels as the model-pixel region that covers it
        (clipped to the model's input)."""
        x, y, w, h = region
        top, left = self.to_model(y, x)
        bottom, right = self.to_model(y + h, x + w)
        top, left = max(0, math.floor(top + 1e-6)), max(0, math.floor(left + 1e-6))
        bottom = min(self.size[0], math.ceil(bottom - 1e-6))
        right = min(self.size[1], math.ceil(right - 1e-6))
        return left, top, max(0, right - left), max(0, bottom - top)

    def describe(self) -> Optional[str]:
        """EXPLAIN's words for what the resize did (None when nothing was done)."""
        if self.identity:
            return None
        (h, w), (th, tw) = self.original, self.size
        text = f"{self.mode} {h}x{w}->{th}x{tw}"
        if self.border != (0, 0):
            text += " ({} {}x{})".format("cut" if self.mode == "crop" else "border", *self.border)
        return text
