"""What the shell shows on a terminal: a heat map as a small Unicode picture of where the
score dropped, with the top regions by drop (boxes in the original image's pixels), and
tables wrapped to the terminal's width (:func:`fit_table`).

With colour, each character is two map pixels, one above the other: '▀' with a 24-bit (or
256-colour) foreground for the upper and background for the lower. Without colour (a pipe,
``NO_COLOR``), each character is the mean of its two pixels in the shades of :func:`shade`.
A map wider than the preview is averaged down; a small one is repeated up. A terminal cell
is about twice as tall as wide, so one character row holds two pixel rows either way.

The picture shows the drop (the unoccluded score minus the occluded one) from 0 (blank)
to the map's largest drop (brightest); a rise in the score shows as 0.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from typing import Optional, TextIO

import numpy as np

SHADES = " ░▒▓█"
UPPER_HALF = "▀"
RESET = "\x1b[0m"
MAX_LINES = 20           # character rows of the picture, at most
MIN_WIDTH = 32           # a smaller map is repeated up to about this many columns
# An inferno-like ramp: no drop is near black, the largest drop pale yellow.
_RAMP = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)],
                 np.float64)


def shade(values) -> str:
    """Values in [0, 1] as block shades, from ' ' (0) to '█' (1).

    >>> shade([0, 0.25, 0.5, 0.75, 1])
    ' ░▒▓█'
    >>> shade([-1, 0.1, 2, float('nan')])     # clipped; NaN is blank
    '  █ '
    """
    v = np.nan_to_num(np.clip(np.asarray(values, np.float64), 0, 1), nan=0.0)
    return "".join(SHADES[i] for i in np.rint(v * (len(SHADES) - 1)).astype(int))


def ramp(value: float) -> tuple:
    """The colour of a value in [0, 1], as (r, g, b) 0..255.

    >>> ramp(0), ramp(1), ramp(0.5)
    ((0, 0, 4), (252, 255, 164), (188, 55, 84))
    """
    v = float(np.clip(np.nan_to_num(value), 0, 1)) * (len(_RAMP) - 1)
    i = min(int(v), len(_RAMP) - 2)
    rgb = _RAMP[i] + (v - i) * (_RAMP[i + 1] - _RAMP[i])
    return tuple(int(round(c)) for c in rgb)


def ansi(rgb: tuple, background: bool = False, truecolor: bool = True) -> str:
    """The escape sequence that sets the foreground (or background) colour.

    >>> ansi((255, 0, 0)), ansi((255, 0, 0), background=True, truecolor=False)
    ('\\x1b[38;2;255;0;0m', '\\x1b[48;5;196m')
    """
    layer = 48 if background else 38
    if truecolor:
        return "\x1b[{};2;{};{};{}m".format(layer, *rgb)
    r, g, b = (int(round(c / 255 * 5)) for c in rgb)
    return f"\x1b[{layer};5;{16 + 36 * r + 6 * g + b}m"


def resample(values: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """``values`` [h, w] at [rows, cols]: each output cell the mean of the cells it covers
    (downsampling), or the one cell it falls in (upsampling).

    >>> resample(np.arange(16.0).reshape(4, 4), 2, 2).tolist()
    [[2.5, 4.5], [10.5, 12.5]]
    >>> resample(np.array([[1.0, 2.0]]), 2, 4).tolist()
    [[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]]
    """
    def spans(n_in, n_out):
        edges = np.linspace(0, n_in, n_out + 1)
        starts = np.minimum(np.floor(edges[:-1]).astype(int), n_in - 1)
        return [(s, max(s + 1, int(np.ceil(e)))) for s, e in zip(starts, edges[1:])]

    out = np.empty((rows, cols))
    for i, (r0, r1) in enumerate(spans(values.shape[0], rows)):
        for j, (c0, c1) in enumerate(spans(values.shape[1], cols)):
            out[i, j] = values[r0:r1, c0:c1].mean()
    return out


def picture_size(rows: int, cols: int, aspect: float, width: int) -> tuple:
    """``(pixel rows, columns)`` of the picture of a rows x cols map whose area is
    ``aspect`` times as tall as wide, within ``width`` columns and :data:`MAX_LINES`.

    >>> picture_size(13, 13, 1.0, 80), picture_size(100, 400, 0.25, 80), picture_size(4, 4, 1.0, 80)
    ((39, 39), (20, 80), (32, 32))
    """
    out_cols = min(width, cols * max(1, -(-MIN_WIDTH // cols)))
    pixel_rows = max(1, round(out_cols * aspect))
    if pixel_rows > 2 * MAX_LINES:
        pixel_rows = 2 * MAX_LINES
        out_cols = max(1, min(out_cols, round(pixel_rows / aspect)))
    return pixel_rows, out_cols


def render_map(values: np.ndarray, aspect: float = 1.0, width: int = 80, color: bool = True,
               truecolor: bool = True) -> list[str]:
    """The picture of ``values`` in [0, 1] (see the module's docstring), one string a line.

    >>> render_map(np.array([[0.0, 1.0], [1.0, 0.0]]), width=4, color=False)
    ['  ██', '██  ']
    >>> render_map(np.array([[0.0, 0.0]]), 0.5, width=2, truecolor=False)   # one pixel row
    ['\\x1b[38;5;16m▀▀\\x1b[0m']
    """
    pixel_rows, cols = picture_size(*values.shape, aspect, width)
    if not color:
        small = resample(values, -(-pixel_rows // 2), cols)
        return [shade(row) for row in small]
    pixels = resample(values, pixel_rows + pixel_rows % 2, cols)
    lines = []
    for top, bottom in zip(pixels[0::2], pixels[1::2]):
        odd_end = len(lines) * 2 + 1 >= pixel_rows       # no lower pixel: the default background
        cells, last = [], None
        for a, b in zip(top, bottom):
            codes = ansi(ramp(a), False, truecolor) + ("" if odd_end else ansi(ramp(b), True, truecolor))
            cells.append(("" if codes == last else codes) + UPPER_HALF)   # only what changed
            last = codes
        lines.append("".join(cells) + RESET)
    return lines


def top_regions(drop: np.ndarray, count: int = 3) -> list[tuple]:
    """``[(row, col), ...]``: the cells of the largest drops, largest first, each one's
    neighbours (within 1 cell) skipped so that the regions differ.

    >>> top_regions(np.array([[0.1, 0.9, 0.8], [0.0, 0.2, 0.0], [0.7, 0.0, 0.3]]))
    [(0, 1), (2, 0), (2, 2)]
    """
    taken: list = []
    order = np.argsort(-np.nan_to_num(drop, nan=-np.inf), axis=None, kind="stable")
    for flat in order:
        i, j = divmod(int(flat), drop.shape[1])
        if not np.isfinite(drop[i, j]) or drop[i, j] <= 0:
            break
        if all(abs(i - a) > 1 or abs(j - b) > 1 for a, b in taken):
            taken.append((i, j))
            if len(taken) == count:
                break
    return taken


def region_text(box: tuple, drop: float) -> str:
    """A cell's patch in the original image and its drop.

    >>> region_text((120.4, 64.0, 32.0, 31.6), 0.4128)
    '(x=120, y=64, 32x32) drop 0.41'
    """
    x, y, w, h = (int(round(v)) for v in box)
    return f"(x={x}, y={y}, {w}x{h}) drop {drop:.2f}"


def _aspect(result, rows: int, cols: int) -> float:
    """Height over width of the image area the map covers (original pixels)."""
    x0, y0, _, _ = result.box(0, 0)
    x1, y1, w, h = result.box(rows - 1, cols - 1)
    span_w, span_h = x1 + w - x0, y1 + h - y0
    return span_h / span_w if span_w > 0 and span_h > 0 else rows / cols


def preview(result, width: int = 80, color: bool = True, truecolor: bool = True) -> str:
    """The picture of an OCCLUDE result's first map and its top regions by drop (one per
    target when there are several); '' for any other result."""
    if getattr(result, "kind", None) != "occlude" or getattr(result, "heatmap", None) is None:
        return ""
    if result.heatmap.ndim == 3:
        return _volume_preview(result, width, color, truecolor)
    drops = result.drops if result.heatmaps is not None else result.drop[None]
    drops = np.asarray(drops, np.float64)
    first = drops[0]
    rows, cols = first.shape
    peak = float(np.nanmax(first)) if np.isfinite(first).any() else 0.0
    scaled = np.clip(first, 0, None) / peak if peak > 0 else np.zeros_like(first)
    lines = render_map(scaled, _aspect(result, rows, cols), width, color, truecolor)
    targets = result.targets or [result.target]
    labels = result.labels or [result.label]
    scale = f"drop 0 (dark) .. {peak:.2f} (bright)" if color else f"drop 0 ' ' .. {peak:.2f} '█'"
    what = f"class {targets[0]} '{labels[0]}': " if len(drops) > 1 else ""
    lines.append(f"{what}{scale}")
    if len(drops) == 1:
        found = top_regions(first)
        lines.append("top regions by drop:" + ("" if found else " none (no cell lowers the score)"))
        lines += [f"  {n}. " + region_text(result.box(i, j), first[i, j])
                  for n, (i, j) in enumerate(found, 1)]
    else:
        lines.append("top region by drop, per target:")
        for target, label, drop in zip(targets, labels, drops):
            found = top_regions(drop, 1)
            where = region_text(result.box(*found[0]), drop[found[0]]) if found else "none"
            lines.append(f"  class {target} '{label}': {where}")
    return "\n".join(lines)


def _volume_preview(result, width: int, color: bool, truecolor: bool) -> str:
    """A volume's map: its slice (along the first axis) through the strongest drop, and
    that cell's patch in voxels."""
    from .volume_overlay import preview_slice, strongest_cell

    index, values = preview_slice(result.heatmap, result.probability)
    drop = np.asarray(result.probability - values, np.float64)
    peak = float(np.nanmax(drop)) if np.isfinite(drop).any() else 0.0
    scaled = np.clip(drop, 0, None) / peak if peak > 0 else np.zeros_like(drop)
    rows, cols = drop.shape
    aspect = (rows * result.stride[1]) / max(cols * result.stride[2], 1)
    lines = render_map(scaled, aspect, width, color, truecolor)
    lines.append(f"slice {index} of {result.heatmap.shape[0]} (axis 0), through the strongest drop; "
                 + (f"drop 0 (dark) .. {peak:.2f} (bright)" if color else f"drop 0 ' ' .. {peak:.2f} '█'"))
    cell = strongest_cell(result.heatmap, result.probability)
    first = [(o + c) * s for o, c, s in zip(result.offset, cell, result.stride)]
    lines.append(f"strongest drop {result.probability - float(result.heatmap[cell]):.3f}: patch at voxel "
                 f"({', '.join(map(str, first))}), {'x'.join(map(str, result.patch))} voxels")
    return "\n".join(lines)


