"""Heat maps drawn so a person can read them: over the original photo, centred on the
unoccluded score.

Each map is drawn over the image as the user gave it, at its own resolution: the map's
values sit at the patch centres and are upsampled bilinearly (``style='smooth'``) or as
one-stride blocks (``'blocks'``). The colour map is diverging and centred on the
target's unoccluded score ``p0``: with the default ``RdBu`` a patch that lowers the score
(a *drop*: the region matters) is red, one that raises it blue, and an unchanged one
leaves the photo as it is (the opacity grows with the change). The colour bar marks
``p0``. The range is symmetric, ``p0 - span .. p0 + span``, so a drop and a rise of the
same size get the same strength of colour; ``scale`` chooses the span:

* ``'auto'`` (the default): the map's largest change, but at least 0.05 for
  probabilities (0.5 for logits): a random net's 0.2586..0.2600 stays pale, a real effect
  gets full colour.
* ``'absolute'``: the whole range a probability can reach, ``max(p0, 1 - p0)`` (±4 for
  logits): colours can be compared between images and models.
* ``'relative'``: the map's largest change, however small (every map looks strong).

The photo is shown in grey underneath (``base='grey'``; ``'colour'`` keeps it), so a red
retina photo does not hide a red map; ``contour='on'`` outlines the cells whose drop is at
least half the largest drop (when that drop is visible at all); ``panels='side_by_side'``
puts the plain photo first. :func:`options_from` reads the ``overlay_*`` settings.

>>> DEFAULTS["colormap"], DEFAULTS["scale"], DEFAULTS["base"]
('RdBu', 'auto', 'grey')
>>> options_from({"overlay_alpha": 0.4, "strategy": "auto"})
{'alpha': 0.4}
>>> value_range([0.2586, 0.2600], 0.2593, "softmax", "auto")   # noise: the 0.05 floor
(0.2093, 0.3093)
>>> value_range([0.1, 0.7], 0.6, "softmax", "relative")
(0.1, 1.1)
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np

from ..errors import KqlPlanError
from ..planner.settings import Setting, one_of

OPTIONS = ("colormap", "alpha", "scale", "style", "panels", "contour", "base")
DEFAULTS = {"colormap": "RdBu", "alpha": 0.8, "scale": "auto", "style": "smooth",
            "panels": "overlay", "contour": "on", "base": "grey"}
FLOOR = {"probability": 0.05, "logits": 0.5}    # 'auto': the least span
LOGIT_SPAN = 4.0                                 # 'absolute' for logits: e^4 ~ 55x the odds
CONTOUR_VISIBLE = 0.25                           # no contour for a drop under this * span
PANEL_INCHES = 6.4


def options_from(settings) -> dict:
    """The overlay options set in ``settings`` (a :class:`Settings` or any mapping of
    ``overlay_<option>`` names), for ``Result.save(path, **options)``."""
    return {name: settings[f"overlay_{name}"] for name in OPTIONS if f"overlay_{name}" in settings}


def checked(options: dict) -> dict:
    """``options`` over :data:`DEFAULTS`; an unknown option or a bad value is a
    :class:`KqlPlanError` (the ``SET overlay_*`` message).

    >>> checked({"style": "blocks"})["style"], checked({})["base"]
    ('blocks', 'grey')
    >>> checked({"scale": "log"})
    Traceback (most recent call last):
    ...
    kql.errors.KqlPlanError: overlay_scale must be 'auto', 'absolute' or 'relative', got 'log'
    """
    rows = {s.name: s for s in SETTINGS}
    for name, value in options.items():
        if name not in OPTIONS:
            raise KqlPlanError(f"unknown overlay option '{name}'; options: {', '.join(OPTIONS)}")
        why = rows[f"overlay_{name}"].check(value)
        if why:
            raise KqlPlanError(why)
    return {**DEFAULTS, **options}


def _kind(output: str) -> str:
    return "logits" if output == "logits" else "probability"


def value_range(values, base: float, output: str, scale: str) -> tuple:
    """``(low, high)`` of the colour map: symmetric around ``base`` (the unoccluded score)."""
    change = float(np.max(np.abs(np.asarray(values, np.float64) - base)))
    kind = _kind(output)
    if scale == "absolute":
        span = max(base, 1.0 - base) if kind == "probability" else LOGIT_SPAN
    elif scale == "relative":
        span = change if change > 0 else 1e-6
    else:
        span = max(change, FLOOR[kind])
    return round(base - span, 6), round(base + span, 6)


def extent(result) -> tuple:
    """(left, right, bottom, top) of the map in the original image's pixels: each cell is
    drawn centred on its patch, one stride wide."""
    (ph, pw), (sy, sx) = result.patch, result.stride
    r0, c0 = result.offset
    rows, cols = result.heatmap.shape
    top = r0 * sy + ph / 2 - sy / 2
    left = c0 * sx + pw / 2 - sx / 2
    bottom, right = top + rows * sy, left + cols * sx
    if result.frame is not None and result.original is not None:
        top, left = result.frame.to_original(top, left)
        bottom, right = result.frame.to_original(bottom, right)
    return left, right, bottom, top


def _picture(result) -> np.ndarray:
    """The image as the user gave it, ``[H, W, C]`` float in [0, 1]."""
    picture = result.original if result.original is not None else result.image
    return np.clip(picture.permute(1, 2, 0).double().numpy(), 0.0, 1.0)


def _axis(count: int, size: int, near: float, far: float, smooth: bool) -> tuple:
    """For each of ``size`` pixel centres on one axis: the two map indices to blend, the
    weight of the second, and whether the pixel lies inside the map's extent."""
    pixels = np.arange(size) + 0.5
    inside = (pixels >= near) & (pixels < far)
    cell = (far - near) / count
    if smooth:                               # linear between patch centres, clamped
        centres = near + cell * (np.arange(count) + 0.5)
        where = np.interp(pixels, centres, np.arange(count, dtype=np.float64))
        first = np.floor(where).astype(int)
        return first, np.minimum(first + 1, count - 1), where - first, inside
    first = np.clip(np.floor((pixels - near) / cell).astype(int), 0, count - 1)
    return first, first, np.zeros(size), inside


