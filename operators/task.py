"""What every occlusion operator computes, and what it hands back."""

from __future__ import annotations

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
    ``targets``: the classes to map (a None among them is the arg-max class of the
    unoccluded image; empty: that class alone); ``target`` is the one-class spelling.
    ``output``: one of :data:`OUTPUTS`, or None to detect it from the unoccluded output
    (:func:`detect_output`).
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

    @property
    def count(self) -> int:
        return int(len(self.ys))


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


def occlude(image: torch.Tensor, color: torch.Tensor, ys, xs, patch) -> torch.Tensor:
    """A batch of copies of ``image`` [3, H, W], each with the patch painted at its corner
    (``ys, xs``: sequences, or int64 tensors already on the image's device).

    One broadcast ``where`` over row and column masks: no loop over the batch.

    >>> occlude(torch.zeros(1, 3, 4), torch.ones(1), [0, 1], [2, 0], (1, 2))[:, 0].tolist()
    [[[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]
    """
    ph, pw = patch
    _, h, w = image.shape
    dev = image.device
    y, x = (v.to(dev)[:, None] if isinstance(v, torch.Tensor)
            else torch.as_tensor(np.asarray(v, np.int64), device=dev)[:, None] for v in (ys, xs))
    rows = (torch.arange(h, device=dev) >= y) & (torch.arange(h, device=dev) < y + ph)
    cols = (torch.arange(w, device=dev) >= x) & (torch.arange(w, device=dev) < x + pw)
    inside = (rows[:, :, None] & cols[:, None, :])[:, None]          # [B, 1, H, W]
    return torch.where(inside, color.view(1, -1, 1, 1), image.unsqueeze(0))


def scan(task: OcclusionTask, base_logits: torch.Tensor, batch_size: int, logits_of,
         progress: Progress = None) -> OcclusionResult:
    """Run ``logits_of(items)`` over the task's positions batch by batch (``items``: the
    slice of positions in the batch); collect one map per target.

    Per-batch scores are copied into one ``[2, T, N]`` tensor on the device, kept until
    the end: no synchronisation per batch, and no batch's ``[B, classes]`` outputs kept
    alive. Every target costs only its columns of the batch's outputs.

    A batch that runs out of memory (:func:`out_of_memory`) is halved and run again, and
    the scan goes on at the smaller size; the sizes that failed are the result's
    ``halved``. Only a single position that does not fit ends the scan (with the error).
    A ``progress`` that raises :class:`StopScan` ends it with the positions done so far.
    """
    output = detect_output(task.output, base_logits)[0]
    targets = resolve_targets(task.targets or (task.target,), base_logits, output)
    columns = torch.tensor(targets, device=base_logits.device)
    scores = torch.empty(2, len(targets), task.count, device=base_logits.device)
    halved = []
    start = 0
    while start < task.count:
        stop = min(start + batch_size, task.count)
        try:
            outputs = logits_of(slice(start, stop))
        except (RuntimeError, MemoryError) as exc:
            if stop - start == 1 or not out_of_memory(exc):
                raise
            del exc                              # frees the failed batch's tensors
            halved.append(stop - start)
            batch_size = (stop - start) // 2
            if base_logits.is_cuda:
                torch.cuda.empty_cache()
            continue
        scores[0, :, start:stop] = score(outputs, columns, output)
        scores[1, :, start:stop] = outputs.float()[:, columns].t()
        start = stop
        if progress is not None:
            try:
                progress(stop, task.count)
            except StopScan:
                break
    base = score(base_logits.view(1, -1), columns, output)[:, 0]
    values, raw = scores[:, :, :start].cpu().numpy()
    return OcclusionResult(values, raw, targets, base.cpu().numpy(), base_logits.cpu().numpy(),
                           output, halved=tuple(halved))


def went_on_at(halved: tuple) -> int:
    """The batch size a scan went on at after the sizes in ``halved`` ran out of memory.

    >>> went_on_at((32, 16))
    8
    """
    return halved[-1] // 2


# What torch says when an allocation fails: CPU (DefaultCPUAllocator) and CUDA.
OUT_OF_MEMORY = ("out of memory", "not enough memory", "can't allocate memory")


def out_of_memory(exc: BaseException) -> bool:
    """Whether torch (or Python) ran out of memory; any other error is not.

    >>> out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: ..."))
    True
    >>> out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    True
    >>> out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    False
    """
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(words in text for words in OUT_OF_MEMORY)


def check_logits(out, what: str = "the model") -> torch.Tensor:
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{what} must return logits of shape [batch, classes], got {shape}")
    return out


def in_eval_mode(model: nn.Module) -> nn.Module:
    """``model`` in eval mode, switched only where a module is training: ``Module.eval``
    sets every submodule's flag through ``__setattr__`` (0.4-1 ms on ShuffleNetV2 to
    DenseNet121, paid several times per query), a look at the flags costs a quarter."""
    if any(m.training for m in model.modules()):
        model.eval()
    return model


def on_device(model: nn.Module, device) -> nn.Module:
    """``model`` with its tensors on ``device``, moved only when its first parameter or
    buffer lies elsewhere: ``Module.to`` walks every tensor even when none moves (1.4-3.2
    ms on ShuffleNetV2 to DenseNet121, on every query).

    >>> net = nn.Linear(2, 3)
    >>> on_device(net, "cpu") is net
    True
    """
    device = torch.device(device)
    for tensors in (model.parameters(), model.buffers()):
        first = next(tensors, None)
        if first is not None and (first.device.type != device.type or
                                  device.index is not None and first.device.index != device.index):
            return model.to(device)
    return model
