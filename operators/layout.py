"""The memory layout the engines run full-size batches in.

On CPU, oneDNN's convolutions run channels-last (NHWC) batches 1.03-2.3x faster than
torch's default contiguous (NCHW) ones (measured on 13 torchvision CNNs, batch 16, 2
threads: ResNet18 1.22x, InceptionV3 1.68x, VGG16 1.38x): an NHWC input makes every
convolution after it, and the element-wise ops between them, stay NHWC. The numbers are
the same up to float rounding. The gain comes from large maps (and max pooling, 5-6x
faster channels-last), and on small inputs the faster layout depends on the model: the
naive operator measures it on its own first batch (:class:`LayoutTrial`); the
incremental one runs only its pooling windows channels-last, as its convolutions on
patch contexts and on the small maps past the crossover measured no faster, or slower. The planner picks the
layout; the engines only apply it.

>>> import torch
>>> x = in_layout(torch.zeros(2, 3, 4, 5), CHANNELS_LAST)
>>> x.is_contiguous(memory_format=torch.channels_last), x.shape
(True, torch.Size([2, 3, 4, 5]))
>>> in_layout(torch.zeros(2, 3), CHANNELS_LAST).shape    # not a batch of maps: unchanged
torch.Size([2, 3])
"""

from __future__ import annotations

from typing import Optional

import torch

CONTIGUOUS = "contiguous"
CHANNELS_LAST = "channels_last"
ADAPTIVE = "adaptive"       # the faster of the two on the task's own first batch
LAYOUTS = (CONTIGUOUS, CHANNELS_LAST)


def in_layout(t, layout: str):
    """``t`` in ``layout`` when it is a batch of feature maps ``[B, C, H, W]``."""
    if layout != CHANNELS_LAST or not isinstance(t, torch.Tensor) or t.dim() != 4:
        return t
    return t.contiguous(memory_format=torch.channels_last)


class LayoutTrial:
    """Picks the faster layout on a scan's own items, measured in this process.

    Which layout wins depends on the model and the map sizes (at 64x64, ResNet18 ran
    channels-last 1.6-1.9x slower than contiguous, SqueezeNet1.1 and DenseNet121 1.3-2x
    faster), so the naive operator tries both on the first batch: its first half runs
    channels-last, its second half contiguous, each timed per item, and every later batch
    runs in the layout that took less. Every item's logits are kept: nothing is computed
    twice, and the price is half a batch in the slower layout. Channels-last runs first,
    so the scan's cold start (allocations, oneDNN building its kernels) counts against it:
    the trial leans towards contiguous, a plain loop's layout. (The trial it replaces ran
    whole batches, two of them only to warm up, and cost ResNet18 at 64x64, 11 batches,
    0.82x of a plain loop; quarter batches cost as much, as batch 4 runs 1.5-2x slower
    per item than batch 16.) A batch of one item tries one layout per batch instead. A
    scan of fewer than :data:`MIN_BATCHES` batches runs contiguous, as a plain loop does.

    >>> trial = LayoutTrial(batches=10)
    >>> [(p.start, p.stop, layout) for p, layout, _ in trial.parts(slice(0, 16))]
    [(0, 8, 'channels_last'), (8, 16, 'contiguous')]
    >>> for unit, seconds in enumerate([1.0, 2.0]):
    ...     trial.record(unit, seconds, 8)
    >>> trial.chosen, [layout for _, layout, _ in trial.parts(slice(16, 32))]
    ('channels_last', ['channels_last'])
    """

    MIN_BATCHES = 2
    TRIED = (CHANNELS_LAST, CONTIGUOUS)

    def __init__(self, batches: int):
        self.seconds = {CONTIGUOUS: 0.0, CHANNELS_LAST: 0.0}
        self.chosen = None if batches >= self.MIN_BATCHES else CONTIGUOUS
        self.unit = 0                              # the next of TRIED to run

    def parts(self, items: slice) -> list:
        """``(items, layout, unit)`` to run the batch of positions ``items`` as: the whole
        batch in the chosen layout (unit None), else the trial's next units."""
        left = len(self.TRIED) - self.unit
        if self.chosen is None and left == 0:     # a trial batch was retried (out of memory)
            self.chosen = CONTIGUOUS
        if self.chosen is not None:
            return [(items, self.chosen, None)]
        count = items.stop - items.start
        if count < left:                           # too small to split: one unit per batch
            unit, self.unit = self.unit, self.unit + 1
            return [(items, self.TRIED[unit], unit)]
        bounds = [items.start + count * i // left for i in range(left + 1)]
        units = range(self.unit, len(self.TRIED))
        self.unit = len(self.TRIED)
        return [(slice(a, b), self.TRIED[u], u) for a, b, u in zip(bounds, bounds[1:], units)]

    def record(self, unit: Optional[int], seconds: float, count: int) -> None:
        """``count`` items of trial unit ``unit`` took ``seconds``; the last one decides."""
        if unit is None or self.chosen is not None:
            return
        self.seconds[self.TRIED[unit]] += seconds / max(count, 1)
        if unit == len(self.TRIED) - 1:
            self.chosen = min(self.seconds, key=self.seconds.get)
