"""One occlusion scan of one image through KQL's engine, for the Captum and MONAI front ends.

Both libraries slide windows whose positions do not always form KQL's grid (Captum cuts
the last window at the border, MONAI pulls it back inside, a MONAI bounding box starts the
windows off the stride) and whose content is not always one colour (a baseline image, the
image's own pixels rescaled). :class:`Scanner` turns one set of windows of one size into
a logical :class:`~kql.planner.logical.OcclusionQuery`, lets the planner choose the plan
(naive or incremental, exact, batch, device) as for an ``OCCLUDE`` statement, and runs it:

* positions that are a stride grid (a start on the stride, an even step) are the query's
  own grid, with a region around them;
* other positions are run by the planned operator re-targeted at them
  (:meth:`~kql.operators.protocol.OcclusionOperator.at`, as a drill-down's stage two);
* a content that is not one colour is the query's ``fill`` (``fill(ys, xs)`` ->
  ``[B, C, h, w]``, :mod:`kql.operators.fills`), which the naive and incremental operators
  paint per position.

Every scan returns the raw outputs (``OUTPUT logits``) of the classes asked for.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from kql.api import Connection, modes_kept
from kql.catalog.models import ModelSpec
from kql.executor import plan_bound
from kql.language import ast
from kql.operators.fills import Windows
from kql.operators.task import OcclusionResult
from kql.planner.grid import OcclusionGrid
from kql.planner.logical import OcclusionQuery
from kql.planner.plan import PhysicalPlan


@dataclass(frozen=True)
class _Positioned(PhysicalPlan):
    """A physical plan run at the scanner's corners, off the query's grid."""

    corners: tuple = ()                # (ys, xs), a volume's (zs, ys, xs)

    def task(self):
        *depth, ys, xs = self.corners
        return dataclasses.replace(super().task(), ys=ys, xs=xs, zs=depth[0] if depth else None)


class Scanner:
    """Runs occlusion scans of one model through a KQL connection of its own.

    ``connection`` is an ordinary :class:`kql.api.Connection`: its settings (``strategy``,
    ``memory_limit``, ...) apply, and its plan cache keeps the model's trace and each
    image's views between scans. ``plans`` holds the physical plans of the last call.
    """

    def __init__(self, module: nn.Module, name: str):
        if not isinstance(module, nn.Module):
            module = _Forward(module)
        self.module = module
        self.connection = Connection()
        self.spec = ModelSpec(name, module)
        self.plans: list = []

    def outputs(self, images: torch.Tensor) -> torch.Tensor:
        """The model's outputs on ``images`` [N, C, H, W], in eval mode (flags kept)."""
        with modes_kept([self.module]), torch.inference_mode():
            return self.spec.composed()(images)

    def scan(self, image: torch.Tensor, size: tuple, starts: tuple, targets: tuple,
             color=None, fill: Optional[Callable] = None, progress=None) -> OcclusionResult:
        """The raw outputs of ``targets`` with a ``size`` window at every corner of the
        grid ``starts`` (one array per axis: rows and columns, a volume's slices first;
        row-major), painted ``color`` (one value per channel) or ``fill(*corners)``;
        ``result.all_logits`` is ``[targets, windows]``."""
        starts = tuple(np.asarray(s, np.int64) for s in starts)
        channels, *dims = image.shape
        axes = [_axis(s, p) for s, p in zip(starts, size)]
        regular = all(a is not None for a in axes)
        depth = dims[0] if len(dims) == 3 else None
        if regular:                            # REGION (x, y, [z,] w, h, [d]): last axis first
            region = tuple(a[1] for a in reversed(axes)) + tuple(a[2] for a in reversed(axes))
            grid = OcclusionGrid(dims[-2], dims[-1], tuple(size), tuple(a[0] for a in axes), region,
                                 depth=depth)
        else:                                  # priced as a grid of the same step; run at ours
            grid = OcclusionGrid(dims[-2], dims[-1], tuple(size), tuple(_step(s) for s in starts),
                                 depth=depth)
        device = "gpu" if image.device.type == "cuda" else "cpu"
        color = tuple(float(c) for c in color) if color is not None else (0.0,) * channels
        stmt = ast.Occlude(image=ast.ImageName("input"), model=ast.ModelName(self.spec.name))
        query = OcclusionQuery(statement=stmt, text="", image_label="input",
                               image=image.detach(), model=self.spec, target=targets[0], grid=grid,
                               color=color, color_label="fill" if fill else "baseline",
                               device=device, targets=tuple(targets), output="logits", fill=fill)
        with modes_kept([self.module]):
            run, _ = plan_bound(self.connection, query)
            if not regular:                    # no feedback: its per-position time is another grid's
                corners = tuple(a.ravel() for a in np.meshgrid(*starts, indexing="ij"))
                fields = {f.name: getattr(run, f.name) for f in dataclasses.fields(PhysicalPlan)}
                fields.update(operator=run.operator.at(*corners), learner=None)
                run = _Positioned(**fields, corners=corners)
            self.plans.append(run)
            return run.run(progress)


class ScannedFront:
    """What both drop-ins expose of their :class:`Scanner` (``self.scanner``)."""

    scanner: Scanner

    @property
    def connection(self) -> Connection:
        """The KQL connection the scans run in (its settings apply)."""
        return self.scanner.connection

    @property
    def plans(self) -> list:
        """The physical plans of the last call (``plan.explain()``: EXPLAIN)."""
        return self.scanner.plans


class _Forward(nn.Module):
    """A plain callable as a module (torch.fx traces through it where it can)."""

    def __init__(self, forward_func: Callable):
        super().__init__()
        self.forward_func = forward_func

    def forward(self, x):
        return self.forward_func(x)


def _axis(starts: np.ndarray, patch: int) -> Optional[tuple]:
    """``(stride, region start, region extent)`` of a grid axis whose positions are exactly
    ``starts`` (sorted), or None when no stride grid has them.

    >>> _axis(np.array([0, 3, 6]), 4), _axis(np.array([7]), 2), _axis(np.array([0, 3, 5]), 2)
    ((3, 0, 10), (7, 7, 2), None)
    """
    first = int(starts[0])
    step = int(starts[1] - starts[0]) if len(starts) > 1 else max(first, 1)
    if step < 1 or np.any(np.diff(starts) != step) or first % step:
        return None
    return step, first, int(starts[-1]) + patch - first


def _step(starts: np.ndarray) -> int:
    """The usual step between ``starts``: the stride the planner prices."""
    return max(1, int(np.median(np.diff(starts)))) if len(starts) > 1 else 1


def baseline_fill(baseline: torch.Tensor, size: tuple) -> Callable:
    """``fill`` whose patch at each corner is ``baseline``'s ([C, H, W]) window there."""
    return Windows(baseline, size)
