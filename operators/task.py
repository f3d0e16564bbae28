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


def occlude(image: torch.Tensor, color: torch.Tensor, ys, xs, patch) -> torch.Tensor:
    """A batch of copies of ``image`` [3, H, W], each with the patch painted at its corner.

    One broadcast ``where`` over row and column masks: no loop over the batch.

    >>> occlude(torch.zeros(1, 3, 4), torch.ones(1), [0, 1], [2, 0], (1, 2))[:, 0].tolist()
    [[[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]
    """
    ph, pw = patch
    _, h, w = image.shape
    dev = image.device
    y = torch.as_tensor(np.asarray(ys, np.int64), device=dev)[:, None]
    x = torch.as_tensor(np.asarray(xs, np.int64), device=dev)[:, None]
    rows = (torch.arange(h, device=dev) >= y) & (torch.arange(h, device=dev) < y + ph)
    cols = (torch.arange(w, device=dev) >= x) & (torch.arange(w, device=dev) < x + pw)
    inside = (rows[:, :, None] & cols[:, None, :])[:, None]          # [B, 1, H, W]
    return torch.where(inside, color.view(1, -1, 1, 1), image.unsqueeze(0))


def scan(task: OcclusionTask, base_logits: torch.Tensor, batch_size: int, logits_of,
         progress: Progress = None) -> OcclusionResult:
    """Run ``logits_of(items)`` over the task's positions batch by batch (``items``: the
    slice of positions in the batch); collect the map.

    The target defaults to the arg-max of ``base_logits`` (the unoccluded image). Per-batch
    scores are copied into one ``[2, N]`` tensor on the device, kept until the end: no
    synchronisation per batch, and no batch's ``[B, classes]`` logits kept alive.
    """
    target = int(base_logits.argmax()) if task.target is None else int(task.target)
    if not 0 <= target < base_logits.numel():
        raise IndexError(f"target class {target} is out of range: the model has "
                         f"{base_logits.numel()} classes (0..{base_logits.numel() - 1})")
    scores = torch.empty(2, task.count, device=base_logits.device)   # probability, logit
    for start in range(0, task.count, batch_size):
        stop = min(start + batch_size, task.count)
        scores[:, start:stop] = target_scores(logits_of(slice(start, stop)), target)
        if progress is not None:
            progress(stop, task.count)
    base_p = float(torch.softmax(base_logits, 0)[target])
    probs, logits = scores.cpu().numpy()
    return OcclusionResult(probs, logits, target, base_p, base_logits.cpu().numpy())


def target_scores(logits: torch.Tensor, target: int) -> torch.Tensor:
    """``[2, B]``: the probability and the logit of ``target`` for each row of ``logits``
    ``[B, classes]``; its own storage, not a view of the batch's.

    >>> target_scores(torch.tensor([[0.0, 0.0], [2.0, 0.0]]), 1)
    tensor([[0.5000, 0.1192],
            [0.0000, 0.0000]])
    """
    logits = logits.float()
    return torch.stack((torch.softmax(logits, dim=1)[:, target], logits[:, target]))


def check_logits(out, what: str = "the model") -> torch.Tensor:
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{what} must return logits of shape [batch, classes], got {shape}")
    return out
