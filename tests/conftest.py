"""Shared test helpers: sensitive small models and the plain occlusion loop.

A randomly initialised CNN gives an almost uniform softmax, so a heat map of it is flat
and any wrong engine matches it. ``sensitive`` calibrates BatchNorm statistics on random
inputs and scales the logits so the target probability really moves across the map.
"""

import os
import tempfile

import numpy as np
import pytest
import torch
from torch import nn


def pytest_configure(config):
    # Calibrations of in-memory catalogs go to a cache of this test run (shared with the
    # CLI subprocesses), never to the user's ~/.cache/kql.
    os.environ["KQL_CACHE_DIR"] = tempfile.mkdtemp(prefix="kql-test-cache-")


class Scaled(nn.Module):
    def __init__(self, body: nn.Module, scale: float):
        super().__init__()
        self.body, self.scale = body, scale

    def forward(self, x):
        return self.body(x) * self.scale


@torch.no_grad()
def sensitive(model: nn.Module, shape, top_probability: float = 0.6, seed: int = 0) -> nn.Module:
    """Calibrate BatchNorm, then scale logits so the top class of a test image has p ~ 0.6."""
    torch.manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if bns:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for i in range(3):
            model(torch.stack([blob_image(*shape[1:], seed=100 + 4 * i + j) for j in range(4)]))
    model.eval()
    logits = model(blob_image(*shape[1:], seed=seed)[None])[0]
    lo, hi = 1e-3, 1e4
    for _ in range(60):                                   # bisection on the logit scale
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if torch.softmax(logits * mid, 0).max() < top_probability else (lo, mid)
    return Scaled(model, lo).eval()


def small_cnn(classes: int = 5) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))


def blob_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A smooth image with structure (random blobs), values in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, height // 8), max(2, width // 8), generator=g)
    img = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear",
                                          align_corners=False)[0]
    return img.clamp(0, 1).contiguous()


@torch.no_grad()
def plain_occlusion(model, image, patch, stride, color, target=None, region=None):
    """The obviously-correct loop: one forward pass per patch position."""
    (ph, pw), (sy, sx) = patch, stride
    _, h, w = image.shape
    base = model(image[None])[0]
    target = int(base.argmax()) if target is None else target
    rows = range(0, (h - ph) // sy + 1)
    cols = range(0, (w - pw) // sx + 1)
    if region is not None:
        x0, y0, rw, rh = region
        rows = [i for i in rows if i * sy >= y0 and i * sy + ph <= y0 + rh]
        cols = [j for j in cols if j * sx >= x0 and j * sx + pw <= x0 + rw]
    out = np.zeros((len(rows), len(cols)), np.float32)
    for a, i in enumerate(rows):
        for b, j in enumerate(cols):
            occluded = image.clone()
            occluded[:, i * sy:i * sy + ph, j * sx:j * sx + pw] = torch.tensor(color).view(3, 1, 1)
            out[a, b] = torch.softmax(model(occluded[None]), 1)[0, target]
    return out, target


@pytest.fixture
def small_model():
    return sensitive(small_cnn(), (3, 24, 30))