def upsampled(result, values: np.ndarray, style: str = "smooth") -> tuple:
    """``(field, inside)``: ``values [rows, cols]`` at every pixel of the original image
    ``[H, W]``, and where the map reaches (False: no patch is centred near the pixel)."""
    height, width = _picture(result).shape[:2]
    left, right, bottom, top = extent(result)
    rows, cols = values.shape
    smooth = style == "smooth"
    y0, y1, wy, in_y = _axis(rows, height, top, bottom, smooth)
    x0, x1, wx, in_x = _axis(cols, width, left, right, smooth)
    v = np.asarray(values, np.float64)
    wy, wx = wy[:, None], wx[None, :]
    field = ((1 - wy) * ((1 - wx) * v[y0][:, x0] + wx * v[y0][:, x1])
             + wy * ((1 - wx) * v[y1][:, x0] + wx * v[y1][:, x1]))
    return field, in_y[:, None] & in_x[None, :]


def _base(picture: np.ndarray, base: str) -> np.ndarray:
    """The photo under the map, ``[H, W, 3]``: its luminance for 'grey' (and 1 channel)."""
    if picture.shape[2] == 1:
        return np.repeat(picture, 3, axis=2)
    if base in ("grey", "gray"):
        luma = picture @ np.array([0.299, 0.587, 0.114])
        return np.repeat(luma[:, :, None], 3, axis=2)
    return picture


def colormap(name: str):
    """A matplotlib colour map by name, any case (``SET`` lower-cases its values)."""
    import matplotlib

    names = {n.lower(): n for n in matplotlib.colormaps}
    return matplotlib.colormaps[names[str(name).lower()]]


def _parts(result, target: int, options: dict):
    """The panel's pieces: the map at every pixel, its colour range and where it reaches."""
    values = _maps(result)[target]
    p0 = _scores(result)[target]
    low, high = value_range(values, p0, result.output, options["scale"])
    field, inside = upsampled(result, values, options["style"])
    return values, p0, (low, high), field, inside


