"""The cost model: FLOPs, bytes and predicted seconds of a plan, node by node.

Seed paper 000, eqs 16-20: ``Q`` is the multiply-adds of every convolution over its full
output, ``Q_inc`` over the region a patch changes (the patch at the image centre, the
paper's worst case), ``R = Q / Q_inc``. To predict time the model also counts the bytes
each incremental node gathers (its read-in contexts) and projects (at the crossover), and
prices MACs and bytes with the device's calibrated :class:`~.calibrate.Throughput`.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from kql.operators.graph import POOLS, Local, Pointwise, is_metadata
from kql.operators.steps import COVER, PATCH, PROJECT, SHAPE, Step, StepTable, steps_at

FLOAT = 4
# Calls that return a view (or a tuple of views) of their input: no bytes move.
VIEW_METHODS = {"view", "flatten", "transpose", "permute", "chunk", "split", "unsqueeze",
                "squeeze", "expand", "narrow", "unbind", "t", "size", "dim"}
VIEW_FUNCTIONS = {operator.getitem, torch.flatten, torch.transpose, torch.permute, torch.chunk,
                  torch.split, torch.unsqueeze, torch.squeeze, torch.narrow, torch.unbind}


@dataclass
class LayerCost:
    name: str
    full_macs: int          # eq 16
    incremental_macs: int   # eq 18
    full: bool              # computed at full size (after the global boundary or crossover)


@dataclass
class NodeCost:
    step: Step              # what the node does (operators.steps)
    macs: float             # per batch
    gather_bytes: float     # per batch
    seconds: float          # predicted, per batch

    @property
    def node(self) -> fx.Node:
        return self.step.node


@dataclass
class PlanCost:
    nodes: list = field(default_factory=list)
    seconds: float = 0.0    # per batch
    macs: float = 0.0       # per batch
    gather_bytes: Optional[float] = None    # per batch; None: the plan gathers nothing

    def by_name(self) -> dict:
        return {c.node.name: c for c in self.nodes}


def centre(profile, patch: tuple) -> tuple:
    return tuple((m - p) // 2 for m, p in zip(profile.map_size(profile.image_node), patch))


def layer_costs(profile, steps: StepTable) -> list[LayerCost]:
    """Per-convolution MACs of one occlusion under ``steps``."""
    costs = []
    for n in profile.nodes:
        op = profile.ops.get(n)
        if not isinstance(op, Local) or op.kind != "conv":
            continue
        c_out, cells = profile.views[n].shape[1], math.prod(profile.map_size(n))
        per = op.macs_per_output() * c_out
        size = steps.changed_size(n)
        area = cells if size is None else math.prod(size)
        costs.append(LayerCost(n.name, per * cells, per * area, size is None))
    return costs


def redundancy_ratio(profile, patch: tuple, position: tuple = None) -> float:
    """R = Q / Q_inc (eqs 17, 19, 20), the patch at ``position`` (default: the centre)."""
    at = position if position is not None else centre(profile, patch)
    costs = layer_costs(profile, steps_at(profile, tuple([c] for c in at), patch))
    q = sum(c.full_macs for c in costs)
    q_inc = sum(c.incremental_macs for c in costs)
    return q / q_inc if q_inc else 1.0


def _numel(t) -> int:
    return t.numel() if isinstance(t, torch.Tensor) else 0


def _depthwise(op: Local) -> bool:
    return op.groups > 1 and op.groups == op.in_channels


def _conv_seconds(tp, op: Local, macs_item: float, area: int, batch: int) -> float:
    return conv_call_seconds(tp, macs_item, op.macs_per_output(), area, _depthwise(op),
                             op.out_channels, batch)


def conv_call_seconds(tp, macs_item: float, depth: int, area: int, depthwise: bool,
                      c_out: int, batch: int) -> float:
    """One convolution call: the table's time at its own batch, minus the call overhead,
    scaled to ``batch``."""
    at_table = tp.conv_seconds(tp.batch * macs_item, depth, area, depthwise, c_out)
    over = tp.overhead
    return over + max(at_table - over, 0.0) * batch / tp.batch


def shape_naive_cost(summary, tp, batch: int, image_shape) -> PlanCost:
    """The naive operator's cost per batch from a forward pass's shapes
    (:class:`~kql.operators.shapes.ShapeSummary`): its convolutions as the calibration
    prices them, its linear layers, and every activation written once (into a fresh
    output, as element-wise ops do) and read once."""
    plan = PlanCost(macs=batch * summary.macs)
    plan.seconds = tp.bytes_seconds(2 * batch * 3 * image_shape[-2] * image_shape[-1] * FLOAT)
    plan.seconds += _shape_seconds(summary.convs, summary.output_bytes, tp, batch)
    plan.seconds += tp.overhead + tp.matmul_seconds(batch * summary.linear_macs)
    return plan


def _shape_seconds(convs, output_bytes, tp, batch: int) -> float:
    """The shape pass's convolutions ``convs`` as the calibration prices them, and its
    module outputs ``output_bytes`` (per image) each written into fresh memory and read."""
    return (sum(conv_call_seconds(tp, c.macs, c.depth, c.area, c.depthwise, c.out_channels, batch)
                for c in convs)
            + sum(tp.bytes_seconds(2 * batch * out) for out in output_bytes))


def shape_ratio_bound(summary, tp, batch: int) -> float:
    """No exact incremental plan runs faster than the plain loop by more than this, from a
    forward pass's shapes: whatever runs after the first global gate
    (:class:`~kql.operators.shapes.ShapeSummary`) runs in full in every plan. In seconds
    as :func:`shape_naive_cost` prices them, not MACs: the large maps of the first layers
    cost far more time than their share of the MACs (memory-bound convolutions,
    element-wise ops writing fresh memory)."""
    if summary.gate is None:
        return math.inf
    convs, outputs = summary.before_gate
    total = (_shape_seconds(summary.convs, summary.output_bytes, tp, batch)
             + tp.matmul_seconds(batch * summary.linear_macs))
    rest = total - _shape_seconds(summary.convs[:convs], summary.output_bytes[:outputs], tp, batch)
    return math.inf if rest <= 0 else total / rest


def shape_incremental_floor(summary, patch: tuple, tp, batch: int) -> Optional[float]:
    """Seconds per batch below which no exact incremental plan is expected to run, from a
    forward pass's shapes: each convolution over the region a centred patch changes
    (:meth:`~kql.operators.shapes.ShapeSummary.changed`, an estimate that leans towards
    the incremental plan), its context gathered at the calibrated rate, the engine's
    bookkeeping on every module the patch reaches, the head; a convolution whose full map
    is cheaper than that at its full price (a crossover may run it so). Left out, as the
    cheap side: element-wise work, projections, the trace and the views. None where the
    shapes cannot say: a linear layer over tokens (``[B, L, C]``), whose changed rows the
    module hooks do not follow (one over a map's pixels, ConvNeXt's, is a 1x1 convolution)."""
    if summary.pixel_linear:
        return None
    seconds = tp.overhead + tp.matmul_seconds(batch * summary.linear_macs)
    for hop, region in zip(summary.hops, summary.changed(patch)):
        if not hop.out:
            continue
        area, whole = math.prod(region), math.prod(hop.out)
        conv = hop.conv
        full = 0.0 if conv is None else conv_call_seconds(
            tp, conv.macs, conv.depth, conv.area, conv.depthwise, conv.out_channels, batch)
        if area >= whole:
            seconds += full
            continue
        changed = tp.node_overhead
        if conv is not None:
            context = hop.in_channels * math.prod((r - 1) * s + (k - 1) * d + 1 for r, s, k, d
                                                  in zip(region, hop.stride, hop.kernel, hop.dilation))
            changed += tp.gather_seconds(batch * context * FLOAT) + conv_call_seconds(
                tp, conv.macs * area / whole, conv.depth, area, conv.depthwise, conv.out_channels, batch)
        seconds += min(changed, full) if conv is not None else changed   # or past a crossover
    return seconds


def _pool_seconds(tp, op: Local, outputs: int) -> float:
    """One pooling call producing ``outputs`` values, each reducing a kernel-sized window."""
    return tp.overhead + tp.pool_seconds(outputs * op.macs_per_output(), op.kind)


def full_node_cost(profile, n: fx.Node, tp, batch: int) -> tuple:
    """(macs, seconds) of running node ``n`` on full tensors for a batch (kept with the
    profile: every candidate plan prices its full nodes alike)."""
    key = ("full", n, id(tp), batch)
    if key not in profile.memo:
        profile.memo[key] = (_full_node_cost(profile, n, tp, batch), tp)   # tp: keeps its id
    return profile.memo[key][0]


def _full_node_cost(profile, n: fx.Node, tp, batch: int) -> tuple:
    out = profile.views.get(n)
    op = profile.ops.get(n)
    if isinstance(op, Local) and op.kind == "conv":
        c_out, cells = out.shape[1], math.prod(out.shape[2:])
        macs = op.macs_per_output() * c_out * cells
        return batch * macs, _conv_seconds(tp, op, macs, cells, batch)
    if isinstance(op, Local) and op.kind in POOLS:
        return 0.0, _pool_seconds(tp, op, batch * out.numel())
    linear = _linear_shape(profile, n)
    if linear:
        rows, k, m = linear
        macs = batch * rows * k * m
        if rows == 1:                                  # a head: bound by streaming the weights
            return macs, tp.overhead + tp.matmul_seconds(macs)
        # Over every pixel it is a 1x1 convolution of depth ``k``.
        return macs, tp.overhead + tp.conv_seconds(macs, k, rows, c_out=m)
    if _is_view(n) or _aliases_input(profile, n, out):
        return 0.0, tp.overhead
    moved = sum(_numel(profile.views.get(a)) for a in n.all_input_nodes) + _numel(out)
    return 0.0, tp.overhead + tp.bytes_seconds(batch * moved * FLOAT)


def _aliases_input(profile, n: fx.Node, out) -> bool:
    """Whether ``n`` handed back its input's memory: an identity in eval mode
    (torchvision's stochastic depth, dropout) moves no bytes."""
    if not isinstance(out, torch.Tensor) or out.numel() == 0:
        return False
    return any(isinstance(v, torch.Tensor) and v.data_ptr() == out.data_ptr()
               for v in (profile.views.get(a) for a in n.all_input_nodes))


def _is_view(n: fx.Node) -> bool:
    if n.op == "call_method":
        return n.target in VIEW_METHODS
    if n.op == "call_function":
        return n.target in VIEW_FUNCTIONS or is_metadata(n)
    return False


def _linear_shape(profile, n: fx.Node) -> Optional[tuple]:
    """(rows, in, out) per batch item of a linear layer: one row for a classifier head,
    one per pixel for ConvNeXt's channel MLPs; None for other nodes."""
    out = profile.views.get(n)
    if not isinstance(out, torch.Tensor) or out.dim() < 1:
        return None
    rows = out[0].numel() // out.shape[-1] if out.dim() > 1 else 1
    if n.op == "call_module":
        mod = profile.module(n)
        if isinstance(mod, nn.Linear):
            return rows, mod.in_features, mod.out_features
    if n.op == "call_function" and n.target in (F.linear, torch.matmul, torch.addmm):
        shapes = [profile.views[a].shape for a in n.all_input_nodes if isinstance(profile.views.get(a), torch.Tensor)]
        at = 2 if n.target is torch.addmm else 1        # addmm(bias, x, weight)
        if len(shapes) > at and len(shapes[at]) == 2:
            weight = shapes[at]                          # [out, in] for linear, else [in, out]
            k = int(weight[1] if n.target is F.linear else weight[0])
            return rows, k, int(weight.numel()) // k
    return None


def naive_cost(profile, tp, batch: int) -> PlanCost:
    """Every node at full size, as the naive operator runs it (plus building the batch)."""
    plan = PlanCost()
    image = profile.views[profile.image_node]
    plan.seconds = tp.bytes_seconds(2 * batch * _numel(image) * FLOAT)
    for n in profile.nodes:
        if n.op.startswith("call"):
            macs, secs = full_node_cost(profile, n, tp, batch)
            plan.macs += macs
            plan.seconds += secs
    return plan


def incremental_cost(profile, steps: StepTable, tp, batch: int) -> PlanCost:
    """Predicted cost per batch of the incremental operator running ``steps``."""
    plan = PlanCost(gather_bytes=0.0)
    for step in steps:
        if not step.computed:
            continue
        n = step.node
        if step.mode == SHAPE:
            macs, gathered, secs = 0.0, 0.0, 0.0
        elif step.incremental:
            macs, gathered, secs = _incremental_node(profile, step, steps, tp, batch)
        else:
            projected = sum(_numel(profile.views[a]) for a in n.all_input_nodes
                            if steps.changed_size(a) is not None)
            macs, secs = full_node_cost(profile, n, tp, batch)
            gathered = batch * projected * FLOAT
            secs += tp.bytes_seconds(2 * gathered) if projected else 0.0   # copy + scatter
        # The engine's bookkeeping (index arrays, patch state) is spent on the nodes it
        # runs incrementally or projects into; a full node is one plain call.
        if step.mode in (PATCH, COVER, PROJECT):
            secs += tp.node_overhead
        plan.nodes.append(NodeCost(step, macs, gathered, secs))
        plan.macs += macs
        plan.gather_bytes += gathered
        plan.seconds += secs
    return plan


def _incremental_node(profile, step: Step, steps: StepTable, tp, batch: int) -> tuple:
    n, op = step.node, step.op
    cells = math.prod(step.size)
    c_out = profile.views[n].shape[1]
    if isinstance(op, Pointwise):
        moved = 2 * c_out * cells
        return 0.0, 0.0, tp.overhead + tp.bytes_seconds(batch * moved * FLOAT)
    if step.delta:
        return _delta_node(profile, step, steps, tp, batch)
    if isinstance(op, Local):
        c_in = profile.views[n.args[0]].shape[1]
        ctx = c_in * math.prod((o - 1) * s + (k - 1) * d + 1 for o, s, k, d in
                               zip(step.size, op.stride, op.kernel, op.dilation))
        gathered = batch * ctx * FLOAT
        secs = tp.gather_seconds(gathered)
        if op.kind == "conv":
            macs = op.macs_per_output() * c_out * cells
            return batch * macs, gathered, secs + _conv_seconds(tp, op, macs, cells, batch)
        if op.kind in POOLS:
            return 0.0, gathered, secs + _pool_seconds(tp, op, batch * c_out * cells)
        return 0.0, gathered, secs + tp.bytes_seconds(batch * (ctx + c_out * cells) * FLOAT)
    inputs = [a for a in n.all_input_nodes if isinstance(profile.views.get(a), torch.Tensor)
              and profile.views[a].dim() in (4, 5)]
    moved = sum(profile.views[a].shape[1] for a in inputs) * cells
    gathered = batch * moved * FLOAT
    combined = batch * c_out * cells * FLOAT
    return 0.0, gathered, (tp.gather_seconds(gathered) + tp.overhead
                           + tp.bytes_seconds(2 * combined))


def _delta_node(profile, step: Step, steps: StepTable, tp, batch: int) -> tuple:
    """A delta convolution: the input's view under its changed region copied and
    subtracted, the transposed convolution over that change alone, the output's view
    under the region copied and the change added."""
    n, op = step.node, step.op
    cells, changed = math.prod(step.size), math.prod(steps[n.args[0]].size)
    c_in, c_out = profile.views[n.args[0]].shape[1], profile.views[n].shape[1]
    moved = c_in * changed + c_out * cells
    gathered = batch * moved * FLOAT
    macs = op.macs_per_output() * c_out * changed
    secs = (tp.gather_seconds(gathered) + 2 * tp.overhead + tp.bytes_seconds(2 * gathered)
            + _conv_seconds(tp, op, macs, cells, batch))
    return batch * macs, gathered, secs


def delta_seconds(profile, step: Step, steps: StepTable, tp, batch: int) -> tuple:
    """(as a window convolution, as a delta convolution): predicted seconds per batch of
    ``step``, a convolution that can run either way (:func:`~kql.operators.steps.can_delta`)."""
    window = _incremental_node(profile, dataclasses.replace(step, delta=False), steps, tp, batch)
    delta = _delta_node(profile, step, steps, tp, batch)
    return window[2], delta[2]
