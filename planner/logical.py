"""The logical plan: *what* heat map a query asks for, with names bound and defaults set.

:class:`OcclusionQuery` is made by the binder (:mod:`kql.binder`), which resolves an
``OCCLUDE`` statement against the catalog: the image (resized to the model's input), the
model, the target, the patch grid and the colour (or the patch's content per position). It
says nothing about *how* the map is computed; that is the physical planner's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import torch

from kql.errors import KqlError, KqlPlanError

from .frame import Frame
from .grid import OcclusionGrid


@dataclass(frozen=True)
class OcclusionQuery:
    """Logical plan of ``OCCLUDE``: every field resolved, every default filled in."""

    statement: object                   # the kql.language.ast.Occlude it was bound from (positions)
    text: str
    image_label: str
    image: torch.Tensor                 # [3, H, W] after the model's resize, pixel space
    model: object                       # kql.catalog.models.ModelSpec
    target: Optional[int]               # None: the arg-max class of the unoccluded image
    grid: OcclusionGrid
    color: Tuple[float, float, float]
    color_label: str
    device: str = "auto"                # 'cpu' | 'gpu' | 'auto' as written
    batch: Optional[int] = None
    into: Optional[str] = None
    ssim: Optional[float] = None
    drilldown: Optional[float] = None
    speedup: Optional[float] = None
    notes: Tuple[str, ...] = field(default=())
    targets: Tuple[Optional[int], ...] = ()   # every class to map (target is the first)
    top: Optional[int] = None           # TARGET TOP k: the k likeliest classes
    output: Optional[str] = None        # OUTPUT as written; None: detected from the model
    frame: Optional[Frame] = None       # how the original image became ``image``
    original: Optional[torch.Tensor] = None   # [C, H, W] before the resize, the user's pixels
    image_info: dict = field(default_factory=dict)   # the file's header: format, pixel spacing, ...
    # What a patch holds where it is not one colour (COLOR gaussian, mean_patch; a Captum
    # baseline image): fill(ys, xs) -> [B, C, ph, pw] (kql.operators.fills); None: ``color``.
    fill: Optional[Callable] = None
    # Settled by the physical planner from the unoccluded output (physical.scored):
    resolved: Tuple[int, ...] = ()      # the class of every map, in order
    output_note: str = ""               # why the output scoring was detected ('' : as asked)

    def replace(self, **changes) -> "OcclusionQuery":
        import dataclasses

        return dataclasses.replace(self, **changes)


def fail(stmt, clause: str, message: str, cls=KqlPlanError) -> KqlError:
    pos = stmt.pos_of(clause)
    return cls(message, line=pos.line or None, column=pos.column or None)


def at_node(error: KqlError, node) -> KqlError:
    pos = getattr(node, "pos", None)
    return error.at(pos.line, pos.column) if pos is not None and pos.line else error
