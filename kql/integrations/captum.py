"""Captum's ``Occlusion``, computed by KQL's engine: a drop-in for ``captum.attr.Occlusion``.

``Occlusion(forward_func).attribute(inputs, sliding_window_shapes, strides, baselines,
target, ...)`` takes Captum's arguments and returns Captum's tensor: for each example and
input element, the mean over the windows covering it of the raw output change (the
unoccluded output minus the occluded one, no softmax). The windows slide as Captum slides
them (from index 0 in steps of the stride until the dimension is covered; the last one
cut at the border where the stride overshoots), over channels too.

Each example is one KQL scan per window size (the full windows, and the cut ones at the
bottom and right borders): planned by KQL's planner and run by its engine, exact
(incremental inference over materialized views where the planner predicts it cheaper,
the plain batched loop otherwise; ``plans`` keeps the physical plans of the last call).
A scalar or per-channel baseline is KQL's patch colour; a baseline that varies per pixel,
or a window over some of the channels, is the patch's content per position
(``OcclusionTask.fill``).

Not supported (a one-line error says so): several input tensors, ``additional_forward_args``,
``target=None`` with more than one output per example, targets of outputs with more than
two dimensions, inputs that are not ``[N, C, H, W]`` float32 images.
``perturbations_per_eval`` is accepted and left to the planner (it picks the batch).

>>> import torch
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten(), torch.nn.Linear(128, 4))
>>> attr = Occlusion(net).attribute(torch.rand(2, 3, 10, 10), (3, 4, 4), strides=(3, 3, 3), target=1)
>>> tuple(attr.shape), attr.dtype
((2, 3, 10, 10), torch.float32)
"""

from __future__ import annotations

import itertools
import math
import numbers
from typing import Callable

import numpy as np
import torch
from torch import nn

from kql.progress import ProgressBar
from kql.results.attribution import window_sums

from .scan import ScannedFront, Scanner, baseline_fill


class Occlusion(ScannedFront):
    """``captum.attr.Occlusion`` with KQL's engine underneath (see the module's text)."""

    def __init__(self, forward_func: Callable[..., torch.Tensor]) -> None:
        self.forward_func = forward_func
        self.scanner = Scanner(forward_func, "captum_model")

    def attribute(self, inputs, sliding_window_shapes, strides=None, baselines=None,
                  target=None, additional_forward_args=None, perturbations_per_eval: int = 1,
                  show_progress: bool = False):
        as_tuple = isinstance(inputs, tuple)
        x = _one_input(inputs)
        if additional_forward_args is not None:
            raise NotImplementedError("kql Occlusion: additional_forward_args is not supported; "
                                      "bind them into forward_func (e.g. functools.partial)")
        if not isinstance(perturbations_per_eval, int) or perturbations_per_eval < 1:
            raise ValueError("Perturbations per evaluation must be an integer and at least 1.")
        window = _per_input(sliding_window_shapes, as_tuple, "sliding_window_shapes")
        stride = _strides(strides, as_tuple)
        _check_geometry(tuple(x.shape[1:]), window, stride)
        base = _baselines(baselines, x, as_tuple)
        _check_eval(self.forward_func)
        targets = _targets(target, self.scanner.outputs(x), len(x))
        bar = ProgressBar() if show_progress else None
        self.scanner.plans = []
        try:
            out = torch.stack([self._one(x[i], base[i], targets[i], window, stride, bar)
                               for i in range(len(x))])
        finally:
            if bar is not None:
                bar.close()
        return (out,) if as_tuple else out

    def _one(self, image, baseline, target: int, window, stride, bar) -> torch.Tensor:
        """``[C, H, W]``: one example's attribution."""
        channels, h, w = image.shape
        total = torch.zeros(channels, h, w, dtype=torch.float64)
        windows_over = torch.zeros(channels, 1, 1, dtype=torch.float64)
        spans = _spans(channels, window[0], stride[0])
        for c0, c1 in ((s, s + size) for starts, size in spans for s in starts):
            content = baseline
            if (c0, c1) != (0, channels):       # the window's channels occluded, the rest kept
                content = image.clone()
                content[c0:c1] = baseline[c0:c1]
            changes = self._changes(image, content, target, window[1:], stride[1:], bar)
            total[c0:c1] += changes
            windows_over[c0:c1] += 1
        return (total / windows_over).to(torch.float32).to(image.device)

    def _changes(self, image, content, target: int, window, stride, bar) -> torch.Tensor:
        """``[H, W]``: each pixel's mean output change over the spatial windows covering it,
        with ``content`` ([C, H, W]) in the window. One scan per window size."""
        h, w = image.shape[1:]
        per_channel = content[:, :1, :1]
        constant = bool((content == per_channel).all())
        total = weights = 0
        for (rows, wh), (cols, ww) in itertools.product(_spans(h, window[0], stride[0]),
                                                         _spans(w, window[1], stride[1])):
            color = per_channel.flatten().tolist() if constant else None
            fill = None if constant else baseline_fill(content, (wh, ww))
            result = self.scanner.scan(image, (wh, ww), (rows, cols), (target,), color=color,
                                       fill=fill, progress=bar)
            change = result.base_logits[target] - result.all_logits[0].astype(np.float64)
            ys, xs = (a.ravel() for a in np.meshgrid(rows, cols, indexing="ij"))
            t, n = window_sums(change[None], ys, xs, (wh, ww), (h, w))
            total, weights = total + t[0], weights + n
        return total / weights


