"""A 3D occlusion map drawn over its scan (CT, MRI): three slices through the strongest cell.

The map ``values [D', H', W']`` holds the target's score with the patch at each cell;
``base`` is the unoccluded score and the *drop* ``base - values`` is large where the
region matters. Each panel is the scan's slice through the strongest cell's patch centre,
normal to one voxel axis (i, j, k), in grey windowed to the volume's 1st-99th percentiles
(Hounsfield units and MRI intensities are not in [0, 1]), with the mean drop of the
patches covering each voxel on top, coloured as :mod:`kql.results.overlay` colours a 2D
map (``colormap``, ``alpha``, ``scale`` centred on ``base``; voxels no patch covers stay
plain). Slices keep the file's voxel order (rows: the lower remaining axis); an
``orientation`` such as ``'RAS'`` only names the planes.

>>> values = np.full((2, 2, 2), 0.75, np.float32); values[1, 0, 1] = 0.25
>>> strongest_cell(values, 0.75)
(1, 0, 1)
>>> index, plane = preview_slice(values, 0.75); index, plane.tolist()
(1, [[0.75, 0.25], [0.75, 0.75]])
>>> plane_names("LPS")
('sagittal', 'coronal', 'axial')
"""

from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np

from ..errors import KqlPlanError
from ..fileio import atomic_write
from .overlay import checked, colormap, value_range

AXES = ("i", "j", "k")
PLANES = {"R": "sagittal", "L": "sagittal", "A": "coronal", "P": "coronal",
          "S": "axial", "I": "axial"}
WINDOW = (1.0, 99.0)          # percentiles of the grey window
WINDOW_SAMPLE = 1 << 22       # voxels the window is estimated from (a 512^2 x 300 CT is 78M)
PANEL_INCHES = 4.0


def _drops(values, base: float) -> np.ndarray:
    values = np.asarray(values, np.float64)
    if values.ndim != 3:
        raise KqlPlanError(f"a 3D map must be [D, H, W], got shape {tuple(values.shape)}")
    return base - values


def strongest_cell(values, base: float) -> tuple[int, int, int]:
    """The cell of the largest drop (the first in C order on ties; NaN cells never win)."""
    drop = _drops(values, base)
    flat = int(np.argmax(np.where(np.isnan(drop), -np.inf, drop)))
    return tuple(int(v) for v in np.unravel_index(flat, drop.shape))


def _cover(size: int, count: int, patch: int, stride: int, offset: int) -> np.ndarray:
    """``[size, count]`` 0/1: whether cell ``a``'s patch covers voxel ``v`` on one axis.

    >>> _cover(5, 2, 2, 3, 0).astype(int).tolist()
    [[1, 0], [1, 0], [0, 0], [0, 1], [0, 1]]
    """
    start = (offset + np.arange(count)) * stride
    voxel = np.arange(size)[:, None]
    return ((voxel >= start) & (voxel < start + patch)).astype(np.float64)


def _mean_cover(drop: np.ndarray, covers: Sequence[np.ndarray]) -> np.ndarray:
    """The mean of ``drop`` over the cells covering each voxel, NaN where none does.

    Covering is separable per axis, so sums are three small matrix products (no loop over
    cells); NaN cells count as not covering."""
    known = np.isfinite(drop)
    total, count = np.where(known, drop, 0.0), known.astype(np.float64)
    for m in covers:                     # contract the leading cell axis, append voxels
        total = np.tensordot(total, m, axes=([0], [1]))
        count = np.tensordot(count, m, axes=([0], [1]))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1e-300), np.nan)


def _covers(shape, cells, patch, stride, offset) -> list:
    return [_cover(int(n), int(c), int(p), int(s), int(o))
            for n, c, p, s, o in zip(shape, cells, patch, stride, offset)]


def voxel_drop(values, base: float, shape, patch, stride, offset) -> np.ndarray:
    """``[D, H, W]``: each voxel the mean drop of the cells whose patch covers it, NaN
    where none covers it (gaps when the stride exceeds the patch, the volume's margins).

    >>> voxel_drop(np.array([[[0.5, 0.7]]]), 1.0, (1, 1, 4), (1, 1, 2), (1, 1, 1), (0, 0, 0))[0, 0]
    array([0.5, 0.4, 0.3, nan])
    """
    drop = _drops(values, base)
    return _mean_cover(drop, _covers(shape[-3:], drop.shape, patch, stride, offset))


