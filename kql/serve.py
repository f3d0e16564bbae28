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
This module holds the app and starting it; :mod:`kql.serve_state` the server's state and
:mod:`kql.serve_handlers` the work behind the routes.

>>> query_text(model="efficientnet_lite0", image="sample('chelsea')", patch=32, stride=16,
...            region=(0, 0, 100, 80), ssim=0.9)
"OCCLUDE sample('chelsea') USING efficientnet_lite0 PATCH 32 STRIDE 16 REGION (0, 0, 100, 80) WITH SSIM >= 0.9"
"""

from __future__ import annotations

import os
import socket
import sys

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .catalog.images import SAMPLES
from .progress import RunProgress
from .serve_guard import TOKEN_HEADER, ApiError, Guard, shown
from .serve_handlers import (_upload_bytes, compare_maps, describe, exact_anyway, image_png,
                             query_text, register_upload, run_occlude, tensor_png)
from .serve_state import (DECODE_BYTES, KEEP_BYTES, KEEP_RESULTS, KEEP_UPLOADS, MAX_UPLOAD,
                          Viewer, _one_line, overlay_png)

__all__ = ["create_app", "serve", "listen", "query_text", "Viewer", "run_occlude", "compare_maps",
           "exact_anyway", "describe", "register_upload", "image_png", "tensor_png",
           "overlay_png", "RunProgress", "TOKEN_HEADER", "WEB", "LOCAL_HOSTS", "MAX_UPLOAD",
           "KEEP_RESULTS", "KEEP_UPLOADS", "KEEP_BYTES", "DECODE_BYTES"]

WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


# -- the app ------------------------------------------------------------------------------------

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
    def original(image: str, slice: str | None = None):
        if slice is not None and not (slice.isascii() and slice.isdigit() and len(slice) < 7):
            raise ApiError(400, f"slice must be a whole number from 0, not {shown(slice, 40)}")
        index = None if slice is None else int(slice)
        return Response(image_png(viewer, viewer.image_ref(image), index), media_type="image/png")


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