def color_wanted(stream: TextIO) -> Optional[str]:
    """``'truecolor'``, ``'256'`` or None (plain): colour only on a terminal, never with
    ``NO_COLOR`` set (https://no-color.org), 24-bit where ``COLORTERM`` says so."""
    if os.environ.get("NO_COLOR", "") != "" or not _isatty(stream):
        return None
    if os.environ.get("TERM", "") == "dumb":
        return None
    return "truecolor" if os.environ.get("COLORTERM", "") in ("truecolor", "24bit") else "256"


def terminal_width(stream: TextIO, most: int = 80) -> int:
    """The terminal's columns (``most`` at most; ``most`` when not a terminal)."""
    if not _isatty(stream):
        return most
    return max(20, min(most, shutil.get_terminal_size((most, 24)).columns))


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def for_stream(result, stream: TextIO) -> str:
    """:func:`preview` as it suits ``stream``: its width, colour if it takes colour."""
    mode = color_wanted(stream)
    return preview(result, terminal_width(stream), mode is not None, mode == "truecolor")


def fit_table(rows: list, width: int) -> str:
    """A SHOW table (columns two spaces apart, a header and a rule), its last column
    wrapped so that the lines fit in ``width``; as it is when it fits, or when the last
    column would get fewer than 20 characters.

    >>> print(fit_table([{"setting": "tau", "description": "the threshold of the projective field"}], 34))
    setting  description
    -------  -------------------------
    tau      the threshold of the
             projective field
    """
    cols = list(rows[0])
    cells = [["" if r.get(c) is None else str(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    room = width - sum(widths[:-1]) - 2 * (len(cols) - 1)
    wrap = sum(widths) + 2 * (len(cols) - 1) > width and room >= 20
    if wrap:
        widths[-1] = room
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()
    out = [line(cols), line(["-" * w for w in widths])]
    for row in cells:
        pieces = (textwrap.wrap(row[-1], room) if wrap else [row[-1]]) or [""]
        out.append(line(row[:-1] + pieces[:1]))
        out += [line([""] * (len(cols) - 1) + [piece]) for piece in pieces[1:]]
    return "\n".join(out)
