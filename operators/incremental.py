"""Exact incremental inference over materialized layer views (seed paper 000, section 4.1).

The unoccluded image runs once and every node's output is kept (the materialized views).
For a batch of patch positions, each node then recomputes only the region its input
changes: a :class:`Patch` (the changed values, uniform size, per-item corner). Window ops
gather their read-in contexts for the whole batch at once; at a global node the patches
are projected into full copies of the view and the rest of the network runs as usual.
A :class:`Crossover` moves that projection earlier.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from . import gather as g
from .graph import Join, Local, Pointwise, classify, is_metadata, trace
from .task import OcclusionResult, OcclusionTask, Progress, check_logits, scan


@dataclass
class Patch:
    """Changed region of one node's output: ``data`` [B, C, h, w] at rows ``y``, cols ``x``."""

    data: torch.Tensor
    y: np.ndarray
    x: np.ndarray

    @property
    def size(self) -> tuple:
        return tuple(self.data.shape[2:])


@dataclass(frozen=True)
class Crossover:
    """Where the engine turns patches into full tensors before the global boundary.

    ``nodes`` run in full on inputs projected into full copies of their views (a crossover
    at a fraction of the map). With ``covered``, a patch that has grown to its whole
    feature map is handed on as the full tensor it is: the nodes after it run as plain
    calls instead of gathering full-sized contexts (the crossover at fraction 1).
    :data:`PURE` does neither: patches, clamped to the map (eqs 23-24), run up to the
    global boundary, as in the seed prototype.
    """

    nodes: frozenset = frozenset()
    covered: bool = True


PURE = Crossover(covered=False)


