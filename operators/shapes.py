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
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .task import check_logits


@dataclass(frozen=True)
class Conv:
    """One convolution of the forward pass, per image."""

    macs: float
    depth: int            # MACs per output value
    area: int             # output pixels
    out_channels: int
    depthwise: bool


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

    @property
    def ratio_bound(self) -> float:
        """No exact incremental plan saves more than this factor of the MACs."""
        rest = self.macs - self.macs_before_gate
        return math.inf if rest <= 0 else self.macs / rest


def _spatial(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[2] * t.shape[3] > 1


def _pooled(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[2] == t.shape[3] == 1


def _bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


class _Recorder:
    def __init__(self):
        self.macs = self.linear_macs = 0.0
        self.before_gate: Optional[float] = None
        self.gate: Optional[str] = None
        self.candidate: Optional[tuple] = None      # (name, MACs before it): a pool to 1x1
        self.peak = self.activations = 0
        self.convs: list = []

    def hook(self, name: str):
        def record(module, inputs, output):
            x = inputs[0] if inputs else None
            if self.candidate is not None and self.gate is None and _spatial(x):
                self.gate, self.before_gate = self.candidate   # the pooled value came back
            if _spatial(x) and _pooled(output) and self.gate is None:
                self.candidate = (name, self.macs)
            self.peak = max(self.peak, _bytes(x) + _bytes(output))
            self.activations += _bytes(output)
            if isinstance(module, nn.Conv2d) and isinstance(output, torch.Tensor):
                _, c_out, h, w = output.shape
                depth = module.in_channels // module.groups * math.prod(module.kernel_size)
                macs = float(c_out * h * w * depth)
                self.macs += macs
                self.convs.append(Conv(macs, depth, h * w, c_out,
                                       module.groups > 1 and module.groups == module.in_channels))
            elif isinstance(module, nn.Linear) and isinstance(output, torch.Tensor):
                macs = float(output.numel() // max(output.shape[0], 1) * module.in_features)
                self.macs += macs
                self.linear_macs += macs
        return record


_GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


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
        if isinstance(m, _GLOBAL_POOLS) and m.output_size in (1, (1, 1)):
            pooled = True
        elif pooled and isinstance(m, nn.Conv2d) and math.prod(m.kernel_size) > 1:
            return True
    return False


@torch.inference_mode()
def summarize(model: nn.Module, image: torch.Tensor, device="cpu") -> ShapeSummary:
    """One forward pass of ``model`` (in eval mode, its tensors on ``device``) on
    ``image`` [3, H, W] with hooks on its leaf modules."""
    rec = _Recorder()
    handles = [m.register_forward_hook(rec.hook(name)) for name, m in model.named_modules()
               if not any(True for _ in m.children())]
    try:
        logits = check_logits(model(image.to(device).unsqueeze(0)))[0].float()
    finally:
        for h in handles:
            h.remove()
    before = rec.macs if rec.gate is None else rec.before_gate
    return ShapeSummary(rec.macs, before, rec.gate, rec.peak, logits, tuple(rec.convs),
                        rec.linear_macs, rec.activations)
