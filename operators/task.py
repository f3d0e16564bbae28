"""What every occlusion operator computes, and what it hands back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

Progress = Optional[Callable[[int, int], None]]


@dataclass
class OcclusionTask:
    """One heat map to compute.

    ``model`` takes pixel-space images ``[B, 3, H, W]`` (normalisation inside) and returns
    logits ``[B, classes]``. ``image`` is ``[3, H, W]`` after the model's resize; ``color``
    is ``[3]``; ``ys``/``xs`` are the top-left corners of the patches in heat-map order.
    ``target`` None means the arg-max class of the unoccluded image.
    """

    model: nn.Module
    image: torch.Tensor
    color: torch.Tensor
    patch: tuple
    ys: np.ndarray
    xs: np.ndarray
    target: Optional[int] = None
    device: str = "cpu"

    @property
    def count(self) -> int:
        return int(len(self.ys))


@dataclass
class OcclusionResult:
    probabilities: np.ndarray   # float32 [N]: softmax probability of the target per position
    logits: np.ndarray          # float32 [N]: target logit per position
    target: int
    base_probability: float     # probability of the target on the unoccluded image
    base_logits: np.ndarray     # float32 [classes]


def occlude(images: torch.Tensor, color: torch.Tensor, ys, xs, patch) -> torch.Tensor:
    """Paint the patch into a batch of copies of one image, in place; returns ``images``."""
    ph, pw = patch
    for b, (y, x) in enumerate(zip(ys, xs)):
        images[b, :, y:y + ph, x:x + pw] = color.view(3, 1, 1)
    return images


def target_scores(logits: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(probability, logit) of ``target`` for each row of ``logits`` [B, classes]."""
    logits = logits.float()
    return torch.softmax(logits, dim=1)[:, target], logits[:, target]


def check_logits(out, what: str = "the model") -> torch.Tensor:
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{what} must return logits of shape [batch, classes], got {shape}")
    return out
