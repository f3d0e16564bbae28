"""Writing heat maps: a PNG overlay (drawn by :mod:`kql.results.overlay`; a volume's three
orthogonal slices by :mod:`kql.results.volume_overlay`), raw .npy, a Parquet row, or a
volume's map as NIfTI (.nii, .nii.gz) with the scan's affine, to open over the scan.

Every writer goes through :func:`kql.fileio.atomic_write`: the data lands in a temporary
file in the target directory and is renamed into place, so a failure leaves nothing
half-written.

>>> FORMATS, formats_text()
(('.png', '.npy', '.parquet', '.nii', '.nii.gz'), '.png, .npy, .parquet, .nii or .nii.gz')
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from ..errors import KqlExecutionError, shorten
from ..fileio import atomic_write
from ..language.parser import path_problem
from ..planner.logical import fail
from .overlay import extent as _extent  # noqa: F401  (where it was; tests import it)


def save(result, path: str, **overlay_options) -> str:
    """Write ``result`` (a :class:`kql.api.Result` of OCCLUDE) to .png, .npy or .parquet;
    ``overlay_options`` (:data:`kql.results.overlay.OPTIONS`, checked for every format) draw the PNG."""
    from .overlay import checked

    ext = extension(path)
    if ext not in WRITERS:
        raise KqlExecutionError(f"cannot save to '{path}': use a {formats_text()} file")
    options = checked(overlay_options) if overlay_options else {}
    if ext in NIFTI:
        return _nifti(result, path)
    try:
        # Through a hidden .kql-* file; the map gets the usual mode, not mkstemp's 0600.
        atomic_write(path, lambda tmp: WRITERS[ext](result, tmp, options), mode=None,
                     private=False)
    except OSError as exc:
        raise KqlExecutionError(f"cannot write '{path}': {exc.strerror or exc}") from None
    return path


def extension(path: str) -> str:
    """The output format a path names: its extension, ``.nii.gz`` taken whole."""
    lower = path.lower()
    return ".nii.gz" if lower.endswith(".nii.gz") else os.path.splitext(lower)[1]


def _nifti(result, path: str) -> str:
    """A volume's map (the first target's) as NIfTI, its affine the scan's with each cell
    at its patch's centre (:func:`~kql.catalog.volumes.map_affine`; no affine: voxel units)."""
    from .nifti import map_affine, write_nifti

    if result.heatmap.ndim != 3:
        raise KqlExecutionError(f"cannot save to '{path}': a NIfTI file holds a volume's map; "
                                f"this map is an image's")
    affine = result.image_info.get("affine", np.eye(4))
    write_nifti(path, result.heatmap, map_affine(affine, result.patch, result.stride, result.offset))
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
    """The overlay of :mod:`kql.results.overlay`: each map over the image as the user gave
    it; a volume's, three orthogonal slices through the strongest drop."""
    if result.volume:
        from .volume_overlay import result_png

        with open(tmp, "wb") as fh:
            fh.write(result_png(result, **options))
        return
    from .overlay import write_png

    write_png(result, tmp, **options)


# The one list of output formats (the INTO check of the planner uses it too).
NIFTI = (".nii", ".nii.gz")
WRITERS = {".png": _png, ".npy": _npy, ".parquet": _parquet, ".nii": None, ".nii.gz": None}
FORMATS = tuple(WRITERS)


# -- the INTO check -------------------------------------------------------------------------

def check_into(plan, ctx=None) -> None:
    """Check a query's INTO before anything expensive runs (the front end runs it ahead of
    the planner's rules): a .png, .npy or .parquet file in a directory that exists, that
    the operating system can take (no NUL, encodable, not longer than the file system
    allows). The parser refuses names no file could have at the string's own position;
    this repeats it for statements built in Python, pointing at the INTO clause.

    >>> from types import SimpleNamespace
    >>> from kql.language.parser import parse
    >>> stmt = parse("OCCLUDE img USING net INTO 'map.jpg'")[0]
    >>> check_into(SimpleNamespace(statement=stmt, into=stmt.into), None)
    Traceback (most recent call last):
    ...
    kql.errors.KqlPlanError: line 1, column 23: INTO 'map.jpg': unsupported file type '.jpg'; use .png, .npy, .parquet, .nii or .nii.gz
    >>> check_into(SimpleNamespace(statement=stmt, into="m" * 300 + ".png"), None)
    Traceback (most recent call last):
    ...
    kql.errors.KqlPlanError: line 1, column 23: INTO 'mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm…': the file name is longer than 255 bytes
    >>> check_into(SimpleNamespace(statement=stmt, into=None), None) is None     # no INTO: nothing to check
    True
    """
    into = plan.into
    if into is None:
        return
    problem = path_problem(into) or _too_long(into)
    if problem is not None:
        raise fail(plan.statement, "into", f"INTO '{shorten(into)}': {problem}")
    ext = extension(into)
    if ext not in FORMATS:
        raise fail(plan.statement, "into", f"INTO '{into}': unsupported file type "
                                           f"'{ext or '(none)'}'; use {formats_text()}")
    folder = os.path.dirname(os.path.abspath(into))
    if not os.path.isdir(folder):
        raise fail(plan.statement, "into", f"INTO '{into}': directory '{folder}' does not exist")
    if os.path.isdir(into):
        raise fail(plan.statement, "into", f"INTO '{into}' is a directory")


def _too_long(path: str) -> Optional[str]:
    """Why the file system would refuse ``path`` for its length, or None."""
    limit_name, limit_path = _limits(os.path.dirname(os.path.abspath(path)))
    if len(os.fsencode(os.path.abspath(path))) > limit_path:
        return f"the path is longer than {limit_path} bytes"
    if len(os.fsencode(os.path.basename(path))) > limit_name:
        return f"the file name is longer than {limit_name} bytes"
    return None


def _limits(folder: str) -> tuple[int, int]:
    """The longest file name and path, in bytes, where ``folder`` lies (POSIX defaults)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX"), os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):   # no such folder yet, or not POSIX
        return 255, 4096
