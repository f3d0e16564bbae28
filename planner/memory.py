"""Memory estimates, the memory limit, and the batch size that fits it.

The naive operator holds a batch of occluded images (batch x 3 x H x W floats and their
patch masks) and their full activations; the incremental one holds the materialized
views (and their padded copies) for the whole query, plus per batch the read-in contexts
and changed patches, and full activations past the crossover.

The limit is ``SET memory_limit`` (default 'auto': a quarter of the memory available on
the device when planning). A batch the planner picks never passes it; a BATCH the user
asks for is lowered to what fits, with a note EXPLAIN shows; a plan that does not fit
even at batch 1 is refused (:class:`MemoryLimitError`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from kql.errors import KqlPlanError
from kql.operators.steps import PATCH

from .settings import byte_count

FLOAT = 4
BUDGET_FRACTION = 0.25
MAX_BATCH = {"cpu": 32, "cuda": 256}


class MemoryLimitError(KqlPlanError):
    """A plan that does not fit the memory limit even at batch 1; ``needed``: its bytes."""

    def __init__(self, message: str, needed: int):
        super().__init__(message)
        self.needed = needed


def budget(device: str) -> int:
    """The default limit: a quarter of the memory free on the device."""
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free * BUDGET_FRACTION)
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        return int(info.get("MemAvailable", info.get("MemFree", 4 << 30)) * BUDGET_FRACTION)
    except (OSError, ValueError, IndexError):
        return 1 << 30


def allowed(setting, device: str) -> int:
    """The bytes a plan may use: ``SET memory_limit`` (a value of :mod:`.settings`), or
    :func:`budget` for 'auto'.

    >>> allowed("2 gb", "cpu")
    2147483648
    """
    count = byte_count(setting)
    return budget(device) if count is None else count


def size_text(count: int) -> str:
    """Bytes for a person (binary units, as ``SET memory_limit`` reads them).

    >>> size_text(6_227_020_800), size_text(3 << 20), size_text(206_200)
    ('5.8 GB', '3.0 MB', '201.4 KB')
    """
    if count >= 2**30:
        return f"{count / 2**30:.1f} GB"
    if count >= 2**20:
        return f"{count / 2**20:.1f} MB"
    return f"{count / 2**10:.1f} KB"


# -- estimates -------------------------------------------------------------------------------

def _bytes(t) -> int:
    return t.numel() * FLOAT if isinstance(t, torch.Tensor) else 0


def _per_item_full(profile, nodes) -> int:
    """A forward pass keeps a node's inputs and output alive at once (x3 for slack)."""
    peak = 0
    for n in nodes:
        live = _bytes(profile.views.get(n)) + sum(_bytes(profile.views.get(a)) for a in n.all_input_nodes)
        peak = max(peak, live)
    return 3 * peak


def occluded_bytes(image_shape) -> int:
    """One occluded copy of a ``[3, H, W]`` image and its patch mask (one byte a pixel),
    alive through the whole forward pass of the naive operator.

    >>> occluded_bytes((3, 224, 224))
    652288
    """
    cells = math.prod(image_shape[1:])
    return 3 * cells * FLOAT + cells


def naive_bytes(profile, batch: int) -> int:
    image = profile.views[profile.image_node]
    return batch * (_per_item_full(profile, profile.nodes) + occluded_bytes(image.shape[1:]))


def incremental_bytes(profile, steps, batch: int) -> int:
    """Views for the query plus, per item, the larger of a forward pass over the nodes run
    in full and the contexts of the nodes run on patches (a plan's
    :class:`~kql.operators.steps.StepTable`)."""
    fixed = 2 * profile.view_bytes()          # views and (at most) their padded copies
    full_nodes = [n for n in profile.nodes if n in profile.dynamic and steps.changed_size(n) is None]
    per_item = _per_item_full(profile, full_nodes)
    for step in steps:
        if step.mode == PATCH:
            c = profile.views[step.node].shape[1]
            per_item = max(per_item, 3 * c * math.prod(s + 4 for s in step.size) * FLOAT)
    return fixed + batch * per_item


# -- the batch that fits ---------------------------------------------------------------------

@dataclass(frozen=True)
class Fit:
    """A batch size within the memory limit; ``note`` says why a BATCH asked for was lowered."""

    batch: int
    note: str = ""


def fit(fixed: int, per_item: int, cap: int, device: str, asked: Optional[int] = None,
        positions: Optional[int] = None, what: str = "the plan") -> Fit:
    """The batch for ``fixed + batch * per_item`` bytes within ``cap``: ``asked`` (BATCH)
    if it fits, else the most that fits (with a note); without ``asked``, the most that
    fits up to :data:`MAX_BATCH`. Never more than ``positions``. Raises
    :class:`MemoryLimitError` (naming ``what``) when batch 1 does not fit.

    >>> fit(0, 10 << 20, 1 << 30, "cpu", asked=1000).note
    'BATCH 1000 lowered to fit memory_limit 1.0 GB'
    >>> fit(0, 10 << 20, 1 << 30, "cpu", asked=1000).batch, fit(0, 10 << 20, 1 << 30, "cpu").batch
    (102, 32)
    >>> fit(2 << 30, 10 << 20, 1 << 30, "cpu", what="the incremental plan (views 2.0 GB)")
    Traceback (most recent call last):
    ...
    kql.planner.memory.MemoryLimitError: the incremental plan (views 2.0 GB) needs 2.0 GB
    at BATCH 1 but memory_limit is 1.0 GB; SET memory_limit = '3 GB' to allow it, or occlude
    a smaller image
    """
    per_item = max(per_item, 1)
    room = (cap - fixed) // per_item
    if room < 1:
        needed = fixed + per_item
        raise MemoryLimitError(
            f"{what} needs {size_text(needed)} at BATCH 1 but memory_limit is {size_text(cap)}; "
            f"SET memory_limit = '{math.ceil(needed / 2**30)} GB' to allow it, or occlude a "
            f"smaller image", needed)
    want = asked if asked is not None else MAX_BATCH[device]
    if positions is not None:
        want = min(want, max(1, positions))
    if want <= room:
        return Fit(int(want))
    note = f"BATCH {asked} lowered to fit memory_limit {size_text(cap)}" if asked is not None else ""
    return Fit(int(room), note)


def naive_fit(profile, cap: int, device: str, asked=None, positions=None) -> Fit:
    return fit(0, naive_bytes(profile, 1), cap, device, asked, positions, "the naive plan")


def incremental_fit(profile, steps, cap: int, device: str, asked=None, positions=None) -> Fit:
    fixed = incremental_bytes(profile, steps, 0)
    what = f"the incremental plan (materialized views {size_text(fixed)})"
    return fit(fixed, incremental_bytes(profile, steps, 1) - fixed, cap, device, asked,
               positions, what)


def naive_batch(profile, limit: int, device: str) -> int:
    """The naive batch within ``limit`` (1 when not even that fits: see :func:`naive_fit`)."""
    try:
        return naive_fit(profile, limit, device).batch
    except MemoryLimitError:
        return 1


def incremental_batch(profile, steps, limit: int, device: str) -> int:
    """The incremental batch within ``limit`` (1 when not even that fits)."""
    try:
        return incremental_fit(profile, steps, limit, device).batch
    except MemoryLimitError:
        return 1