def overlay_image(result, target: int = 0, **options) -> np.ndarray:
    """``[H, W, 3]`` float in [0, 1]: map ``target`` composited over the photo at the
    photo's own resolution (what a panel shows, before the contour and colour bar)."""
    options = checked(options)
    _, p0, (low, high), field, inside = _parts(result, target, options)
    strength = np.clip(np.abs(field - p0) / (high - p0), 0.0, 1.0)
    colour = colormap(options["colormap"])((field - low) / (high - low))[:, :, :3]
    opacity = (options["alpha"] * strength * inside)[:, :, None]
    return (1 - opacity) * _base(_picture(result), options["base"]) + opacity * colour


def _maps(result) -> np.ndarray:
    return result.heatmaps if result.heatmaps is not None else result.heatmap[None]


def _scores(result) -> list:
    return [float(s) for s in (result.base_scores or [result.probability])]


def _labels(result) -> list:
    return result.labels or [result.label]


def strongest(result, target: int = 0) -> tuple:
    """``(row, col, drop)``: the map cell whose patch lowers the score most."""
    drop = _scores(result)[target] - _maps(result)[target]
    row, col = np.unravel_index(int(np.argmax(drop)), drop.shape)
    return int(row), int(col), float(drop[row, col])


def _contour(ax, result, target: int, options: dict) -> None:
    """Outline the cells whose drop is at least half the largest, if that drop shows."""
    import matplotlib.patheffects as effects

    values, p0, (_, high), field, inside = _parts(result, target, options)
    top_drop = float(p0 - values.min())
    if top_drop <= 0 or top_drop < CONTOUR_VISIBLE * (high - p0):
        return
    drop = np.where(inside, p0 - field, -np.inf)
    height, width = drop.shape
    lines = ax.contour(np.arange(width) + 0.5, np.arange(height) + 0.5, drop,
                       levels=[top_drop / 2], colors="black", linewidths=1.6)
    lines.set(path_effects=[effects.withStroke(linewidth=3.5, foreground="white")])


