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
    """The map ``[rows, cols]``; with several targets all of them, ``[targets, rows, cols]``."""
    maps = result.heatmaps if result.heatmaps is not None else result.heatmap[None]
    with open(tmp, "wb") as fh:
        np.save(fh, maps if len(maps) > 1 else maps[0])


def _parquet(result, tmp: str) -> None:
    import pyarrow.parquet as pq

    pq.write_table(result.to_arrow(), tmp)


def _png(result, tmp: str) -> None:
    """The image as the user gave it (before the model's resize), each map drawn over it
    where its patches lie; one panel per target, side by side."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    picture = result.original if result.original is not None else result.image
    image = picture.permute(1, 2, 0).numpy()
    grey = image.shape[2] == 1
    image = image[:, :, 0] if grey else image
    height, width = image.shape[:2]
    maps = result.heatmaps if result.heatmaps is not None else result.heatmap[None]
    labels = result.labels or [result.label]
    scores = result.base_scores or [result.probability]
    extent = _extent(result)
    panels = len(maps)
    fig = Figure(figsize=(6.4 * panels, 6.4 * height / width + 0.6), dpi=100)
    what = "logit" if result.output == "logits" else "P"
    for k, (values, label, score) in enumerate(zip(maps, labels, scores)):
        ax = fig.add_subplot(1, panels, k + 1)
        ax.imshow(image, extent=(0, width, height, 0), cmap="gray" if grey else None,
                  vmin=0.0, vmax=1.0)
        shown = ax.imshow(values, cmap="jet_r", alpha=0.5, extent=extent,
                          interpolation="nearest", vmin=float(values.min()),
                          vmax=float(values.max()))
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_axis_off()
        ax.set_title(f"{result.model}: {what}({label}) = {score:.3f} unoccluded", fontsize=10)
        bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
        bar.set_label(f"{what}({label}) with the patch here")
    fig.savefig(tmp, format="png", bbox_inches="tight")


def _extent(result) -> tuple:
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


# The one list of output formats (the INTO check of the planner uses it too).
WRITERS = {".png": _png, ".npy": _npy, ".parquet": _parquet}
FORMATS = tuple(WRITERS)
