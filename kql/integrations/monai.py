"""MONAI's ``OcclusionSensitivity``, computed by KQL's engine: a drop-in for
``monai.visualize.OcclusionSensitivity`` on 2D images and 3D volumes.

``OcclusionSensitivity(nn_module, mask_size, n_batch, verbose, mode, overlap,
activate)(x, b_box)`` returns MONAI's two tensors: the occlusion map ``[1, K, H, W]`` (a
volume's ``[1, K, D, H, W]``: each pixel the blend of the activated outputs of the
windows covering it, as MONAI's sliding-window inference blends them) and the most
probable class ``[1, 1, H, W]`` (plain tensors, not MetaTensors). The windows are MONAI's: a step of ``int(mask * (1 -
overlap))``, the last one pulled back inside the image, over the bounding box widened by
half a mask when ``b_box`` is given.

Every mode is exact, each as one KQL scan of the image (planned by KQL's planner, run by
its engine; ``plans`` keeps the physical plans of the last call):

* a float, ``mean_img``: one colour, KQL's plain patch;
* ``gaussian``: the window's pixels times ``1 - Gaussian`` (MONAI's kernel, the content
  of KQL's ``COLOR gaussian``), and the windows blended with MONAI's Gaussian weights;
* ``mean_patch``: as MONAI computes it, the window's pixels times their mean over every
  channel (MONAI's source multiplies by the mean where its docstring says "replaced
  with"; KQL's ``COLOR mean_patch`` is the documented meaning, each channel's mean);
* a callable ``mode(x, window)``: its result is the window's content (called once per
  window, as MONAI calls it).

These are the patch's content per position (``OcclusionTask.fill``). Not supported (a
one-line error says so): ``**kwargs`` for the module. ``n_batch`` is accepted
and left to the planner (it picks the batch within ``memory_limit``); ``verbose`` shows
KQL's progress bar; a callable ``activate`` must act row by row (it gets every window's
outputs at once).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from kql.operators import fills
from kql.operators.gather import windows
from kql.progress import ProgressBar
from kql.results.attribution import window_sums_at

from .scan import ScannedFront, Scanner

MODES = ("gaussian", "mean_patch", "mean_img")


class OcclusionSensitivity(ScannedFront):
    """``monai.visualize.OcclusionSensitivity`` with KQL's engine underneath."""

    def __init__(self, nn_module: nn.Module, mask_size=16, n_batch: int = 16,
                 verbose: bool = True, mode="gaussian", overlap: float = 0.6,
                 activate=True) -> None:
        self.nn_module = nn_module
        self.mask_size = mask_size
        self.n_batch = n_batch
        self.verbose = verbose
        self.overlap = overlap
        self.activate = activate
        if isinstance(mode, str) and mode not in MODES:
            raise NotImplementedError(f"mode must be a float, a callable or one of {MODES}, "
                                      f"got {mode!r}")
        self.mode = mode
        self.scanner = Scanner(nn_module, "monai_model")

    def __call__(self, x: torch.Tensor, b_box: Optional[Sequence] = None, **kwargs):
        self._check(x, kwargs)
        x = x.as_tensor() if hasattr(x, "as_tensor") else x     # a MetaTensor's plain tensor
        image = x[0].detach()
        shape = tuple(image.shape[1:])
        box, mask = self._box(shape, b_box)
        starts = tuple(lo + _starts(hi - lo, m, self.overlap) for (lo, hi), m in zip(box, mask))
        scores = self._scores(x, image, mask, starts)
        weight = _blend_weights(mask) if self.mode == "gaussian" else None
        corners = tuple(a.ravel() for a in np.meshgrid(*starts, indexing="ij"))
        total, weights = window_sums_at(scores, corners, mask, shape, weight)
        full = torch.zeros(scores.shape[0], *shape, dtype=torch.float64)
        inside = tuple(slice(lo, hi) for lo, hi in box)
        full[(slice(None), *inside)] = total[(slice(None), *inside)] / weights[inside]
        if b_box is not None:                  # the box itself, as MONAI crops it
            lo = [max(b, 0) for b in b_box[::2]]
            hi = [b if b > 0 else s for b, s in zip(b_box[1::2], shape)]
            full = full[(slice(None), *(slice(a, b) for a, b in zip(lo, hi)))]
        occ_map = full.to(x.dtype).to(x.device)[None]
        return occ_map, occ_map.argmax(dim=1, keepdim=True)

    def _check(self, x: torch.Tensor, kwargs: dict) -> None:
        if x.shape[0] > 1:
            raise ValueError("Expected batch size of 1.")
        if x.ndim not in (4, 5):
            raise NotImplementedError(f"kql OcclusionSensitivity: images [1, C, H, W] or volumes "
                                      f"[1, C, D, H, W], got shape {tuple(x.shape)}")
        if kwargs:
            raise NotImplementedError(f"kql OcclusionSensitivity: arguments for the module "
                                      f"({', '.join(kwargs)}) are not supported")
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must be >= 0 and < 1, got {self.overlap}.")

    def _box(self, shape: tuple, b_box) -> tuple:
        """``(((row0, row1), (col0, col1)), mask)`` (a volume's slices first): where MONAI
        slides its windows (a bounding box widened by half a mask, the mask cut to it) and
        their size."""
        mask = _sizes(self.mask_size, len(shape))
        box = tuple((0, s) for s in shape)
        if b_box is not None:
            box = _crop(b_box, mask, shape)
            mask = tuple(min(m, hi - lo) for m, (lo, hi) in zip(mask, box))
        crop = tuple(hi - lo for lo, hi in box)
        if any(m > g for g, m in zip(crop, mask)):
            raise ValueError(f"Image (spatial shape) {crop} should be bigger than mask {mask}.")
        return box, mask

    def _scores(self, x, image, mask: tuple, starts: tuple) -> torch.Tensor:
        """``[K, windows]``: the activated outputs with each window occluded, one KQL scan."""
        color, fill = self._content(image, mask)
        classes = self.scanner.outputs(x).shape[1]
        bar = ProgressBar() if self.verbose else None
        self.scanner.plans = []
        try:
            result = self.scanner.scan(image, mask, starts, tuple(range(classes)),
                                       color=color, fill=fill, progress=bar)
        finally:
            if bar is not None:
                bar.close()
        return self._activated(torch.as_tensor(result.all_logits).t(), image.shape[0]).t()

    def _content(self, image: torch.Tensor, mask: tuple) -> tuple:
        """``(colour, fill)`` of the occluded window: one of them None."""
        mode, channels = self.mode, image.shape[0]
        if isinstance(mode, (int, float)) and not isinstance(mode, bool):
            return (float(mode),) * channels, None
        if mode == "mean_img":
            return (image.mean().item(),) * channels, None
        if mode == "gaussian":                 # KQL's COLOR gaussian
            return None, fills.gaussian(image, mask)
        base = image.unsqueeze(0).contiguous()
        if mode == "mean_patch":
            def fill(*corners):
                w = windows(base, corners, mask)
                return w * w.mean(dim=tuple(range(1, w.dim())), keepdim=True)
        elif callable(mode):
            def fill(*corners):
                return torch.cat([mode(base, w[None]) for w in windows(base, corners, mask)])
        else:
            raise NotImplementedError(f"mode must be a float, a callable or one of {MODES}, "
                                      f"got {mode!r}")
        return None, fill

    def _activated(self, outputs: torch.Tensor, channels: int) -> torch.Tensor:
        """MONAI's activation of the raw outputs ``[N, K]``: a callable's, else sigmoid for
        a one-channel *image* (MONAI tests the input's channels) and softmax otherwise."""
        if callable(self.activate):
            return self.activate(outputs)
        if self.activate:
            return outputs.sigmoid() if channels == 1 else outputs.softmax(1)
        return outputs


