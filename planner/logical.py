"""The logical plan: *what* heat map a query asks for, with names bound and defaults set.

The binder resolves an ``ast.Occlude`` against the catalog: the image (resized to the
model's input), the model, the target, the patch grid and the colour. It says nothing
about *how* the map is computed; that is the physical planner's job.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from kql import ast, images
from kql.errors import KqlError, KqlPlanError

from .grid import OcclusionGrid

DEFAULT_PATCH = 16
DEFAULT_STRIDE = 4
NAMED_COLORS = {"black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5), "white": (1.0, 1.0, 1.0)}


@dataclass(frozen=True)
class OcclusionQuery:
    """Logical plan of ``OCCLUDE``: every field resolved, every default filled in."""

    statement: ast.Occlude
    text: str
    image_label: str
    image: torch.Tensor                 # [3, H, W] after the model's resize, pixel space
    model: object                       # kql.models.ModelSpec
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

    def replace(self, **changes) -> "OcclusionQuery":
        import dataclasses

        return dataclasses.replace(self, **changes)


def fail(stmt: ast.Occlude, clause: str, message: str, cls=KqlPlanError) -> KqlError:
    pos = stmt.pos_of(clause)
    return cls(message, line=pos.line or None, column=pos.column or None)


def at_node(error: KqlError, node) -> KqlError:
    pos = getattr(node, "pos", None)
    return error.at(pos.line, pos.column) if pos is not None and pos.line else error


def bind(stmt: ast.Occlude, text: str, catalog, max_pixels: int = images.MAX_PIXELS) -> OcclusionQuery:
    """Resolve names and fill defaults; raises KqlError pointing at the clause at fault."""
    try:
        spec = catalog.resolve_model(stmt.model.name)
    except KqlError as exc:
        raise at_node(exc, stmt.model)
    raw, label = _image(stmt.image, catalog, max_pixels)
    image = images.resize(raw, images.target_size(raw.shape[1], raw.shape[2], spec.input_size))
    patch = stmt.patch or (DEFAULT_PATCH, DEFAULT_PATCH)
    stride = stmt.stride or (DEFAULT_STRIDE, DEFAULT_STRIDE)
    region = (stmt.region.x, stmt.region.y, stmt.region.w, stmt.region.h) if stmt.region else None
    grid = OcclusionGrid(int(image.shape[1]), int(image.shape[2]), patch, stride, region)
    problem = grid.problem()
    if problem:
        clause = ("stride" if "stride" in problem else
                  "region" if "region" in problem and stmt.region else "patch")
        raise fail(stmt, clause, problem)
    color, color_label = _color(stmt, image)
    if stmt.batch is not None and stmt.batch < 1:
        raise fail(stmt, "batch", f"BATCH must be at least 1, got {stmt.batch}")
    return OcclusionQuery(
        statement=stmt, text=text, image_label=label, image=image, model=spec,
        target=_target(stmt, spec), grid=grid, color=color, color_label=color_label,
        device=stmt.device or "auto", batch=stmt.batch, into=stmt.into, ssim=stmt.ssim,
        drilldown=stmt.drilldown, speedup=stmt.speedup)


def _image(ref, catalog, max_pixels: int) -> tuple[torch.Tensor, str]:
    try:
        if isinstance(ref, ast.SampleImage):
            return images.load_sample(ref.name), f"sample('{ref.name}')"
        if isinstance(ref, ast.ImageFile):
            return images.load_file(ref.path, max_pixels=max_pixels), f"'{ref.path}'"
        return catalog.resolve_image(ref.name, max_pixels), ref.name
    except KqlError as exc:
        raise at_node(exc, ref)


def _color(stmt: ast.Occlude, image: torch.Tensor) -> tuple[tuple, str]:
    c = stmt.color
    if c is None:
        return NAMED_COLORS["gray"], "gray"
    if isinstance(c, ast.ColorNamed):
        if c.name == "mean":
            m = image.mean(dim=(1, 2))
            return tuple(float(v) for v in m), "mean"
        return NAMED_COLORS[c.name], c.name
    rgb = (float(c.r), float(c.g), float(c.b))
    if not all(0.0 <= v <= 1.0 for v in rgb):
        raise fail(stmt, "color", f"colour components must lie in [0, 1] (pixel space), got "
                                  f"({c.r:g}, {c.g:g}, {c.b:g}); e.g. COLOR (0.5, 0.5, 0.5)")
    return rgb, "({:g}, {:g}, {:g})".format(*rgb)


def _target(stmt: ast.Occlude, spec) -> Optional[int]:
    t = stmt.target
    if t is None or isinstance(t, ast.TargetPredicted):
        return None
    labels = spec.labels
    if isinstance(t, ast.TargetIndex):
        if labels is not None and not 0 <= t.index < len(labels):
            raise fail(stmt, "target", f"target class {t.index} is out of range: model "
                                       f"'{spec.name}' has {len(labels)} classes (0..{len(labels) - 1})")
        return t.index
    if labels is None:
        raise fail(stmt, "target", f"model '{spec.name}' has no labels; name the class by "
                                   f"index (TARGET 3) or register labels")
    lowered = [lbl.lower() for lbl in labels]
    if t.label.lower() in lowered:
        return lowered.index(t.label.lower())
    hint = difflib.get_close_matches(t.label.lower(), lowered, n=1)
    extra = f"; did you mean '{labels[lowered.index(hint[0])]}'?" if hint else ""
    raise fail(stmt, "target", f"unknown label '{t.label}' for model '{spec.name}'{extra}")
