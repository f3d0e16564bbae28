"""The binder: an ``OCCLUDE`` statement resolved against the catalog into the logical plan.

It reads the image (resized to the model's input), looks up the model, the target, the
patch grid and the colour, and fills every default: the
:class:`~kql.planner.logical.OcclusionQuery` the planner takes. It sits above the
planner, as it reads the language's tree and the catalog's files; a clause at fault is
named with its line and column.
"""

from __future__ import annotations

import difflib
from typing import Callable, Optional

import torch

from .catalog import images
from .catalog.models import spatial_axes
from .errors import KqlError, KqlPlanError
from .language import ast
from .operators import fills
from .planner.frame import DEFAULT_RESIZE, Frame
from .planner.grid import OcclusionGrid
from .planner.logical import OcclusionQuery, at_node, fail

DEFAULT_PATCH = 16
DEFAULT_STRIDE = 4
NAMED_COLORS = {"black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5), "white": (1.0, 1.0, 1.0)}
# The COLOR forms that paint the image's own pixels under each patch: MONAI's gaussian mode
# (the window times 1 - a Gaussian centred on it) and each channel's mean of the window.
CONTENTS = {"gaussian": fills.gaussian, "mean_patch": fills.PatchMean}


def bind(stmt: ast.Occlude, text: str, catalog, max_pixels: int = images.MAX_PIXELS) -> OcclusionQuery:
    """Resolve names and fill defaults; raises KqlError pointing at the clause at fault."""
    try:
        spec = catalog.resolve_model(stmt.model.name)
    except KqlError as exc:
        raise at_node(exc, stmt.model)
    raw, label, info = _image(stmt.image, catalog, max_pixels)
    _same_rank(stmt, spec, raw, label)
    if raw.dim() == 4:
        return _bind_volume(stmt, text, spec, raw, label, info)
    raw, channel_note = _channels(stmt, raw, spec)
    size = images.target_size(raw.shape[1], raw.shape[2], spec.input_size)
    frame = Frame.fitting(tuple(raw.shape[1:]), size, stmt.resize or DEFAULT_RESIZE)
    image = fit(raw, frame, spec.mean)
    patch = stmt.patch or (DEFAULT_PATCH, DEFAULT_PATCH)
    stride = stmt.stride or (DEFAULT_STRIDE, DEFAULT_STRIDE)
    region = _region(stmt, frame)
    grid = _checked(stmt, OcclusionGrid(int(image.shape[1]), int(image.shape[2]), patch, stride, region))
    return _query(stmt, text, spec, label, image, grid, _color(stmt, image, patch), raw, info,
                  ssim=stmt.ssim, drilldown=stmt.drilldown, speedup=stmt.speedup,
                  notes=(channel_note,) if channel_note else (), frame=frame)


def _query(stmt: ast.Occlude, text: str, spec, label: str, image: torch.Tensor,
           grid: OcclusionGrid, painted: tuple, raw: torch.Tensor, info: dict,
           **more) -> OcclusionQuery:
    """The logical plan of an image's or a volume's statement: BATCH checked, the
    targets resolved; ``painted`` is ``(colour, its label, fill)``, ``more`` the fields
    only one of them sets."""
    if stmt.batch is not None and stmt.batch < 1:
        raise fail(stmt, "batch", f"BATCH must be at least 1, got {stmt.batch}")
    targets, top = _targets(stmt, spec)
    color, color_label, fill = painted
    return OcclusionQuery(
        statement=stmt, text=text, image_label=label, image=image, model=spec,
        target=targets[0] if targets else None, grid=grid, color=color, color_label=color_label,
        device=stmt.device or "auto", batch=stmt.batch, into=stmt.into, targets=targets, top=top,
        output=stmt.output, original=raw, image_info=info, fill=fill, **more)


def _same_rank(stmt: ast.Occlude, spec, raw: torch.Tensor, label: str) -> None:
    """A volume for a network of 3D convolutions, an image for one of 2D ones."""
    axes = spatial_axes(spec.module)
    if axes in (2, 3) and raw.dim() - 1 != axes:
        takes, given = (("volumes", "an image") if axes == 3 else ("images", "a volume"))
        raise at_node(KqlPlanError(f"model '{spec.name}' takes {takes} (its first convolution "
                                   f"is {axes}D); {label} is {given}"), stmt.image)


def _checked(stmt: ast.Occlude, grid: OcclusionGrid) -> OcclusionGrid:
    problem = grid.problem()
    if problem:
        clause = ("stride" if "stride" in problem or "STRIDE" in problem else
                  "region" if ("region" in problem or "REGION" in problem) and stmt.region else "patch")
        raise fail(stmt, clause, problem)
    return grid


def _bind_volume(stmt: ast.Occlude, text: str, spec, raw: torch.Tensor, label: str,
                 info: dict) -> OcclusionQuery:
    """An ``OCCLUDE`` of a volume ``[C, D, H, W]``: the same query in three dimensions
    (a cube for one number, REGION's six numbers); exact plans only for now."""
    for clause, given in (("ssim", stmt.ssim), ("drilldown", stmt.drilldown), ("resize", stmt.resize)):
        if given is not None:
            raise fail(stmt, clause, f"{_CLAUSE_WORDS[clause]} applies to images; a volume's map "
                                     f"is computed exactly")
    if int(raw.shape[0]) != spec.channels:
        raise at_node(KqlPlanError(f"the volume has {raw.shape[0]} channel(s) but model "
                                   f"'{spec.name}' takes {spec.channels}"), stmt.image)
    volume = _volume_input(stmt, raw, spec)
    grid = _checked(stmt, OcclusionGrid(
        int(volume.shape[2]), int(volume.shape[3]), _cube(stmt.patch, DEFAULT_VOLUME_PATCH),
        _cube(stmt.stride, DEFAULT_STRIDE), stmt.region.numbers if stmt.region else None,
        depth=int(volume.shape[1])))
    return _query(stmt, text, spec, label, volume, grid, _volume_color(stmt, volume, grid.patch),
                  raw, info)


DEFAULT_VOLUME_PATCH = 8
_CLAUSE_WORDS = {"ssim": "WITH SSIM", "drilldown": "DRILLDOWN", "resize": "RESIZE"}


def _cube(size, default: int) -> tuple:
    """PATCH or STRIDE of a volume: three sizes, one number for all three."""
    if size is None:
        return (default,) * 3
    return (size[0],) * 3 if isinstance(size, ast.Same) else tuple(size)


def _volume_input(stmt: ast.Occlude, raw: torch.Tensor, spec) -> torch.Tensor:
    """The volume at the model's input size: as it is, or resampled (trilinear) to a
    model's ``input_size`` of three numbers."""
    size = spec.input_size
    if size is None or tuple(raw.shape[1:]) == tuple(size if isinstance(size, (tuple, list)) else ()):
        return raw
    if not isinstance(size, (tuple, list)) or len(size) != 3:
        raise at_node(KqlPlanError(f"model '{spec.name}' has input_size {size!r}; a volume needs "
                                   f"three sizes (d, h, w) or none"), stmt.image)
    return torch.nn.functional.interpolate(raw[None], size=tuple(int(v) for v in size),
                                           mode="trilinear", align_corners=False)[0]


def _volume_color(stmt: ast.Occlude, volume: torch.Tensor, patch: tuple) -> tuple:
    """``(colour, label, fill)`` of a volume's cube: one value per channel, the volume's
    mean (the default, ``COLOR mean``) or ``COLOR (v)`` in the volume's own intensities;
    or the volume under the cube repainted (``COLOR gaussian``, ``COLOR mean_patch``)."""
    c = stmt.color
    channels = int(volume.shape[0])
    if c is None or (isinstance(c, ast.ColorNamed) and c.name == "mean"):
        return tuple(float(v) for v in volume.mean(dim=(1, 2, 3))), "mean", None
    if isinstance(c, ast.ColorValue):
        return (float(c.value),) * channels, f"({c.value:g})", None
    if isinstance(c, ast.ColorNamed) and c.name in CONTENTS:
        return (0.0,) * channels, c.name, CONTENTS[c.name](volume, patch)
    raise fail(stmt, "color", "a volume takes COLOR mean, COLOR (value) in the volume's own "
                              "intensities, COLOR gaussian or COLOR mean_patch")


def _region(stmt: ast.Occlude, frame: Frame) -> Optional[tuple]:
    """REGION (in the original image's pixels) in the model's pixels."""
    if stmt.region is None:
        return None
    if stmt.region.z is not None:
        raise fail(stmt, "region", "REGION takes four numbers (x, y, w, h) for an image; six "
                                   "are a volume's")
    r = stmt.region
    region = (r.x, r.y, r.w, r.h)
    (h, w) = frame.original
    if r.w < 1 or r.h < 1:
        raise fail(stmt, "region", f"region size must be at least 1 (got {r.w}x{r.h})")
    if r.x + r.w > w or r.y + r.h > h:
        raise fail(stmt, "region", f"region ({r.x}, {r.y}, {r.w}, {r.h}) is not inside the "
                                   f"image ({w} wide, {h} high)")
    return region if frame.identity else frame.region_in_model(region)


def _channels(stmt: ast.Occlude, raw: torch.Tensor, spec) -> tuple[torch.Tensor, Optional[str]]:
    try:
        return images.match_channels(raw, spec.channels)
    except KqlError as exc:
        raise at_node(exc, stmt.image)


def _image(ref, catalog, max_pixels: int) -> tuple[torch.Tensor, str, dict]:
    """The image's pixels, its label, and what its file's header says (a quoted file)."""
    try:
        if isinstance(ref, ast.SampleImage):
            return images.load_sample(ref.name), f"sample('{ref.name}')", {}
        if isinstance(ref, ast.ImageFile):
            loaded = images.read_image(ref.path, max_pixels=max_pixels)
            return loaded.tensor, f"'{ref.path}'", dict(loaded.info)
        tensor = catalog.resolve_image(ref.name, max_pixels)
        return tensor, ref.name, catalog.image_info(ref.name)
    except KqlError as exc:
        raise at_node(exc, ref)


def _color(stmt: ast.Occlude, image: torch.Tensor, patch: tuple) -> tuple[tuple, str, Optional[Callable]]:
    """The occlusion colour, one value per channel of ``image``, its name, and the patch's
    content per position where it is not one colour (None otherwise; the colour then
    unused, zeros)."""
    c, channels = stmt.color, int(image.shape[0])
    if c is None:
        return NAMED_COLORS["gray"][:1] * channels, "gray", None
    if isinstance(c, ast.ColorNamed):
        if c.name == "mean":
            m = image.mean(dim=(1, 2))
            return tuple(float(v) for v in m), "mean", None
        if c.name in CONTENTS:
            return (0.0,) * channels, c.name, CONTENTS[c.name](image, patch)
        return NAMED_COLORS[c.name][:1] * channels, c.name, None
    if isinstance(c, ast.ColorValue):
        if channels != 1 or not 0.0 <= c.value <= 1.0:
            raise fail(stmt, "color", f"one colour value is a grey image's (in [0, 1]); this "
                                      f"image has {channels} channels: use (r, g, b) or a name")
        return (float(c.value),), f"({c.value:g})", None
    rgb = (float(c.r), float(c.g), float(c.b))
    if not all(0.0 <= v <= 1.0 for v in rgb):
        raise fail(stmt, "color", f"colour components must lie in [0, 1] (pixel space), got "
                                  f"({c.r:g}, {c.g:g}, {c.b:g}); e.g. COLOR (0.5, 0.5, 0.5)")
    label = "({:g}, {:g}, {:g})".format(*rgb)
    if channels == 3:
        return rgb, label, None
    if channels == 1:                   # a grey image: the colour's luma
        return (sum(w * v for w, v in zip(images.LUMA, rgb)),), label, None
    if len(set(rgb)) == 1:
        return rgb[:1] * channels, label, None
    raise fail(stmt, "color", f"an (r, g, b) colour needs a 3-channel image; the model takes "
                              f"{channels} channels: use a named colour or equal components")


def _targets(stmt: ast.Occlude, spec) -> tuple[tuple, Optional[int]]:
    """The classes to map (None: the predicted one) and TOP k's k."""
    t = stmt.target
    if isinstance(t, ast.TargetTop):
        if spec.labels is not None and t.k > len(spec.labels):
            raise fail(stmt, "target", f"TARGET TOP {t.k}: model '{spec.name}' has only "
                                       f"{len(spec.labels)} classes")
        return (), t.k
    singles = t.targets if isinstance(t, ast.TargetList) else (t,)
    chosen = tuple(_target(stmt, spec, one) for one in singles)
    if len(set(chosen)) != len(chosen):
        raise fail(stmt, "target", "TARGET names the same class twice")
    return chosen, None


def _target(stmt: ast.Occlude, spec, t) -> Optional[int]:
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


def fit(image: torch.Tensor, frame: Frame, fill: Optional[tuple] = None) -> torch.Tensor:
    """``image`` [C, H, W] in the model's frame: resized, then cropped or padded with
    ``fill`` (per channel; grey 0.5 when None).

    >>> t = fit(torch.ones(1, 30, 60), Frame.fitting((30, 60), (10, 10), "pad"))
    >>> tuple(t.shape), [round(v, 3) for v in t[0, :, 0].tolist()]
    ((1, 10, 10), [0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5])
    """
    resized = images.resize(image, frame.resized)
    (th, tw), (by, bx) = frame.size, frame.border
    if frame.mode == "crop":
        return resized[:, by:by + th, bx:bx + tw].contiguous()
    if frame.mode == "pad" and tuple(resized.shape[1:]) != (th, tw):
        rh, rw = resized.shape[1:]
        channels = resized.shape[0]
        value = torch.tensor(fill if fill is not None else (0.5,) * channels,
                             dtype=resized.dtype).view(-1, 1, 1)
        out = value.expand(channels, th, tw).clone()
        out[:, by:by + rh, bx:bx + rw] = resized
        return out
    return resized
