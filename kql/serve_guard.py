"""What guards ``kql serve`` (:mod:`kql.serve`): the values of a request, cross-site
requests, request bodies and what the server keeps.

* **Values.** Every JSON field is checked for its type and range before it reaches query
  text (NaN, infinities, huge numbers, lists and objects included): a bad one is a 400
  with one line, its value shortened (:func:`shown`); an unknown field is refused too.
* **Cross-site requests.** Every state-changing request (any method but GET, HEAD and
  OPTIONS) must carry the server's token in the ``X-KQL-Token`` header, and its
  ``Origin`` (or, without one, its ``Referer``) must be the server itself. A page on
  another origin can send a form POST but cannot set a header without a CORS preflight,
  which this server never grants, nor read the token (``GET /api/session``), so both
  checks refuse it (403); a client that is no browser reads the token and sends it. No
  page may frame the viewer (``X-Frame-Options``, CSP ``frame-ancestors``): a click there
  would be the user's own, token and all.
* **Bodies.** A request body past its limit (the upload's size, 64 KB for JSON) is
  refused with 413, from its Content-Length or, without one, as it arrives.
* **What is kept.** Uploads and results live in :class:`BoundedStore` s: at most so many
  entries and so many bytes, the oldest dropped first.

>>> store = BoundedStore(count=2, size=100, sizer=len)
>>> [store.put(k, v) for k, v in (("a", "x" * 60), ("b", "y" * 30), ("c", "z" * 50))]
[[], [], ['a']]
>>> list(store), store.bytes
(['b', 'c'], 80)
"""

from __future__ import annotations

import json
import math
import os
import secrets
import threading
from collections import OrderedDict
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException

TOKEN_HEADER = "X-KQL-Token"
MAX_JSON = 64 * 1024                    # bytes of a JSON request body
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
HEADERS = [(b"x-frame-options", b"DENY"), (b"content-security-policy", b"frame-ancestors 'none'"),
           (b"x-content-type-options", b"nosniff")]
MAX_SIDE = 100_000                      # the largest patch, stride or region coordinate
FIELDS = ("model", "image", "patch", "stride", "region", "ssim", "compare")


class ApiError(Exception):
    """An answer other than 200: its HTTP status and a one-line message."""
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# -- the values of a request ------------------------------------------------------------------

