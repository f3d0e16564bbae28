"""Reduced precision in the planner: which arithmetic a plan runs in, and what it saves.

The cost model prices a plan in float32 (:mod:`.calibrate`). A plan in ``bfloat16``,
``float16`` or ``int8`` (:mod:`kql.operators.precision`) is priced from the measured
ratio of float32 to that precision on the query's own model, a batch of its image: the
ratio depends on the model's layers, not only the hardware (here bfloat16 ran ResNet18
1.9x faster and EfficientNet-Lite0 1.7x; torch.ao's int8 ResNet18 10x faster and int8
Lite0, whose depthwise convolutions and swish stay in float, 6x *slower*). The two run
interleaved, round after round, and the median ratio is kept: a busy machine slows both
alike, so the ratio holds where absolute times do not. Ratios are kept in this process,
and, when measured on a quiet machine, per device, model and image shape beside the
calibration (``precision.json``); the planner prices the multiplying nodes of a plan with
them (:func:`priced`), and the scans' feedback (:mod:`.feedback`, keyed by precision)
corrects the rest.

``SET precision = 'auto'`` (the default) is float32 for exact queries. Under ``WITH SSIM``
the verified scans may also run in bfloat16 (:func:`for_ssim`), their check's windows in
float32, and the planner prices both. A precision the device cannot run is a stated
fallback to float32 (EXPLAIN: ``precision: float32 (bfloat16: <why>)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import time

import torch
from torch import nn

from kql.fileio import read_entries, update_json
from kql.operators.contention import contended
from kql.operators.precision import BFLOAT16, FLOAT16, FLOAT32, INT8, computing, quantized, unsupported

from . import calibrate

FILE = "precision.json"
VERSION = 1
ROUNDS = 3
PAYS = 1.15                              # a reduced precision 'auto' may pick: this much faster
BATCH = 8                                # images per timed forward pass on CPU
_cache: dict = {}


def resolve(setting: str, device: str) -> tuple:
    """``(precision, note)``: what a plan on ``device`` runs in for the session's
    ``precision`` setting, and why it is not what was asked ('' when it is).

    >>> resolve("auto", "cpu"), resolve("float32", "cpu")
    (('float32', ''), ('float32', ''))
    """
    if setting in ("auto", FLOAT32):
        return FLOAT32, ""
    why = unsupported(setting, device)
    if why is not None:
        return FLOAT32, f"{setting}: {why}"
    return setting, ""


def for_ssim(query, ctx, device: str):
    """The reduced precision a WITH SSIM query's verified scans may run in (their check's
    windows run in float32, so the promise is measured against the float32 map): the
    session's, where it asked for one the device runs; under 'auto', bfloat16 (float16 on
    a GPU without it) where the device has it and it runs this model at least
    :data:`PAYS` times faster than float32; else None."""
    setting = ctx.precision
    if setting != "auto":
        chosen, _ = resolve(setting, device)
        return None if chosen == FLOAT32 else chosen
    for candidate in ((BFLOAT16, FLOAT16) if device == "cuda" else (BFLOAT16,)):
        if unsupported(candidate, device) is None:
            fast = speedup(candidate, device, query.model, query.image, ctx.directory) >= PAYS
            return candidate if fast else None
    return None


def speedup(precision: str, device: str, model, image: torch.Tensor, directory=None) -> float:
    """Measured float32 seconds over ``precision`` seconds of ``model`` (a catalog
    :class:`~kql.catalog.models.ModelSpec`) on a batch of ``image`` on ``device``; 1 for
    float32. Kept per device, model structure and image shape."""
    if precision == FLOAT32:
        return 1.0
    key = "|".join((calibrate.device_key(device), precision, model.structure()[:16],
                    "x".join(map(str, image.shape))))
    if key in _cache:
        return _cache[key]
    folder = calibrate.folder_of(directory)
    path = os.path.join(folder, FILE) if folder else None
    stored = _read(path).get(key) if path else None
    if stored is not None:
        _cache[key] = float(stored)
        return _cache[key]
    ratio = measure(precision, device, model.composed(), image)
    _cache[key] = ratio
    if path and not contended():           # a ratio measured under load serves this process
        with contextlib.suppress(OSError):
            update_json(path, lambda p: {"version": VERSION, "entries": _read(p)},
                        lambda old: {"version": VERSION, "entries": {**old["entries"], key: ratio}},
                        prefix=".precision-")
    return ratio


def _read(path: str) -> dict:
    """The sound ratios of ``path``; empty when it is missing, unreadable or of another
    version."""
    return read_entries(path, VERSION, _sound)


def _sound(ratio) -> bool:
    return isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0.01 < ratio < 100


def measure(precision: str, device: str, model: nn.Module, image: torch.Tensor,
            rounds: int = ROUNDS) -> float:
    """The median over ``rounds`` interleaved rounds of float32 seconds / ``precision``
    seconds (each the better of two runs) of ``model`` on a batch of ``image``.
    ``$KQL_PRECISION_RATIO`` (a number) is taken as the ratio instead: reproducible plans,
    whatever the CPU and its load (the test suite sets it to 1)."""
    fixed = os.environ.get("KQL_PRECISION_RATIO")
    if fixed:
        return float(fixed)
    batch = BATCH if device == "cpu" else 4 * BATCH
    model = model.to(device).eval()
    x = image.to(device).unsqueeze(0).expand(batch, *image.shape).contiguous()
    if precision == INT8:
        reduced = quantized(model, image)

        def low():
            return reduced(x)
    else:
        def low():
            with computing(precision, device):
                return model(x)

    def best(fn) -> float:
        times = []
        for _ in range(2):
            start = _now()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(_now() - start)
        return min(times)

    with torch.inference_mode():
        model(x), low()                                    # warm up: oneDNN's primitives
        ratios = [best(lambda: model(x)) / best(low) for _ in range(rounds)]
    return float(statistics.median(ratios))


def _now() -> float:
    return time.perf_counter()


def priced(cost, factor: float):
    """``cost`` (a :class:`~.cost.PlanCost`) with its arithmetic taking ``factor`` of its
    float32 time: the nodes that multiply (convolutions, linear layers) where the cost has
    nodes, else the whole (the plain loop's cost is one sum)."""
    if not cost.nodes:
        return dataclasses.replace(cost, seconds=cost.seconds * factor)
    nodes = [dataclasses.replace(n, seconds=n.seconds * factor) if n.macs > 0 else n
             for n in cost.nodes]
    saved = sum(a.seconds - b.seconds for a, b in zip(cost.nodes, nodes))
    return dataclasses.replace(cost, nodes=nodes, seconds=cost.seconds - saved)
