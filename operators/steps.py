"""The step table: what the incremental engine does at every node, decided once per plan.

For the patch positions of a query, :func:`plan_steps` walks the traced graph once and
gives each node one :class:`Step`: run on the changed region only (and where), run in
full, project patches into full tensors first, or read the materialized view. The engine
executes the table, the cost and memory models price it, EXPLAIN prints it; none of them
re-derives it. A :class:`Crossover` is the policy that moves the switch to full tensors.

The changed region of a node is a patch of one size for the whole query (the largest
over its positions, so every position fits) at a per-position corner (seed paper 000,
eqs 21-38, generalised to dilation and asymmetric pads). Each position's own region,
clipped at the map's border, is kept too (:attr:`Step.span`): a patch near the border
changes less, which :mod:`kql.planner.position_groups` turns into tables of their own.

A stride-1 convolution among :attr:`StepTable.deltas` computes the change of its output
instead of its new values (:attr:`Step.delta`, :class:`~.graph.DeltaConv`): from the
input's changed region alone, no read-in halo; the planner picks those nodes where it
pays (:func:`delta_gain` is its work ratio).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch.fx as fx

from .graph import Join, Local, Pointwise, is_metadata

# Step modes.
INPUT = "input"        # the occluded image: the patch itself
VIEW = "view"          # not changed by the occlusion: its materialized view
PATCH = "patch"        # computed on the changed region; hands on a patch
COVER = "cover"        # computed on the changed region, which is the whole map: hands on a full tensor
PROJECT = "project"    # run in full on inputs whose patches are projected into copies of their views
FULL = "full"          # run in full on full inputs
SHAPE = "shape"        # reads only the shape of its input (x.size(), x.shape)
FROZEN = "frozen"      # a global gate kept at its unoccluded value (approximate): its view
OUTPUT = "output"

_LOCAL_NAMES = {"conv": "IncrementalConv", "maxpool": "IncrementalPool",
                "avgpool": "IncrementalPool", "pad": "IncrementalPad"}


@dataclass(frozen=True)
class Crossover:
    """Where the engine turns patches into full tensors before the global boundary.

    ``nodes`` run in full on inputs projected into full copies of their views (a crossover
    at a fraction of the map). With ``covered``, a patch that has grown to its whole
    feature map is handed on as the full tensor it is: the nodes after it run as plain
    calls instead of gathering full-sized contexts (the crossover at fraction 1).
    :data:`PURE` does neither: patches, clamped to the map (eqs 23-24), run up to the
    global boundary, as in the seed prototype. ``fraction`` only names the policy.
    """

    nodes: frozenset = frozenset()
    covered: bool = True
    fraction: Optional[float] = field(default=1.0, compare=False)

    @property
    def label(self) -> str:
        return "none" if self.fraction is None else f"{self.fraction:.2f}"


PURE = Crossover(covered=False, fraction=None)


@dataclass(frozen=True, eq=False)
class Step:
    """One node's step. ``size`` and the per-position corners ``at`` (one array per spatial
    axis: rows and columns, with slices first for a volume) describe the changed region
    for :data:`INPUT`, :data:`PATCH` and :data:`COVER` steps."""

    node: fx.Node
    mode: str
    op: object = None                   # the logical op (Local, Pointwise, Join) run on the region
    size: Optional[tuple] = None
    at: Optional[tuple] = None          # the region's first index per axis, per position
    span: Optional[tuple] = None        # ((first, extent), ...) per axis: each position's own region
    delta: bool = False                 # a delta convolution: view + the change (DeltaConv)

    @property
    def y(self) -> Optional[np.ndarray]:
        """The corners' rows (the last axis but one)."""
        return None if self.at is None else self.at[-2]

    @property
    def x(self) -> Optional[np.ndarray]:
        """The corners' columns (the last axis)."""
        return None if self.at is None else self.at[-1]

    @property
    def hands_on_patch(self) -> bool:
        """Its output is a patch (not a full tensor) for the nodes that read it."""
        return self.mode in (INPUT, PATCH)

    @property
    def incremental(self) -> bool:
        return self.mode in (PATCH, COVER)

    @property
    def computed(self) -> bool:
        """Work done per batch (not a view, the input or the output)."""
        return self.mode in (PATCH, COVER, PROJECT, FULL, SHAPE)

    @property
    def explain_name(self) -> Optional[str]:
        """The EXPLAIN line this step belongs to; None: no work worth a line."""
        if self.incremental:
            if self.delta:
                return "DeltaConv"
            if isinstance(self.op, Local):
                return _LOCAL_NAMES[self.op.kind]
            return "IncrementalJoin" if isinstance(self.op, Join) else "IncrementalPointwise"
        return {PROJECT: "Project", FULL: "Full"}.get(self.mode)

    @property
    def explain_merge(self) -> Optional[str]:
        """How EXPLAIN groups it: 'fold' (a point-wise step, shown with the step that feeds
        it), 'run' (full steps in a row share one line) or None (a line of its own)."""
        if self.incremental and isinstance(self.op, Pointwise):
            return "fold"
        return "run" if self.mode == FULL else None


