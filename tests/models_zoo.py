"""Small models and helpers for the naive-vs-incremental differential tests.

Each custom model exercises one operator kind the incremental engine must handle, ends
in the same head (global average pool, linear, 10 classes) and takes any image size,
except ``flatten_linear_head`` and ``adaptive_avg_pools``, which are sized for 64x80. ``sensitive`` turns a randomly initialised network into one whose occlusion
map is not flat: a flat map is matched by any wrong engine, so it proves nothing.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CLASSES = 10


# -- images ----------------------------------------------------------------------------------

def blob_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth random colour blobs on a gradient: structure a random CNN reacts to."""
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


# -- making a random network sensitive ---------------------------------------------------------

class Scaled(nn.Module):
    """``scale * body(x) + offset``: a random network's near-uniform softmax made sensitive.

    ``magnitude`` is the largest |scale * body logit| on the fitting image: float rounding
    in the body grows with it, the constant ``offset`` adds none.
    """

    def __init__(self, body: nn.Module, scale: float, offset: torch.Tensor, magnitude: float):
        super().__init__()
        self.body, self.scale, self.magnitude = body, float(scale), float(magnitude)
        self.register_buffer("offset", offset.float().view(1, -1))

    def forward(self, x):
        return self.scale * self.body(x) + self.offset


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, height: int, width: int, passes: int = 3,
                        kind: str = "blobs") -> nn.Module:
    """Running statistics = the average batch statistics of random images like the test's.

    ``kind``: "blobs" (``blob_image``) or "photo" (``chelsea_crop``). Statistics from
    other images than the test's leave channels of tiny variance that blow up on it.
    """
    make = blob_image if kind == "blobs" else chelsea_crop
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if norms:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None                   # cumulative average over the passes
        model.train()
        with torch.random.fork_rng():           # dropout and stochastic depth are random in train()
            torch.manual_seed(0)
            for p in range(passes):
                model(torch.stack([make(height, width, seed=1000 + 4 * p + k) for k in range(4)]))
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
    """A model's logits on the probes, run as one batch and one by one, and the target."""

    def __init__(self, model, image, patch, color, target):
        probes = _probes(image, patch, color)
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


@torch.no_grad()
def sensitive(model: nn.Module, image: torch.Tensor, patch, color=(0.0, 0.0, 0.0),
              target=None) -> Scaled:
    """``model`` (BatchNorm already calibrated) wrapped so occluding ``image`` moves the target.

    The offset makes the unoccluded image a near tie between the target and the rival
    class whose logit gap to it moves most across the probes (p ~ 0.5, where the softmax
    is steepest; with ``target`` given the rival leads, so the default target differs).
    The scale makes that gap move by ~3 across the probes, within three caps: MAX_SPREAD,
    MAX_MAGNITUDE, and NOISE_BUDGET on the model's own float noise, measured as the
    difference between running the probes as one batch and one by one. A chaotic random
    network amplifies rounding so much that it cannot judge an engine to 1e-5: its map
    then comes out flat, and the test's range check says so.
    """
    probed = _Probed(model.eval(), image, patch, color, target)
    scale = min(3.0 / probed.gap, MAX_MAGNITUDE / float(probed.base.abs().max()))
    for _ in range(3):                          # the noise is about linear in the scale
        scale *= min(1.0, NOISE_BUDGET / max(probed.noise(scale), 1e-15))
    while probed.spread(scale) > MAX_SPREAD:
        scale *= 0.8
    net = Scaled(model, scale, probed.lead - scale * probed.base,
                 scale * float(probed.base.abs().max()))
    net.noise = probed.noise(scale)
    return net.eval()


