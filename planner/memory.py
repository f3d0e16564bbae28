"""Memory estimates and the batch size they allow.

The naive operator holds a batch of full activations; the incremental one holds the
materialized views (and their padded copies) for the whole query, plus per batch the
read-in contexts and changed patches, and full activations past the crossover.
The default budget is a quarter of the memory free on the device; BATCH overrides it.
"""

from __future__ import annotations

import torch

from kql.operators.steps import PATCH

FLOAT = 4
BUDGET_FRACTION = 0.25
MAX_BATCH = {"cpu": 32, "cuda": 256}


def budget(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return int(free * BUDGET_FRACTION)
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
        return int(info.get("MemAvailable", info.get("MemFree", 4 << 30)) * BUDGET_FRACTION)
    except (OSError, ValueError, IndexError):
        return 1 << 30


def _bytes(t) -> int:
    return t.numel() * FLOAT if isinstance(t, torch.Tensor) else 0


def _per_item_full(profile, nodes) -> int:
    """A forward pass keeps a node's inputs and output alive at once (x3 for slack)."""
    peak = 0
    for n in nodes:
        live = _bytes(profile.views.get(n)) + sum(_bytes(profile.views.get(a)) for a in n.all_input_nodes)
        peak = max(peak, live)
    return 3 * peak


def naive_bytes(profile, batch: int) -> int:
    return batch * _per_item_full(profile, profile.nodes)


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
            per_item = max(per_item, 3 * c * (step.size[0] + 4) * (step.size[1] + 4) * FLOAT)
    return fixed + batch * per_item


def _fit(per_item: int, fixed: int, limit: int, device: str) -> int:
    room = max(limit - fixed, per_item)
    return int(max(1, min(MAX_BATCH[device], room // max(per_item, 1))))


def naive_batch(profile, limit: int, device: str) -> int:
    return _fit(naive_bytes(profile, 1), 0, limit, device)


def incremental_batch(profile, steps, limit: int, device: str) -> int:
    fixed = incremental_bytes(profile, steps, 0)
    per_item = incremental_bytes(profile, steps, 1) - fixed
    return _fit(per_item, fixed, limit, device)
