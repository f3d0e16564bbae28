"""``kql serve``: a local web viewer of heat maps (FastAPI; the page lies in kql/web/).

The page picks a model and an image (or uploads one), draws a REGION with the mouse,
runs OCCLUDE, shows the map over the image, the PNG overlay and the plan, a cell's value
when it is clicked, and the exact and the approximate map side by side. Its JSON API:

    GET  /api/models                 the catalog's models (SHOW MODELS)
    GET  /api/images                 the catalog's images (SHOW IMAGES) and the sample names
    POST /api/upload                 a PNG/JPEG/DICOM file -> {name}, registered in the session
    POST /api/occlude                {model, image, patch, stride, region, ssim, compare}
    GET  /api/result/{id}/overlay.png
    GET  /api/image/{image}.png      the original image, for drawing a region on

Every query runs through one :func:`kql.connect` connection, one at a time (the engine
is not thread-safe). Query text is built only from checked parts: names from the
catalog's lists or the sample names, numbers in range, file paths inside the catalog
directory or the working directory. Errors come back as ``{"error": "one line"}``.

>>> query_text(model="efficientnet_lite0", image="sample('chelsea')", patch=32, stride=16,
...            region=(0, 0, 100, 80), ssim=0.9)
"OCCLUDE sample('chelsea') USING efficientnet_lite0 PATCH 32 STRIDE 16 REGION (0, 0, 100, 80) WITH SSIM >= 0.9"
"""

from __future__ import annotations

import io
import os
import re
import secrets
import socket
import sys
import tempfile
import threading
from collections import OrderedDict

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .errors import KqlError
from .images import SAMPLES

WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
MAX_UPLOAD = 20 * 1024 * 1024           # bytes of one uploaded image file
KEEP_RESULTS = 20                       # results kept in memory for their overlay PNG
MAX_SIDE = 100_000                      # the largest patch, stride or region coordinate
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SAMPLE = re.compile(r"(?:sample:|sample\(')([a-z_]+)(?:'\))?\Z")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class ApiError(Exception):
    """An answer other than 200: its HTTP status and a one-line message."""
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# -- query text from checked parts ------------------------------------------------------------

def query_text(*, model: str, image: str, patch: int, stride: int, region=None, ssim=None) -> str:
    """The OCCLUDE statement of already checked parts (see :func:`check_request`)."""
    text = f"OCCLUDE {image} USING {model} PATCH {patch} STRIDE {stride}"
    if region is not None:
        text += " REGION ({}, {}, {}, {})".format(*region)
    return text + (f" WITH SSIM >= {ssim:g}" if ssim is not None else "")


def whole(value, what: str, low: int, high: int = MAX_SIDE) -> int:
    """``value`` as an int in [low, high], else a 400.

    >>> whole(8, "patch", 1)
    8
    >>> whole("8", "patch", 1)
    Traceback (most recent call last):
    ...
    kql.serve.ApiError: patch must be a whole number from 1 to 100000, not '8'
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
            or not low <= value <= high:
        raise ApiError(400, f"{what} must be a whole number from {low} to {high}, not {value!r}")
    return int(value)


def check_region(region) -> tuple | None:
    """``[x, y, w, h]`` (original pixels) as four ints, or None for the whole image.

    >>> check_region([1, 2, 30, 40]), check_region(None)
    ((1, 2, 30, 40), None)
    """
    if region is None:
        return None
    if not isinstance(region, (list, tuple)) or len(region) != 4:
        raise ApiError(400, "region must be [x, y, width, height] in the image's pixels")
    x, y, w, h = region
    return (whole(x, "region x", 0), whole(y, "region y", 0),
            whole(w, "region width", 1), whole(h, "region height", 1))


def check_ssim(ssim) -> float | None:
    """The quality target of WITH SSIM >= s: a number in (0, 1], or None."""
    if ssim is None:
        return None
    if isinstance(ssim, bool) or not isinstance(ssim, (int, float)) or not 0 < ssim <= 1:
        raise ApiError(400, f"ssim must be a number above 0 and at most 1, not {ssim!r}")
    return float(ssim)


def inside(path: str, roots: list) -> bool:
    """Whether ``path`` (symbolic links followed) lies in one of the ``roots``.

    >>> inside("/tmp/a/../b.png", ["/tmp"]), inside("/etc/passwd", ["/tmp"])
    (True, False)
    """
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, os.path.realpath(root)]) == os.path.realpath(root)
               for root in roots)


# -- the app ------------------------------------------------------------------------------------

class Viewer:
    """The server's state: one connection, its lock, the last results and uploads."""

    def __init__(self, con, roots: list, max_upload: int = MAX_UPLOAD):
        self.con, self.roots, self.max_upload = con, roots, max_upload
        self.lock = threading.Lock()
        self.results: OrderedDict = OrderedDict()

    def execute(self, text: str):
        with self.lock:
            try:
                return self.con.execute(text)
            except KqlError as exc:
                raise ApiError(400, _one_line(exc)) from None

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
        if not _NAME.match(image) or image not in self.names("IMAGES"):
            raise ApiError(400, f"unknown image {image!r}; GET /api/images lists them")
        return image

    def _path_ref(self, path: str) -> str:
        if any(c in path for c in "'\"") or any(ord(c) < 32 for c in path):
            raise ApiError(400, "an image path must not hold quotes or control characters")
        if not inside(path, self.roots):
            raise ApiError(403, "image files must lie in the catalog directory or the working directory")
        return f"'{os.path.realpath(path)}'"

    def model_ref(self, model) -> str:
        if not isinstance(model, str) or not _NAME.match(model) or model not in self.names("MODELS"):
            raise ApiError(400, f"unknown model {model!r}; GET /api/models lists them")
        return model

    def keep(self, result) -> str:
        key = secrets.token_hex(8)
        self.results[key] = {"result": result, "png": None}
        while len(self.results) > KEEP_RESULTS:
            self.results.popitem(last=False)
        return key

    def overlay(self, key: str) -> bytes:
        entry = self.results.get(key)
        if entry is None:
            raise ApiError(404, f"no result '{key}' (only the last {KEEP_RESULTS} are kept)")
        if entry["png"] is None:
            with self.lock:
                entry["png"] = overlay_png(entry["result"])
        return entry["png"]


