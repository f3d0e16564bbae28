"""Small models for the tests.

``small_cnn`` (made sensitive: ``sensitive_small_cnn``) is the API, error and EXPLAIN
tests' model. The custom models of the differential tests each exercise one operator
kind the incremental engine must handle, end in the same head (global average pool,
linear, 10 classes) and take any image size, except ``flatten_linear_head`` and
``adaptive_avg_pools``, which are sized for 64x80.
A random network's occlusion map is flat, so a test makes it sensitive first (see
``helpers.calibrate_batchnorm`` and ``helpers.sensitive``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from helpers import calibrate_batchnorm, sensitive, smooth_noise_image

CLASSES = 10


def small_cnn(classes: int = 5) -> nn.Module:
    """A deterministic CNN with BatchNorm (5 classes by default): conv, pool, strided conv, head."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))


def sensitive_small_cnn() -> nn.Module:
    """``small_cnn`` calibrated on 24x30 noise images, its top class at p ~ 0.6.

    The API, error and EXPLAIN tests' model (the ``small_model`` fixture): the golden
    EXPLAIN fixtures depend on exactly this model.
    """
    model = calibrate_batchnorm(small_cnn(), 24, 30, kind="noise", seed=100)
    return sensitive(model, smooth_noise_image(24, 30))


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
