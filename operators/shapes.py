"""What one forward pass's shapes say about a model, without a torch.fx trace.

Before the planner pays for a trace and the materialized views (:mod:`.profile`), it
runs the model once with hooks on its leaf modules. In execution order they record each
convolution's and linear layer's multiply-accumulates, each module's activation bytes,
and the first *global gate*: a pooling to 1x1 in the middle of the network, followed by
more work on feature maps (squeeze-excitation). Past a gate every feature map changes
with every occlusion, so no exact incremental plan can save more than the work before
it: :attr:`ShapeSummary.ratio_bound` bounds the redundancy ratio from above.

A gate that is only a side branch (its value never rescales a later map) would make the
bound too low; the planner then runs the plain loop where incremental inference might
have been cheaper: slower, never wrong. A gate written as a function (``x.mean((2, 3))``)
is not seen by module hooks: the bound is then the whole network (no decision skipped).

>>> from torch import nn
>>> class SE(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.conv, self.pool = nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1)
...         self.fc = nn.Conv2d(8, 8, 1)
...         self.head = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1),
...                                   nn.Flatten(), nn.Linear(8, 2))
...     def forward(self, x):
...         x = self.conv(x)
...         return self.head(x * self.fc(self.pool(x)).sigmoid())
>>> s = summarize(SE().eval(), torch.rand(3, 8, 8))
>>> s.gate, s.macs_before_gate, s.macs, round(s.ratio_bound, 2), tuple(s.logits.shape)
('pool', 13824.0, 50768.0, 1.37, (2,))
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .user_model import check_logits

# Below this many times the image's bytes, a memory limit is not checked by an estimated
# pass: no CNN we know holds a thousand times its input at once (VGG16's views: ~100x).
UNCHECKED_FACTOR = 4096


class OverMemoryLimit(Exception):
    """A pass over the unoccluded image that would not fit the memory limit, refused before
    it ran: ``what`` it was, the bytes it ``needed``, the ``limit``."""

    def __init__(self, what: str, needed: int, limit: int):
        super().__init__(f"{what} needs {needed:,} bytes, more than the limit of {limit:,}")
        self.what, self.needed, self.limit = what, needed, limit


class _LiveBytes(TorchDispatchMode):
    """The bytes of tensors an op made that are still alive, and their peak (ops whose
    schema says they return a view or write in place make none)."""

    def __init__(self, start: int):
        super().__init__()
        self.live = self.peak = start

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        for ret, value in zip(returns, out if len(returns) > 1 else (out,)):
            for t in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(t, torch.Tensor) and ret.alias_info is None:
                    size = t.numel() * t.element_size()
                    self.live += size
                    weakref.finalize(t, self._free, size)
        self.peak = max(self.peak, self.live)
        return out

    def _free(self, size: int) -> None:
        self.live -= size


def peak_bytes(run, x: torch.Tensor, module: Optional[nn.Module] = None) -> Optional[int]:
    """The most bytes ``run(x)`` holds at once, ``x`` included, found on fake tensors
    (shapes, no values, no memory); None when it cannot run on them (a model that reads a
    value, an operator without a fake kernel). A fake tensor the run left in ``module``
    (default: ``run``, when a module) is taken out again.

    >>> peak_bytes(nn.Conv2d(3, 8, 3, padding=1), torch.zeros(1, 3, 100, 100))    # in + out
    440000
    """
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    module = module if module is not None else run if isinstance(run, nn.Module) else None
    kept = [(m, dict(vars(m)), dict(m._buffers)) for m in module.modules()] if module else []
    try:
        with torch.inference_mode(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = mode.from_tensor(x)
            with _LiveBytes(_bytes(x)) as live:
                out = run(fake)
            del out, fake
        return live.peak
    except Exception:           # fake tensors cannot follow every model: no estimate
        return None
    finally:                    # a forward that caches a tensor in its module
        for m, attributes, buffers in kept:
            for now, before in ((vars(m), attributes), (m._buffers, buffers)):
                for name in [k for k, v in now.items() if isinstance(v, FakeTensor)]:
                    if name in before:
                        now[name] = before[name]
                    else:
                        del now[name]


def check_fits(run, x: torch.Tensor, limit: Optional[int], what: str,
               module: Optional[nn.Module] = None) -> Optional[int]:
    """The peak bytes of ``run(x)`` (:func:`peak_bytes`, None: not estimated); raises
    :class:`OverMemoryLimit` when they pass ``limit``. Not estimated without a limit or
    while ``x`` is too small for any CNN to reach it (:data:`UNCHECKED_FACTOR`)."""
    if unchecked(x, limit):
        return None
    needed = peak_bytes(run, x, module)
    if needed is not None and needed > limit:
        raise OverMemoryLimit(what, needed, limit)
    return needed


@dataclass(frozen=True)
class Conv:
    """One convolution of the forward pass, per image."""

    macs: float
    depth: int            # MACs per output value
    area: int             # output pixels
    out_channels: int
    depthwise: bool


@dataclass(frozen=True)
class Hop:
    """One leaf module's call, as far as where a patch's change goes: the hop whose output
    it read (-1: the image), its window (kernel, stride, dilation; 1s for a module without
    one), its output's spatial size, its input's channels, its convolution's
    MACs (None: no convolution). A module without a window whose output size differs from
    its input's (an adaptive pooling, an upsampling) is ``resized``: the region scales."""

    source: int
    kernel: tuple
    stride: tuple
    dilation: tuple
    out: tuple            # (h, w), a volume's (d, h, w); () for an output that is no feature map
    in_channels: int
    conv: Optional[Conv] = None
    resized: bool = False
    gated: bool = False   # past a global gate: its whole output changes


