"""A model profile: what the planner and the engine know about one model on one image.

The traced graph, every node's materialized view (its output for the unoccluded image,
seed paper 000, section 4.1), which nodes an occlusion changes and each changing node's
logical operator (:mod:`.graph`). It is built once per (model, image, device): one
trace and one forward pass. The planner prices plans from it, the step table
(:mod:`.steps`) is computed from it, and the incremental operator runs on it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph import Local, classify, trace
from .task import check_logits


class ModelProfile:
    """Traced graph, materialized views, changing nodes and their logical operators."""

    def __init__(self, model: torch.nn.Module, image: torch.Tensor, device: str = "cpu",
                 traced: Optional[fx.GraphModule] = None):
        self.device = torch.device(device)
        self.gm = traced if traced is not None else trace(model, self.device)
        self.nodes = list(self.gm.graph.nodes)
        self.views = self._materialize(image.to(self.device).unsqueeze(0))
        self.dynamic = frozenset(self._dynamic_nodes())
        self.ops = {n: classify(n, self.gm, self.views.get, self._arg_reader(n))
                    for n in self.nodes if n in self.dynamic and n.op.startswith("call")}
        self.gates = frozenset(self._gates())
        self._padded: dict = {}
        self._modules = dict(self.gm.named_modules())
        self.memo: dict = {}          # for the planner: costs that depend only on the profile

    @torch.inference_mode()
    def _materialize(self, x: torch.Tensor) -> dict:
        views: dict = {}

        class Recorder(fx.Interpreter):
            def run_node(self, n):
                views[n] = super().run_node(n)
                return views[n]

        out = Recorder(self.gm, garbage_collect_values=False).run(x)
        self.base_logits = check_logits(out)[0].float()
        return views

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
        return ModelProfile(self.gm, image, str(self.device), traced=self.gm)

    # -- what the planner reads ------------------------------------------------------------

    @property
    def image_node(self) -> fx.Node:
        return self.nodes[0]

    def map_size(self, n: fx.Node) -> tuple:
        """(h, w) of a node's feature map."""
        return tuple(self.views[n].shape[2:])

    def module(self, n: fx.Node) -> Optional[torch.nn.Module]:
        return self._modules.get(n.target) if n.op == "call_module" else None

    def view_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.views.values()
                   if isinstance(v, torch.Tensor))

    # -- what the engine reads -------------------------------------------------------------

    def padded_view(self, node: fx.Node, op: Local) -> torch.Tensor:
        """The view of ``node`` padded as ``op`` reads it (cached: the windows of every
        batch are cut from it)."""
        key = (node, op.pad, op.fill)
        if key not in self._padded:
            top, bottom, left, right = op.pad
            self._padded[key] = F.pad(self.views[node], (left, right, top, bottom), value=op.fill)
        return self._padded[key]