def whole(value, what: str, low: int, high: int = MAX_SIDE) -> int:
    """``value`` as an int in [low, high], else a 400.

    >>> whole(8, "patch", 1)
    8
    >>> whole("8", "patch", 1)
    Traceback (most recent call last):
    ...
    kql.serve_guard.ApiError: patch must be a whole number from 1 to 100000, not '8'
    >>> whole(float("nan"), "patch", 1)
    Traceback (most recent call last):
    ...
    kql.serve_guard.ApiError: patch must be a whole number from 1 to 100000, not nan
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and not math.isfinite(value)) \
            or not low <= value <= high or value != int(value):
        raise ApiError(400, f"{what} must be a whole number from {low} to {high}, not {shown(value)}")
    return int(value)


def shown(value, limit: int = 40) -> str:
    """``repr(value)`` for a message, shortened past ``limit`` characters.

    >>> shown(10 ** 50)
    '1000000000000000000000000000000000000... (int)'
    """
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 3]}... ({type(value).__name__})"


def check_fields(body: dict) -> None:
    """Refuse a field /api/occlude does not know (a typo would be silently ignored)."""
    unknown = [key for key in body if key not in FIELDS]
    if unknown:
        raise ApiError(400, f"unknown field {shown(unknown[0])}; fields: {', '.join(FIELDS)}")


def check_flag(value, what: str) -> bool:
    """A JSON true/false (absent: false)."""
    if value is None or isinstance(value, bool):
        return bool(value)
    raise ApiError(400, f"{what} must be true or false, not {shown(value)}")


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
        raise ApiError(400, f"ssim must be a number above 0 and at most 1, not {shown(ssim)}")
    return float(ssim)


def inside(path: str, roots: list) -> bool:
    """Whether ``path`` (symbolic links followed) lies in one of the ``roots``.

    >>> inside("/tmp/a/../b.png", ["/tmp"]), inside("/etc/passwd", ["/tmp"])
    (True, False)
    """
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, os.path.realpath(root)]) == os.path.realpath(root)
               for root in roots)


# -- cross-site requests, bodies, what is kept ---------------------------------------------------

class BoundedStore:
    """Values by key, in the order put; past ``count`` entries or ``size`` bytes (as
    ``sizer`` measures a value) the oldest go, and ``on_evict(key, value)`` hears of each."""

    def __init__(self, count: int, size: int, sizer, on_evict=None):
        self.count, self.size, self.sizer, self.on_evict = count, size, sizer, on_evict
        self.bytes = 0
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key, value) -> list:
        """Keep ``value`` (the newest entry is kept even when larger than ``size``); the
        keys dropped to make room."""
        with self._lock:
            self._drop(key)
            self._items[key] = (value, self.sizer(value))
            self.bytes += self._items[key][1]
            gone = []
            while len(self._items) > 1 and (len(self._items) > self.count or self.bytes > self.size):
                old = next(iter(self._items))
                gone.append((old, self._drop(old)))
        for old, value in gone:
            if self.on_evict is not None:
                self.on_evict(old, value)
        return [old for old, _ in gone]

    def _drop(self, key):
        value, size = self._items.pop(key, (None, 0))
        self.bytes -= size
        return value

    def get(self, key, default=None):
        with self._lock:
            entry = self._items.get(key)
        return default if entry is None else entry[0]

    def __contains__(self, key) -> bool:
        return key in self._items

    def __iter__(self):
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)


def new_token() -> str:
    return secrets.token_urlsafe(24)


def _host_of(url: str) -> str | None:
    """``host[:port]`` of an Origin or Referer, lower case; None when it names none (the
    scheme is not compared: behind a proxy the server sees http for https).

    >>> _host_of("HTTP://Example.org:8080/a?b"), _host_of("null")
    ('example.org:8080', None)
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return parts.netloc.lower() if parts.scheme and parts.netloc else None


def cross_site_problem(scope: dict, token: str) -> str | None:
    """Why a state-changing request is refused as cross-site, or None to let it through."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    own = headers.get("host", "").lower()
    sender = headers.get("origin", headers.get("referer"))
    if sender is not None and _host_of(sender) != own:
        return (f"cross-site request refused: it comes from {shown(sender, 60)}, not from this "
                f"server ({shown(own, 60)})")
    sent = headers.get(TOKEN_HEADER.lower(), "")
    if not secrets.compare_digest(sent.encode("latin-1", "replace"), token.encode()):
        return (f"request refused: it needs the {TOKEN_HEADER} header of this server "
                f"(GET /api/session gives it; the page sends it)")
    return None


async def answer(send, status: int, message: str) -> None:
    """A JSON ``{"error": message}`` response from ASGI middleware."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _with_headers(send):
    """``send`` that adds :data:`HEADERS` to every response."""
    async def sending(message):
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *HEADERS]}
        await send(message)
    return sending


class Guard:
    """ASGI middleware: the cross-site check and the body limit (see the module)."""

    def __init__(self, app, token: str, upload_path: str, max_upload: int):
        self.app, self.token = app, token
        self.upload_path, self.max_upload = upload_path, max_upload

    def limit(self, path: str) -> int:
        return self.max_upload + 64 * 1024 if path == self.upload_path else MAX_JSON

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = _with_headers(send)
        if scope["method"] not in SAFE_METHODS:
            problem = cross_site_problem(scope, self.token)
            if problem:
                return await answer(send, 403, problem)
        limit = self.limit(scope["path"])
        too_large = f"request body too large: the limit is {limit / 1e6:.3g} MB"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await answer(send, 400, "bad Content-Length header")
            if int(length) > limit:
                return await answer(send, 413, too_large)
        seen = 0

        async def bounded():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:            # FastAPI and Starlette pass an HTTPException on
                raise HTTPException(413, too_large)
            return message

        return await self.app(scope, bounded, send)
