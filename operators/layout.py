"""The memory layout the engines run full-size batches in.

On CPU, oneDNN's convolutions run channels-last (NHWC) batches 1.03-2.3x faster than
torch's default contiguous (NCHW) ones (measured on 13 torchvision CNNs, batch 16, 2
threads: ResNet18 1.22x, InceptionV3 1.68x, VGG16 1.38x): an NHWC input makes every
convolution after it, and the element-wise ops between them, stay NHWC. The numbers are
the same up to float rounding. The gain comes from large maps (and max pooling, 5-6x
faster channels-last): the naive operator runs its batches channels-last; the incremental
one only its pooling windows, as its convolutions on patch contexts and on the small maps
past the crossover measured no faster, or slower, channels-last. The planner picks the
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
LAYOUTS = (CONTIGUOUS, CHANNELS_LAST)


def in_layout(t, layout: str):
    """``t`` in ``layout`` when it is a batch of feature maps ``[B, C, H, W]``."""
    if layout != CHANNELS_LAST or not isinstance(t, torch.Tensor) or t.dim() != 4:
        return t
    return t.contiguous(memory_format=torch.channels_last)