@dataclass(frozen=True, eq=False)
class StepTable:
    """Every node's :class:`Step` in graph order, for a query's patch positions."""

    steps: dict
    crossover: Crossover
    patch: tuple
    tau: float = 1.0                    # projective-field threshold; 1: exact
    gates: str = "exact"                # 'frozen': global gates keep their unoccluded values
    deltas: frozenset = frozenset()     # convolutions run as delta convolutions where they can

    def __getitem__(self, node: fx.Node) -> Step:
        return self.steps[node]

    def __iter__(self):
        return iter(self.steps.values())

    def changed_size(self, node: fx.Node) -> Optional[tuple]:
        """(h, w) (a volume's: (d, h, w)) of the patch a node hands on; None when it hands
        on a full tensor."""
        step = self.steps.get(node)
        return step.size if step is not None and step.hands_on_patch else None

    def count(self, *modes: str) -> int:
        return sum(1 for s in self if s.mode in modes)


def plan_steps(profile, ys, xs, patch: tuple, crossover: Crossover = Crossover(),
               tau: float = 1.0, gates: str = "exact", deltas: frozenset = frozenset()) -> StepTable:
    """The step of every node of ``profile`` for patches ``patch`` at corners ``ys, xs``
    (:func:`steps_at` with ``(ys, xs)``).

    ``tau`` < 1 thresholds the projective field (seed paper 000, section 4.2): no node's
    changed region grows past ``round(tau x its map)`` per dimension; a larger one is cut
    to its centre, and the nodes that read it see the unoccluded values outside it (an
    approximation). ``tau`` = 1 is exact.

    ``gates`` 'frozen' keeps every global gate (:attr:`ModelProfile.gates`: the global
    pooling of a squeeze-excitation block, whose 1x1 output rescales a feature map again)
    at its unoccluded value, so the changed region stays a patch through the block instead
    of making every later layer full (an approximation; 'exact' computes them).

    ``deltas``: the convolutions (nodes) to run as delta convolutions where their step
    allows it (:func:`can_delta`); the others compute their region's new values.

    >>> import torch
    >>> from torch import nn
    >>> from kql.operators.profile import ModelProfile
    >>> net = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
    ...                     nn.Flatten(), nn.Linear(2, 2))
    >>> table = plan_steps(ModelProfile(net, torch.rand(3, 8, 8)), [0, 4], [2, 4], (2, 2))
    >>> [(s.node.name, s.mode, s.size) for s in table]     # doctest: +NORMALIZE_WHITESPACE
    [('input_1', 'input', (2, 2)), ('_0', 'patch', (4, 4)), ('_1', 'patch', (4, 4)),
     ('_2', 'project', None), ('_3', 'full', None), ('_4', 'full', None), ('output', 'output', None)]
    >>> list(table)[1].y.tolist()                 # clamped to the map (eq 23)
    [0, 3]
    """
    return steps_at(profile, (ys, xs), patch, crossover, tau, gates, deltas)