@torch.no_grad()
def plain_heatmap(model, image, patch, stride, color, region=None) -> np.ndarray:
    """The obviously-correct loop of the spec: one forward pass per patch position."""
    (ph, pw), (sy, sx) = patch, stride
    _, h, w = image.shape
    target = int(model(image[None])[0].argmax())
    x0, y0, rw, rh = region if region is not None else (0, 0, w, h)
    rows = [i for i in range((h - ph) // sy + 1) if y0 <= i * sy and i * sy + ph <= y0 + rh]
    cols = [j for j in range((w - pw) // sx + 1) if x0 <= j * sx and j * sx + pw <= x0 + rw]
    out = np.zeros((len(rows), len(cols)), np.float32)
    for a, i in enumerate(rows):
        for b, j in enumerate(cols):
            occluded = image.clone()
            occluded[:, i * sy:i * sy + ph, j * sx:j * sx + pw] = torch.tensor(color).view(3, 1, 1)
            out[a, b] = torch.softmax(model(occluded[None]).double(), 1)[0, target]
    return out


# -- building blocks ------------------------------------------------------------------------

def conv(cin: int, cout: int, k=3, **kw) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, **kw)


def head(channels: int) -> list:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, CLASSES)]


def seq(channels: int, *layers) -> nn.Sequential:
    return nn.Sequential(*layers, *head(channels))


class Lambda(nn.Module):
    """A forward written as a function of ``(self, x)``, with its own parameters in ``parts``."""

    def __init__(self, fn, **parts):
        super().__init__()
        self.fn = fn
        for name, part in parts.items():
            setattr(self, name, part)

    def forward(self, x):
        return self.fn(self, x)


# -- one model per operator kind ------------------------------------------------------------

def _asym_pad_functional():
    weight = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
    bias = nn.Parameter(torch.randn(8) * 0.1)
    return seq(8, nn.ZeroPad2d((0, 1, 0, 1)),
               Lambda(lambda m, x: F.conv2d(x, m.weight, m.bias, stride=2),
                      weight=weight, bias=bias),
               nn.ReLU(), conv(8, 8, padding=1))


def _constant_pads():
    return seq(8, nn.ConstantPad2d((1, 2, 2, 1), 0.7), conv(3, 8), nn.ReLU(),
               Lambda(lambda m, x: F.pad(x, (1, 2, 0, 3))), conv(8, 8, stride=2), nn.Tanh())


def _max_pools():
    return seq(8, conv(3, 8, padding=1), nn.MaxPool2d(3, stride=2, padding=1),
               conv(8, 8, padding=1), nn.MaxPool2d(3, stride=2, ceil_mode=True),
               conv(8, 8, padding=1), nn.MaxPool2d(2, stride=1, dilation=2))


def _avg_pools():
    return seq(8, conv(3, 8, padding=1),
               nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
               conv(8, 8, padding=1), nn.AvgPool2d(3, stride=2, ceil_mode=True),
               conv(8, 8, padding=1), nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True,
                                                   count_include_pad=False))


