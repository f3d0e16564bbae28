"""The physical planner: decides *how* a logical occlusion query is computed.

It lowers an :class:`~kql.planner.logical.OcclusionQuery` to a physical operator
(naive or incremental), a device and a batch size, and renders EXPLAIN text: one
operator per line, ``Name: key=value, ...``, in a fixed order, with no object ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from kql.errors import KqlModelError
from kql.operators.graph import TraceError
from kql.operators.incremental import IncrementalModel, IncrementalOcclusion
from kql.operators.naive import NaiveOcclusion
from kql.operators.task import OcclusionResult, OcclusionTask, Progress

from .logical import OcclusionQuery

DEFAULT_BATCH = {"cpu": 16, "gpu": 64}


@dataclass
class PlanContext:
    """What the planner may consult: session settings and the machine."""

    settings: dict = field(default_factory=dict)

    def cuda_available(self) -> bool:
        return torch.cuda.is_available()

    @property
    def strategy(self) -> str:
        return str(self.settings.get("strategy", "auto"))


@dataclass
class PhysicalPlan:
    query: OcclusionQuery
    operator: object
    batch: int
    reason: str = ""
    timings: dict = field(default_factory=dict)

    @property
    def device(self) -> str:
        return "cuda" if self.query.device == "gpu" else "cpu"

    def task(self) -> OcclusionTask:
        q = self.query
        ys, xs = q.grid.positions()
        return OcclusionTask(model=q.model.composed(), image=q.image,
                             color=torch.tensor(q.color, dtype=torch.float32),
                             patch=q.grid.patch, ys=ys, xs=xs, target=q.target, device=self.device)

    def run(self, progress: Progress = None) -> OcclusionResult:
        return self.operator.run(self.task(), progress)

    def explain(self) -> list[str]:
        q = self.query
        rows, cols = q.grid.shape
        target = "predicted" if q.target is None else str(q.target)
        lines = [_line("HeatMap", target=target, shape=f"{rows}x{cols}", positions=q.grid.count,
                       into=q.into or "none")]
        op = _line(self.operator.name, model=q.model.name, device=q.device, batch=self.batch,
                   **self.operator.describe_plan() if hasattr(self.operator, "describe_plan") else {})
        if self.reason:
            op += f", reason={self.reason}"
        lines.append("  " + op)
        h, w = q.image.shape[1:]
        lines.append("    " + _line("Image", source=q.image_label, size=f"{h}x{w}",
                                     patch="{}x{}".format(*q.grid.patch),
                                     stride="{}x{}".format(*q.grid.stride),
                                     region=("({}, {}, {}, {})".format(*q.grid.region)
                                             if q.grid.region else "none"),
                                     color=q.color_label))
        return lines


def _line(name: str, **items) -> str:
    return f"{name}: " + ", ".join(f"{k}={v}" for k, v in items.items())


def plan_query(query: OcclusionQuery, ctx: PlanContext) -> PhysicalPlan:
    """Choose the operator, device and batch size for an optimized logical plan."""
    batch = query.batch or DEFAULT_BATCH[query.device]
    if ctx.strategy == "naive":
        return PhysicalPlan(query, NaiveOcclusion(batch), batch, reason="strategy=naive")
    device = "cuda" if query.device == "gpu" else "cpu"
    try:
        engine = IncrementalModel(query.model.composed(), query.image, device)
    except TraceError as exc:
        return PhysicalPlan(query, NaiveOcclusion(batch), batch, reason=_quote(str(exc)))
    except (RuntimeError, ValueError, TypeError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise KqlModelError(f"model '{query.model.name}' failed on the "
                            f"{tuple(query.image.shape[1:])} image: {detail}") from None
    return PhysicalPlan(query, IncrementalOcclusion(batch, engine=engine), batch)


def _quote(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


def check_setting(name: str, value) -> Optional[str]:
    """Why a SET is invalid, or None."""
    if name == "strategy":
        if value not in ("auto", "naive", "incremental"):
            return f"strategy must be 'auto', 'naive' or 'incremental', got {value!r}"
        return None
    return f"unknown setting '{name}'; settings: strategy"
