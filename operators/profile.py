"""A model profile: what the planner and the engine know about one model on one image.

The traced graph, every node's materialized view (its output for the unoccluded image,
seed paper 000, section 4.1), which nodes an occlusion changes and each changing node's
logical operator (:mod:`.graph`). It is built once per (model, image, device): one
trace and one forward pass. The planner prices plans from it, the step table
(:mod:`.steps`) is computed from it, and the incremental operator runs on it.

Given a memory limit, the pass is first run on fake tensors (:func:`.shapes.peak_bytes`):
views that would not fit are not kept, only their shapes (on the meta device), which is
all the planner reads; such a profile prices the incremental plan at the views' estimate,
so it is never chosen. A pass that would not fit even without its views is refused
(:class:`.shapes.OverMemoryLimit`) before it runs.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph import Local, classify, pixels_format, trace
from .shapes import check_fits, peak_bytes, unchecked
from .user_model import check_logits


class ModelProfile:
    """Traced graph, materialized views, changing nodes and their logical operators."""

    def __init__(self, model: torch.nn.Module, image: torch.Tensor, device: str = "cpu",
                 traced: Optional[fx.GraphModule] = None, memory_limit: Optional[int] = None):
        self.device = torch.device(device)
        self.gm = traced if traced is not None else trace(model, self.device)
        self.nodes = list(self.gm.graph.nodes)
        self.dynamic = frozenset(self._dynamic_nodes())
        self.memory_limit = memory_limit
        x = image.to(self.device).unsqueeze(0)
        # None, or the bytes the views would need: they were not kept, only their shapes.
        self.shapes_only = self._too_big(x, memory_limit)
        self.views = self._materialize(x)
        self.ops = {n: classify(n, self.gm, self.views.get, self._arg_reader(n))
                    for n in self.nodes if n in self.dynamic and n.op.startswith("call")}
        self.gates = frozenset(self._gates())
        self._padded: dict = {}
        self._in_dtype: dict = {}     # dtype -> this profile with its views in it
        self._modules = dict(self.gm.named_modules())
        self.memo: dict = {}          # for the planner: costs that depend only on the profile

    def _too_big(self, x: torch.Tensor, limit: Optional[int]) -> Optional[int]:
        """The estimated bytes of the views when they would not fit ``limit`` (None: they
        fit, or were not estimated); :class:`.shapes.OverMemoryLimit` when a pass that
        keeps no views would not fit either."""
        if unchecked(x, limit):
            return None
        views = peak_bytes(lambda v: self._run(v, keep=True), x, self.gm)
        if views is None or views <= limit:
            return None
        check_fits(lambda v: self._run(v, keep=False), x, limit, "one forward pass", self.gm)
        return views

    @torch.inference_mode()
    def _materialize(self, x: torch.Tensor) -> dict:
        views: dict = {}
        out = self._run(x, keep=not self.shapes_only, views=views)
        self.base_logits = check_logits(out)[0].float()
        return views

    def _run(self, x: torch.Tensor, keep: bool, views: Optional[dict] = None):
        """The graph's output on ``x``; each node's value kept until the end (``keep``) or
        freed after its last use, and recorded in ``views`` when given (not kept: for a
        node the image reaches, a tensor of its shape on the meta device)."""
        dynamic = self.dynamic

        class Recorder(fx.Interpreter):
            def run_node(self, n):
                value = super().run_node(n)
                if views is not None:
                    shape_only = not keep and n in dynamic and isinstance(value, torch.Tensor)
                    views[n] = torch.empty_like(value, device="meta") if shape_only else value
                return value

        return Recorder(self.gm, garbage_collect_values=not keep).run(x)

    def _dynamic_nodes(self) -> set:
        dynamic: set = set()
        for n in self.nodes:
            if n.op == "placeholder" or any(a in dynamic for a in n.all_input_nodes):
                dynamic.add(n)
        return dynamic

    def _gates(self) -> list:
        """Global nodes that pool a feature map to 1x1 whose value rescales a feature map
        again (squeeze-excitation): not the classifier head, which only reaches the output."""
        def spatial(n):
            v = self.views.get(n)
            return isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[2] * v.shape[3] > 1

        feeds_map: dict = {}
        for n in reversed(self.nodes):
            feeds_map[n] = any(spatial(u) or feeds_map.get(u, False) for u in n.users)
        gates = []
        for n in self.nodes:
            v = self.views.get(n)
            if (n in self.dynamic and n.op.startswith("call") and self.ops.get(n) is None
                    and isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[2] == v.shape[3] == 1
                    and any(spatial(a) for a in n.all_input_nodes) and feeds_map[n]):
                gates.append(n)
        return gates

    def _arg_reader(self, node: fx.Node):
        def arg(i, name, default):
            v = node.args[i] if i < len(node.args) else node.kwargs.get(name, default)
            return self.views[v] if isinstance(v, fx.Node) else v
        return arg

    def for_image(self, image: torch.Tensor) -> "ModelProfile":
        """The profile of the same traced model on another image (of the same size): its
        own views, no second trace. The graph's nodes are shared, so a step table made
        from this profile serves the other one too."""
        return ModelProfile(self.gm, image, str(self.device), traced=self.gm,
                            memory_limit=self.memory_limit)

    # -- what the planner reads ------------------------------------------------------------

    @property
    def image_node(self) -> fx.Node:
        return self.nodes[0]

    def map_size(self, n: fx.Node) -> tuple:
        """(h, w) of a node's feature map; a volume's (d, h, w)."""
        return tuple(self.views[n].shape[2:])

    def module(self, n: fx.Node) -> Optional[torch.nn.Module]:
        return self._modules.get(n.target) if n.op == "call_module" else None

    def view_bytes(self) -> int:
        """The views' bytes; of views not kept (:attr:`shapes_only`), what building them
        was estimated to need."""
        kept = sum(v.numel() * v.element_size() for v in self.views.values()
                   if isinstance(v, torch.Tensor))
        return max(kept, self.shapes_only or 0)

    # -- what the engine reads -------------------------------------------------------------

    def in_dtype(self, dtype: torch.dtype) -> "ModelProfile":
        """The same profile with its floating-point views in ``dtype`` (kept with this
        one): a scan in reduced precision (:mod:`.precision`) gathers its windows at half
        the bytes and casts nothing per call. The unoccluded logits stay float32."""
        if dtype == torch.float32:
            return self
        if dtype not in self._in_dtype:
            other = copy.copy(self)
            other.views = {n: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                           else v for n, v in self.views.items()}
            other._padded, other._in_dtype = {}, {}
            self._in_dtype[dtype] = other
        return self._in_dtype[dtype]

    def pixel_view(self, node: fx.Node) -> torch.Tensor:
        """The view of ``node`` channels-last (cached): a delta convolution copies its
        windows as pixels of C values (:func:`~.gather.windows`)."""
        key = (node, "channels_last")
        if key not in self._padded:
            view = self.views[node]
            self._padded[key] = view.contiguous(memory_format=pixels_format(view))
        return self._padded[key]

    def padded_view(self, node: fx.Node, op: Local) -> torch.Tensor:
        """The view of ``node`` padded as ``op`` reads it (cached: the windows of every
        batch are cut from it)."""
        key = (node, op.pad, op.fill)
        if key not in self._padded:
            # F.pad takes the last axis first; op.pad is (before, after) per axis in order.
            pads = tuple(v for a in reversed(range(len(op.pad) // 2)) for v in op.pad[2 * a:2 * a + 2])
            self._padded[key] = F.pad(self.views[node], pads, value=op.fill)
        return self._padded[key]
