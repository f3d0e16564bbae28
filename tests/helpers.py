"""Shared test helpers: test images, sensitive random networks, the plain occlusion loop;
connections, checks and in-memory image files that several suites share.

A randomly initialised CNN gives an almost uniform softmax, so its occlusion map is flat
and any wrong engine matches it. ``calibrate_batchnorm`` gives BatchNorm statistics of
images like the test's; ``sensitive`` then scales (and optionally offsets) the logits so
the target probability really moves across the map. ``plain_heatmap`` is the
obviously-correct loop every engine is checked against.

The models themselves live in ``models_zoo``.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kql


# -- images ----------------------------------------------------------------------------------

def smooth_noise_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Uniform noise at 1/8 resolution, upsampled bilinearly: smooth structure in [0, 1].

    The image of the API, error, planner and EXPLAIN tests (the golden EXPLAIN fixtures
    depend on it, and on the models calibrated on it).
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, height // 8), max(2, width // 8), generator=g)
    img = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
    return img.clamp(0, 1).contiguous()


def blob_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth random colour blobs on a gradient: structure a random CNN reacts to.

    The image of the differential suite's custom models.
    """
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, height).view(height, 1)
    xs = torch.linspace(0, 1, width).view(1, width)
    image = 0.25 + 0.3 * torch.rand(3, 1, 1, generator=g) * (ys + xs)
    for _ in range(6):
        cy, cx, r = torch.rand(3, generator=g).tolist()
        radius = 0.08 + 0.25 * r
        blob = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * radius ** 2))
        image = image + (torch.rand(3, 1, 1, generator=g) - 0.4) * blob
    return image.clamp(0, 1).float().contiguous()


def _photo() -> torch.Tensor:
    import skimage.data

    return torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float() / 255


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    out = F.interpolate(image[None], size=(height, width), mode="bilinear", align_corners=False,
                        antialias=True)
    return out[0].clamp(0, 1).contiguous()


def chelsea(height: int, width: int) -> torch.Tensor:
    """skimage's cat photo, resized to ``height x width``."""
    return _resize(_photo(), height, width)