def _ceil_div(a, b):
    return -(-a // b)


def local_geometry(y: np.ndarray, p: int, k: int, s: int, d: int, pad: int, out: int):
    """Output patch corner and size for an input patch (eqs 21-24 and 29-34, with dilation).

    Returns ``(oy, po)``: the output rows ``oy .. oy+po-1`` hold every output that reads
    an input row in ``y .. y+p-1``; ``po`` is the same for every item (the upper bound),
    and ``oy`` is shifted back inside the output where the bound would overhang it.
    """
    po = min((p - 1 + (k - 1) * d) // s + 1, out)
    lo = _ceil_div(y + pad - (k - 1) * d, s)
    return np.clip(lo, 0, out - po), po


def union_geometry(corners: list, sizes: list, out: int):
    """Bounding box of several patches, per item, with one size for the batch (eqs 35-38)."""
    lo = np.min(np.stack(corners), axis=0)
    hi = np.max(np.stack([c + s for c, s in zip(corners, sizes)]), axis=0)
    size = min(int((hi - lo).max()), out)
    return np.minimum(lo, out - size), size


class IncrementalModel:
    """A traced model with its materialized views for one image; runs batches of patches."""

    def __init__(self, model: torch.nn.Module, image: torch.Tensor, device: str = "cpu",
                 crossover: Optional[Crossover] = None):
        self.device = torch.device(device)
        self.gm = trace(model, self.device)
        self.nodes = list(self.gm.graph.nodes)
        self.crossover = crossover or Crossover()
        self.views = self._materialize(image.to(self.device).unsqueeze(0))
        self.dynamic = self._dynamic_nodes()
        self.ops = {n: classify(n, self.gm, self.views.get, self._arg_reader(n))
                    for n in self.nodes if n in self.dynamic and n.op.startswith("call")}
        self._padded: dict = {}
        # Free each batch value after its last reader, as eager PyTorch would.
        last_use: dict = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last_use[a] = i
        self._dead_after = [[] for _ in self.nodes]
        for n, i in last_use.items():
            self._dead_after[i].append(n)

    # -- set-up ------------------------------------------------------------------------------

    @torch.inference_mode()
    def _materialize(self, x: torch.Tensor) -> dict:
        views: dict = {}

        class Recorder(fx.Interpreter):
            def run_node(self, n):
                views[n] = super().run_node(n)
                return views[n]

        out = Recorder(self.gm).run(x)
        self.base_logits = check_logits(out)[0].float()
        return views

    def _dynamic_nodes(self) -> set:
        dynamic: set = set()
        for n in self.nodes:
            if n.op == "placeholder" or any(a in dynamic for a in n.all_input_nodes):
                dynamic.add(n)
        return dynamic

    def _arg_reader(self, node: fx.Node):
        def arg(i, name, default):
            v = node.args[i] if i < len(node.args) else node.kwargs.get(name, default)
            return self.views[v] if isinstance(v, fx.Node) else v
        return arg

    def _padded_view(self, node: fx.Node, op: Local) -> torch.Tensor:
        key = (node, op.pad, op.fill)
        if key not in self._padded:
            top, bottom, left, right = op.pad
            self._padded[key] = F.pad(self.views[node], (left, right, top, bottom), value=op.fill)
        return self._padded[key]

    def view_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.views.values()
                   if isinstance(v, torch.Tensor))

    # -- one batch ---------------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, ys: np.ndarray, xs: np.ndarray, patch: torch.Tensor,
            profile: Optional[dict] = None) -> torch.Tensor:
        """Logits ``[B, classes]`` with ``patch`` ([3, h, w], model input space) at each corner.

        With ``profile``, each node's seconds are added to ``profile[node.name]``.
        """
        b = len(ys)
        env: dict = {}
        for i, n in enumerate(self.nodes):
            if n.op == "placeholder":
                data = patch.to(self.device).unsqueeze(0).expand(b, *patch.shape)
                env[n] = Patch(data, np.asarray(ys, np.int64), np.asarray(xs, np.int64))
            elif n.op == "output":
                return check_logits(self._full_args(n, env, b)[0][0])
            elif n not in self.dynamic:
                env[n] = self.views[n]
            elif profile is None:
                env[n] = self._step(n, env, b)
            else:
                start = time.perf_counter()
                env[n] = self._step(n, env, b)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                profile[n.name] = profile.get(n.name, 0.0) + time.perf_counter() - start
            for dead in self._dead_after[i]:
                env.pop(dead, None)
        raise RuntimeError("the traced graph has no output")

    def incremental_op(self, n: fx.Node, patch_inputs: bool, crossover: Crossover):
        """The logical op to apply incrementally at ``n``, or None to compute it in full."""
        op = self.ops.get(n)
        return op if op is not None and patch_inputs and n not in crossover.nodes else None

    def patch_geometry(self, y: int, x: int, ph: int, pw: int,
                       crossover: Optional[Crossover] = None) -> dict:
        """Shape-only dry run for one patch: node -> changed (h, w), or None when full.

        Mirrors :meth:`run`'s decisions (with ``crossover`` in place of the engine's own
        policy when given); the cost model prices a plan with it.
        """
        crossover = crossover or self.crossover
        sizes: dict = {}
        corners: dict = {}
        for n in self.nodes:
            if n.op == "placeholder":
                sizes[n], corners[n] = (ph, pw), (np.array([y]), np.array([x]))
                continue
            if n not in self.dynamic or n.op == "output":
                continue
            inputs = [a for a in n.all_input_nodes if a in self.dynamic]
            op = self.incremental_op(n, all(sizes.get(a) is not None for a in inputs), crossover)
            full = tuple(self.views[n].shape[2:]) if op is not None else None
            if isinstance(op, Pointwise):
                sizes[n], corners[n] = sizes[n.args[0]], corners[n.args[0]]
            elif isinstance(op, Local):
                geo = self._local_geometry(n, op, corners[n.args[0]], sizes[n.args[0]])
                sizes[n], corners[n] = (geo[1], geo[3]), (geo[0], geo[2])
            elif isinstance(op, Join):
                src = [a for a in inputs if sizes.get(a) is not None]
                (uy, uh), (ux, uw) = self._union([corners[a] for a in src], [sizes[a] for a in src], full)
                sizes[n], corners[n] = (uh, uw), (uy, ux)
            else:
                sizes[n] = None
            if crossover.covered and sizes[n] is not None and sizes[n] == full:
                sizes[n] = None
        return sizes

    def _local_geometry(self, n: fx.Node, op: Local, corner: tuple, size: tuple):
        _, _, h_out, w_out = self.views[n].shape
        top, _, left, _ = op.pad
        oy, po = local_geometry(corner[0], size[0], op.kernel[0], op.stride[0], op.dilation[0], top, h_out)
        ox, pwo = local_geometry(corner[1], size[1], op.kernel[1], op.stride[1], op.dilation[1], left, w_out)
        return oy, po, ox, pwo

    @staticmethod
    def _union(corners, sizes, full):
        uy = union_geometry([c[0] for c in corners], [s[0] for s in sizes], full[0])
        ux = union_geometry([c[1] for c in corners], [s[1] for s in sizes], full[1])
        return uy, ux

    def _step(self, n: fx.Node, env: dict, b: int):
        if is_metadata(n) and isinstance(env.get(n.args[0]), Patch):
            return self._metadata(n, b)
        states = [env[a] for a in n.all_input_nodes if a in self.dynamic]
        op = self.incremental_op(n, all(isinstance(s, Patch) for s in states), self.crossover)
        if op is not None:
            if isinstance(op, Pointwise):
                out = self._pointwise(n, op, env)
            elif isinstance(op, Local):
                out = self._local(n, op, env[n.args[0]])
            else:
                out = self._join(n, op, env)
            if self.crossover.covered and out.size == tuple(self.views[n].shape[2:]):
                return out.data          # the patch covers the whole map: it is the full tensor
            return out
        args, kwargs = self._full_args(n, env, b)
        return self._call(n, args, kwargs)

    def _metadata(self, n: fx.Node, b: int):
        """The shape of a patched tensor is its view's shape with the batch's size."""
        shape = torch.Size((b,) + tuple(self.views[n.args[0]].shape[1:]))
        if n.op == "call_function":
            return shape if n.args[1] == "shape" else len(shape)
        if n.target == "dim":
            return len(shape)
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        return shape if dim is None else shape[dim]

    def _call(self, n: fx.Node, args, kwargs):
        if n.op == "call_module":
            return self.gm.get_submodule(n.target)(*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        return self.views[n]

    def _full_args(self, n: fx.Node, env: dict, b: int):
        def full(a):
            v = env[a]
            return g.project(self.views[a], v.data, v.y, v.x) if isinstance(v, Patch) else v
        return fx.node.map_arg(n.args, full), fx.node.map_arg(n.kwargs, full)

    def _pointwise(self, n: fx.Node, op: Pointwise, env: dict) -> Patch:
        first = env[n.args[0]]
        args = fx.node.map_arg(n.args, lambda a: env[a].data if isinstance(env[a], Patch) else env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
        return Patch(op.call(*args, **kwargs), first.y, first.x)

    def _local(self, n: fx.Node, op: Local, p: Patch) -> Patch:
        src = n.args[0]
        (kh, kw), (sh, sw), (dh, dw) = op.kernel, op.stride, op.dilation
        top, _, left, _ = op.pad
        oy, po, ox, pwo = self._local_geometry(n, op, (p.y, p.x), p.size)
        size = ((po - 1) * sh + (kh - 1) * dh + 1, (pwo - 1) * sw + (kw - 1) * dw + 1)
        padded = self._padded_view(src, op)
        # Eqs 25-28: the read-in window starts at o*S - P, i.e. at o*S in padded coordinates.
        ctx = g.gather(padded, p.data, p.y + top, p.x + left, oy * sh, ox * sw, size)
        out = op.apply(ctx)
        if op.divisor is not None:
            div = g.windows(op.divisor.to(out.device), oy, ox, (po, pwo))
            out = out / div
        elif op.kind == "avgpool":
            out = out / float(kh * kw)
        return Patch(out, oy, ox)

    def _join(self, n: fx.Node, op: Join, env: dict) -> Patch:
        operands = list(n.args[0]) if n.target is torch.cat else list(n.args) + list(n.kwargs.values())
        _, _, h, w = self.views[n].shape
        patches = [env[operands[i]] for i in op.spatial if isinstance(env.get(operands[i]), Patch)]
        (uy, uh), (ux, uw) = self._union([(p.y, p.x) for p in patches],
                                         [p.size for p in patches], (h, w))
        values = []
        for i, a in enumerate(operands):
            if i not in op.spatial:
                values.append(env[a] if isinstance(a, fx.Node) else a)
                continue
            v = env[a]
            if isinstance(v, Patch):
                values.append(g.gather(self.views[a], v.data, v.y, v.x, uy, ux, (uh, uw)))
            else:
                values.append(g.windows(self.views[a], uy, ux, (uh, uw)))
        if n.target is torch.cat:
            return Patch(op.call(*values), uy, ux)
        args = values[:len(n.args)]
        kwargs = dict(zip(n.kwargs.keys(), values[len(n.args):]))
        return Patch(op.call(*args, **kwargs), uy, ux)


class IncrementalOcclusion:
    """Physical operator: exact heat maps by incremental inference, batch by batch."""

    name = "IncrementalOcclusion"

    def __init__(self, batch_size: int = 16, crossover: Optional[Crossover] = None,
                 engine: Optional[IncrementalModel] = None):
        self.batch_size = max(1, int(batch_size))
        self.crossover = crossover
        self.engine = engine

    def prepare(self, task: OcclusionTask) -> IncrementalModel:
        if self.engine is None:
            self.engine = IncrementalModel(task.model, task.image, task.device, self.crossover)
        return self.engine

    @torch.inference_mode()
    def run(self, task: OcclusionTask, progress: Progress = None,
            profile: Optional[dict] = None) -> OcclusionResult:
        engine = self.prepare(task)
        ph, pw = task.patch
        patch = task.color.to(engine.device, torch.float32).view(3, 1, 1).expand(3, ph, pw)
        return scan(task, engine.base_logits, self.batch_size,
                    lambda ys, xs: engine.run(ys, xs, patch, profile), progress)