def steps_at(profile, corners: tuple, patch: tuple, crossover: Crossover = Crossover(),
             tau: float = 1.0, gates: str = "exact", deltas: frozenset = frozenset()) -> StepTable:
    """:func:`plan_steps` for patches at ``corners``, one array per spatial axis of the
    image (an image's ``(ys, xs)``, a volume's ``(zs, ys, xs)``): every rule is applied
    per axis, so a volume's table is the same algorithm in three dimensions.

    >>> import torch
    >>> from torch import nn
    >>> from kql.operators.profile import ModelProfile
    >>> net = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.MaxPool3d(2), nn.Flatten(),
    ...                     nn.Linear(2 * 4 * 4 * 4, 2))
    >>> table = steps_at(ModelProfile(net, torch.rand(1, 8, 8, 8)), ([0, 6], [2, 2], [4, 0]), (2, 2, 2))
    >>> [(s.mode, s.size) for s in list(table)[1:3]], list(table)[2].at[0].tolist()
    ([('patch', (3, 4, 4)), ('patch', (2, 3, 3))], [0, 2])
    """
    corners = tuple(np.asarray(c, np.int64) for c in corners)
    steps: dict = {}
    frozen = profile.gates if gates == "frozen" else frozenset()
    for n in profile.nodes:
        step = _step(profile, n, steps, corners, patch, crossover, tau, frozen)
        if n in deltas and can_delta(step, steps):
            step = dataclasses.replace(step, delta=True)
        steps[n] = step
    return StepTable(steps, crossover, tuple(patch), tau, gates, frozenset(deltas))


def can_delta(step: Step, steps: dict) -> bool:
    """Whether ``step`` can run as a delta convolution: a stride-1 convolution computed on
    its changed region from an input handed on as a patch."""
    if not step.incremental or not isinstance(step.op, Local) or step.op.delta is None:
        return False
    return steps[step.node.args[0]].hands_on_patch


def delta_gain(step: Step, steps: dict) -> float:
    """How many times fewer multiply-adds a delta convolution does than the window
    convolution of ``step``: its region's outputs over the changed inputs
    (:func:`can_delta` steps; the same weights and depth per output either way).

    >>> import torch
    >>> from torch import nn
    >>> from kql.operators.profile import ModelProfile
    >>> net = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Flatten(), nn.Linear(128, 2))
    >>> profile = ModelProfile(net, torch.rand(3, 8, 8))
    >>> table = plan_steps(profile, [2], [2], (2, 2))
    >>> round(delta_gain(table[profile.nodes[1]], table.steps), 2)       # 4x4 outputs, 2x2 inputs
    4.0
    """
    return math.prod(step.size) / math.prod(steps[step.node.args[0]].size)


def _step(profile, n: fx.Node, steps: dict, corners: tuple, patch, crossover: Crossover,
          tau: float, frozen: frozenset) -> Step:
    if n.op == "placeholder":
        return Step(n, INPUT, size=tuple(patch), at=corners,
                    span=tuple((c, np.full_like(c, p)) for c, p in zip(corners, patch)))
    if n.op == "output":
        return Step(n, OUTPUT)
    inputs = [steps[a] for a in n.all_input_nodes if steps[a].mode not in (VIEW, FROZEN)]
    if not inputs:                     # nothing it reads changes (or only frozen gates)
        return Step(n, VIEW)
    if n in frozen:
        return Step(n, FROZEN)
    patched = [s for s in inputs if s.hands_on_patch]
    if is_metadata(n) and steps[n.args[0]].hands_on_patch:
        return Step(n, SHAPE)
    op = profile.ops.get(n)
    if op is None or len(patched) < len(inputs) or n in crossover.nodes:
        return Step(n, PROJECT if patched else FULL)
    span = _span(profile, n, op, patched)
    at, size = _region(profile, n, op, patched, span)
    if tau < 1.0 and not isinstance(op, Pointwise):
        at, size = threshold(at, size, profile.map_size(n), tau)
        span = None                      # thresholded: one size for every position
    covers = size == profile.map_size(n)
    return Step(n, COVER if crossover.covered and covers else PATCH, op, size, at, span)


def _region(profile, n: fx.Node, op, patched: list, span: Optional[tuple]) -> tuple:
    """Corners (per axis) and size of the region ``n`` changes: a point-wise op runs on its
    input's region; otherwise the largest of the positions' own regions (``span``), each
    moved inside the map, or, without them, the bound from the inputs' regions."""
    out = profile.map_size(n)
    if isinstance(op, Pointwise):
        src = patched[0]
        return src.at, src.size
    if span is not None:
        size = tuple(max(1, min(int(extent.max()), o)) for (_, extent), o in zip(span, out))
        return tuple(np.clip(first, 0, o - p) for (first, _), o, p in zip(span, out, size)), size
    if isinstance(op, Local):
        src = patched[0]
        axes = [local_geometry(src.at[a], src.size[a], op.kernel[a], op.stride[a], op.dilation[a],
                               op.pad[2 * a], out[a]) for a in range(len(out))]
    else:
        axes = [union_geometry([s.at[a] for s in patched], [s.size[a] for s in patched], out[a])
                for a in range(len(out))]
    return tuple(first for first, _ in axes), tuple(size for _, size in axes)