def chelsea_crop(height: int, width: int, seed: int) -> torch.Tensor:
    """A random crop of the cat photo (same aspect ratio), resized to ``height x width``."""
    g = torch.Generator().manual_seed(seed)
    photo = _photo()
    _, ph, pw = photo.shape
    ch = int(torch.randint(ph // 3, ph + 1, (1,), generator=g))
    cw = min(pw, round(ch * width / height))
    y = int(torch.randint(0, ph - ch + 1, (1,), generator=g))
    x = int(torch.randint(0, pw - cw + 1, (1,), generator=g))
    return _resize(photo[:, y:y + ch, x:x + cw], height, width)


IMAGES = {"noise": smooth_noise_image, "blobs": blob_image, "photo": chelsea_crop}


# -- making a random network sensitive ---------------------------------------------------------

class Scaled(nn.Module):
    """``body(x) * scale (+ offset)``: a random network's near-uniform softmax made sensitive.

    ``magnitude`` is the largest |scale * body logit| on the fitting image: float rounding
    in the body grows with it, the constant ``offset`` adds none. Without an offset the
    traced graph ends in the one ``mul`` (the golden EXPLAIN fixtures show it). ``noise``
    is the model's own float noise on the target probability, where ``sensitive``
    measured it (None otherwise).
    """

    def __init__(self, body: nn.Module, scale: float, offset: torch.Tensor | None = None,
                 magnitude: float | None = None, noise: float | None = None):
        super().__init__()
        self.body, self.scale = body, float(scale)
        self.magnitude = None if magnitude is None else float(magnitude)
        self.noise = noise
        self.register_buffer("offset", None if offset is None else offset.float().view(1, -1))

    def forward(self, x):
        out = self.body(x) * self.scale
        return out if self.offset is None else out + self.offset


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, height: int, width: int, passes: int = 3,
                        kind: str = "blobs", seed: int = 1000) -> nn.Module:
    """Running statistics = the average batch statistics of random images like the test's.

    ``kind`` names the images (``IMAGES``): "noise" (``smooth_noise_image``), "blobs"
    (``blob_image``) or "photo" (``chelsea_crop``); pass ``p`` uses seeds ``seed + 4p``
    to ``seed + 4p + 3``. Statistics from other images than the test's leave channels of
    tiny variance that blow up on it. Returns ``model`` in eval mode.
    """
    make = IMAGES[kind]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None                   # cumulative average over the passes
        model.train()
        with torch.random.fork_rng():           # dropout and stochastic depth are random in train()
            torch.manual_seed(0)
            for p in range(passes):
                model(torch.stack([make(height, width, seed=seed + 4 * p + k) for k in range(4)]))
    return model.eval()


def _probes(image: torch.Tensor, patch, color) -> torch.Tensor:
    """The image and 9 copies with the patch at spread-out places."""
    _, h, w = image.shape
    ph, pw = min(patch[0], h), min(patch[1], w)
    out = [image]
    for fy in (0.0, 0.5, 1.0):
        for fx in (0.0, 0.5, 1.0):
            y, x = round(fy * (h - ph)), round(fx * (w - pw))
            occluded = image.clone()
            occluded[:, y:y + ph, x:x + pw] = torch.tensor(color, dtype=image.dtype).view(3, 1, 1)
            out.append(occluded)
    return torch.stack(out)


MAX_MAGNITUDE = 15.0   # |scaled logit| cap: the brief's "std ~5" order; float noise grows with it
NOISE_BUDGET = 1e-6    # the model's own float noise on the target probability: 10x below 1e-5
MAX_SPREAD = 0.3       # no more sensitive than needed: the float noise shrinks with the scale


class _Probed:
    """A model's logits on the probes (the unoccluded input first), run as one batch and
    one by one, and the target."""

    def __init__(self, model, probes, target):
        self.batched = model(probes).double()
        self.alone = torch.cat([model(p[None]) for p in probes]).double()
        self.base = self.batched[0]
        self.target = int(self.base.argmax()) if target is None else int(target)
        moves = self.batched - self.base
        gaps = moves[:, self.target:self.target + 1] - moves
        gaps = gaps.amax(0) - gaps.amin(0)           # how much each class's gap to the target moves
        gaps[self.target] = -1.0
        self.rival = int(gaps.argmax())
        self.gap = max(float(gaps[self.rival]), 1e-12)
        self.lead = torch.full_like(self.base, -4.0)
        leader = self.rival if target is not None else self.target
        self.lead[self.target], self.lead[self.rival] = 0.0, 0.0
        self.lead[leader] = 0.2

    def probability(self, scale, logits):
        return torch.softmax(scale * (logits - self.base) + self.lead, 1)[:, self.target]

    def noise(self, scale) -> float:
        diff = self.probability(scale, self.batched) - self.probability(scale, self.alone)
        return float(diff.abs().max())

    def spread(self, scale) -> float:
        p = self.probability(scale, self.batched)
        return float(p.max() - p.min())


def probed_scale(model: nn.Module, probes: torch.Tensor, target, spread: float = MAX_SPREAD) -> Scaled:
    """Offset and scale fitted on ``probes`` (the unoccluded input, then occluded copies;
    see ``sensitive``): images' or volumes'."""
    probed = _Probed(model, probes, target)
    scale = min(3.0 / probed.gap, MAX_MAGNITUDE / float(probed.base.abs().max()))
    for _ in range(3):                          # the noise is about linear in the scale
        scale *= min(1.0, NOISE_BUDGET / max(probed.noise(scale), 1e-15))
    while probed.spread(scale) > spread:
        scale *= 0.8
    return Scaled(model, scale, probed.lead - scale * probed.base,
                  scale * float(probed.base.abs().max()), probed.noise(scale))


def _top_probability_scale(model: nn.Module, image, top_probability: float) -> Scaled:
    """A scale alone, bisected so the top class of ``image`` has p ~ ``top_probability``."""
    logits = model(image[None])[0]
    lo, hi = 1e-3, 1e4
    for _ in range(60):                                   # bisection on the logit scale
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if torch.softmax(logits * mid, 0).max() < top_probability else (lo, mid)
    return Scaled(model, lo, magnitude=lo * float(logits.abs().max()))


@torch.no_grad()
def scaled(model: nn.Module, factor: float, seed: int = 0) -> nn.Module:
    """``model`` with fresh random weights (``seed``), each conv and linear weight times
    ``factor`` so its outputs move with the image: the drop-in suites' models."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
            with torch.no_grad():
                m.weight.mul_(factor)
    return model.eval()


def sensitive(model: nn.Module, image: torch.Tensor, patch=None, color=(0.0, 0.0, 0.0),
              target=None, top_probability: float = 0.6) -> Scaled:
    """``model`` (BatchNorm already calibrated) wrapped so occluding ``image`` moves the target.

    With ``patch`` (the differential suite, which judges engines to 1e-5 on deep
    networks): the offset makes the unoccluded image a near tie between the target and
    the rival class whose logit gap to it moves most across 9 probes with the patch
    spread over the image (p ~ 0.5, where the softmax is steepest; with ``target`` given
    the rival leads, so the default target differs). The scale makes that gap move by
    ~3 across the probes, within three caps: MAX_SPREAD, MAX_MAGNITUDE, and NOISE_BUDGET
    on the model's own float noise, measured as the difference between running the
    probes as one batch and one by one (``.noise``). A chaotic random network amplifies
    rounding so much that it cannot judge an engine to 1e-5: its map then comes out
    flat, and the test's range check says so.

    Without ``patch`` (the API, error, planner and EXPLAIN tests, on small shallow
    models): no offset, and a scale alone, bisected so the top class of ``image`` has
    p ~ ``top_probability``; enough for the map to move, and the golden EXPLAIN fixtures
    depend on exactly this model.
    """
    model.eval()
    if patch is None:
        return _top_probability_scale(model, image, top_probability).eval()
    return probed_scale(model, _probes(image, patch, color), target).eval()


# -- the reference -----------------------------------------------------------------------------

@torch.no_grad()
def plain_heatmap(model, image, patch, stride, color, target=None, region=None):
    """The obviously-correct loop of the spec: one forward pass per patch position.

    Returns ``(map, target)``: float32 probabilities (the softmax taken in float64) and
    the target class (the predicted one when ``target`` is None). ``region`` is
    ``(x, y, width, height)``: only positions whose patch lies inside it.
    """
    (ph, pw), (sy, sx) = patch, stride
    _, h, w = image.shape
    target = int(model(image[None])[0].argmax()) if target is None else int(target)
    x0, y0, rw, rh = region if region is not None else (0, 0, w, h)
    rows = [i for i in range((h - ph) // sy + 1) if y0 <= i * sy and i * sy + ph <= y0 + rh]
    cols = [j for j in range((w - pw) // sx + 1) if x0 <= j * sx and j * sx + pw <= x0 + rw]
    out = np.zeros((len(rows), len(cols)), np.float32)
    for a, i in enumerate(rows):
        for b, j in enumerate(cols):
            occluded = image.clone()
            occluded[:, i * sy:i * sy + ph, j * sx:j * sx + pw] = torch.tensor(color).view(3, 1, 1)
            out[a, b] = torch.softmax(model(occluded[None]).double(), 1)[0, target]
    return out, target


def residual_connection(height: int = 64, width: int = 80, seed: int = 5):
    """A connection with ``net`` (a calibrated two-block residual CNN, sensitive to a 12x12
    patch) and ``img`` (a blob image it was calibrated on): the drill-down suites' set-up."""
    import kql
    from models_zoo import custom_model

    c = kql.connect()
    image = blob_image(height, width, seed=seed)
    c.register_model("net", sensitive(calibrate_batchnorm(custom_model("residual_two_rf"), height, width),
                                      image, (12, 12)))
    c.register_image("img", image)
    return c


def one_line_error(con, query: str, cls=None) -> str:
    """The message of the KqlError ``query`` fails with (of class ``cls`` when given),
    asserting it is one clean line: no newline, no ANSI escape, no traceback."""
    with pytest.raises(kql.KqlError) as info:
        con.execute(query)
    message = str(info.value)
    assert isinstance(info.value, cls or kql.KqlError), message
    assert "\n" not in message and "\x1b" not in message and "Traceback" not in message
    return message


def state_dict_of(arch: str, **kwargs) -> dict:
    """Zero weights in ``arch``'s shapes: built on the meta device, nothing initialised."""
    import torchvision      # here: the subprocess tests import this module, not torchvision

    with torch.device("meta"):
        module = torchvision.models.get_model(arch, weights=None, **kwargs)
    return {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in module.state_dict().items()}


class Boom:
    """Unpickling it would run a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


# -- connections -------------------------------------------------------------------------------

SMALL_QUERY = "OCCLUDE img USING net PATCH 8 STRIDE 4"     # a 5x6 map of image_connection's image


def image_connection(directory=None, image=None, model=None):
    """``kql.connect(directory)`` with ``model`` (when given) as "net" and ``image`` as
    "img", by default the 24x30 noise image ``sensitive_small_cnn`` is made sensitive on:
    the model-format and memory suites' set-up."""
    con = kql.connect(directory)
    if model is not None:
        con.register_model("net", model)
    con.register_image("img", smooth_noise_image(24, 30) if image is None else image)
    return con


def small_cnn_connection():
    """A connection with ``small_cnn`` as "net" and no image: the hostile-file suites' set-up."""
    from models_zoo import small_cnn

    con = kql.connect()
    con.register_model("net", small_cnn())
    return con


# -- checks of the model-format suites ----------------------------------------------------------

def model_error(con, query: str) -> str:
    """The message of the KqlModelError ``query`` fails with, asserting it is one line (no
    newline, no traceback)."""
    with pytest.raises(kql.KqlModelError) as info:
        con.execute(query)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def moving(heatmap) -> bool:
    """Whether a map moves: a broken engine on a flat map would pass a comparison."""
    return float(heatmap.max() - heatmap.min()) > 1e-6


def incremental_equals_naive(con, query: str):
    """``query``'s map planned incrementally (EXPLAIN says so) and naively: equal and not
    flat; returns the naive map."""
    con.execute("SET strategy = 'incremental'")
    assert "IncrementalOcclusion" in con.execute(f"EXPLAIN {query}").plan.splitlines()[1]
    fast = con.execute(query).heatmap
    con.execute("SET strategy = 'naive'")
    slow = con.execute(query).heatmap
    assert moving(slow)
    np.testing.assert_allclose(fast, slow, atol=1e-4)
    return slow


# -- image files, made in memory -----------------------------------------------------------------

def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: its length, kind, data and CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A PNG of its header alone (no pixel data): what a decompression bomb starts with."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def encoded(image, fmt: str, **options) -> bytes:
    """``image`` (a PIL image) saved as ``fmt``, in memory."""
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def gradient(height=12, width=16) -> np.ndarray:
    """An RGB uint8 picture: red down, green across, grey blue."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([ys * 255 // max(1, height - 1), xs * 255 // max(1, width - 1),
                     np.full_like(ys, 128)], -1).astype(np.uint8)


MB = 1 << 20


def deflated(head: bytes, zeros: int, middle: bytes = b"", more_zeros: int = 0) -> bytes:
    """A raw deflate stream of ``head``, ``zeros`` zero bytes, ``middle``, ``more_zeros``
    zero bytes, made in milliseconds: after a full flush every MB of zeros compresses to
    the same block, so a 2 GB stream is one block repeated."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = [c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)]
    block = c.compress(bytes(MB)) + c.flush(zlib.Z_FULL_FLUSH)
    for count, after in ((zeros, middle), (more_zeros, b"")):
        out.append(block * (count // MB) + c.compress(bytes(count % MB) + after))
        out.append(c.flush(zlib.Z_FULL_FLUSH))
    return b"".join(out) + c.flush()
