"""Window ops: the :class:`Local` logical operator (convolution, max/avg pooling, constant
padding) and how each is built from a layer's arguments, for images' ``[B, C, H, W]`` and
volumes' ``[B, C, D, H, W]`` alike: a kernel, stride and dilation per spatial axis, a
(before, after) pad per axis, in the map's axis order. :mod:`.graph` classifies a traced
node into one of these; the step table, the engine and the cost model read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

POOLS = ("maxpool", "avgpool")      # the pooling kinds of :class:`Local`


@dataclass
class Local:
    """A window op (seed paper 000, eqs 7-15), generalised to dilation and asymmetric pads."""

    kind: str                       # 'conv' | 'maxpool' | 'avgpool' | 'pad'
    kernel: tuple                   # (kh, kw), a volume's (kd, kh, kw)
    stride: tuple
    dilation: tuple
    pad: tuple                      # (top, bottom, left, right), a volume's (front, back, top, ...); may be negative for 'pad'
    fill: float                     # value outside the input (0, -inf, or the pad constant)
    apply: Callable                 # applied to a gathered context with no further padding
    in_channels: int = 0
    out_channels: int = 0
    groups: int = 1
    divisor: Optional[torch.Tensor] = None   # avg pool: exact per-output divisor map
    delta: Optional[Callable] = None  # stride-1 conv: the change of its output from its input's

    def macs_per_output(self) -> int:
        """Multiply-adds per output element (eq. 16 without the output volume)."""
        if self.kind == "conv":
            return (self.in_channels // self.groups) * math.prod(self.kernel)
        if self.kind == "pad":
            return 0
        return math.prod(self.kernel)


def pair(v, n: int = 2) -> tuple:
    """``v`` as ``n`` ints (one int: the same on every axis)."""
    return (int(v),) * n if isinstance(v, int) else tuple(int(v[i]) for i in range(n))


_CONV = {2: F.conv2d, 3: F.conv3d}
_CONV_T = {2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}


def conv(weight, bias, stride, padding, dilation, groups) -> Optional[Local]:
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (4, 5):
        return None
    n = weight.dim() - 2
    k, s, d = tuple(int(v) for v in weight.shape[2:]), pair(stride, n), pair(dilation, n)
    if isinstance(padding, str):
        if padding == "valid":
            p = (0,) * 2 * n
        else:  # 'same' (stride 1): PyTorch puts the odd pixel at the end of each axis
            p = tuple(v for a in range(n) for t in [d[a] * (k[a] - 1)] for v in (t // 2, t - t // 2))
    else:
        p = tuple(v for v in pair(padding, n) for _ in (0, 1))
    call = _CONV[n]

    def apply(ctx, weight=weight, bias=bias):
        return call(ctx, weight, bias, s, 0, d, groups)

    return Local("conv", k, s, d, p, 0.0, apply, int(weight.shape[1]) * int(groups),
                 int(weight.shape[0]), int(groups),
                 delta=DeltaConv(weight, d, int(groups)) if set(s) == {1} and set(k) != {1} else None)


class DeltaConv:
    """The change of a stride-1 convolution's output from a change ``dx`` [B, C, h, w] (a
    volume's [B, C, d, h, w]) of its input: the transposed convolution of ``dx`` with the
    kernel flipped, no bias (a convolution is
    linear). Output row ``t`` is the convolution's output row ``y + t - (k-1)d + pad`` for
    ``dx`` at input row ``y``: every output the change reaches, and only those, from
    ``h x w`` inputs, where a window over the output region reads ``(h + 2(k-1)d)`` rows.
    Channels-last (oneDNN's transposed convolution runs 3-4x slower contiguous on
    64-channel maps, at a plain convolution's rate channels-last).

    >>> w = torch.randn(4, 2, 3, 3)
    >>> x, dx = torch.randn(1, 2, 6, 6), torch.zeros(1, 2, 6, 6)
    >>> dx[..., 2:4, 1:3] = torch.randn(1, 2, 2, 2)
    >>> change = DeltaConv(w, (1, 1), 1)(dx[..., 2:4, 1:3])     # output rows 1..4, cols 0..3
    >>> full = F.conv2d(x + dx, w, padding=1) - F.conv2d(x, w, padding=1)
    >>> bool(torch.allclose(change, full[..., 1:5, 0:4], atol=1e-5))
    True
    """

    def __init__(self, weight: torch.Tensor, dilation: tuple, groups: int):
        self.weight, self.dilation, self.groups = weight, dilation, groups
        self._kernel: Optional[torch.Tensor] = None

    def __call__(self, dx: torch.Tensor) -> torch.Tensor:
        if self._kernel is None or self._kernel.device != dx.device:
            self._kernel = self._flipped().to(dx.device)
        if dx.device.type == "cpu":
            dx = dx.contiguous(memory_format=pixels_format(dx))
        return _CONV_T[dx.dim() - 2](dx, self._kernel, None, 1, 0, 0, self.groups, self.dilation)

    def _flipped(self) -> torch.Tensor:
        """[C_out, C_in/g, *k] -> [C_in, C_out/g, *k], each kernel turned 180°."""
        w = self.weight.detach().flip(tuple(range(2, self.weight.dim())))
        c_out, c_in_g, *k = w.shape
        g = self.groups
        w = w.reshape(g, c_out // g, c_in_g, *k).transpose(1, 2).reshape(c_in_g * g, c_out // g, *k)
        return w.contiguous(memory_format=pixels_format(w)) if w.device.type == "cpu" else w.contiguous()


def pixels_format(t: torch.Tensor) -> torch.memory_format:
    """Channels-last for ``t``'s rank: pixels (voxels) of C values."""
    return torch.channels_last_3d if t.dim() == 5 else torch.channels_last


def maxpool(kernel, stride, padding, dilation, ceil_mode, shape) -> Local:
    n = len(shape) - 2
    k, s, d = pair(kernel, n), pair(stride if stride else kernel, n), pair(dilation, n)
    pads = pair(padding, n)
    outs = tuple(_pool_out(shape[2 + i], k[i], s[i], pads[i], d[i], ceil_mode) for i in range(n))
    p = _pool_pads(shape, k, s, d, pads, outs)
    call = _MAX_POOL[n]
    return Local("maxpool", k, s, d, p, -math.inf,
                 lambda ctx: call(ctx, k, s, 0, d), int(shape[1]), int(shape[1]))


def avgpool(kernel, stride, padding, ceil_mode, count_include_pad, divisor_override, shape):
    if divisor_override:
        return None
    n = len(shape) - 2
    k, s = pair(kernel, n), pair(stride if stride else kernel, n)
    pads = pair(padding, n)
    outs = tuple(_pool_out(shape[2 + i], k[i], s[i], pads[i], 1, ceil_mode) for i in range(n))
    p = _pool_pads(shape, k, s, (1,) * n, pads, outs)
    # Exact divisor of every output (count_include_pad, ceil_mode overhang): torch's own
    # average of ones against its sum of ones.
    call = _AVG_POOL[n]
    ones = torch.ones(1, 1, *(int(v) for v in shape[2:]))
    mean = call(ones, k, s, pads, ceil_mode, count_include_pad)
    total = call(ones, k, s, pads, ceil_mode, count_include_pad, divisor_override=1)
    divisor = total / mean
    uniform = bool((divisor == math.prod(k)).all())

    def apply(ctx):
        return call(ctx, k, s, 0, False, True, divisor_override=1)

    return Local("avgpool", k, s, (1,) * n, p, 0.0, apply, int(shape[1]), int(shape[1]),
                 divisor=None if uniform else divisor)


def adaptive_avgpool(output_size, shape) -> Optional[Local]:
    n = len(shape) - 2
    sizes = tuple(int(v) for v in shape[2:])
    out = pair(output_size, n) if not isinstance(output_size, (tuple, list)) or None not in output_size \
        else tuple(sizes[i] if v is None else int(v) for i, v in enumerate(output_size))
    if any(o < 1 or m % o for o, m in zip(out, sizes)) or (set(out) == {1} and set(sizes) != {1}):
        return None
    k = tuple(m // o for m, o in zip(sizes, out))
    return avgpool(k, k, 0, False, True, None, shape)


def pad(padding, value: float, n: int = 2) -> Local:
    """Constant padding of a map with ``n`` spatial axes; ``padding`` as F.pad takes it
    (the last axis first: left, right, top, bottom, front, back)."""
    given = tuple(int(v) for v in padding) if isinstance(padding, (tuple, list)) and \
        len(padding) == 2 * n else (int(padding),) * 2 * n
    p = tuple(v for a in reversed(range(n)) for v in given[2 * a:2 * a + 2])
    return Local("pad", (1,) * n, (1,) * n, (1,) * n, p, value, lambda ctx: ctx)


def _pool_out(size, k, s, p, d, ceil_mode) -> int:
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _pool_pads(shape, k, s, d, pads, outs) -> tuple:
    """(before, after) per axis (2D: top, bottom, left, right) so that every window lies
    inside the padded input."""
    res = []
    for i in range(len(shape) - 2):
        size, p = int(shape[2 + i]), pads[i]
        last = (outs[i] - 1) * s[i] - p + d[i] * (k[i] - 1)
        res += [p, max(0, last + 1 - size)]
    return tuple(res)
