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

from typing import Optional

import numpy as np
import torch


def window_sums(values, ys, xs, size: tuple, shape: tuple,
                weight: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(total [K, H, W], weights [H, W])`` in float64 on the CPU: every window ``n``
    (corner ``ys[n], xs[n]``, ``size`` (h, w), inside the ``shape`` (H, W) image) adds
    ``values[:, n]`` times ``weight`` (``[h, w]``; None: ones) to the pixels it covers,
    and ``weight`` to their weights. Sums of several window sizes add up."""
    values = torch.as_tensor(np.asarray(values, np.float64))
    k = values.shape[0]
    (ph, pw), (h, w) = size, shape
    weight = (torch.ones(ph, pw, dtype=torch.float64) if weight is None
              else torch.as_tensor(weight).detach().cpu().to(torch.float64))
    ys, xs = (torch.as_tensor(np.asarray(v, np.int64)) for v in (ys, xs))
    total = torch.zeros(k, h * w, dtype=torch.float64)
    weights = torch.zeros(h * w, dtype=torch.float64)
    corner = ys * w + xs
    # One scatter per offset inside the window: the loop runs h*w times, not once per window.
    for i in range(ph):
        for j in range(pw):
            flat = corner + (i * w + j)
            total.index_add_(1, flat, values * weight[i, j])
            weights.index_add_(0, flat, weight[i, j].expand(len(flat)))
    return total.view(k, h, w), weights.view(h, w)


def window_mean(values, ys, xs, size: tuple, shape: tuple) -> torch.Tensor:
    """``[K, H, W]``: each pixel the mean of ``values[k]`` over the windows covering it;
    NaN where none does (Captum's 0/0)."""
    total, weights = window_sums(values, ys, xs, size, shape)
    return total / weights