@dataclass(frozen=True)
class ShapeSummary:
    """Per image: the MACs of convolutions and linear layers, those run before the first
    global gate, the gate's module name (None: no gate seen), the largest activation
    (a module's input and output together, bytes), the unoccluded logits."""

    macs: float
    macs_before_gate: float
    gate: Optional[str]
    peak_bytes: int
    logits: torch.Tensor
    convs: tuple = field(default=(), repr=False)
    linear_macs: float = 0.0
    activation_bytes: int = 0        # every module's output, summed
    output_bytes: tuple = field(default=(), repr=False)   # and one by one
    before_gate: tuple = (0, 0)      # how many of ``convs``, of ``output_bytes`` ran before the gate
    hops: tuple = field(default=(), repr=False)
    image_size: tuple = ()
    seconds: float = 0.0             # the shape pass itself, measured
    pixel_linear: bool = False       # a linear layer ran over tokens ([B, L, C])

    def changed(self, patch: tuple) -> list:
        """Per hop, ``(h, w)`` of the region a centred ``patch`` changes in its output (its
        whole map past a global pooling; () for an output that is no feature map).

        An estimate from the order the modules ran in: a module's input is the output of
        the module that wrote that tensor, else (a tensor made by a function: an addition,
        a concatenation) the latest output of the same size; each window grows the region
        by its extent and divides it by its stride, as in the projective field of seed
        paper 000, section 3.2. Where parallel branches meet, the branch read may not be
        the widest one, so the region can come out smaller than the engine's: the estimate
        leans towards the incremental plan's favour."""
        regions = []
        for hop in self.hops:
            before = tuple(patch) if hop.source < 0 else regions[hop.source]
            if hop.gated or not hop.out or not before:
                regions.append(hop.out)
                continue
            if hop.resized:
                source = self.image_size if hop.source < 0 else self.hops[hop.source].out
                size = tuple(min(o, max(1, -(-r * o // max(i, 1))))
                             for r, o, i in zip(before, hop.out, source))
            else:
                size = tuple(min(o, max(1, (r + (k - 1) * d) // st)) for r, o, k, st, d
                             in zip(before, hop.out, hop.kernel, hop.stride, hop.dilation))
            regions.append(size)
        return regions

    @property
    def ratio_bound(self) -> float:
        """No exact incremental plan saves more than this factor of the MACs."""
        rest = self.macs - self.macs_before_gate
        return math.inf if rest <= 0 else self.macs / rest


def _spatial(t) -> bool:
    return _maps(t) and math.prod(t.shape[2:]) > 1


def _pooled(t) -> bool:
    return _maps(t) and all(s == 1 for s in t.shape[2:])


def _maps(t) -> bool:
    """An image's feature map [B, C, H, W] (or [B, H, W, C]) or a volume's [B, C, D, H, W]."""
    return isinstance(t, torch.Tensor) and t.dim() in (4, 5)


def _pair(v, n: int = 2) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def unchecked(x: torch.Tensor, limit: Optional[int]) -> bool:
    """Whether no estimated pass is needed: no limit, or ``x`` too small for any CNN on it
    to reach ``limit`` (:data:`UNCHECKED_FACTOR`)."""
    return limit is None or _bytes(x) * UNCHECKED_FACTOR <= limit


def _bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class _Recorder:
    def __init__(self):
        self.macs = self.linear_macs = 0.0
        self.before_gate: Optional[float] = None
        self.gate: Optional[str] = None
        self.candidate: Optional[tuple] = None      # a pool to 1x1: (name, MACs, convs, outputs before it)
        self.counts_before: Optional[tuple] = None
        self.peak = self.activations = 0
        self.convs: list = []
        self.outputs: list = []
        self.hops: list = []
        self.pixel_linear = False
        self.image_size: tuple = ()
        self.writers: dict = {}      # id -> (the tensor, weakly; the hop that wrote it)
        self.latest: dict = {}       # spatial size -> the latest hop whose output has it

    def start(self, x: torch.Tensor) -> None:
        self.writers[id(x)] = (weakref.ref(x), -1)
        self.image_size = tuple(x.shape[2:])
        self.latest[self.image_size] = -1

    def _source(self, x) -> int:
        if not _maps(x):
            return len(self.hops) - 1
        found = self.writers.get(id(x))
        if found is not None and found[0]() is x:      # not a new tensor at a reused id
            return found[1]
        return self.latest.get(tuple(x.shape[2:]), len(self.hops) - 1)

    def _hop(self, module, x, output, conv: Optional[Conv]) -> None:
        """Record the call; a map ``[B, H, W, C]`` (after a permutation, or a linear layer
        over every pixel) is followed as channels-last: its size is dims 1-2."""
        source = self._source(x)
        windowed = isinstance(module, _WINDOWS)
        n = x.dim() - 2 if _maps(x) else 2
        # The input's layout from its size against its source's map (a tensor a function
        # permuted is not the module output it was read as); windows take [B, C, H, W].
        was = self.image_size if source < 0 else self.hops[source].out
        last_in = (_maps(x) and x.dim() == 4 and not windowed and bool(was)
                   and tuple(x.shape[2:]) != was and tuple(x.shape[1:3]) == was)
        in_size = (tuple(x.shape[1:3]) if last_in else tuple(x.shape[2:])) if _maps(x) else ()
        in_channels = (x.shape[3] if last_in else x.shape[1]) if _maps(x) else 0
        kernel = _pair(module.kernel_size, n) if windowed else (1,) * n
        stride = _pair(module.stride or module.kernel_size, n) if windowed else (1,) * n
        dilation = _pair(getattr(module, "dilation", 1), n) if windowed else (1,) * n
        last_out, out = False, ()
        if _maps(output) and output.dim() == 5:      # a volume's map: channels first
            out = tuple(output.shape[2:])
        elif _maps(output):
            if isinstance(module, nn.Linear):
                last_out = True                      # features last: [B, H, W, C]
            elif not windowed:
                same = tuple(output.shape[1:3]) if last_in else tuple(output.shape[2:])
                flipped = tuple(output.shape[2:]) if last_in else tuple(output.shape[1:3])
                last_out = last_in != (same != in_size and flipped == in_size)
            out = tuple(output.shape[1:3]) if last_out else tuple(output.shape[2:])
        resized = bool(out) and not windowed and out != in_size
        if out and set(out) == {1} and set(in_size) != {1}:
            out = ()                                 # pooled to 1x1: every value changes
        self.hops.append(Hop(source, kernel, stride, dilation, out, in_channels, conv, resized,
                             gated=self.gate is not None))
        index = len(self.hops) - 1
        if _maps(output):
            self.writers[id(output)] = (weakref.ref(output), index)
            self.latest[out] = index

    def hook(self, name: str):
        def record(module, inputs, output):
            x = inputs[0] if inputs else None
            if self.candidate is not None and self.gate is None and _spatial(x):
                self.gate, self.before_gate, *counts = self.candidate   # the pooled value came back
                self.counts_before = tuple(counts)
            if _spatial(x) and _pooled(output) and self.gate is None:
                self.candidate = (name, self.macs, len(self.convs), len(self.outputs))
            self.peak = max(self.peak, _bytes(x) + _bytes(output))
            self.activations += _bytes(output)
            self.outputs.append(_bytes(output))
            conv = None
            if isinstance(module, (nn.Conv2d, nn.Conv3d)) and isinstance(output, torch.Tensor):
                c_out, cells = output.shape[1], math.prod(output.shape[2:])
                depth = module.in_channels // module.groups * math.prod(module.kernel_size)
                macs = float(c_out * cells * depth)
                self.macs += macs
                conv = Conv(macs, depth, cells, c_out,
                            module.groups > 1 and module.groups == module.in_channels)
                self.convs.append(conv)
            elif isinstance(module, nn.Linear) and isinstance(output, torch.Tensor):
                macs = float(output.numel() // max(output.shape[0], 1) * module.in_features)
                self.macs += macs
                if output.dim() == 4:                     # over every pixel: a 1x1 convolution
                    _, h, w, c_out = output.shape         # (ConvNeXt's channel MLPs)
                    conv = Conv(macs, module.in_features, h * w, c_out, False)
                    self.convs.append(conv)
                else:
                    self.linear_macs += macs
                    self.pixel_linear |= output.dim() > 2     # over tokens: not followed
            self._hop(module, x, output, conv)
        return record


_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)
_WINDOWS = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.Conv3d, nn.MaxPool3d, nn.AvgPool3d)
_LAYERS = _WINDOWS + (nn.Linear,)


def may_have_gate(model: nn.Module) -> bool:
    """Without running it: does ``model`` define a pooling to 1x1 before a spatial
    convolution (in the order its modules are defined)? False means no module hook could
    see a gate, so :func:`summarize` need not run.

    >>> from torch import nn
    >>> may_have_gate(nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    False
    >>> may_have_gate(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(3, 8, 3)))
    True
    """
    pooled = False
    for m in model.modules():
        if isinstance(m, _GLOBAL_POOLS) and m.output_size in (1, (1, 1), (1, 1, 1)):
            pooled = True
        elif pooled and isinstance(m, (nn.Conv2d, nn.Conv3d)) and math.prod(m.kernel_size) > 1:
            return True
    return False


@torch.inference_mode()
def summarize(model: nn.Module, image: torch.Tensor, device="cpu",
              memory_limit: Optional[int] = None) -> ShapeSummary:
    """One forward pass of ``model`` (in eval mode, its tensors on ``device``) on
    ``image`` [3, H, W] with hooks on its leaf modules; one that would pass
    ``memory_limit`` bytes is refused before it runs (:class:`OverMemoryLimit`)."""
    check_fits(model, image.to(device).unsqueeze(0), memory_limit, "one forward pass")
    rec = _Recorder()
    # Leaf modules, and the layers a subclass gives children of their own (a convolution
    # holding its padding module: EfficientNet-Lite0's Conv2dStaticSamePadding).
    handles = [m.register_forward_hook(rec.hook(name)) for name, m in model.named_modules()
               if isinstance(m, _LAYERS) or not m._modules]
    start = time.perf_counter()
    try:
        batch = image.to(device).unsqueeze(0)
        rec.start(batch)
        logits = check_logits(model(batch))[0].float()
    finally:
        for h in handles:
            h.remove()
    before = rec.macs if rec.gate is None else rec.before_gate
    counts = rec.counts_before if rec.gate is not None else (len(rec.convs), len(rec.outputs))
    return ShapeSummary(rec.macs, before, rec.gate, rec.peak, logits, tuple(rec.convs),
                        rec.linear_macs, rec.activations, tuple(rec.outputs), counts, tuple(rec.hops),
                        tuple(image.shape[1:]), time.perf_counter() - start, rec.pixel_linear)