def _adaptive_pools():
    # 64x80 image -> 32x40 after the strided conv; (8, 10) divides it exactly.
    return nn.Sequential(conv(3, 8, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((8, 10)),
                         conv(8, 8, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((1, 1)),
                         nn.Flatten(), nn.Linear(8, CLASSES))


def _adaptive_uneven():
    # 32x40 -> (5, 7): bins of unequal, overlapping sizes.
    return seq(8, conv(3, 8, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((5, 7)),
               conv(8, 8, padding=1))


def _flatten_linear():
    # 64x80 image -> 8x10 map, flattened into a position-sensitive Linear (no global pool).
    return nn.Sequential(conv(3, 8, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         conv(8, 4, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 8 * 10, CLASSES))


def _batchnorm():
    return seq(8, conv(3, 8, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
               conv(8, 8, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())


def _activation(act: nn.Module, centre: float = 0.0):
    """conv, act, strided conv, act; ``centre`` is subtracted from a positive activation's
    output so the head's logits are not one large constant (which would cap the scale)."""
    tail = [Lambda(lambda m, x: x - centre)] if centre else []
    return lambda: seq(8, conv(3, 8, padding=1), act, conv(8, 8, stride=2, padding=1), act, *tail)


def _dropouts():
    return seq(8, conv(3, 8, padding=1), nn.Dropout(0.5), conv(8, 8, padding=1), nn.Dropout2d(0.3),
               Lambda(lambda m, x: F.dropout(x, 0.2, m.training)), nn.ReLU())


def _scalar_arith():
    def forward(m, x):
        x = m.a(x) * 0.5 + 1
        x = m.b(2 - x) / 3
        return m.c(-x.relu())
    return seq(8, Lambda(forward, a=conv(3, 8, padding=1), b=conv(8, 8, padding=1),
                         c=conv(8, 8, stride=2)))


def _channel_scale():
    def forward(m, x):
        return torch.relu(m.a(x) * m.scale + m.shift)
    return seq(8, Lambda(forward, a=conv(3, 8, padding=1),
                         scale=nn.Parameter(torch.randn(1, 8, 1, 1)),
                         shift=nn.Parameter(torch.randn(1, 8, 1, 1) * 0.2)),
               conv(8, 8, stride=2, padding=1))


def _residual_two_rf():
    def forward(m, x):
        x = m.stem(x)
        return torch.relu(m.near(x) + m.far(torch.relu(m.wide(x))))
    return seq(8, Lambda(forward, stem=conv(3, 8, padding=1), near=conv(8, 8, 1),
                         wide=conv(8, 8, 5, padding=4, dilation=2), far=conv(8, 8, padding=1)),
               conv(8, 8, stride=2, padding=1))


def _mul_branches():
    def forward(m, x):
        return torch.sigmoid(m.gate(x)) * m.value(x)
    return seq(8, Lambda(forward, gate=conv(3, 8, padding=1), value=conv(3, 8, 5, padding=2)),
               conv(8, 8, stride=2, padding=1))


def _cat_inception():
    def forward(m, x):
        x = m.stem(x)
        branches = [m.b1(x), m.b3(x), m.b5(x), m.bp(F.max_pool2d(x, 3, 1, 1))]
        return torch.relu(torch.cat(branches, 1))
    return seq(16, Lambda(forward, stem=conv(3, 8, padding=1), b1=conv(8, 4, 1),
                          b3=conv(8, 4, padding=1), b5=conv(8, 4, 5, padding=2), bp=conv(8, 4, 1)),
               conv(16, 16, stride=2, padding=1))


def _squeeze_excite():
    def forward(m, x):
        x = torch.relu(m.stem(x))
        squeeze = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(m.up(torch.relu(m.down(squeeze))))
    return seq(8, Lambda(forward, stem=conv(3, 8, padding=1), down=conv(8, 4, 1), up=conv(4, 8, 1)),
               conv(8, 8, stride=2, padding=1), nn.ReLU())


def _in_place():
    def forward(m, x):
        identity = m.relu(m.stem(x))
        out = m.body(identity)
        out += identity
        return out.relu_()
    return seq(8, Lambda(forward, stem=conv(3, 8, padding=1), relu=nn.ReLU(inplace=True),
                         body=conv(8, 8, padding=1)), conv(8, 8, stride=2, padding=1))


def _tensor_methods():
    def forward(m, x):
        a = m.a(x).relu()
        b = m.b(a)
        return a.add(b).mul(b.sigmoid())
    return seq(8, Lambda(forward, a=conv(3, 8, padding=1), b=conv(8, 8, padding=1)),
               conv(8, 8, stride=2))


def _untraceable():
    def forward(m, x):
        x = m.a(x)
        if x.sum() > 0:                         # data-dependent control flow: fx cannot trace
            x = torch.relu(x)
        else:
            x = -x
        return m.b(x)
    return seq(8, Lambda(forward, a=conv(3, 8, padding=1), b=conv(8, 8, stride=2)))


def _non_square():
    return seq(8, conv(3, 8, (3, 5), stride=(2, 1), padding=(1, 2)), nn.ReLU(),
               conv(8, 8, (5, 3), stride=(1, 2)), nn.MaxPool2d((2, 3), stride=(2, 3)))


CUSTOM = {
    "conv_stride2": lambda: seq(8, conv(3, 8, stride=2, padding=1), nn.ReLU(),
                                conv(8, 8, stride=2)),
    "conv_kernel5": lambda: seq(8, conv(3, 8, 5, padding=2), nn.ReLU(), conv(8, 8, 5)),
    "conv_dilation2": lambda: seq(8, conv(3, 8, padding=2, dilation=2), nn.ReLU(),
                                  conv(8, 8, dilation=2, stride=2)),
    "conv_groups": lambda: seq(12, conv(3, 12, padding=1), conv(12, 12, padding=1, groups=12),
                               nn.ReLU(), conv(12, 12, stride=2, padding=1, groups=3)),
    "asym_pad_functional_conv": _asym_pad_functional,
    "padding_same": lambda: seq(8, conv(3, 8, padding="same"), nn.ReLU(),
                                conv(8, 8, 4, padding="same"), nn.ReLU(),
                                conv(8, 8, (2, 5), padding="same", dilation=(1, 2))),
    "constant_pad_and_F_pad": _constant_pads,
    "max_pools": _max_pools,
    "avg_pools": _avg_pools,
    "adaptive_avg_pools": _adaptive_pools,
    "adaptive_avg_uneven": _adaptive_uneven,
    "flatten_linear_head": _flatten_linear,
    "batchnorm_eval": _batchnorm,
    "relu": _activation(nn.ReLU()),
    "relu6": _activation(nn.ReLU6()),
    "silu": _activation(nn.SiLU()),
    "gelu": _activation(nn.GELU()),
    "hardswish": _activation(nn.Hardswish()),
    "sigmoid": _activation(nn.Sigmoid(), centre=0.5),
    "leaky_relu": _activation(nn.LeakyReLU(0.1)),
    "dropout_eval": _dropouts,
    "scalar_arith": _scalar_arith,
    "channel_scale_param": _channel_scale,
    "residual_two_rf": _residual_two_rf,
    "mul_branches": _mul_branches,
    "cat_inception": _cat_inception,
    "squeeze_excite": _squeeze_excite,
    "in_place_ops": _in_place,
    "tensor_methods": _tensor_methods,
    "non_square_kernels": _non_square,
}


def custom_model(name: str, seed: int = 0) -> nn.Module:
    """A fresh, deterministic instance of ``CUSTOM[name]`` (or the untraceable model)."""
    torch.manual_seed(seed)
    model = (_untraceable if name == "untraceable" else CUSTOM[name])()
    for m in model.modules():                   # variance-preserving: the image, not the
        if isinstance(m, (nn.Conv2d, nn.Linear)):   # biases, decides the logits
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.uniform_(m.bias, -0.1, 0.1)
    return model.eval()


def torchvision_model(name: str, seed: int = 0) -> nn.Module:
    """A torchvision classifier with random weights and 10 classes."""
    import torchvision

    torch.manual_seed(seed)
    kwargs = {"weights": None, "num_classes": CLASSES}
    if name in ("inception_v3", "googlenet"):
        kwargs.update(aux_logits=False, init_weights=False)
    return torchvision.models.get_model(name, **kwargs).eval()