def create_app(con=None, catalog_dir: str | None = None, *, max_upload: int = MAX_UPLOAD,
               allowed_hosts: list | None = None) -> FastAPI:
    """The viewer around ``con`` (default: ``kql.connect(catalog_dir)``).

    File paths are allowed in the catalog directory and the working directory;
    ``allowed_hosts`` (e.g. ``["127.0.0.1", "localhost"]``) refuses other Host headers.
    """
    from . import api as kql_api
    con = con if con is not None else kql_api.connect(catalog_dir)
    folder = catalog_dir if catalog_dir is not None else getattr(con.catalog, "directory", None)
    roots = [os.getcwd()] + ([folder] if isinstance(folder, str) else [])
    viewer = Viewer(con, roots, max_upload)
    app = FastAPI(title="KQL viewer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.viewer = viewer
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


def _routes(app: FastAPI, viewer: Viewer) -> None:
    @app.get("/")
    def index():
        return FileResponse(os.path.join(WEB, "index.html"))

    @app.get("/api/models")
    def models():
        return {"models": viewer.execute("SHOW MODELS").rows}

    @app.get("/api/images")
    def images():
        return {"images": viewer.execute("SHOW IMAGES").rows, "samples": list(SAMPLES)}

    @app.post("/api/occlude")
    def occlude(body: dict):
        return run_occlude(viewer, body)

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
    model = viewer.model_ref(body.get("model"))
    image = viewer.image_ref(body.get("image"))
    parts = dict(model=model, image=image, patch=whole(body.get("patch"), "patch", 1),
                 stride=whole(body.get("stride", body.get("patch")), "stride", 1),
                 region=check_region(body.get("region")))
    ssim = check_ssim(body.get("ssim"))
    if not body.get("compare"):
        return describe(viewer, viewer.execute(query_text(**parts, ssim=ssim)))
    from .planner.tuning import heatmap_ssim
    exact = viewer.execute(query_text(**parts))
    approx = viewer.execute(query_text(**parts, ssim=ssim if ssim is not None else 0.9))
    same = exact.heatmap.shape == approx.heatmap.shape
    return {"exact": describe(viewer, exact), "approx": describe(viewer, approx),
            "ssim": heatmap_ssim(exact.heatmap, approx.heatmap) if same else None}


def describe(viewer: Viewer, result) -> dict:
    """The JSON of one OCCLUDE result; ``boxes[i][j]`` is cell (i, j)'s patch (x, y, w, h)
    in the original image's pixels."""
    key = viewer.keep(result)
    rows, cols = result.heatmap.shape
    picture = result.original if result.original is not None else result.image
    return {
        "id": key, "query": result.query, "rows": rows, "cols": cols,
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
    form = await request.form(max_files=1, max_fields=4)
    upload = next((v for v in form.values() if hasattr(v, "read")), None)
    if upload is None:
        raise ApiError(400, "no file in the upload (send multipart/form-data with a 'file')")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise too_large
    return data


def register_upload(viewer: Viewer, data: bytes) -> dict:
    """Decode an uploaded file (PNG, JPEG, DICOM, ...) and register it as ``upload_<hex>``."""
    from .images import read_image
    name = f"upload_{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="kql-upload-") as folder:
        path = os.path.join(folder, "upload")
        with open(path, "wb") as fh:
            fh.write(data)
        try:
            tensor = read_image(path).tensor
        except KqlError as exc:
            raise ApiError(400, _one_line(exc).replace(path, "the upload")) from None
    with viewer.lock:
        viewer.con.register_image(name, tensor)
    return {"name": name, "height": int(tensor.shape[1]), "width": int(tensor.shape[2])}


def image_png(viewer: Viewer, ref: str) -> bytes:
    """The image of a checked reference as a PNG, as the user gave it."""
    from . import images
    with viewer.lock:
        try:
            if ref.startswith("sample("):
                tensor = images.load_sample(ref[8:-2])
            elif ref.startswith("'"):
                tensor = images.load_file(ref[1:-1])
            else:
                tensor = viewer.con.catalog.resolve_image(ref)
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
    """The result's PNG overlay (:meth:`kql.result.Result.save`) as bytes."""
    if hasattr(result, "_repr_png_"):
        return result._repr_png_()
    with tempfile.TemporaryDirectory(prefix="kql-serve-") as folder:
        path = result.save(os.path.join(folder, "overlay.png"))
        with open(path, "rb") as fh:
            return fh.read()


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
