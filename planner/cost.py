"""The cost model: FLOPs of full and incremental inference per layer (seed paper 000, eqs 16-20).

``Q`` is the multiply-adds of every convolution over its full output, ``Q_inc`` over the
region a patch changes (the patch placed at the image centre, the paper's worst case);
``R = Q / Q_inc`` is the theoretical speedup of incremental inference.
"""

from __future__ import annotations

from dataclasses import dataclass

from kql.operators.graph import Local


@dataclass
class LayerCost:
    name: str
    full_macs: int          # eq 16
    incremental_macs: int   # eq 18
    full: bool              # computed at full size (after the global boundary or crossover)


def layer_costs(engine, patch: tuple, position: tuple = None) -> list[LayerCost]:
    """Per-convolution MACs of one occlusion, with the patch at ``position`` (default: centre)."""
    h, w = engine.views[engine.nodes[0]].shape[2:]
    ph, pw = patch
    y, x = position if position is not None else ((h - ph) // 2, (w - pw) // 2)
    sizes = engine.patch_geometry(y, x, ph, pw)
    costs = []
    for n in engine.nodes:
        op = engine.ops.get(n)
        if not isinstance(op, Local) or op.kind != "conv":
            continue
        _, c_out, h_out, w_out = engine.views[n].shape
        per = op.macs_per_output() * c_out
        size = sizes.get(n)
        area = h_out * w_out if size is None else size[0] * size[1]
        costs.append(LayerCost(n.name, per * h_out * w_out, per * area, size is None))
    return costs


def redundancy_ratio(engine, patch: tuple, position: tuple = None) -> float:
    """R = Q / Q_inc (eqs 17, 19, 20)."""
    costs = layer_costs(engine, patch, position)
    q = sum(c.full_macs for c in costs)
    q_inc = sum(c.incremental_macs for c in costs)
    return q / q_inc if q_inc else 1.0
