"""The memory layout the engines run full-size batches in.

On CPU, oneDNN's convolutions run channels-last (NHWC) batches 1.03-2.3x faster than
torch's default contiguous (NCHW) ones (measured on 13 torchvision CNNs, batch 16, 2
threads: ResNet18 1.22x, InceptionV3 1.68x, VGG16 1.38x): an NHWC input makes every
convolution after it, and the element-wise ops between them, stay NHWC. The numbers are
the same up to float rounding. The gain comes from large maps (and max pooling, 5-6x
faster channels-last), and on small inputs the faster layout depends on the model: the
naive operator measures it on its own first batches (:class:`LayoutTrial`); the
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

import torch

CONTIGUOUS = "contiguous"
CHANNELS_LAST = "channels_last"
ADAPTIVE = "adaptive"       # the faster of the two on the task's own first batches
LAYOUTS = (CONTIGUOUS, CHANNELS_LAST)


def in_layout(t, layout: str):
    """``t`` in ``layout`` when it is a batch of feature maps ``[B, C, H, W]``."""
    if layout != CHANNELS_LAST or not isinstance(t, torch.Tensor) or t.dim() != 4:
        return t
    return t.contiguous(memory_format=torch.channels_last)


class LayoutTrial:
    """Picks the faster layout on a scan's own batches, measured in this process.

    Which layout wins depends on the model and the map sizes (ResNet18 at 80x96 ran
    contiguous 1.04x and channels-last 0.93x of a plain loop; RegNetX-400MF the other way
    round), so the naive operator tries both: batches 0 and 1 warm each layout up (oneDNN
    builds its kernels on first use), batches 2 and 3 are timed, and the rest run in the
    layout whose timed batch took less. Every batch's logits are kept: nothing is computed
    twice; the price is two batches in the slower layout (a longer trial, three of them,
    cost SqueezeNet1.1 at 80x96 1.90x -> 1.58x of a plain loop). A scan of fewer than
    :data:`MIN_BATCHES` batches runs channels-last.

    >>> trial = LayoutTrial(batches=10)
    >>> [trial.layout(i) for i in range(4)]
    ['channels_last', 'contiguous', 'channels_last', 'contiguous']
    >>> for i, seconds in enumerate([9, 9, 1.0, 2.0]):
    ...     trial.record(i, seconds)
    >>> trial.layout(4), trial.chosen
    ('channels_last', 'channels_last')
    """

    MIN_BATCHES = 8
    TRIED = (CHANNELS_LAST, CONTIGUOUS) * 2

    def __init__(self, batches: int):
        self.seconds = {CONTIGUOUS: 0.0, CHANNELS_LAST: 0.0}
        self.chosen = None if batches >= self.MIN_BATCHES else CHANNELS_LAST

    def layout(self, index: int) -> str:
        if self.chosen is None and index < len(self.TRIED):
            return self.TRIED[index]
        if self.chosen is None:                    # batches arrive in order: decide now
            self.chosen = min(self.seconds, key=self.seconds.get)
        return self.chosen

    def record(self, index: int, seconds: float) -> None:
        if self.chosen is None and 2 <= index < len(self.TRIED):
            self.seconds[self.TRIED[index]] += seconds