def _sizes(mask_size, n: int) -> tuple:
    """The mask per spatial axis (one number: the same on each, as MONAI's ensure_tuple_rep)."""
    if isinstance(mask_size, int):
        return (mask_size,) * n
    mask = tuple(int(m) for m in mask_size)
    if len(mask) == 1:
        return mask * n
    if len(mask) != n:
        raise ValueError(f"mask_size must have {n} values for a {n}D input, got {mask_size!r}")
    return mask


def _crop(b_box: Sequence, mask: tuple, shape: tuple) -> tuple:
    """The rows and columns MONAI scans for ``b_box``: the box widened by half a mask."""
    if len(b_box) != 2 * len(shape):
        raise ValueError(f"b_box must be [min, max] per spatial axis ({2 * len(shape)} values), "
                         f"got {b_box!r}")
    edge = [(m - 1) // 2 for m in mask]
    lo = [max(b - e, 0) for b, e in zip(b_box[::2], edge)]
    hi = [s if b == -1 else min(b + e, s) for b, e, s in zip(b_box[1::2], edge, shape)]
    return tuple(zip(lo, hi))


def _starts(size: int, window: int, overlap: float) -> np.ndarray:
    """MONAI's window starts along one axis (``dense_patch_slices``): a step of
    ``int(window * (1 - overlap))`` (at least 1), the last pulled back inside.

    >>> _starts(20, 6, 0.6).tolist(), _starts(6, 6, 0.6).tolist()
    ([0, 2, 4, 6, 8, 10, 12, 14], [0])
    """
    step = window if window == size else max(int(window * (1 - overlap)), 1)
    count = next((d for d in range(math.ceil(size / step)) if d * step + window >= size), 0) + 1
    return np.array([min(d * step, size - window) for d in range(count)], np.int64)


def _blend_weights(mask: tuple) -> torch.Tensor:
    """MONAI's Gaussian importance map (``compute_importance_map``, sigma_scale 0.125)."""
    out = None
    for m in mask:
        x = torch.arange(-(m - 1) / 2.0, (m - 1) / 2.0 + 1, dtype=torch.float)
        g = torch.exp(x ** 2 / (-2 * (m * 0.125) ** 2))
        out = g if out is None else out.unsqueeze(-1) * g[None]
    return out.clamp(min=max(out.min().item(), 1e-3))
