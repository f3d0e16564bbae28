"""Bring an image to the size a model expects (pixel space, before normalisation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def target_size(height: int, width: int, input_size) -> tuple[int, int]:
    """None keeps the size; an int is the shorter side (aspect kept); (h, w) is exact.

    >>> target_size(300, 451, 224)
    (224, 337)
    >>> target_size(300, 451, (224, 224)), target_size(5, 7, None)
    ((224, 224), (5, 7))
    """
    if input_size is None:
        return height, width
    if isinstance(input_size, int):
        if height <= width:
            return input_size, max(1, round(width * input_size / height))
        return max(1, round(height * input_size / width)), input_size
    return int(input_size[0]), int(input_size[1])


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of a ``[3, H, W]`` image in [0, 1]."""
    if tuple(image.shape[1:]) == tuple(size):
        return image
    out = F.interpolate(image.unsqueeze(0), size=size, mode="bilinear", align_corners=False,
                        antialias=True)[0]
    return out.clamp_(0.0, 1.0).contiguous()
