"""The work behind the routes of ``kql serve`` (:mod:`kql.serve`): the query text of
checked parts, OCCLUDE (one map or the exact and the approximate one) and its JSON, an
upload read and registered, an image as PNG bytes."""

from __future__ import annotations

import io
import os
import secrets
import tempfile

from fastapi import Request

from .errors import KqlError
from .serve_guard import (ApiError, check_fields, check_flag, check_region, check_ssim, shown,
                          whole)
from .serve_state import Viewer, _one_line


# -- query text from checked parts ------------------------------------------------------------

def query_text(*, model: str, image: str, patch: int, stride: int, region=None, ssim=None) -> str:
    """The OCCLUDE statement of already checked parts (see :func:`check_request`)."""
    text = f"OCCLUDE {image} USING {model} PATCH {patch} STRIDE {stride}"
    if region is not None:
        text += " REGION ({}, {}, {}, {})".format(*region)
    return text + (f" WITH SSIM >= {ssim:g}" if ssim is not None else "")


# -- the handlers' work -------------------------------------------------------------------------

def run_occlude(viewer: Viewer, body: dict) -> dict:
    """POST /api/occlude: one map, or with ``compare`` the exact and the approximate one."""
    check_fields(body)
    model = viewer.model_ref(body.get("model"))
    image = viewer.image_ref(body.get("image"))
    parts = dict(model=model, image=image, patch=whole(body.get("patch"), "patch", 1),
                 stride=whole(body.get("stride", body.get("patch")), "stride", 1),
                 region=check_region(body.get("region")))
    ssim = check_ssim(body.get("ssim"))
    compare = check_flag(body.get("compare"), "compare")
    if not viewer.running.acquire(blocking=False):
        raise ApiError(409, "another query is running (GET /api/progress shows how far it is); "
                            "run this one when it is done")
    try:
        if not compare:
            return describe(viewer, viewer.execute(query_text(**parts, ssim=ssim), "heat map"))
        return compare_maps(viewer, parts, ssim if ssim is not None else 0.9)
    finally:
        viewer.running.release()


def compare_maps(viewer: Viewer, parts: dict, ssim: float) -> dict:
    """The approximate map (WITH SSIM >= ``ssim``), the exact one and their SSIM; when the
    planner made the approximate query exact, that one map (run once) and a ``note`` why."""
    from .planner.tuning import heatmap_ssim

    approx = viewer.execute(query_text(**parts, ssim=ssim), "approximate map")
    why = exact_anyway(approx, ssim)
    if why:
        return {"exact": describe(viewer, approx), "approx": None, "ssim": None, "note": why}
    exact = viewer.execute(query_text(**parts), "exact map")
    same = exact.heatmap.shape == approx.heatmap.shape
    return {"exact": describe(viewer, exact), "approx": describe(viewer, approx),
            "ssim": heatmap_ssim(exact.heatmap, approx.heatmap) if same else None, "note": None}


def exact_anyway(result, ssim: float) -> str | None:
    """Why the result of an OCCLUDE ... WITH SSIM is the exact map; None when it is not."""
    from .operators.verified import WINDOW, checkable

    if result.check is not None:
        return f"{result.quality()}; it ran once" if result.check["exact"] else None
    if result.tau < 1.0 or result.exactness.startswith("approximate"):
        return None
    rows, cols = result.heatmap.shape
    if not checkable((rows, cols)):
        return (f"this {rows}x{cols} map is too small for the approximate check (a check window "
                f"is {WINDOW}x{WINDOW} cells): WITH SSIM >= {ssim:g} planned the exact map; it ran once")
    return (f"WITH SSIM >= {ssim:g} planned the exact map for this {rows}x{cols} map (too small "
            f"for the check to pay, or no approximation predicted cheaper); it ran once")


def describe(viewer: Viewer, result) -> dict:
    """The JSON of one OCCLUDE result; ``boxes[i][j]`` is cell (i, j)'s patch (x, y, w, h)
    in the original image's pixels."""
    if result.volume:
        return describe_volume(viewer, result)
    key = viewer.keep(result)
    rows, cols = result.heatmap.shape
    picture = result.original if result.original is not None else result.image
    return {
        "id": key, "query": result.query, "rows": rows, "cols": cols, "positions": rows * cols,
        "values": result.heatmap.tolist(), "probability": result.probability,
        "label": result.label, "target": result.target, "plan": result.plan,
        "seconds": result.seconds, "tau": result.tau, "predicted_ssim": result.predicted_ssim,
        "tuning": result.tuning, "patch": list(result.patch), "stride": list(result.stride),
        "offset": list(result.offset), "output": result.output,
        "width": int(picture.shape[2]), "height": int(picture.shape[1]),
        "boxes": [[[round(float(v), 3) for v in result.box(i, j)] for j in range(cols)]
                  for i in range(rows)],
        "overlay_url": f"/api/result/{key}/overlay.png",
    }


