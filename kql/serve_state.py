"""The state of ``kql serve`` (:mod:`kql.serve`): the :class:`Viewer` (one connection, its
locks, the kept results and uploads, the progress), how it checks an image or a model
name into query text, and what a kept result or upload weighs."""

from __future__ import annotations

import glob
import os
import re
import secrets
import tempfile
import threading

from .errors import KqlError
from .catalog.images import SAMPLES
from .progress import RunProgress
from .serve_guard import ApiError, BoundedStore, inside, new_token, shown

MAX_UPLOAD = 20 * 1024 * 1024           # bytes of one uploaded image file
KEEP_RESULTS = 20                       # results kept in memory for their overlay PNG
KEEP_UPLOADS = 16                       # uploaded images kept (the oldest is dropped)
KEEP_BYTES = 512 << 20                  # bytes of the kept uploads, and of the kept results
DECODE_BYTES = 16                       # peak bytes a pixel costs while a file is decoded
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SAMPLE = re.compile(r"(?:sample:|sample\(')([a-z_]+)(?:'\))?\Z")


class Viewer:
    """The server's state: one connection, its lock, the kept results and uploads (bounded
    stores), the progress of the query that runs, the token of state-changing requests."""

    def __init__(self, con, roots: list, max_upload: int = MAX_UPLOAD,
                 keep_uploads: int = KEEP_UPLOADS, keep_bytes: int = KEEP_BYTES):
        self.con, self.roots, self.max_upload = con, roots, max_upload
        self.lock = threading.Lock()            # the engine: one statement at a time
        self.running = threading.Lock()         # one OCCLUDE request at a time (else 409)
        self.decoding = threading.Lock()        # one upload decoded at a time (its peak)
        self.token = new_token()
        self.progress = RunProgress()
        self.results = BoundedStore(KEEP_RESULTS, keep_bytes, _result_bytes)
        self.uploads = BoundedStore(keep_uploads, keep_bytes, _tensor_bytes, self._forget_upload)

    def execute(self, text: str, phase: str | None = None):
        """Run ``text``; with ``phase`` (an OCCLUDE), its progress is reported as it runs."""
        with self.lock:
            if phase:
                self.progress.start(phase)
            try:
                return self.con.execute(text, progress=self.progress if phase else None)
            except KqlError as exc:
                raise ApiError(400, _one_line(exc)) from None
            finally:
                if phase:
                    self.progress.stop()

    def tables(self) -> set:
        """The names of the catalog's image tables (LOAD IMAGES: many images each)."""
        return {row["name"] for row in self.con.catalog.table_rows()}

    def pixel_limit(self) -> tuple:
        """``(pixels, why)``: the most pixels an image file the viewer decodes may have:
        ``SET max_image_pixels``, and no more than ``SET memory_limit`` holds while it is
        decoded (16 bytes a pixel at the peak); ``why`` names the memory limit when it is
        the smaller, else ''."""
        from .planner.memory import allowed, size_text

        settings = self.con.settings
        limit = allowed(settings["memory_limit"], "cpu")
        pixels = max(1, limit // DECODE_BYTES)
        if pixels >= int(settings["max_image_pixels"]):
            return int(settings["max_image_pixels"]), ""
        return pixels, f"memory_limit {size_text(limit)} decodes at most {pixels:,} pixels"

    def _forget_upload(self, name: str, tensor) -> None:
        with self.lock:
            self.con.catalog.forget_image(name)

    def names(self, what: str) -> list:
        return [row["name"] for row in self.execute(f"SHOW {what}").rows]

    def image_ref(self, image) -> str:
        """The image as query text: a catalog name, ``sample('x')`` or a quoted path."""
        if not isinstance(image, str) or not image:
            raise ApiError(400, "image must be a catalog image, a sample name or a quoted path")
        sample = _SAMPLE.match(image)
        if sample:
            if sample.group(1) not in SAMPLES:
                raise ApiError(400, f"unknown sample image '{sample.group(1)}'")
            return f"sample('{sample.group(1)}')"
        if image[0] in "'\"" and image[-1] == image[0] and len(image) > 2:
            return self._path_ref(image[1:-1])
        sources = {row["name"]: row["source"] for row in self.execute("SHOW IMAGES").rows}
        if not _NAME.match(image) or image not in sources:
            raise ApiError(400, f"unknown image {shown(image)}; GET /api/images lists them")
        if image in self.tables():
            raise ApiError(400, f"'{image}' is an image table: the viewer shows one image at a "
                                "time (kql runs a query over many)")
        if os.path.isabs(sources[image]) and not inside(sources[image], self.roots):
            raise ApiError(403, f"image '{image}' is a file outside the catalog directory and the "
                                "working directory")
        return image

    def _path_ref(self, path: str) -> str:
        """A quoted path, symbolic links resolved, that names one file inside the roots;
        nothing is opened (a glob is refused, not expanded)."""
        if any(c in path for c in "'\"") or any(ord(c) < 32 for c in path):
            raise ApiError(400, "an image path must not hold quotes or control characters")
        try:
            os.fsencode(path)
        except UnicodeError:
            raise ApiError(400, "an image path must be text the file system can encode") from None
        if not inside(path, self.roots):
            raise ApiError(403, "image files must lie in the catalog directory or the working directory")
        real = os.path.realpath(path)
        if glob.has_magic(real) and not os.path.exists(real):
            raise ApiError(400, "the viewer reads one image file: a path with *, ? or [...] is a "
                                "glob of many (kql runs a query over them)")
        if os.path.isdir(real):
            raise ApiError(400, "the viewer reads one image file, not a folder")
        return f"'{real}'"

    def model_ref(self, model) -> str:
        if not isinstance(model, str) or not _NAME.match(model) or model not in self.names("MODELS"):
            raise ApiError(400, f"unknown model {shown(model)}; GET /api/models lists them")
        return model

    def keep(self, result) -> str:
        key = secrets.token_hex(8)
        self.results.put(key, {"result": result, "png": None})
        return key

    def overlay(self, key: str) -> bytes:
        entry = self.results.get(key)
        if entry is None:
            raise ApiError(404, f"no result {shown(key)} (only the last few are kept)")
        if entry["png"] is None:
            with self.lock:
                entry["png"] = overlay_png(entry["result"])
        return entry["png"]


def overlay_png(result) -> bytes:
    """The result's PNG overlay (:meth:`kql.results.result.Result.save`) as bytes."""
    if hasattr(result, "_repr_png_"):
        return result._repr_png_()
    with tempfile.TemporaryDirectory(prefix="kql-serve-") as folder:
        path = result.save(os.path.join(folder, "overlay.png"))
        with open(path, "rb") as fh:
            return fh.read()


def _tensor_bytes(tensor) -> int:
    return tensor.element_size() * tensor.nelement()


def _result_bytes(entry: dict) -> int:
    """The bytes a kept result holds: its images and maps."""
    result = entry["result"]
    tensors = [t for t in (result.image, result.original) if t is not None]
    maps = [m for m in (result.heatmap, result.heatmaps) if m is not None]
    return sum(_tensor_bytes(t) for t in tensors) + sum(m.nbytes for m in maps)


def _one_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
