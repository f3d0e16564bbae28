"""What every occlusion operator computes, and what it hands back: the task, its result,
and how a model's outputs become the map's scores."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

Progress = Optional[Callable[[int, int], None]]


class StopScan(Exception):
    """Raised by a scan's ``progress`` callback to end the scan after the batch it reports:
    :func:`scan` returns the positions done so far (a watcher hands the rest to another
    operator without losing them)."""


# How a model's outputs become the map's score. softmax: the model returns logits over
# exclusive classes; sigmoid: independent logits (one unit: a binary classifier); logits:
# the raw output; probability: the model already ends in a softmax (taken as it is).
OUTPUTS = ("softmax", "sigmoid", "logits", "probability")


@dataclass
class OcclusionTask:
    """One occlusion scan: one or more heat maps of the same positions.

    ``model`` takes pixel-space images ``[B, C, H, W]`` (normalisation inside) and returns
    outputs ``[B, classes]``. ``image`` is ``[C, H, W]`` after the model's resize; ``color``
    is ``[C]``; ``ys``/``xs`` are the top-left corners of the patches in heat-map order.
    A volume (``image`` ``[C, D, H, W]``, ``patch`` ``(d, h, w)``) gives each patch's first
    slice in ``zs`` too; :attr:`corners` is every spatial axis's, in the image's order.
    ``targets``: the classes to map (a None among them is the arg-max class of the
    unoccluded image; empty: that class alone); ``target`` is the one-class spelling.
    ``output``: one of :data:`OUTPUTS`, or None to detect it from the unoccluded output
    (:func:`detect_output`).
    ``fill``: what a patch holds where it is not one colour, ``fill(ys, xs)`` ->
    ``[B, C, ph, pw]`` for the patches at those corners (numpy arrays, or int64 tensors on
    the device): a baseline image's windows (Captum's tensor baselines), or the image's
    own pixels rescaled (MONAI's modes). None: every patch is ``color``.
    """

    model: nn.Module
    image: torch.Tensor
    color: torch.Tensor
    patch: tuple
    ys: np.ndarray
    xs: np.ndarray
    target: Optional[int] = None
    device: str = "cpu"
    targets: tuple = ()
    output: Optional[str] = None
    fill: Optional[Callable] = None
    zs: Optional[np.ndarray] = None

    @property
    def count(self) -> int:
        return int(len(self.ys))

    @property
    def corners(self) -> tuple:
        """The patches' first index along each spatial axis: ``(ys, xs)``, or ``(zs, ys, xs)``."""
        return (self.ys, self.xs) if self.zs is None else (self.zs, self.ys, self.xs)

    def taking(self, index) -> "OcclusionTask":
        """The task of the positions ``index`` (a slice or an index array) selects."""
        zs = None if self.zs is None else np.asarray(self.zs)[index]
        return dataclasses.replace(self, ys=np.asarray(self.ys)[index],
                                   xs=np.asarray(self.xs)[index], zs=zs)


@dataclass
class OcclusionResult:
    """The maps of one scan, one row per target (the first row is the primary map)."""

    scores: np.ndarray          # float32 [T, N]: the output score of each target per position
    all_logits: np.ndarray      # float32 [T, N]: each target's raw output per position
    targets: tuple              # T class indices
    base_scores: np.ndarray     # float32 [T]: each target's score on the unoccluded image
    base_logits: np.ndarray     # float32 [classes]
    output: str = "softmax"     # how the scores were made (:data:`OUTPUTS`)
    check: Optional[dict] = None    # a verified drill-down's measured quality (:mod:`.verified`)
    halved: tuple = ()          # batch sizes that ran out of memory, in order (see :func:`scan`)
    ran: tuple = ()             # ((operator name, items, seconds), ...) of a watched scan's parts
    paced: tuple = ()           # ((batch, threads from, threads to, why), ...): see .pacing

    @property
    def probabilities(self) -> np.ndarray:
        """The primary target's map (its score: a probability unless output is logits)."""
        return self.scores[0]

    @property
    def logits(self) -> np.ndarray:
        return self.all_logits[0]

    @property
    def target(self) -> int:
        return int(self.targets[0])

    @property
    def base_probability(self) -> float:
        return float(self.base_scores[0])


def detect_output(requested: Optional[str], base: torch.Tensor) -> tuple[str, str]:
    """How to score a model's outputs ``base`` [classes] on the unoccluded image, and why
    (empty when nothing was detected): as asked; else sigmoid for one output unit, the
    outputs as they are when they already sum to one (a model ending in softmax), softmax
    otherwise.

    >>> detect_output(None, torch.tensor([2.0]))
    ('sigmoid', 'one output unit')
    >>> detect_output(None, torch.tensor([0.25, 0.75]))
    ('probability', 'outputs already sum to 1')
    >>> detect_output(None, torch.tensor([0.25, 3.0])), detect_output('logits', torch.tensor([0.5, 0.5]))
    (('softmax', ''), ('logits', ''))
    """
    if requested is not None:
        return requested, ""
    base = base.detach().float().reshape(-1)
    if base.numel() == 1:
        return "sigmoid", "one output unit"
    if bool(((base >= 0) & (base <= 1)).all()) and abs(float(base.sum()) - 1.0) < 1e-3:
        return "probability", "outputs already sum to 1"
    return "softmax", ""


def score(outputs: torch.Tensor, targets: torch.Tensor, output: str) -> torch.Tensor:
    """``[T, B]``: the score of each class in ``targets`` for each row of ``outputs``.

    >>> out = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    >>> score(out, torch.tensor([1]), "softmax"), score(out, torch.tensor([0]), "logits")
    (tensor([[0.5000, 0.1192]]), tensor([[0., 2.]]))
    """
    outputs = outputs.float()
    if output == "softmax":
        outputs = torch.softmax(outputs, dim=1)
    elif output == "sigmoid":
        outputs = torch.sigmoid(outputs)
    return outputs[:, targets].t()


def resolve_targets(targets: tuple, base: torch.Tensor, output: str) -> tuple:
    """The class indices ``targets`` names (None: the unoccluded image's arg-max); an
    IndexError names the first out of range.

    >>> resolve_targets((None, 0), torch.tensor([0.1, 0.7, 0.2]), "softmax")
    (1, 0)
    """
    classes = base.numel()
    best = int(score(base.view(1, -1), torch.arange(classes), output).argmax())
    chosen = tuple(best if t is None else int(t) for t in (targets or (None,)))
    for t in chosen:
        if not 0 <= t < classes:
            raise IndexError(f"target class {t} is out of range: the model has "
                             f"{classes} classes (0..{classes - 1})")
    return chosen


def top_classes(base: torch.Tensor, k: int, output: str) -> tuple:
    """The ``k`` classes with the highest score on the unoccluded image, best first.

    >>> top_classes(torch.tensor([0.1, 0.7, 0.2]), 2, "softmax")
    (1, 2)
    """
    values = score(base.view(1, -1).float(), torch.arange(base.numel()), output)[:, 0]
    return tuple(int(i) for i in torch.argsort(values, descending=True, stable=True)[:k])


def joined(parts: list) -> OcclusionResult:
    """One result of the parts' positions in order (the first part's targets and base):
    the parts a watched or grouped scan ran."""
    head = parts[0]
    return dataclasses.replace(
        head, scores=np.concatenate([p.scores for p in parts], axis=1),
        all_logits=np.concatenate([p.all_logits for p in parts], axis=1),
        halved=tuple(h for p in parts for h in p.halved),
        paced=tuple(x for p in parts for x in p.paced))


def unordered(result: OcclusionResult, order: np.ndarray) -> OcclusionResult:
    """``result`` of positions taken in ``order``, back in the task's order."""
    if result.scores.shape[1] != len(order):
        raise RuntimeError("a scan in group order stopped early: its positions are not a prefix")
    scores, logits = np.empty_like(result.scores), np.empty_like(result.all_logits)
    scores[:, order], logits[:, order] = result.scores, result.all_logits
    return dataclasses.replace(result, scores=scores, all_logits=logits)
