"""The layer graph: a model traced by torch.fx, each node normalised to a logical operator.

The three spellings of an operation (``nn.Conv2d`` module, ``F.conv2d`` call, tensor
method) become one of four logical kinds (seed paper 000, section 3.2):

* :class:`Local` - convolution, max/avg pooling, constant padding: a window op with a
  kernel, stride, dilation, padding and a fill value for the border;
* :class:`Pointwise` - batch norm (eval), activations, dropout (eval), identity, scalar or
  per-channel arithmetic;
* :class:`Join` - element-wise ops of several spatial tensors, channel concatenation;
* ``None`` - global: everything else. Incremental computation ends there (the patch is
  projected into a full tensor); an unknown node is global, which is slower, never wrong.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn


class TraceError(Exception):
    """torch.fx could not trace the model."""


POOLS = ("maxpool", "avgpool")      # the pooling kinds of :class:`Local`


@dataclass
class Local:
    """A window op (seed paper 000, eqs 7-15), generalised to dilation and asymmetric pads."""

    kind: str                       # 'conv' | 'maxpool' | 'avgpool' | 'pad'
    kernel: tuple                   # (kh, kw)
    stride: tuple
    dilation: tuple
    pad: tuple                      # (top, bottom, left, right); may be negative for 'pad'
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
            return (self.in_channels // self.groups) * self.kernel[0] * self.kernel[1]
        if self.kind == "pad":
            return 0
        return self.kernel[0] * self.kernel[1]


@dataclass
class Pointwise:
    """Applied position by position: a patch maps to the same patch."""

    call: Callable                  # call(*args, **kwargs) with patches in place of tensors


@dataclass
class Join:
    """Several spatial operands combined position by position (eqs 35-38)."""

    call: Callable
    spatial: tuple                  # indices into the flattened operand list


_POINTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid,
                      nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish,
                      nn.Softplus, nn.Hardtanh, nn.PReLU, nn.Softsign, nn.Identity,
                      nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.Threshold)
_POINTWISE_FUNCTIONS = {F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid,
                        F.sigmoid, F.tanh, F.leaky_relu, F.elu, F.selu, F.mish, F.softplus,
                        F.hardtanh, F.dropout, torch.relu, torch.sigmoid, torch.tanh,
                        torch.clamp, torch.neg, torch.exp, torch.abs, operator.neg,
                        F.batch_norm}
_POINTWISE_METHODS = {"relu", "sigmoid", "tanh", "clamp", "clamp_min", "clamp_max", "neg",
                      "exp", "abs", "contiguous", "float", "hardswish"}
_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add,
                     torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum}
_BINARY_METHODS = {"add", "sub", "mul", "div"}
_INPLACE = {operator.iadd: operator.add, operator.isub: operator.sub,
            operator.imul: operator.mul, operator.itruediv: operator.truediv}


def trace(model: nn.Module, device=None) -> fx.GraphModule:
    """Trace ``model`` into a graph module of its own with in-place ops made out-of-place.

    In-place ops would overwrite the materialized views other nodes read. The graph
    module shares the parameters, buffers and modules of ``model`` (copying VGG16's would
    move 0.5 GB), except that a module computing in place is replaced by an out-of-place
    copy; nothing here writes to the model. A model in training mode or with tensors on
    another device is copied first (in eval mode, on ``device``). The graph's Python code
    is generated lazily: the engines interpret the graph and never need it.
    """
    if _needs_copy(model, device):
        model = _eval_copy(model, device)
    try:
        graph = fx.Tracer().trace(model)
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, RuntimeError...)
        first = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise TraceError(f"torch.fx cannot trace the model: {first}") from None
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _INPLACE:
            node.target = _INPLACE[node.target]
        elif node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__") \
                and hasattr(torch.Tensor, node.target[:-1]):
            node.target = node.target[:-1]
        if "inplace" in node.kwargs and node.kwargs["inplace"] is True:
            node.kwargs = {**node.kwargs, "inplace": False}
    attrs = {n.target: _out_of_place(_attr(model, n.target)) for n in graph.nodes
             if n.op in ("call_module", "get_attr")}
    return _GraphModule(attrs, graph, model.__class__.__name__)


def _needs_copy(model: nn.Module, device) -> bool:
    if any(m.training for m in model.modules()):
        return True
    if device is None:
        return False
    device = torch.device(device)
    return any(t.device != device for t in list(model.parameters()) + list(model.buffers()))


def _eval_copy(model: nn.Module, device) -> nn.Module:
    """A copy in eval mode whose tensors already on ``device`` stay shared."""
    memo: dict = {}
    for t in list(model.parameters()) + list(model.buffers()):
        moved = t.to(device) if device is not None else t     # ``t`` itself when already there
        if moved is not t and isinstance(t, nn.Parameter):
            moved = nn.Parameter(moved, requires_grad=t.requires_grad)
        memo[id(t)] = moved
    return copy.deepcopy(model, memo).eval()


def _attr(root: nn.Module, target: str):
    obj = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _out_of_place(obj):
    if isinstance(obj, nn.Module) and getattr(obj, "inplace", False) is True:
        obj = copy.copy(obj)          # a parameterless activation: its own attribute dict
        obj.inplace = False
    return obj


try:                                  # torch >= 2.3: code generated on first call only
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GraphModule
except ImportError:                   # pragma: no cover
    _GraphModule = fx.GraphModule


def is_metadata(node: fx.Node) -> bool:
    """``x.size()``, ``x.dim()``, ``x.shape``: reads only the shape of its input."""
    return ((node.op == "call_method" and node.target in ("size", "dim"))
            or (node.op == "call_function" and node.target is getattr
                and len(node.args) > 1 and node.args[1] in ("shape", "ndim")))


def pair(v) -> tuple:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def classify(node: fx.Node, gm: fx.GraphModule, value, arg) -> object:
    """The logical operator of ``node``, or None for global.

    ``value(n)`` gives the materialized output of node ``n``; ``arg(i, name, default)`` the
    materialized value of the node's argument (positional index or keyword).
    """
    out = value(node)
    if not _is_map(out):
        return None
    if node.op == "call_module":
        return _classify_module(gm.get_submodule(node.target), node, value)
    if node.op == "call_function":
        return _classify_function(node, value, arg)
    if node.op == "call_method":
        return _classify_method(node, value)
    return None


def _is_map(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point()


def _input_shape(node: fx.Node, value) -> Optional[torch.Size]:
    first = node.args[0] if node.args else None
    v = value(first) if isinstance(first, fx.Node) else None
    return v.shape if _is_map(v) else None


def _classify_module(mod: nn.Module, node: fx.Node, value):
    if isinstance(mod, nn.BatchNorm2d):
        return Pointwise(mod) if not mod.training and mod.running_mean is not None else None
    if isinstance(mod, _POINTWISE_MODULES):
        return Pointwise(mod) if not isinstance(mod, (nn.Dropout, nn.Dropout2d)) or not mod.training else None
    if len(node.args) != 1 or node.kwargs:
        return None
    shape = _input_shape(node, value)
    if shape is None:
        return None
    if isinstance(mod, nn.Conv2d) and type(mod).forward is nn.Conv2d.forward:
        if mod.padding_mode != "zeros":
            return None
        return conv(mod.weight, mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups)
    if isinstance(mod, nn.MaxPool2d) and not mod.return_indices:
        return maxpool(mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode, shape)
    if isinstance(mod, nn.AvgPool2d):
        return avgpool(mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode,
                       mod.count_include_pad, mod.divisor_override, shape)
    if isinstance(mod, nn.AdaptiveAvgPool2d):
        return adaptive_avgpool(mod.output_size, shape)
    if isinstance(mod, (nn.ZeroPad2d, nn.ConstantPad2d)):
        return pad(mod.padding, float(getattr(mod, "value", 0.0)))
    return None


def _classify_function(node: fx.Node, value, arg):
    t = node.target
    if t in (F.conv2d, torch.conv2d):
        stride, padding, dilation, groups = (arg(i, k, d) for i, k, d in (
            (3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1)))
        return conv(arg(1, "weight", None), arg(2, "bias", None), stride, padding, dilation, groups)
    shape = _input_shape(node, value)
    if t in (F.max_pool2d, torch.max_pool2d) and shape is not None and not arg(6, "return_indices", False):
        k = arg(1, "kernel_size", None)
        return maxpool(k, arg(2, "stride", None) or k, arg(3, "padding", 0), arg(4, "dilation", 1),
                       arg(5, "ceil_mode", False), shape)
    if t is F.avg_pool2d and shape is not None:
        k = arg(1, "kernel_size", None)
        return avgpool(k, arg(2, "stride", None) or k, arg(3, "padding", 0), arg(4, "ceil_mode", False),
                       arg(5, "count_include_pad", True), arg(6, "divisor_override", None), shape)
    if t is F.adaptive_avg_pool2d and shape is not None:
        return adaptive_avgpool(arg(1, "output_size", None), shape)
    if t is F.pad:
        if arg(2, "mode", "constant") != "constant" or len(arg(1, "pad", ())) != 4:
            return None
        return pad(tuple(arg(1, "pad", ())), float(arg(3, "value", 0.0) or 0.0))
    if t is torch.cat:
        dim = arg(1, "dim", 0)
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        if dim in (1, -3) and isinstance(tensors, (list, tuple)) and all(
                isinstance(a, fx.Node) and _is_map(value(a)) for a in tensors):
            return Join(lambda *xs: torch.cat(xs, 1), tuple(range(len(tensors))))
        return None
    if t in _BINARY_FUNCTIONS:
        return _binary(node, value, t)
    if t in _POINTWISE_FUNCTIONS:
        if t is F.dropout and arg(2, "training", True):
            return None
        if t is F.batch_norm and arg(5, "training", False):
            return None
        return _unary(node, value, t)
    return None


def _classify_method(node: fx.Node, value):
    name = node.target
    if name in _BINARY_METHODS:
        return _binary(node, value, lambda a, *rest, **kw: getattr(a, name)(*rest, **kw))
    if name in _POINTWISE_METHODS:
        return _unary(node, value, lambda a, *rest, **kw: getattr(a, name)(*rest, **kw))
    return None


def _broadcast_safe(v) -> bool:
    """A constant operand that is the same at every spatial position."""
    if not isinstance(v, torch.Tensor):
        return isinstance(v, (int, float, bool))
    if v.dim() == 0:
        return True
    if v.dim() == 1:
        return v.shape[0] == 1
    return v.shape[-1] == 1 and v.shape[-2] == 1


def _operands(node: fx.Node) -> list:
    return list(node.args) + list(node.kwargs.values())


def _unary(node: fx.Node, value, fn):
    first, rest = node.args[0] if node.args else None, _operands(node)[1:]
    if not isinstance(first, fx.Node) or not _is_map(value(first)):
        return None
    if any(isinstance(a, fx.Node) and not _broadcast_safe(value(a)) for a in rest):
        return None
    return Pointwise(fn)


def _binary(node: fx.Node, value, fn):
    ops = _operands(node)
    spatial = tuple(i for i, a in enumerate(ops) if isinstance(a, fx.Node) and _is_map(value(a))
                    and not _broadcast_safe(value(a)))
    others_ok = all(_broadcast_safe(value(a)) if isinstance(a, fx.Node) else _broadcast_safe(a)
                    for i, a in enumerate(ops) if i not in spatial)
    if not spatial or not others_ok or len(node.args) < 2:
        return None
    if len(spatial) == 1 and spatial[0] == 0:
        return Pointwise(fn)
    return Join(fn, spatial)


# -- window ops ---------------------------------------------------------------------------

def conv(weight, bias, stride, padding, dilation, groups) -> Optional[Local]:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        return None
    k, s, d = pair(weight.shape[2:]), pair(stride), pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            p = (0, 0, 0, 0)
        else:  # 'same' (stride 1): PyTorch puts the odd pixel at the bottom/right
            th, tw = d[0] * (k[0] - 1), d[1] * (k[1] - 1)
            p = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    else:
        ph, pw = pair(padding)
        p = (ph, ph, pw, pw)

    def apply(ctx, weight=weight, bias=bias):
        return F.conv2d(ctx, weight, bias, s, 0, d, groups)

    return Local("conv", k, s, d, p, 0.0, apply, int(weight.shape[1]) * int(groups),
                 int(weight.shape[0]), int(groups),
                 delta=DeltaConv(weight, d, int(groups)) if s == (1, 1) and k != (1, 1) else None)


class DeltaConv:
    """The change of a stride-1 convolution's output from a change ``dx`` [B, C, h, w] of
    its input: ``conv_transpose2d(dx)`` with the kernel flipped, no bias (a convolution is
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
            dx = dx.contiguous(memory_format=torch.channels_last)
        return F.conv_transpose2d(dx, self._kernel, None, 1, 0, 0, self.groups, self.dilation)

    def _flipped(self) -> torch.Tensor:
        """[C_out, C_in/g, kh, kw] -> [C_in, C_out/g, kh, kw], each kernel turned 180°."""
        w = self.weight.detach().flip(2, 3)
        c_out, c_in_g, kh, kw = w.shape
        g = self.groups
        w = w.reshape(g, c_out // g, c_in_g, kh, kw).transpose(1, 2).reshape(c_in_g * g, c_out // g, kh, kw)
        return w.contiguous(memory_format=torch.channels_last) if w.device.type == "cpu" else w.contiguous()


def maxpool(kernel, stride, padding, dilation, ceil_mode, shape) -> Local:
    k, s, d = pair(kernel), pair(stride if stride else kernel), pair(dilation)
    ph, pw = pair(padding)
    h_out, w_out = (_pool_out(shape[2 + i], k[i], s[i], (ph, pw)[i], d[i], ceil_mode) for i in (0, 1))
    p = _pool_pads(shape, k, s, d, (ph, pw), (h_out, w_out))
    return Local("maxpool", k, s, d, p, -math.inf,
                 lambda ctx: F.max_pool2d(ctx, k, s, 0, d), int(shape[1]), int(shape[1]))


def avgpool(kernel, stride, padding, ceil_mode, count_include_pad, divisor_override, shape):
    if divisor_override:
        return None
    k, s = pair(kernel), pair(stride if stride else kernel)
    ph, pw = pair(padding)
    h_out, w_out = (_pool_out(shape[2 + i], k[i], s[i], (ph, pw)[i], 1, ceil_mode) for i in (0, 1))
    p = _pool_pads(shape, k, s, (1, 1), (ph, pw), (h_out, w_out))
    # Exact divisor of every output (count_include_pad, ceil_mode overhang): torch's own
    # average of ones against its sum of ones.
    ones = torch.ones(1, 1, int(shape[2]), int(shape[3]))
    mean = F.avg_pool2d(ones, k, s, (ph, pw), ceil_mode, count_include_pad)
    total = F.avg_pool2d(ones, k, s, (ph, pw), ceil_mode, count_include_pad, divisor_override=1)
    divisor = total / mean
    uniform = bool((divisor == k[0] * k[1]).all())

    def apply(ctx):
        return F.avg_pool2d(ctx, k, s, 0, False, True, divisor_override=1)

    return Local("avgpool", k, s, (1, 1), p, 0.0, apply, int(shape[1]), int(shape[1]),
                 divisor=None if uniform else divisor)


def adaptive_avgpool(output_size, shape) -> Optional[Local]:
    out = pair(output_size) if not isinstance(output_size, (tuple, list)) or None not in output_size \
        else tuple(shape[2 + i] if v is None else int(v) for i, v in enumerate(output_size))
    h, w = int(shape[2]), int(shape[3])
    if out[0] < 1 or out[1] < 1 or h % out[0] or w % out[1] or (out == (1, 1) and (h, w) != (1, 1)):
        return None
    k = (h // out[0], w // out[1])
    return avgpool(k, k, 0, False, True, None, shape)


def pad(padding, value: float) -> Local:
    left, right, top, bottom = (int(v) for v in (padding if isinstance(padding, (tuple, list))
                                                  and len(padding) == 4 else (padding,) * 4))
    return Local("pad", (1, 1), (1, 1), (1, 1), (top, bottom, left, right), value, lambda ctx: ctx)


def _pool_out(size, k, s, p, d, ceil_mode) -> int:
    span = size + 2 * p - d * (k - 1) - 1
    out = (span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def _pool_pads(shape, k, s, d, pads, outs) -> tuple:
    """(top, bottom, left, right) so that every window lies inside the padded input."""
    res = []
    for i in (0, 1):
        size, p = int(shape[2 + i]), pads[i]
        last = (outs[i] - 1) * s[i] - p + d[i] * (k[i] - 1)
        res += [p, max(0, last + 1 - size)]
    return tuple(res)