def describe_volume(viewer: Viewer, result) -> dict:
    """A volume's map as the page browses it, slice by slice along the first axis:
    ``values[s][i][j]``, each map slice's first voxel slice (``slice_first``) and the
    patch's depth, and ``boxes[i][j]`` the cell's patch in a slice's voxels (x, y, w, h)."""
    key = viewer.keep(result)
    slices, rows, cols = result.heatmap.shape
    (pd, ph, pw), (sd, sy, sx), (d0, r0, c0) = result.patch, result.stride, result.offset
    depth, height, width = (int(v) for v in result.image.shape[1:])
    return {
        "id": key, "query": result.query, "volume": True, "slices": slices, "rows": rows,
        "cols": cols, "positions": slices * rows * cols, "values": result.heatmap.tolist(),
        "probability": result.probability, "label": result.label, "target": result.target,
        "plan": result.plan, "seconds": result.seconds, "tau": result.tau,
        "predicted_ssim": result.predicted_ssim, "tuning": result.tuning,
        "patch": list(result.patch), "stride": list(result.stride), "offset": list(result.offset),
        "output": result.output, "depth": depth, "width": width, "height": height,
        "slice_first": [(d0 + s) * sd for s in range(slices)], "slice_patch": pd,
        "boxes": [[[(c0 + j) * sx, (r0 + i) * sy, pw, ph] for j in range(cols)] for i in range(rows)],
        "overlay_url": f"/api/result/{key}/overlay.png",
    }


async def _upload_bytes(request: Request, limit: int) -> bytes:
    """The one file of a multipart upload, refused (413) past ``limit`` bytes."""
    too_large = ApiError(413, f"upload too large: the limit is {limit / 1e6:g} MB")
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        raise ApiError(411, "an upload needs a Content-Length")
    if int(length) > limit + 64 * 1024:
        raise too_large
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "an upload is multipart/form-data with one 'file'")
    form = await request.form(max_files=1, max_fields=4)
    upload = next((v for v in form.values() if hasattr(v, "read")), None)
    if upload is None:
        raise ApiError(400, "no file in the upload (send multipart/form-data with a 'file')")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise too_large
    return data


def register_upload(viewer: Viewer, data: bytes) -> dict:
    """Decode an uploaded file (PNG, JPEG, DICOM, ...) with the readers every image file goes
    through, within :meth:`Viewer.pixel_limit`, one at a time; register it as
    ``upload_<hex>`` and keep it in the bounded store (the oldest upload goes first)."""
    from .catalog.images import read_image
    name = f"upload_{secrets.token_hex(4)}"
    pixels, why = viewer.pixel_limit()
    with viewer.decoding, tempfile.TemporaryDirectory(prefix="kql-upload-") as folder:
        path = os.path.join(folder, "upload")
        with open(path, "wb") as fh:
            fh.write(data)
        del data
        try:
            tensor = read_image(path, max_pixels=pixels).tensor
        except KqlError as exc:
            message = _one_line(exc).replace(path, "the upload")
            raise ApiError(400, message + (f" ({why})" if why and "max_image_pixels" in message
                                           else "")) from None
        except (ValueError, OSError, MemoryError, RuntimeError) as exc:   # a reader's slip
            raise ApiError(400, f"cannot read the upload: {shown(_one_line(exc), 160)}") from None
    with viewer.lock:
        viewer.con.register_image(name, tensor)
    viewer.uploads.put(name, tensor)
    return {"name": name, "height": int(tensor.shape[1]), "width": int(tensor.shape[2])}


def image_png(viewer: Viewer, ref: str, index: int | None = None) -> bytes:
    """The image of a checked reference as a PNG, as the user gave it; a volume's slice
    ``index`` along its first axis (default: the middle one), in the grey window of the
    whole scan (:func:`~kql.results.volume_overlay.grey_window`: every slice alike)."""
    from .catalog import images
    pixels, _ = viewer.pixel_limit()
    with viewer.lock:
        try:
            if ref.startswith("sample("):
                tensor = images.load_sample(ref[8:-2])
            elif ref.startswith("'"):
                tensor = images.load_file(ref[1:-1], max_pixels=pixels)
            else:
                tensor = viewer.con.catalog.resolve_image(ref, max_pixels=pixels)
        except KqlError as exc:
            raise ApiError(400, _one_line(exc)) from None
    if tensor.dim() == 4:
        depth = int(tensor.shape[1])
        index = depth // 2 if index is None else index
        if index >= depth:
            raise ApiError(400, f"slice {index} is past the volume's last ({depth - 1})")
        from .results.volume_overlay import grey_window

        low, high = grey_window(tensor)
        return tensor_png(((tensor[:, index] - low) / (high - low)).clamp(0, 1))
    return tensor_png(tensor)


def tensor_png(tensor) -> bytes:
    """``[C, H, W]`` floats in [0, 1] as PNG bytes.

    >>> import torch
    >>> tensor_png(torch.zeros(1, 2, 3))[:4]
    b'\\x89PNG'
    """
    import numpy as np
    from PIL import Image
    pixels = (tensor.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(out, "PNG")
    return out.getvalue()
