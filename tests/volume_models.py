"""Volumes, small 3D CNNs and the plain 3D occlusion loop of the volume suite.

The 3D counterpart of ``helpers`` and ``models_zoo``: seeded test volumes (smooth noise,
blobs), three small networks for 16^3..24^3 volumes (a ResNet-style net, MONAI's DenseNet,
a custom net of the operators a 3D engine must handle), the same two-step calibration
that keeps a random network's map from being flat (BatchNorm statistics of volumes like
the test's, then ``sensitive_volume``: ``helpers.sensitive``'s logit scale and offset,
fitted on cubes spread over the volume) and ``plain_volume_map``, the obviously-correct
loop every engine is checked against.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from helpers import MAX_SPREAD, Scaled, probed_scale

CLASSES = 5


# -- volumes ------------------------------------------------------------------------------------

def smooth_noise_volume(depth: int, height: int, width: int, channels: int = 1,
                        seed: int = 0) -> torch.Tensor:
    """Uniform noise at 1/4 resolution, upsampled trilinearly: ``[C, D, H, W]`` in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, channels, *(max(2, n // 4) for n in (depth, height, width)), generator=g)
    volume = F.interpolate(coarse, size=(depth, height, width), mode="trilinear",
                           align_corners=False)
    return volume[0].contiguous()


def blob_volume(depth: int, height: int, width: int, channels: int = 1, seed: int = 0,
                blobs: int = 6) -> torch.Tensor:
    """Gaussian blobs of either sign on a gradient, ``[C, D, H, W]``: unclamped intensities,
    roughly -0.5..1.5 (a volume's intensities are any floats, not [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    zs = torch.linspace(0, 1, depth).view(depth, 1, 1)
    ys = torch.linspace(0, 1, height).view(1, height, 1)
    xs = torch.linspace(0, 1, width).view(1, 1, width)
    volume = 0.2 + 0.4 * torch.rand(channels, 1, 1, 1, generator=g) * (zs + ys + xs)
    for _ in range(blobs):
        cz, cy, cx, r = torch.rand(4, generator=g).tolist()
        radius = 0.1 + 0.25 * r
        blob = torch.exp(-((zs - cz) ** 2 + (ys - cy) ** 2 + (xs - cx) ** 2) / (2 * radius ** 2))
        volume = volume + 1.5 * (torch.rand(channels, 1, 1, 1, generator=g) - 0.4) * blob
    return volume.float().contiguous()


VOLUMES = {"noise": smooth_noise_volume, "blobs": blob_volume}


# -- (a) a ResNet-style 3D network ----------------------------------------------------------------

class ResidualBlock3d(nn.Module):
    """Two 3x3x3 convolutions with BatchNorm; the shortcut is the identity, or a strided
    1x1x1 projection where the stride or the width changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm3d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet3d(nn.Module):
    """Stem (Conv3d stride 2, BatchNorm, ReLU, MaxPool3d stride 2), one residual block per
    width (the first at stride 1, the others at stride 2), global average pool, linear."""

    def __init__(self, widths=(8, 16), in_channels: int = 1, classes: int = CLASSES,
                 stem_kernel: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, widths[0], stem_kernel, stride=2, padding=stem_kernel // 2,
                      bias=False),
            nn.BatchNorm3d(widths[0]), nn.ReLU(inplace=True), nn.MaxPool3d(3, stride=2, padding=1))
        blocks, cin = [], widths[0]
        for i, cout in enumerate(widths):
            blocks.append(ResidualBlock3d(cin, cout, stride=1 if i == 0 else 2))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def resnet3d(in_channels: int = 1, seed: int = 0) -> nn.Module:
    """(a) Block one identity at 8 channels, block two a strided 1x1x1 projection to 16."""
    torch.manual_seed(seed)
    return ResNet3d((8, 16), in_channels).eval()


# -- (b) MONAI's DenseNet, small ------------------------------------------------------------------

def monai_densenet(in_channels: int = 1, seed: int = 0) -> nn.Module:
    """(b) ``monai.networks.nets.DenseNet`` (DenseNet121's class) with 8 initial features,
    growth 8 and two dense blocks of two layers: conv0 stride 2, max pool, dense block,
    transition (average pool), dense block, ReLU, adaptive average pool, linear."""
    from monai.networks.nets import DenseNet

    torch.manual_seed(seed)
    return DenseNet(spatial_dims=3, in_channels=in_channels, out_channels=3, init_features=8,
                    growth_rate=8, block_config=(2, 2), bn_size=2).eval()


# -- (c) the operators a 3D engine must handle ------------------------------------------------

class Branches3d(nn.Module):
    """(c) ConstantPad3d (uneven, a non-zero value), conv, BatchNorm, AvgPool3d; two branches
    joined by ``torch.cat`` and a BatchNorm: anisotropic 1x3x3 then 3x1x1 convolutions, and
    a dilated 3x3x3 one; MaxPool3d with padding, a strided conv, global average pool, linear."""

    def __init__(self, in_channels: int = 1, width: int = 8, classes: int = CLASSES):
        super().__init__()
        self.pad = nn.ConstantPad3d((1, 2, 1, 1, 2, 1), 0.25)
        self.conv = nn.Conv3d(in_channels, width, 3)
        self.bn = nn.BatchNorm3d(width)
        self.avg = nn.AvgPool3d(2)
        self.planar = nn.Conv3d(width, width, (1, 3, 3), padding=(0, 1, 1))
        self.axial = nn.Conv3d(width, width, (3, 1, 1), padding=(1, 0, 0))
        self.dilated = nn.Conv3d(width, width, 3, padding=2, dilation=2)
        self.joined = nn.BatchNorm3d(2 * width)
        self.max = nn.MaxPool3d(3, stride=2, padding=1)
        self.last = nn.Conv3d(2 * width, 2 * width, 3, stride=2, padding=1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.avg(torch.relu(self.bn(self.conv(self.pad(x)))))
        a = self.axial(torch.relu(self.planar(x)))
        b = self.dilated(x)
        x = self.max(torch.relu(self.joined(torch.cat([a, b], 1))))
        x = torch.relu(self.last(x))
        return self.fc(F.adaptive_avg_pool3d(x, 1).flatten(1))


def branches3d(in_channels: int = 1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Branches3d(in_channels).eval()


MODELS = {"resnet3d": resnet3d, "monai_densenet": monai_densenet, "branches3d": branches3d}


# -- making a random network sensitive --------------------------------------------------------

@torch.no_grad()
def calibrate_batchnorm3d(model: nn.Module, shape, channels: int = 1, kind: str = "blobs",
                          passes: int = 3, seed: int = 1000, make=None) -> nn.Module:
    """``helpers.calibrate_batchnorm`` for volumes: running statistics = the average batch
    statistics of ``passes`` batches of 4 volumes of ``shape`` (D, H, W) like the test's
    (``VOLUMES[kind]``, seeds ``seed + 4p + k``; or ``make(seed)``, a ``[C, D, H, W]``
    volume). Returns ``model`` in eval mode."""
    make = make or (lambda s: VOLUMES[kind](*shape, channels=channels, seed=s))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                       # cumulative average over the passes
    if norms:
        model.train()
        for p in range(passes):
            model(torch.stack([make(seed + 4 * p + k) for k in range(4)]))
    return model.eval()


def cube(size) -> tuple:
    """``4`` -> ``(4, 4, 4)``; a 3-sequence (d, h, w) as a tuple."""
    return (int(size),) * 3 if np.isscalar(size) else tuple(int(s) for s in size)


def paint(volume: torch.Tensor, corner, patch, color) -> torch.Tensor:
    """A copy of ``volume`` ``[C, D, H, W]`` with the cube of ``patch`` at ``corner``
    (z, y, x) set to ``color`` (one number, or one per channel)."""
    (z, y, x), (pd, ph, pw) = corner, patch
    out = volume.clone()
    value = torch.as_tensor(color, dtype=volume.dtype).reshape(-1, 1, 1, 1)
    out[:, z:z + pd, y:y + ph, x:x + pw] = value
    return out


def _probes(volume: torch.Tensor, patch, color) -> torch.Tensor:
    """The volume and 27 copies with the cube at spread-out places (first, middle, last
    position along each axis)."""
    patch = [min(p, n) for p, n in zip(patch, volume.shape[1:])]
    spots = [[round(f * (n - p)) for f in (0.0, 0.5, 1.0)] for p, n in zip(patch, volume.shape[1:])]
    copies = [paint(volume, c, patch, color) for c in itertools.product(*spots)]
    return torch.stack([volume] + copies)


@torch.no_grad()
def sensitive_volume(model: nn.Module, volume: torch.Tensor, patch, color, target=None,
                     spread: float = MAX_SPREAD) -> Scaled:
    """``helpers.sensitive`` with a patch, for volumes: ``model`` (BatchNorm calibrated)
    wrapped so that cubes of ``patch`` painted ``color`` move the target probability.

    The offset makes the unoccluded volume a near tie of the target and the rival class
    (the target leads by 0.2; with ``target`` given, the rival leads); the scale makes
    their gap move by ~3 across the 27 probes, within ``helpers``' caps: the largest
    scaled logit (MAX_MAGNITUDE), the model's own float noise, batched against one by one
    (NOISE_BUDGET), and the probability's spread over the probes (``spread``).
    """
    model.eval()
    return probed_scale(model, _probes(volume, cube(patch), color), target, spread).eval()


# -- the reference ------------------------------------------------------------------------------

def grid_axis(size: int, patch: int, stride: int, start: int = 0, length: int = None) -> list:
    """The cells of one axis: cube starts ``i * stride`` whose cube fits the volume and
    lies inside ``[start, start + length)`` (the whole axis by default)."""
    length = size if length is None else length
    return [i for i in range((size - patch) // stride + 1)
            if start <= i * stride and i * stride + patch <= start + length]


def grid_cells(shape, patch, stride, region=None) -> list:
    """Per axis (d, h, w) the cells of the map; ``region`` is ``(x, y, z, w, h, d)``."""
    patch, stride = cube(patch), cube(stride)
    bounds = [(0, None)] * 3
    if region is not None:
        x, y, z, w, h, d = region
        bounds = [(z, d), (y, h), (x, w)]
    return [grid_axis(n, p, s, *b) for n, p, s, b in zip(shape, patch, stride, bounds)]


@torch.no_grad()
def plain_volume_map(model, volume, patch, stride, color, target=None, region=None):
    """The obviously-correct loop: one forward pass per cube position.

    ``volume`` ``[C, D, H, W]`` (or ``[D, H, W]``); ``patch`` and ``stride`` one number
    (a cube) or ``(d, h, w)``; ``color`` one number painted in every channel;
    ``region`` ``(x, y, z, w, h, d)``: only cells whose cube lies inside it. Returns
    ``(map, target)``: float32 ``[D', H', W']`` probabilities (softmax in float64) and the
    target class (the predicted one when ``target`` is None).
    """
    volume = torch.as_tensor(volume, dtype=torch.float32)
    volume = volume[None] if volume.ndim == 3 else volume
    patch, stride = cube(patch), cube(stride)
    target = int(model(volume[None])[0].argmax()) if target is None else int(target)
    cells = grid_cells(volume.shape[1:], patch, stride, region)
    out = np.zeros([len(c) for c in cells], np.float32)
    for index in itertools.product(*(range(len(c)) for c in cells)):
        corner = [c[i] * s for c, i, s in zip(cells, index, stride)]
        logits = model(paint(volume, corner, patch, color)[None]).double()
        out[index] = torch.softmax(logits, 1)[0, target]
    return out, target