def _check_eval(model) -> None:
    """KQL explains a module in eval mode; one whose BatchNorm or dropout is training would
    give Captum other (batch-dependent, random) outputs: refused rather than differ."""
    if isinstance(model, nn.Module) and any(
            m.training for m in model.modules()
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))):
        raise ValueError("kql Occlusion: the model is in training mode (BatchNorm/dropout): "
                         "call model.eval() first")


def _spans(size: int, window: int, stride: int) -> list:
    """Captum's window starts along one axis, grouped by window size: ``[(starts, size)]``,
    the full windows, then the last one cut at the border where the stride overshoots.

    >>> _spans(10, 4, 3), _spans(10, 4, 4)
    ([(array([0, 3, 6]), 4)], [(array([0, 4]), 4), (array([8]), 2)])
    """
    count = math.ceil((size - window) / stride) + 1
    starts = np.arange(count, dtype=np.int64) * stride
    full, cut = starts[starts + window <= size], starts[starts + window > size]
    return [(full, window)] + ([(cut, size - int(cut[0]))] if len(cut) else [])


def _one_input(inputs) -> torch.Tensor:
    if isinstance(inputs, tuple):
        if len(inputs) != 1:
            raise NotImplementedError(f"kql Occlusion: one input tensor is supported, got "
                                      f"{len(inputs)}")
        inputs = inputs[0]
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4 or inputs.dtype != torch.float32:
        what = (f"{tuple(inputs.shape)} {inputs.dtype}" if isinstance(inputs, torch.Tensor)
                else type(inputs).__name__)
        raise NotImplementedError(f"kql Occlusion: inputs must be float32 images [N, C, H, W], "
                                  f"got {what}")
    return inputs.detach()


def _per_input(value, as_tuple: bool, what: str) -> tuple:
    """One input's entry of a Captum per-input argument (a tuple of one tuple, or the tuple)."""
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        if len(value) != 1:
            raise ValueError(f"Must provide {what} for each input tensor (1).")
        value = value[0]
    if not (isinstance(value, tuple) and len(value) == 3 and all(isinstance(v, int) for v in value)):
        raise ValueError(f"{what} must be a tuple of 3 ints (channels, height, width) for "
                         f"inputs [N, C, H, W], got {value!r}")
    return value


def _strides(strides, as_tuple: bool) -> tuple:
    """Captum's strides as (channel, row, column): None is 1, an int every dimension's."""
    if strides is None:
        strides = 1
    if isinstance(strides, tuple) and len(strides) == 1:
        strides = strides[0]
    if isinstance(strides, int):
        return (strides,) * 3
    return _per_input(strides, as_tuple, "strides")


def _check_geometry(shape: tuple, window: tuple, stride: tuple) -> None:
    """Captum's own checks of the window and the stride, as ValueErrors."""
    if any(s < 1 for s in stride) or any(k < 1 for k in window):
        raise ValueError(f"windows and strides must be at least 1, got {window} and {stride}")
    if any(k > d for k, d in zip(window, shape)):
        raise ValueError(f"Sliding window dimensions {window} cannot exceed input dimensions{shape}.")
    if any(d != k and s > k for d, k, s in zip(shape, window, stride)):
        raise ValueError(f"Stride dimension {stride} cannot be larger than sliding window "
                         f"shape dimension {window}.")


def _baselines(baselines, x: torch.Tensor, as_tuple: bool) -> torch.Tensor:
    """``[N, C, H, W]``: the baseline of every element (a scalar, or a tensor that
    broadcasts to the inputs, as Captum broadcasts it)."""
    if isinstance(baselines, tuple):
        if len(baselines) != 1:
            raise ValueError("Baseline must be provided for each input tensor (1).")
        baselines = baselines[0]
    if baselines is None:
        baselines = 0.0
    if isinstance(baselines, (int, float)):
        return torch.full_like(x, float(baselines))
    if not isinstance(baselines, torch.Tensor):
        raise ValueError(f"baselines must be a scalar or a tensor, got {type(baselines).__name__}")
    try:
        return torch.broadcast_to(baselines.detach().to(x.device, x.dtype), x.shape)
    except RuntimeError:
        raise ValueError(f"baselines of shape {tuple(baselines.shape)} do not broadcast to the "
                         f"inputs {tuple(x.shape)}") from None


def _targets(target, outputs: torch.Tensor, n: int) -> list:
    """One output index per example, as Captum reads ``target``."""
    if outputs.dim() != 2:
        raise NotImplementedError(f"kql Occlusion: forward_func must return [N, outputs], got "
                                  f"shape {tuple(outputs.shape)}")
    if target is None:
        if outputs.shape[1] != 1:
            raise NotImplementedError(f"kql Occlusion: target=None needs one output per example; "
                                      f"the model returns {outputs.shape[1]}: pass target")
        return [0] * n
    if isinstance(target, torch.Tensor):
        target = target.tolist() if target.dim() else int(target)
    if isinstance(target, numbers.Integral):
        return [int(target)] * n
    if isinstance(target, list) and all(isinstance(t, numbers.Integral) for t in target):
        if len(target) != n:
            raise ValueError(f"target has {len(target)} entries for {n} examples")
        return [int(t) for t in target]
    raise NotImplementedError(f"kql Occlusion: target must be an int, a list of ints or a "
                              f"tensor of them (one per example), got {target!r}")
