"""Exact incremental inference over materialized layer views (seed paper 000, section 4.1).

The unoccluded image runs once and every node's output is kept (the materialized views,
:class:`~.profile.ModelProfile`). For a batch of patch positions, each node then does
what its :class:`~.steps.Step` says: recompute only the changed region (a :class:`Patch`:
the changed values, one size, a corner per item; window ops gather their read-in
contexts for the whole batch at once), run in full (projecting patches into full copies
of the views first), or read its view. The step table is the plan; this module only
executes it, with torch.fx's :class:`~torch.fx.Interpreter` (its value table frees each
value after its last use, as eager PyTorch would).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
import torch.fx as fx

from . import gather as g
from .batches import scan
from .graph import POOLS, Join, Local, Pointwise
from .layout import ADAPTIVE, CHANNELS_LAST, CONTIGUOUS, Kept, LayoutTrial, in_layout, known_layout
from .profile import ModelProfile
from .protocol import Approximation, Operator
from .steps import COVER, FROZEN, FULL, INPUT, OUTPUT, PATCH, PROJECT, SHAPE, VIEW, StepTable, steps_at
from .task import OcclusionResult, OcclusionTask, Progress
from .user_model import check_logits


@dataclass
class Patch:
    """Changed region of one node's output: ``data`` [B, C, h, w] (a volume's [B, C, d, h,
    w]) whose first index on each spatial axis is ``at`` (numpy arrays, or int64 tensors on
    the device where ``kql.cuda``'s kernels run)."""

    data: torch.Tensor
    at: tuple


class IncrementalOcclusion(Operator):
    """Physical operator: exact heat maps by incremental inference, batch by batch.

    Immutable once built: a model profile, the step table for the task's positions, a
    batch size.
    """

    name = "IncrementalOcclusion"
    learns_layout = True

    def __init__(self, profile: ModelProfile, steps: StepTable, batch_size: int = 16,
                 layout: str = CONTIGUOUS, kept: Optional[Kept] = None):
        self.profile = profile
        self.steps = steps
        self.batch_size = max(1, int(batch_size))
        self.layout = layout              # see in_layout
        self.kept = kept                  # where an adaptive layout's trial is kept

    def exact(self) -> "IncrementalOcclusion":
        """The same operator without approximations (threshold, frozen gates)."""
        if self.steps.tau >= 1.0 and self.steps.gates == "exact":
            return self
        first = self.steps[self.profile.image_node]
        return self._with(first.at, 1.0, "exact")

    def at(self, *corners) -> "IncrementalOcclusion":
        """The same policy (crossover, threshold, gates, batch) for patches at other corners."""
        return self._with(corners, self.steps.tau, self.steps.gates)

    def _with(self, corners: tuple, tau: float, gates: str) -> "IncrementalOcclusion":
        t = self.steps
        steps = steps_at(self.profile, corners, t.patch, t.crossover, tau, gates, t.deltas)
        return IncrementalOcclusion(self.profile, steps, self.batch_size, self.layout, self.kept)

    def rebind(self, profile) -> "IncrementalOcclusion":
        """The same plan (step table, batch, layout) on another image's profile of the same
        traced model (:meth:`ModelProfile.for_image`)."""
        return IncrementalOcclusion(profile, self.steps, self.batch_size, self.layout, self.kept)

    def in_layout(self, layout: str) -> "IncrementalOcclusion":
        """``layout``: of the pooling windows and of the full tensors past the crossover.
        'auto': pooling windows channels-last (oneDNN pools them 5-6x faster), full
        tensors in the faster layout on the scan's first two batches (:class:`LayoutTrial`:
        GoogLeNet's inception blocks run channels-last 1.7x faster, ResNet18's layer4 1.6x
        slower)."""
        layout = ADAPTIVE if layout == "auto" else layout
        return IncrementalOcclusion(self.profile, self.steps, self.batch_size, layout)

    def remembering(self, kept: Kept) -> "IncrementalOcclusion":
        """The same operator, its layout trial kept in (and read from) ``kept``."""
        return IncrementalOcclusion(self.profile, self.steps, self.batch_size, self.layout, kept)

    @property
    def _full_part(self) -> bool:
        return self.steps.count(PROJECT, FULL) > 0

    def describe(self) -> dict:
        """This operator's own EXPLAIN items."""
        items = {"crossover": self.steps.crossover.label}
        if self.steps.tau < 1.0:
            items["tau"] = f"{self.steps.tau:.2f}"
        if self.steps.gates == "frozen":
            items["frozen_gates"] = self.steps.count(FROZEN)
        deltas = sum(1 for s in self.steps if s.delta)
        if deltas:
            items["delta_convs"] = deltas
        if self.layout != CONTIGUOUS:               # adaptive only where a full part is run
            items["layout"] = (CHANNELS_LAST if self.layout == ADAPTIVE and not self._full_part
                               else known_layout(self.layout, self.kept))
        return items

    def approximation(self) -> Optional[Approximation]:
        if self.steps.tau < 1.0:
            return Approximation("tau", f"tau={self.steps.tau:.2f}")
        if self.steps.gates == "frozen":
            return Approximation("frozen_gates", "frozen gates")
        return None

    @torch.inference_mode()
    def run(self, task: OcclusionTask, progress: Progress = None,
            timings: Optional[dict] = None) -> OcclusionResult:
        """The task's heat map; with ``timings``, each node's seconds are added to
        ``timings[node.name]``. The task's positions must be the step table's."""
        device = self.profile.device
        patch = (task.fill if task.fill is not None else      # each patch its own content
                 task.color.to(device, torch.float32).view(-1, *(1,) * len(task.patch))
                 .expand(-1, *task.patch))
        corners = device_corners(self.steps, device) if g.kernels(device) else None
        profile = self.profile
        if torch.is_autocast_enabled(device.type):           # a reduced-precision scan
            profile = profile.in_dtype(torch.get_autocast_dtype(device.type))
        batch = _Batch(profile, self.steps, patch, timings, self.layout, corners)
        if self.layout != ADAPTIVE or not self._full_part:
            return scan(task, self.profile.base_logits, self.batch_size, batch.run, progress)
        trial = LayoutTrial(-(-task.count // self.batch_size), self.kept)

        def run_in(items, layout):
            batch.full_layout = layout
            return batch.run(items)
        return scan(task, self.profile.base_logits, self.batch_size, trial.batches(device, run_in),
                    progress)


def device_corners(steps: StepTable, device) -> dict:
    """Every changed region's corners (``{node: (ys, xs)}``) as int64 tensors on
    ``device``, copied once for the whole scan: the kernels of ``kql.cuda`` read them
    there, and no index array is built on the host or copied per layer or batch."""
    located = [s for s in steps if s.at is not None]
    flat = iter(g.device_corners([a for s in located for a in s.at], device))
    return {s.node: tuple(next(flat) for _ in s.at) for s in located}


class _Batch(fx.Interpreter):
    """Runs the step table on one batch of positions (a slice of the query's); with
    ``corners`` (:func:`device_corners`), the corners are sliced from the device's copy."""

    def __init__(self, profile: ModelProfile, steps: StepTable, patch: torch.Tensor, timings,
                 layout: str = CONTIGUOUS, corners: Optional[dict] = None):
        super().__init__(profile.gm)
        self.corners = corners
        self.pool_layout = CONTIGUOUS if layout == CONTIGUOUS else CHANNELS_LAST
        # of the full tensors past the crossover; the operator's trial sets it per batch
        self.full_layout = CONTIGUOUS if layout == ADAPTIVE else layout
        self.extra_traceback = False     # errors keep their own message
        self.profile, self.table, self.patch, self.timings = profile, steps, patch, timings
        self.views = profile.views
        self.items = slice(0, 0)
        self.b = 0
        self._do = {INPUT: self._input, VIEW: self._view, FROZEN: self._view, SHAPE: self._shape,
                    PATCH: self._patch,
                    COVER: self._cover, PROJECT: self._full, FULL: self._full, OUTPUT: self._output}

    def run(self, items: slice) -> torch.Tensor:
        self.items, self.b = items, items.stop - items.start
        return super().run()

    def run_node(self, n: fx.Node):
        step = self.table[n]
        if self.timings is None or not step.computed:
            return self._do[step.mode](n, step)
        start = time.perf_counter()
        out = self._do[step.mode](n, step)
        if self.profile.device.type == "cuda":
            torch.cuda.synchronize(self.profile.device)
        self.timings[n.name] = self.timings.get(n.name, 0.0) + time.perf_counter() - start
        return out

    def _corners(self, step) -> tuple:
        at = self.corners[step.node] if self.corners is not None else step.at
        return tuple(c[self.items] for c in at)

    # -- the steps -----------------------------------------------------------------------------

    def _input(self, n, step):
        at = self._corners(step)
        if callable(self.patch):             # OcclusionTask.fill: the content at each corner
            return Patch(self.patch(*at).to(self.profile.device, torch.float32), at)
        data = self.patch.unsqueeze(0).expand(self.b, *self.patch.shape)
        return Patch(data, at)

    def _view(self, n, step):
        return self.views[n]

    def _output(self, n, step):
        return check_logits(self._full_args(n)[0][0])

    def _shape(self, n, step):
        """The shape of a patched tensor is its view's shape with the batch's size."""
        shape = torch.Size((self.b,) + tuple(self.views[n.args[0]].shape[1:]))
        if n.op == "call_function":
            return shape if n.args[1] == "shape" else len(shape)
        if n.target == "dim":
            return len(shape)
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        return shape if dim is None else shape[dim]

    def _cover(self, n, step):
        # the patch covers the whole map: it is the full tensor
        return in_layout(self._patch(n, step).data, self.full_layout)

    def _patch(self, n, step) -> Patch:
        at = self._corners(step)
        if isinstance(step.op, Pointwise):
            data = self._pointwise(n, step.op)
        elif step.delta:
            data = self._delta(n, step, at)
        elif isinstance(step.op, Local):
            data = self._local(n, step, at)
        else:
            data = self._join(n, step, at)
        return Patch(data, at)

    def _full(self, n, step):
        args, kwargs = self._full_args(n)
        if n.op == "call_module":
            return self.profile.module(n)(*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        return self.views[n]

    # -- helpers -------------------------------------------------------------------------------

    def _full_args(self, n: fx.Node):
        def full(a):
            v = self.env[a]
            if not isinstance(v, Patch):
                return v
            full = g.project(self.views[a], v.data, v.at, self.full_layout == CHANNELS_LAST)
            return in_layout(full, self.full_layout)
        return fx.node.map_arg(n.args, full), fx.node.map_arg(n.kwargs, full)

    def _pointwise(self, n: fx.Node, op: Pointwise) -> torch.Tensor:
        env = self.env
        args = fx.node.map_arg(n.args, lambda a: env[a].data if isinstance(env[a], Patch) else env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
        return op.call(*args, **kwargs)

    def _local(self, n: fx.Node, step, out_at: tuple) -> torch.Tensor:
        op: Local = step.op
        src = n.args[0]
        p = self.env[src]
        size = tuple((o - 1) * s + (k - 1) * d + 1
                     for o, s, k, d in zip(step.size, op.stride, op.kernel, op.dilation))
        padded = self.profile.padded_view(src, op)
        # Eqs 25-28: the read-in window starts at o*S - P, i.e. at o*S in padded coordinates.
        ctx = g.gather(padded, p.data, p.at, out_at, size, offset=op.pad[0::2], scale=op.stride)
        if op.kind in POOLS:
            ctx = in_layout(ctx, self.pool_layout)    # oneDNN pools channels-last 5-6x faster
        out = op.apply(ctx)
        if op.divisor is not None:
            out = out / g.windows(op.divisor.to(out.device), out_at, step.size)
        elif op.kind == "avgpool":
            out = out / float(math.prod(op.kernel))
        return out

    def _delta(self, n: fx.Node, step, out_at: tuple) -> torch.Tensor:
        """A delta convolution: the view over the region plus the change the input's
        changed values make (:class:`~.graph.DeltaConv`)."""
        op: Local = step.op
        src = n.args[0]
        p = self.env[src]
        views = self.views if self.corners is not None else None    # the kernels' path
        view = views[src] if views else self.profile.pixel_view(src)
        dx = p.data - g.windows(view, p.at, tuple(p.data.shape[2:]))
        change = op.delta(dx)
        # The change's first output index per axis, relative to the region's.
        shift = tuple(c + (pad - (k - 1) * d) - o for c, pad, k, d, o in
                      zip(p.at, op.pad[0::2], op.kernel, op.dilation, out_at))
        view = views[n] if views else self.profile.pixel_view(n)
        return g.add_at(g.windows(view, out_at, step.size), change, shift)

    def _join(self, n: fx.Node, step, out_at: tuple) -> torch.Tensor:
        op: Join = step.op
        operands = list(n.args[0]) if n.target is torch.cat else list(n.args) + list(n.kwargs.values())
        values = []
        for i, a in enumerate(operands):
            if i not in op.spatial:
                values.append(self.env[a] if isinstance(a, fx.Node) else a)
                continue
            v = self.env[a]
            if isinstance(v, Patch):
                values.append(g.gather(self.views[a], v.data, v.at, out_at, step.size))
            else:
                values.append(g.windows(self.views[a], out_at, step.size))
        if n.target is torch.cat:
            return op.call(*values)
        args = values[:len(n.args)]
        kwargs = dict(zip(n.kwargs.keys(), values[len(n.args):]))
        return op.call(*args, **kwargs)
