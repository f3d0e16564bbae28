"""``kql serve``: a local web viewer of heat maps (FastAPI; the page lies in kql/web/).

The page picks a model and an image (or uploads one), draws a REGION with the mouse,
runs OCCLUDE, shows the map over the image, the PNG overlay and the plan, a cell's value
when it is clicked, and the exact and the approximate map side by side. Its JSON API:

    GET  /api/session                the token every POST sends (X-KQL-Token) and the limits
    GET  /api/models                 the catalog's models (SHOW MODELS)
    GET  /api/images                 the catalog's images (SHOW IMAGES) and the sample names
    POST /api/upload                 a PNG/JPEG/DICOM file -> {name}, registered in the session
    POST /api/occlude                {model, image, patch, stride, region, ssim, compare}
    GET  /api/progress               the positions done of the query that runs, and an ETA
    GET  /api/result/{id}/overlay.png
    GET  /api/image/{image}.png      the original image, for drawing a region on

Every query runs through one :func:`kql.connect` connection, one at a time (the engine
is not thread-safe; a second is refused with 409). Query text is built only from checked
parts: names from the catalog's lists or the sample names, numbers in range, file paths
inside the catalog directory or the working directory (symbolic links resolved; a glob
or a folder is refused: the viewer reads one image file). Uploads are read by the same
bounded readers as every image file and kept in a bounded store; :mod:`kql.serve_guard`
refuses cross-site requests and large bodies. Errors come back as
``{"error": "one line"}`` with a 4xx status.

>>> query_text(model="efficientnet_lite0", image="sample('chelsea')", patch=32, stride=16,
...            region=(0, 0, 100, 80), ssim=0.9)
"OCCLUDE sample('chelsea') USING efficientnet_lite0 PATCH 32 STRIDE 16 REGION (0, 0, 100, 80) WITH SSIM >= 0.9"
"""

from __future__ import annotations

import glob
import io
import os
import re
import secrets
import socket
import sys
import tempfile
import threading

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .errors import KqlError
from .catalog.images import SAMPLES
from .progress import RunProgress
from .serve_guard import (TOKEN_HEADER, ApiError, BoundedStore, Guard, check_fields, check_flag,
                          check_region, check_ssim, inside, new_token, shown, whole)

WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
MAX_UPLOAD = 20 * 1024 * 1024           # bytes of one uploaded image file
KEEP_RESULTS = 20                       # results kept in memory for their overlay PNG
KEEP_UPLOADS = 16                       # uploaded images kept (the oldest is dropped)
KEEP_BYTES = 512 << 20                  # bytes of the kept uploads, and of the kept results
DECODE_BYTES = 16                       # peak bytes a pixel costs while a file is decoded
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SAMPLE = re.compile(r"(?:sample:|sample\(')([a-z_]+)(?:'\))?\Z")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


# -- query text from checked parts ------------------------------------------------------------

def query_text(*, model: str, image: str, patch: int, stride: int, region=None, ssim=None) -> str:
    """The OCCLUDE statement of already checked parts (see :func:`check_request`)."""
    text = f"OCCLUDE {image} USING {model} PATCH {patch} STRIDE {stride}"
    if region is not None:
        text += " REGION ({}, {}, {}, {})".format(*region)
    return text + (f" WITH SSIM >= {ssim:g}" if ssim is not None else "")


# -- the app ------------------------------------------------------------------------------------

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


def create_app(con=None, catalog_dir: str | None = None, *, max_upload: int = MAX_UPLOAD,
               allowed_hosts: list | None = None, keep_uploads: int = KEEP_UPLOADS,
               keep_bytes: int = KEEP_BYTES) -> FastAPI:
    """The viewer around ``con`` (default: ``kql.connect(catalog_dir)``).

    File paths are allowed in the catalog directory and the working directory;
    ``allowed_hosts`` (e.g. ``["127.0.0.1", "localhost"]``) refuses other Host headers.
    At most ``keep_uploads`` uploads and ``keep_bytes`` bytes of their pixels are kept (the
    oldest go first), and as many bytes of results.
    """
    from . import api as kql_api
    con = con if con is not None else kql_api.connect(catalog_dir)
    folder = catalog_dir if catalog_dir is not None else getattr(con.catalog, "directory", None)
    roots = [os.getcwd()] + ([folder] if isinstance(folder, str) else [])
    viewer = Viewer(con, roots, max_upload, keep_uploads, keep_bytes)
    app = FastAPI(title="KQL viewer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.viewer = viewer
    app.add_middleware(Guard, token=viewer.token, upload_path="/api/upload", max_upload=max_upload)
    if allowed_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    _errors(app)
    _routes(app, viewer)
    app.mount("/static", StaticFiles(directory=WEB), name="static")
    return app


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        return JSONResponse({"error": f"bad request: {first.get('msg', 'invalid body')}"},
                            status_code=400)

    @app.exception_handler(Exception)
    async def internal(request, exc: Exception):     # a bug, still one line, no traceback
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: "
                                      f"{shown(_one_line(exc), 200)}"}, status_code=500)


def _routes(app: FastAPI, viewer: Viewer) -> None:
    @app.get("/")
    def index():
        return FileResponse(os.path.join(WEB, "index.html"))

    @app.get("/api/session")
    def session():
        return {"token": viewer.token, "header": TOKEN_HEADER, "max_upload": viewer.max_upload}

    @app.get("/api/models")
    def models():
        return {"models": viewer.execute("SHOW MODELS").rows}

    @app.get("/api/images")
    def images():
        tables = viewer.tables()
        singles = [r for r in viewer.execute("SHOW IMAGES").rows if r["name"] not in tables]
        return {"images": singles, "samples": list(SAMPLES)}

    @app.post("/api/occlude")
    def occlude(body: dict):
        return run_occlude(viewer, body)

    @app.get("/api/progress")
    def progress():
        return viewer.progress.state()

    @app.post("/api/upload")
    async def upload(request: Request):
        data = await _upload_bytes(request, viewer.max_upload)
        return await run_in_threadpool(register_upload, viewer, data)

    @app.get("/api/result/{key}/overlay.png")
    def overlay(key: str):
        return Response(viewer.overlay(key), media_type="image/png")

    @app.get("/api/image/{image}.png")
    def original(image: str):
        return Response(image_png(viewer, viewer.image_ref(image)), media_type="image/png")


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


def image_png(viewer: Viewer, ref: str) -> bytes:
    """The image of a checked reference as a PNG, as the user gave it."""
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


# -- running it -------------------------------------------------------------------------------

def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn listens on it); OSError when it cannot be."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def serve(host: str = "127.0.0.1", port: int = 8765, catalog: str | None = None) -> int:
    """``kql serve``: run the viewer until Ctrl-C; the exit status."""
    import uvicorn
    local = host in LOCAL_HOSTS
    if not local:
        print(f"warning: serving on {host}: anyone who can reach this machine can run "
              "queries and read images in the catalog and working directories", file=sys.stderr)
    try:
        sock = listen(host, port)
    except OSError as exc:
        print(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    app = create_app(catalog_dir=catalog, allowed_hosts=list(LOCAL_HOSTS) if local else None)
    where = f"[{host}]" if ":" in host else host
    print(f"kql serve: http://{where}:{sock.getsockname()[1]}/ (Ctrl-C stops)", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])
    return 0
