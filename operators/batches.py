"""Running a task's positions batch by batch: the occluded batch, the scan that collects
one map per target, and halving a batch that runs out of memory."""

from __future__ import annotations

import numpy as np
import torch

from .task import OcclusionResult, OcclusionTask, Progress, StopScan, detect_output, resolve_targets, score


def occlude(image: torch.Tensor, color: torch.Tensor, at: tuple, patch) -> torch.Tensor:
    """A batch of copies of ``image`` [C, H, W] (a volume's [C, D, H, W]), each with the
    patch painted at its corner (``at``: one sequence per axis, or int64 tensors already
    on the image's device).

    One broadcast ``where`` over per-axis masks: no loop over the batch.

    >>> occlude(torch.zeros(1, 3, 4), torch.ones(1), ([0, 1], [2, 0]), (1, 2))[:, 0].tolist()
    [[[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]
    """
    dev = image.device
    sizes = image.shape[1:]
    n = len(sizes)
    inside = None
    for a, (corner, p, size) in enumerate(zip(at, patch, sizes)):
        c = (corner.to(dev) if isinstance(corner, torch.Tensor)
             else torch.as_tensor(np.asarray(corner, np.int64), device=dev))[:, None]
        span = torch.arange(size, device=dev)
        mask = ((span >= c) & (span < c + p)).view(-1, *(size if i == a else 1 for i in range(n)))
        inside = mask if inside is None else inside & mask
    return torch.where(inside[:, None], color.view(1, -1, *(1,) * n), image.unsqueeze(0))


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
