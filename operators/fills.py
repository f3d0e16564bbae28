"""What a patch holds where it is not one colour: its content at each corner, the
:attr:`~.task.OcclusionTask.fill` the naive and incremental operators paint,
``fill(ys, xs) -> [B, C, ph, pw]``.

* :class:`Windows`: the windows of an image, optionally times a kernel: a baseline
  image's windows (Captum's tensor baselines), or the image's own pixels times
  :func:`gaussian_kernel` (``COLOR gaussian``, MONAI's ``gaussian`` mode);
* :class:`PatchMean`: each patch the per-channel mean of the image under it
  (``COLOR mean_patch``).

Each changes only the pixels inside its patch, so incremental inference runs them exactly.
The corners are numpy arrays or int64 tensors on the device; the image is kept once per
device the corners come on. Fills are plain objects (they pickle, for Ray workers).

>>> image = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
>>> PatchMean(image, (2, 2))(np.array([0, 1]), np.array([2, 0]))[:, :, 0, 0].tolist()
[[4.5, 16.5], [6.5, 18.5]]
>>> Windows(image, (1, 2), gaussian_kernel((1, 2)))(np.array([0]), np.array([1]))[0, 0].tolist()
[[1.0, 0.0]]
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .gather import windows


class _PerDevice:
    """Tensors made once per device the corners come on."""

    def __init__(self, **tensors):
        self._tensors = {torch.device("cpu"): tensors}

    def on(self, ys) -> dict:
        device = ys.device if isinstance(ys, torch.Tensor) else torch.device("cpu")
        if device not in self._tensors:
            first = next(iter(self._tensors.values()))
            self._tensors[device] = {k: None if t is None else t.to(device) for k, t in first.items()}
        return self._tensors[device]


class Windows(_PerDevice):
    """The windows of ``image`` ``[C, H, W]`` of ``size`` at the corners, times ``kernel``
    (``[ph, pw]``; None: as they are)."""

    def __init__(self, image: torch.Tensor, size: tuple, kernel: Optional[torch.Tensor] = None):
        super().__init__(base=image.detach().cpu().unsqueeze(0).contiguous(),
                         kernel=None if kernel is None else kernel.detach().cpu())
        self.size = tuple(size)

    def __call__(self, *corners) -> torch.Tensor:
        t = self.on(corners[0])
        out = windows(t["base"], corners, self.size)
        return out if t["kernel"] is None else out * t["kernel"]


class PatchMean(_PerDevice):
    """Each patch of ``size`` the per-channel mean of ``image`` ``[C, H, W]`` (a volume's
    ``[C, D, H, W]``) under it."""

    def __init__(self, image: torch.Tensor, size: tuple):
        pool = F.avg_pool3d if image.dim() == 4 else F.avg_pool2d
        means = pool(image.detach().cpu().float().unsqueeze(0), tuple(size), stride=1)[0]
        super().__init__(means=means.to(image.dtype))       # [C, H - ph + 1, W - pw + 1]
        self.size = tuple(size)

    def __call__(self, *corners) -> torch.Tensor:
        means = self.on(corners[0])["means"]
        index = tuple(torch.as_tensor(np.asarray(v, np.int64) if not isinstance(v, torch.Tensor) else v,
                                      device=means.device) for v in corners)
        at = means[(slice(None), *index)].t()               # [B, C]
        return at.view(*at.shape, *(1,) * len(self.size)).expand(*at.shape, *self.size).contiguous()


def gaussian(image: torch.Tensor, size: tuple) -> Windows:
    """``COLOR gaussian``, MONAI's ``gaussian`` mode: each patch the image's own window
    times ``1 - Gaussian`` (:func:`gaussian_kernel`)."""
    return Windows(image, size, gaussian_kernel(size, image.dtype))


def gaussian_kernel(size: tuple, dtype=torch.float32) -> torch.Tensor:
    """``[h, w]`` (a volume's ``[d, h, w]``): MONAI's ``gaussian_occlusion`` multiplier,
    ``1 - Gaussian`` scaled to [0, 1]: a unit impulse at the centre (pixel ``h // 2, w //
    2``) smoothed by a Gaussian of sigma ``size / 4`` per axis (MONAI's ``GaussianSmooth``, erf approximation,
    truncated at 4 sigma, zero padding), negated and min-max scaled: 0 at the centre, 1
    at the far corners.

    >>> gaussian_kernel((3, 3))
    tensor([[1.0000, 0.6830, 1.0000],
            [0.6830, 0.0000, 0.6830],
            [1.0000, 0.6830, 1.0000]])
    """
    axes = []
    for m in size:
        g = _gaussian_1d(m * 0.25)
        tail = (len(g) - 1) // 2
        at = torch.arange(m) - m // 2 + tail        # the impulse response at each pixel
        inside = (at >= 0) & (at < len(g))
        axes.append(torch.where(inside, g[at.clamp(0, len(g) - 1)], torch.zeros(())))
    smooth = -axes[0]
    for g in axes[1:]:                              # the outer product over the axes
        smooth = smooth.unsqueeze(-1) * g
    low, high = smooth.min(), smooth.max()
    if low == high:
        return torch.zeros(tuple(size), dtype=dtype)
    return ((smooth - low) / (high - low)).to(dtype)


def _gaussian_1d(sigma: float) -> torch.Tensor:
    """MONAI's ``gaussian_1d(sigma, truncated=4.0, approx="erf")``, unnormalised."""
    sigma = torch.as_tensor(sigma, dtype=torch.float)
    tail = int(max(float(sigma) * 4.0, 0.5) + 0.5)
    x = torch.arange(-tail, tail + 1, dtype=torch.float)
    t = 0.70710678 / torch.abs(sigma)
    return (0.5 * ((t * (x + 0.5)).erf() - (t * (x - 0.5)).erf())).clamp(min=0)
