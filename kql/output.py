"""Writing heat maps: PNG overlay with a colour bar, raw .npy, or a Parquet row.

Every writer goes through :func:`kql.fileio.atomic_write`: the data lands in a temporary
file in the target directory and is renamed into place, so a failure leaves nothing
half-written.

>>> FORMATS, formats_text()
(('.png', '.npy', '.parquet'), '.png, .npy or .parquet')
"""

from __future__ import annotations

import os

import numpy as np

from .errors import KqlExecutionError
from .fileio import atomic_write


def save(result, path: str) -> str:
    """Write ``result`` (a :class:`kql.api.Result` of OCCLUDE) to .png, .npy or .parquet."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in WRITERS:
        raise KqlExecutionError(f"cannot save to '{path}': use a {formats_text()} file")
    try:
        # Through a hidden .kql-* file; the map gets the usual mode, not mkstemp's 0600.
        atomic_write(path, lambda tmp: WRITERS[ext](result, tmp), mode=None, private=False)
    except OSError as exc:
        raise KqlExecutionError(f"cannot write '{path}': {exc.strerror or exc}") from None
    return path


def formats_text() -> str:
    """The file types INTO and :func:`save` accept, for messages."""
    return ", ".join(FORMATS[:-1]) + " or " + FORMATS[-1]


def _npy(result, tmp: str) -> None:
    with open(tmp, "wb") as fh:
        np.save(fh, result.heatmap)


def _parquet(result, tmp: str) -> None:
    import pyarrow.parquet as pq

    pq.write_table(result.to_arrow(), tmp)


def _png(result, tmp: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    image = result.image.permute(1, 2, 0).numpy()
    height, width = image.shape[:2]
    (ph, pw), (sy, sx) = result.patch, result.stride
    r0, c0 = result.offset
    rows, cols = result.heatmap.shape
    # Each cell is drawn centred on its patch, one stride wide.
    top = r0 * sy + ph / 2 - sy / 2
    left = c0 * sx + pw / 2 - sx / 2
    extent = (left, left + cols * sx, top + rows * sy, top)
    fig = Figure(figsize=(6.4, 6.4 * height / width + 0.6), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(image, extent=(0, width, height, 0))
    shown = ax.imshow(result.heatmap, cmap="jet_r", alpha=0.5, extent=extent,
                      interpolation="nearest", vmin=float(result.heatmap.min()),
                      vmax=float(result.heatmap.max()))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()
    ax.set_title(f"{result.model}: P({result.label}) = {result.probability:.3f} unoccluded",
                 fontsize=10)
    bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label(f"P({result.label}) with the patch here")
    fig.savefig(tmp, format="png", bbox_inches="tight")


# The one list of output formats (the INTO check of the planner uses it too).
WRITERS = {".png": _png, ".npy": _npy, ".parquet": _parquet}
FORMATS = tuple(WRITERS)
