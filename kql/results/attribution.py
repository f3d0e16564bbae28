"""Per-pixel attribution from per-window values: each pixel the weighted mean of the
values of the windows covering it.

This is how Captum's ``Occlusion`` turns the output change of each occluded window into a
map at the input's resolution (weight 1 everywhere, so a pixel's value is the mean over
the windows covering it), and how MONAI's sliding-window inference blends window scores
(a weight map per window: constant or Gaussian). :attr:`kql.results.result.Result.attribution`
and the Captum and MONAI front ends (:mod:`kql.integrations`) share it.

>>> import numpy as np
>>> total, weight = window_sums(np.array([[1.0, 3.0]]), [0, 0], [0, 1], (1, 2), (1, 3))
>>> total.tolist(), weight.tolist()
([[[1.0, 4.0, 3.0]]], [[1.0, 2.0, 1.0]])
>>> window_mean(np.array([[1.0, 3.0]]), [0, 0], [0, 1], (1, 2), (2, 3)).tolist()
[[[1.0, 2.0, 3.0], [nan, nan, nan]]]
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import numpy as np
import torch


def window_sums(values, ys, xs, size: tuple, shape: tuple,
                weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(total [K, H, W], weights [H, W])`` in float64 on the CPU: every window ``n``
    (corner ``ys[n], xs[n]``, ``size`` (h, w), inside the ``shape`` (H, W) image) adds
    ``values[:, n]`` times ``weight`` (``[h, w]``; None: ones) to the pixels it covers,
    and ``weight`` to their weights. Sums of several window sizes add up. A volume's:
    ``ys`` the tuple of corners per axis and ``xs`` None (:func:`window_sums_at`)."""
    return window_sums_at(values, ys if xs is None else (ys, xs), size, shape, weight)


def window_sums_at(values, corners: tuple, size: tuple, shape: tuple,
                   weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`window_sums` for windows at ``corners`` (one array per axis) of an image or a
    volume of ``shape``."""
    values = torch.as_tensor(np.asarray(values, np.float64))
    k, cells = values.shape[0], math.prod(shape)
    weight = (torch.ones(tuple(size), dtype=torch.float64) if weight is None
              else torch.as_tensor(weight).detach().cpu().to(torch.float64))
    corner = torch.zeros(len(corners[0]), dtype=torch.int64)
    for c, n in zip(corners, shape):                 # the corners' flat indices
        corner = corner * n + torch.as_tensor(np.asarray(c, np.int64))
    strides = [math.prod(shape[a + 1:]) for a in range(len(shape))]
    total = torch.zeros(k, cells, dtype=torch.float64)
    weights = torch.zeros(cells, dtype=torch.float64)
    # One scatter per offset inside the window: the loop runs once per window cell, not per window.
    for offset in itertools.product(*(range(s) for s in size)):
        flat = corner + sum(o * s for o, s in zip(offset, strides))
        total.index_add_(1, flat, values * weight[offset])
        weights.index_add_(0, flat, weight[offset].expand(len(flat)))
    return total.view(k, *shape), weights.view(*shape)


def window_mean(values, ys, xs, size: tuple, shape: tuple) -> torch.Tensor:
    """``[K, H, W]``: each pixel the mean of ``values[k]`` over the windows covering it;
    NaN where none does (Captum's 0/0)."""
    total, weights = window_sums(values, ys, xs, size, shape)
    return total / weights