def _colour_bar(fig, ax, result, target: int, options: dict):
    """The bar of the panel's scores, its reachable part only, with ``p0`` marked."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    values, p0, (low, high), _, _ = _parts(result, target, options)
    shown_low, shown_high = low, high
    if _kind(result.output) == "probability":
        shown_low, shown_high = max(low, 0.0), min(high, 1.0)
    mappable = ScalarMappable(Normalize(low, high), colormap(options["colormap"]))
    bar = fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.04,
                       boundaries=np.linspace(shown_low, shown_high, 257), spacing="proportional")
    bar.ax.axhline(p0, color="black", linewidth=2.5)
    near = 0.08 * (shown_high - shown_low)
    ticks = [float(t) for t in MaxNLocator(6).tick_values(shown_low, shown_high)
             if shown_low <= t <= shown_high and abs(t - p0) > near]
    ticks = sorted(ticks + [p0])
    bar.set_ticks(ticks, labels=[f"{t:.3f} unoccluded" if t == p0 else f"{t:.3g}" for t in ticks])
    what = "logit" if result.output == "logits" else "P"
    bar.set_label(f"{what}({_labels(result)[target]}) with the patch here "
                  f"({options['scale']} scale: ±{high - p0:.3g})")
    return bar


def _overlay_panel(fig, ax, result, target: int, options: dict) -> None:
    height, width = _picture(result).shape[:2]
    ax.imshow(overlay_image(result, target, **options), extent=(0, width, height, 0),
              interpolation="antialiased")
    if options["contour"] == "on":
        _contour(ax, result, target, options)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    what = "logit" if result.output == "logits" else "P"
    ax.set_title(f"{result.model}: {what}({_labels(result)[target]}) = "
                 f"{_scores(result)[target]:.3f} unoccluded", fontsize=10)
    _colour_bar(fig, ax, result, target, options)


def _plain_panel(ax, result) -> None:
    picture = _picture(result)
    grey = picture.shape[2] == 1
    ax.imshow(picture[:, :, 0] if grey else picture, cmap="gray" if grey else None,
              vmin=0.0, vmax=1.0)
    ax.set_axis_off()
    ax.set_title(result.image_label or "image", fontsize=10)


def figure(result, **options):
    """The matplotlib Figure of :func:`png_bytes`: one panel per target (after the plain
    photo for ``panels='side_by_side'``), each with its colour bar."""
    from matplotlib.figure import Figure

    options = checked(options)
    height, width = _picture(result).shape[:2]
    side = options["panels"] == "side_by_side"
    count = len(_maps(result)) + side
    w, h = (PANEL_INCHES, PANEL_INCHES * height / width) if width >= height else \
        (PANEL_INCHES * width / height, PANEL_INCHES)
    pixels = min(max(width, height, 640), 1280)   # about the photo's own resolution
    # Constrained layout keeps each colour bar's ticks and label clear of the next panel.
    fig = Figure(figsize=(w * 1.3 * count, h + 0.6), dpi=pixels / PANEL_INCHES, layout="constrained")
    axes = [fig.add_subplot(1, count, k + 1) for k in range(count)]
    if side:
        _plain_panel(axes.pop(0), result)
    for target, ax in enumerate(axes):
        _overlay_panel(fig, ax, result, target, options)
    return fig


def png_bytes(result, **options) -> bytes:
    """The overlay of :func:`figure` as PNG bytes (no file)."""
    buffer = io.BytesIO()
    write_png(result, buffer, **options)
    return buffer.getvalue()


def write_png(result, target, **options) -> None:
    """Write the overlay PNG to ``target`` (a path or a binary file)."""
    fig = figure(result, **options)
    fig.savefig(target, format="png", bbox_inches="tight", dpi=fig.dpi)


# -- the overlay's session settings (SET overlay_<option>; kql.settings registers them) ---

def _check_overlay_colormap(value) -> Optional[str]:
    import matplotlib

    if isinstance(value, str) and value.lower() in {n.lower() for n in matplotlib.colormaps}:
        return None
    return f"overlay_colormap must be a matplotlib colour map such as 'RdBu' or 'coolwarm', got {value!r}"


def _check_overlay_alpha(value) -> Optional[str]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
        return None
    return f"overlay_alpha must be a number from 0 to 1, got {value!r}"


_check_overlay_scale = one_of("overlay_scale", "auto", "absolute", "relative")
_check_overlay_style = one_of("overlay_style", "smooth", "blocks")
_check_overlay_panels = one_of("overlay_panels", "overlay", "side_by_side")
_check_overlay_contour = one_of("overlay_contour", "on", "off")


def _check_overlay_base(value) -> Optional[str]:
    if value in ("grey", "gray", "colour", "color"):
        return None
    return f"overlay_base must be 'grey' or 'colour', got {value!r}"


SETTINGS = (
    Setting("overlay_colormap", "RdBu", _check_overlay_colormap,
            "the PNG overlay's colour map (matplotlib's name), centred on the unoccluded "
            "score: with a diverging one such as 'RdBu', drops red and rises blue"),
    Setting("overlay_alpha", 0.8, _check_overlay_alpha,
            "the overlay's opacity where the score changes most (0..1); an unchanged cell "
            "leaves the image as it is"),
    Setting("overlay_scale", "auto", _check_overlay_scale,
            "the overlay's colour range around the unoccluded score: 'auto' (the largest "
            "change, at least 0.05 of probability or 0.5 logits), 'absolute' (all of 0..1; "
            "logits: 4) or 'relative' (the largest change, however small)"),
    Setting("overlay_style", "smooth", _check_overlay_style,
            "the overlay between patch centres: 'smooth' (bilinear) or 'blocks' (one stride wide)"),
    Setting("overlay_panels", "overlay", _check_overlay_panels,
            "'overlay' (the map over the image) or 'side_by_side' (the plain image first)"),
    Setting("overlay_contour", "on", _check_overlay_contour,
            "'on': outline the cells whose drop is at least half the largest drop; 'off'"),
    Setting("overlay_base", "grey", _check_overlay_base,
            "the image under the overlay: 'grey' (its luminance, readable under any map) "
            "or 'colour'"),
)