def _span(profile, n: fx.Node, op, patched: list) -> Optional[tuple]:
    """Each position's own changed region at ``n`` (clipped at the border), from its
    inputs' own regions; None where an input has none (a thresholded one)."""
    if any(s.span is None for s in patched):
        return None
    out = profile.map_size(n)
    if isinstance(op, Pointwise):
        return patched[0].span
    if isinstance(op, Local):
        return tuple(clipped_span(first, extent, op.kernel[a], op.stride[a], op.dilation[a],
                                  op.pad[2 * a], out[a])
                     for a, (first, extent) in enumerate(patched[0].span))
    spans = []
    for axis in range(len(out)):
        lo = np.min(np.stack([s.span[axis][0] for s in patched]), axis=0)
        hi = np.max(np.stack([s.span[axis][0] + s.span[axis][1] for s in patched]), axis=0)
        spans.append((lo, hi - lo))
    return tuple(spans)


def clipped_span(y: np.ndarray, p: np.ndarray, k: int, s: int, d: int, pad: int, out: int):
    """``(first, count)`` per item: the output rows that read an input row in ``y ..
    y+p-1`` (each item its own ``p``), clipped to the output (eqs 21-24 without the
    shift: a region at the border is cut, not moved).

    >>> clipped_span(np.array([0, 5, 9]), np.array([2, 2, 1]), 3, 1, 1, 1, 10)
    (array([0, 4, 8]), array([3, 4, 2]))
    """
    lo = np.maximum(_ceil_div(y + pad - (k - 1) * d, s), 0)
    hi = np.minimum((y + p - 1 + pad) // s, out - 1)
    return lo, np.maximum(hi - lo + 1, 0)


def threshold(at: tuple, size: tuple, out: tuple, tau: float) -> tuple:
    """Cap a changed region (corners ``at`` per axis) at ``round(tau x out)`` per
    dimension, keeping its centre (eqs 40-41 and 43, on the output side: the read-in
    window follows from the capped output, eq 42). Returns ``(at, size)``.

    >>> (y, x), size = threshold((np.array([0, 6]), np.array([2, 2])), (8, 3), (16, 16), 0.25)
    >>> y.tolist(), x.tolist(), size
    ([2, 8], [2, 2], (4, 3))
    """
    capped = tuple(min(h, max(1, round(tau * o))) for h, o in zip(size, out))
    return (tuple(np.clip(c + (h - k) // 2, 0, o - k) for c, h, k, o in zip(at, size, capped, out)),
            capped)


def _ceil_div(a, b):
    return -(-a // b)


def local_geometry(y: np.ndarray, p: int, k: int, s: int, d: int, pad: int, out: int):
    """Output patch corner and size for an input patch (eqs 21-24 and 29-34, with dilation).

    Returns ``(oy, po)``: the output rows ``oy .. oy+po-1`` hold every output that reads
    an input row in ``y .. y+p-1``; ``po`` is the same for every item (the upper bound),
    and ``oy`` is shifted back inside the output where the bound would overhang it.

    >>> local_geometry(np.array([0, 5, 9]), 2, 3, 1, 1, 1, 10)     # 3x3 conv, pad 1
    (array([0, 4, 6]), 4)
    """
    po = min((p - 1 + (k - 1) * d) // s + 1, out)
    lo = _ceil_div(y + pad - (k - 1) * d, s)
    return np.clip(lo, 0, out - po), po


def union_geometry(corners: list, sizes: list, out: int):
    """Bounding box of several patches, per item, with one size for all items (eqs 35-38)."""
    lo = np.min(np.stack(corners), axis=0)
    hi = np.max(np.stack([c + s for c, s in zip(corners, sizes)]), axis=0)
    size = min(int((hi - lo).max()), out)
    return np.minimum(lo, out - size), size
