"""Writing heat maps: a PNG overlay (drawn by :mod:`kql.overlay`), raw .npy, or a Parquet row.

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
from .overlay import extent as _extent  # noqa: F401  (where it was; tests import it)


def save(result, path: str, **overlay_options) -> str:
    """Write ``result`` (a :class:`kql.api.Result` of OCCLUDE) to .png, .npy or .parquet;
    ``overlay_options`` (:data:`kql.overlay.OPTIONS`, checked for every format) draw the PNG."""
    from .overlay import checked

    ext = os.path.splitext(path)[1].lower()
    if ext not in WRITERS:
        raise KqlExecutionError(f"cannot save to '{path}': use a {formats_text()} file")
    options = checked(overlay_options) if overlay_options else {}
    try:
        # Through a hidden .kql-* file; the map gets the usual mode, not mkstemp's 0600.
        atomic_write(path, lambda tmp: WRITERS[ext](result, tmp, options), mode=None,
                     private=False)
    except OSError as exc:
        raise KqlExecutionError(f"cannot write '{path}': {exc.strerror or exc}") from None
    return path


def formats_text() -> str:
    """The file types INTO and :func:`save` accept, for messages."""
    return ", ".join(FORMATS[:-1]) + " or " + FORMATS[-1]


def _npy(result, tmp: str, options: dict) -> None:
    """The map ``[rows, cols]``; with several targets all of them, ``[targets, rows, cols]``."""
    maps = result.heatmaps if result.heatmaps is not None else result.heatmap[None]
    with open(tmp, "wb") as fh:
        np.save(fh, maps if len(maps) > 1 else maps[0])


def _parquet(result, tmp: str, options: dict) -> None:
    import pyarrow.parquet as pq

    pq.write_table(result.to_arrow(), tmp)


def _png(result, tmp: str, options: dict) -> None:
    """The overlay of :mod:`kql.overlay`: each map over the image as the user gave it."""
    from .overlay import write_png

    write_png(result, tmp, **options)


# The one list of output formats (the INTO check of the planner uses it too).
WRITERS = {".png": _png, ".npy": _npy, ".parquet": _parquet}
FORMATS = tuple(WRITERS)
