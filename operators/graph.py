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

Feature maps are images' ``[B, C, H, W]`` or volumes' ``[B, C, D, H, W]``: a window op's
kernel, stride and dilation have one entry per spatial axis, its padding two (before and
after), in the map's axis order, and every rule downstream is applied per axis. The
window ops themselves are built in :mod:`.window_ops` (re-exported here).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .window_ops import (POOLS, DeltaConv, Local, adaptive_avgpool, avgpool, conv,  # noqa: F401
                         maxpool, pad, pair, pixels_format)


class TraceError(Exception):
    """torch.fx could not trace the model."""


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
                      nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Threshold)
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
    """An image's ``[B, C, H, W]`` or a volume's ``[B, C, D, H, W]`` feature map."""
    return isinstance(t, torch.Tensor) and t.dim() in (4, 5) and t.is_floating_point()


def _input_shape(node: fx.Node, value) -> Optional[torch.Size]:
    first = node.args[0] if node.args else None
    v = value(first) if isinstance(first, fx.Node) else None
    return v.shape if _is_map(v) else None


def _classify_module(mod: nn.Module, node: fx.Node, value):
    if isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm3d)):
        return Pointwise(mod) if not mod.training and mod.running_mean is not None else None
    if isinstance(mod, _POINTWISE_MODULES):
        return Pointwise(mod) if not isinstance(mod, (nn.Dropout, nn.Dropout2d, nn.Dropout3d)) \
            or not mod.training else None
    if len(node.args) != 1 or node.kwargs:
        return None
    shape = _input_shape(node, value)
    if shape is None:
        return None
    if isinstance(mod, (nn.Conv2d, nn.Conv3d)) and type(mod).forward in (nn.Conv2d.forward, nn.Conv3d.forward):
        if mod.padding_mode != "zeros":
            return None
        return conv(mod.weight, mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups)
    if isinstance(mod, (nn.MaxPool2d, nn.MaxPool3d)) and not mod.return_indices:
        return maxpool(mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode, shape)
    if isinstance(mod, (nn.AvgPool2d, nn.AvgPool3d)):
        return avgpool(mod.kernel_size, mod.stride, mod.padding, mod.ceil_mode,
                       mod.count_include_pad, mod.divisor_override, shape)
    if isinstance(mod, (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        return adaptive_avgpool(mod.output_size, shape)
    if isinstance(mod, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ConstantPad3d, *_ZERO_PAD_3D)):
        return pad(mod.padding, float(getattr(mod, "value", 0.0)), len(shape) - 2)
    return None


_ZERO_PAD_3D = (nn.ZeroPad3d,) if hasattr(nn, "ZeroPad3d") else ()


def _classify_function(node: fx.Node, value, arg):
    t = node.target
    if t in (F.conv2d, torch.conv2d, F.conv3d, torch.conv3d):
        stride, padding, dilation, groups = (arg(i, k, d) for i, k, d in (
            (3, "stride", 1), (4, "padding", 0), (5, "dilation", 1), (6, "groups", 1)))
        return conv(arg(1, "weight", None), arg(2, "bias", None), stride, padding, dilation, groups)
    shape = _input_shape(node, value)
    if t in (F.max_pool2d, torch.max_pool2d, F.max_pool3d, torch.max_pool3d) and shape is not None \
            and not arg(6, "return_indices", False):
        k = arg(1, "kernel_size", None)
        return maxpool(k, arg(2, "stride", None) or k, arg(3, "padding", 0), arg(4, "dilation", 1),
                       arg(5, "ceil_mode", False), shape)
    if t in (F.avg_pool2d, F.avg_pool3d) and shape is not None:
        k = arg(1, "kernel_size", None)
        return avgpool(k, arg(2, "stride", None) or k, arg(3, "padding", 0), arg(4, "ceil_mode", False),
                       arg(5, "count_include_pad", True), arg(6, "divisor_override", None), shape)
    if t in (F.adaptive_avg_pool2d, F.adaptive_avg_pool3d) and shape is not None:
        return adaptive_avgpool(arg(1, "output_size", None), shape)
    if t is F.pad:
        spatial = value(node).dim() - 2
        if arg(2, "mode", "constant") != "constant" or len(arg(1, "pad", ())) != 2 * spatial:
            return None
        return pad(tuple(arg(1, "pad", ())), float(arg(3, "value", 0.0) or 0.0), spatial)
    if t is torch.cat:
        dim = arg(1, "dim", 0)
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        if dim in (1, 1 - value(node).dim()) and isinstance(tensors, (list, tuple)) and all(
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


def _broadcast_safe(v, spatial: int = 2) -> bool:
    """A constant operand that is the same at every position of a map with ``spatial``
    axes (its last ``spatial`` dimensions, where it has them, are 1)."""
    if not isinstance(v, torch.Tensor):
        return isinstance(v, (int, float, bool))
    return all(d == 1 for d in v.shape[max(0, v.dim() - spatial):])


def _operands(node: fx.Node) -> list:
    return list(node.args) + list(node.kwargs.values())


def _unary(node: fx.Node, value, fn):
    first, rest = node.args[0] if node.args else None, _operands(node)[1:]
    if not isinstance(first, fx.Node) or not _is_map(value(first)):
        return None
    axes = value(node).dim() - 2
    if any(isinstance(a, fx.Node) and not _broadcast_safe(value(a), axes) for a in rest):
        return None
    return Pointwise(fn)


def _binary(node: fx.Node, value, fn):
    ops = _operands(node)
    axes = value(node).dim() - 2
    spatial = tuple(i for i, a in enumerate(ops) if isinstance(a, fx.Node) and _is_map(value(a))
                    and not _broadcast_safe(value(a), axes))
    others_ok = all(_broadcast_safe(value(a) if isinstance(a, fx.Node) else a, axes)
                    for i, a in enumerate(ops) if i not in spatial)
    if not spatial or not others_ok or len(node.args) < 2:
        return None
    if len(spatial) == 1 and spatial[0] == 0:
        return Pointwise(fn)
    return Join(fn, spatial)