def plane_names(orientation: Optional[str]) -> tuple:
    """The plane normal to each voxel axis for an orientation code such as 'RAS' (one
    letter per axis, as nibabel's ``aff2axcodes`` gives it); ``(None,)*3`` without one."""
    if orientation is None:
        return (None, None, None)
    code = str(orientation).upper()
    names = tuple(PLANES.get(c) for c in code)
    if len(code) != 3 or None in names or len(set(names)) != 3:
        raise KqlPlanError("orientation must name each axis once from R/L, A/P and S/I "
                           f"(such as 'RAS' or 'LPS'), got {orientation!r}")
    return names


def _scan(volume) -> np.ndarray:
    """The volume's first channel as ``[D, H, W]`` float (a multi-channel MRI shows its first)."""
    if hasattr(volume, "detach"):
        volume = volume.detach().cpu().float().numpy()
    volume = np.asarray(volume, np.float32)
    return volume if volume.ndim == 3 else volume[0]


def grey_window(volume) -> tuple:
    """``(low, high)``: the grey range a volume's slices are shown in, whichever slice
    (:func:`_window` of its first channel): the page's slices and the PNG's alike."""
    return _window(_scan(volume))


def _window(scan: np.ndarray) -> tuple:
    """The grey range: the 1st-99th percentiles, from a strided sample of a large scan."""
    flat = scan.ravel()
    if flat.size > WINDOW_SAMPLE:
        flat = flat[:: flat.size // WINDOW_SAMPLE]
    low, high = (float(v) for v in np.nanpercentile(flat, WINDOW))
    return (low, high) if high > low else (low, low + 1.0)      # a flat scan: all black


def centre(cell, patch, stride, offset) -> tuple:
    """The strongest cell's patch centre in voxel coordinates (voxel ``v`` spans [v, v+1)).

    >>> centre((1, 0, 2), (4, 4, 3), (2, 2, 2), (0, 1, 0))
    (4.0, 4.0, 5.5)
    """
    return tuple(float((o + c) * s + p / 2) for c, p, s, o in zip(cell, patch, stride, offset))


def _composite(grey: np.ndarray, drop: np.ndarray, base: float, low: float, high: float,
               options: dict) -> np.ndarray:
    """``[h, w, 3]``: the map over the grey slice as overlay.py blends it; NaN stays grey."""
    score = base - drop
    strength = np.nan_to_num(np.clip(np.abs(drop) / (high - base), 0.0, 1.0))
    colour = colormap(options["colormap"])(np.nan_to_num((score - low) / (high - low)))[..., :3]
    opacity = (options["alpha"] * strength)[..., None]
    return (1 - opacity) * grey[..., None] + opacity * colour


def _mark(ax, axis: int, index: int, middle: tuple, spacing, name: Optional[str]) -> None:
    """The marker at the strongest cell's centre, the aspect, the panel's title and labels."""
    import matplotlib.patheffects as effects
    from matplotlib.ticker import MaxNLocator

    rows, cols = (a for a in range(3) if a != axis)
    ax.plot([middle[cols]], [middle[rows]], marker="+", markersize=14, markeredgewidth=2,
            color="black", label="strongest cell",
            path_effects=[effects.withStroke(linewidth=4, foreground="white")])
    if spacing is not None:                  # one voxel drawn as its true height / width
        ax.set_aspect(float(spacing[rows]) / float(spacing[cols]))
    label = f"axis {axis} ({AXES[axis]})"
    ax.set_title(f"{name}\n{label} = {index}" if name else f"{label} = {index}", fontsize=9)
    ax.set_ylabel(f"axis {rows} ({AXES[rows]})", fontsize=8)
    ax.set_xlabel(f"axis {cols} ({AXES[cols]})", fontsize=8)
    ax.tick_params(labelsize=7)
    for side in (ax.xaxis, ax.yaxis):        # voxel indices: whole numbers
        side.set_major_locator(MaxNLocator(integer=True))


def _colour_bar(fig, axes, base: float, limits: tuple, options: dict, output: str) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    low, high = limits
    shown = (max(low, 0.0), min(high, 1.0)) if output != "logits" else limits
    bar = fig.colorbar(ScalarMappable(Normalize(low, high), colormap(options["colormap"])),
                       ax=axes, fraction=0.03, pad=0.02, spacing="proportional",
                       boundaries=np.linspace(*shown, 257))
    bar.ax.axhline(base, color="black", linewidth=2.5)
    near = 0.08 * (shown[1] - shown[0])
    ticks = sorted([float(t) for t in MaxNLocator(6).tick_values(*shown)
                    if shown[0] <= t <= shown[1] and abs(t - base) > near] + [base])
    bar.set_ticks(ticks, labels=[f"{t:.3f} unoccluded" if t == base else f"{t:.3g}" for t in ticks])
    what = "logit" if output == "logits" else "P"
    bar.set_label(f"{what}(target) with the patch here, mean over the patches "
                  f"({options['scale']} scale: ±{high - base:.3g})", fontsize=8)


def slices_figure(volume, values, base: float, patch, stride, offset, title: str = "",
                  spacing=None, **options):
    """The Figure of three slices through the strongest cell's patch centre, one colour
    bar. ``options``: overlay.py's (colormap, alpha, scale; the 2D-only ones are accepted
    so ``options_from(settings)`` passes whole), ``orientation`` (e.g. 'RAS') to name the
    planes, ``output`` ('logits' for a logit map)."""
    from matplotlib.figure import Figure

    names = plane_names(options.pop("orientation", None))
    output = options.pop("output", "softmax")
    options = checked(options)
    scan = _scan(volume)
    drop = _drops(values, base)
    cell = strongest_cell(values, base)
    middle = centre(cell, patch, stride, offset)
    limits = value_range(values, base, output, options["scale"])
    covers = _covers(scan.shape, drop.shape, patch, stride, offset)
    # Each panel as wide as its slice is (in mm with ``spacing``) for its height.
    size = np.asarray(scan.shape, np.float64) * (1.0 if spacing is None else np.asarray(spacing))
    widths = [float(np.clip(size[max(o)] / size[min(o)], 0.45, 4.0))
              for o in ((1, 2), (0, 2), (0, 1))]
    fig = Figure(figsize=(PANEL_INCHES * sum(widths) + 1.6, PANEL_INCHES + 0.8), dpi=100,
                 layout="constrained")
    grid = fig.add_gridspec(1, 3, width_ratios=widths)
    axes = [fig.add_subplot(grid[0, k]) for k in range(3)]
    low, high = _window(scan)
    for axis, ax in enumerate(axes):         # only the voxels of the slice: a CT stays cheap
        index = min(int(middle[axis]), scan.shape[axis] - 1)
        one = [m[index:index + 1] if a == axis else m for a, m in enumerate(covers)]
        plane = np.take(_mean_cover(drop, one), 0, axis)
        grey = np.clip((np.take(scan, index, axis) - low) / (high - low), 0.0, 1.0)
        height, width = grey.shape
        ax.imshow(_composite(grey, plane, base, *limits, options), extent=(0, width, height, 0),
                  interpolation="nearest")
        _mark(ax, axis, index, middle, spacing, names[axis])
    _colour_bar(fig, axes, base, limits, options, output)
    info = (f"unoccluded {base:.3f}; largest drop {float(drop[cell]):.3f} "
            f"at cell {cell}")
    fig.suptitle(f"{title}\n{info}" if title else info, fontsize=10)
    return fig


def png_bytes(volume, values, base: float, patch, stride, offset, **kw) -> bytes:
    """The PNG of :func:`slices_figure` as bytes (for the web viewer; no file)."""
    buffer = io.BytesIO()
    fig = slices_figure(volume, values, base, patch, stride, offset, **kw)
    fig.savefig(buffer, format="png", dpi=fig.dpi)
    return buffer.getvalue()


# The overlay options that shape a volume's slices (the others shape 2D panels).
RESULT_OPTIONS = ("colormap", "alpha", "scale")


def result_png(result, **options) -> bytes:
    """A volume's OCCLUDE result (:class:`~kql.results.result.Result`) as PNG bytes: its
    first map over the scan it ran on, titled, spaced and oriented as the scan's file says;
    of ``options`` (overlay options), those of :data:`RESULT_OPTIONS` apply."""
    info = result.image_info
    return png_bytes(result.image, result.heatmap, result.probability, result.patch,
                     result.stride, result.offset,
                     title=f"{result.model}: {result.label} on {result.image_label}",
                     spacing=info.get("spacing"), orientation=info.get("orientation"),
                     output=result.output,
                     **{k: v for k, v in options.items() if k in RESULT_OPTIONS})


def write_png(path: str, volume, values, base: float, patch, stride, offset, **kw) -> None:
    """Write the PNG of :func:`slices_figure` to ``path`` through a hidden temporary file,
    so a failure (drawing included) leaves no half-written picture."""
    fig = slices_figure(volume, values, base, patch, stride, offset, **kw)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=fig.dpi), mode=None)


def preview_slice(values, base: float) -> tuple[int, np.ndarray]:
    """``(a, values[a])``: the map's plane along axis 0 through the strongest cell, which
    the shell's 2D preview can show as it shows a photo's map."""
    a = strongest_cell(values, base)[0]
    return a, np.array(np.asarray(values)[a], np.float32)
