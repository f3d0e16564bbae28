"""kql.integrations.monai.OcclusionSensitivity against monai.visualize.OcclusionSensitivity.

Same models, images and arguments into both; the occlusion map must agree within 1e-4
and the most probable class exactly. The models' weights are scaled up so that the maps
vary from window to window (a flat map would let a wrong engine pass).
"""

import warnings

import pytest
import torch
import torchvision
from torch import nn

from helpers import scaled
from kql.integrations.monai import OcclusionSensitivity

monai_visualize = pytest.importorskip("monai.visualize")

TOLERANCE = 1e-4


class Net(nn.Module):
    """conv, ReLU, max pool, a residual add, a position-dependent linear head."""

    def __init__(self, height: int, width: int, channels: int = 3, classes: int = 5,
                 softmax: bool = False, depth: int = 1, features: int = 8, pool: int = 2):
        super().__init__()
        self.stem = nn.Conv2d(channels, features, 3, padding=1)
        self.body = nn.ModuleList(nn.Conv2d(features, features, 3, padding=1) for _ in range(depth))
        self.pool = nn.MaxPool2d(pool)
        self.head = nn.Linear(features * (height // pool) * (width // pool), classes)
        self.out = nn.Softmax(dim=1) if softmax else nn.Identity()

    def forward(self, x):
        y = torch.relu(self.stem(x))
        for conv in self.body:
            y = y + torch.relu(conv(y))
        return self.out(self.head(self.pool(y).flatten(1)))


def image(channels: int = 3, height: int = 20, width: int = 18, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, channels, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def net():
    return scaled(Net(20, 18), 3.0)


def monai_maps(model, x, b_box=None, **kw):
    with warnings.catch_warnings():               # MONAI's own deprecation warnings
        warnings.simplefilter("ignore")
        occ, best = monai_visualize.OcclusionSensitivity(model, verbose=False, **kw)(x, b_box=b_box)
    return occ.as_tensor(), best.as_tensor()


def same_as_monai(model, x, b_box=None, reference=None, **kw) -> OcclusionSensitivity:
    """``reference``: MONAI's arguments where they differ from ours."""
    expected, expected_class = monai_maps(model, x, b_box, **(reference or kw))
    ours = OcclusionSensitivity(model, verbose=False, **kw)
    occ, best = ours(x, b_box=b_box)
    assert occ.shape == expected.shape and occ.dtype == expected.dtype
    assert float(expected.std(dim=tuple(range(2, expected.dim()))).max()) > 50 * TOLERANCE   # a map that varies
    torch.testing.assert_close(occ, expected, atol=TOLERANCE, rtol=0)
    assert torch.equal(best, expected_class)
    return ours


@pytest.mark.parametrize("kw,b_box", [
    (dict(mask_size=6), None),                                        # gaussian, the default
    (dict(mask_size=(5, 4), mode="mean_patch", overlap=0.5), None),   # rectangular mask
    (dict(mask_size=6, mode=0.3, activate=False), None),
    (dict(mask_size=4, mode="mean_img", overlap=0.0), None),          # windows side by side
    (dict(mask_size=6, mode="mean_img"), [3, 12, -1, -1]),
    (dict(mask_size=5, mode="gaussian", overlap=0.25), [3, 12, 5, 15]),
    (dict(mask_size=(7, 3), mode="mean_patch"), [-1, -1, 2, 10]),
    (dict(mask_size=6, mode=0.0, activate=lambda out: out.sigmoid()), [0, 5, 0, 5]),  # mask cut
])
def test_matches_monai(net, kw, b_box):
    same_as_monai(net, image(seed=1), b_box, **kw)


def test_one_channel_image_gets_a_sigmoid():
    """MONAI picks sigmoid or softmax by the *image's* channels: one channel, sigmoid."""
    model = scaled(Net(16, 16, channels=1, classes=3), 3.0, seed=2)
    same_as_monai(model, image(1, 16, 16, seed=2), mask_size=4, mode="gaussian")


def test_model_ending_in_softmax():
    model = scaled(Net(20, 18, softmax=True), 5.0, seed=3)
    same_as_monai(model, image(seed=3), mask_size=5, mode="mean_patch", activate=False)


@pytest.mark.parametrize("mode,reference", [
    (lambda x, window: window * window.mean(), "mean_patch"),
    (lambda x, window: window * 0 + 0.3, 0.3),
])
def test_a_callable_mode_is_the_windows_content(net, mode, reference):
    """MONAI 1.6 raises for a callable mode (its predictor checks ``add`` and ``mul``
    first); KQL applies it as MONAI documents: checked against the equivalent mode."""
    same_as_monai(net, image(seed=4), mask_size=6, mode=mode,
                  reference=dict(mask_size=6, mode=reference))


def test_the_planner_picks_incremental_inference():
    """Windows side by side (overlap 0), small against the image: the planner's own choice
    is incremental inference, painting MONAI's Gaussian-weighted windows of the image.
    (Above 160x160 pixels: below, the choice also weighs a timed forward pass.)"""
    model = scaled(Net(176, 176, depth=2, pool=4), 1.5, seed=6)
    ours = same_as_monai(model, image(height=176, width=176, seed=5), mask_size=16, overlap=0.0)
    (plan,) = ours.plans
    assert plan.operator.name == "IncrementalOcclusion" and getattr(plan, "ys", None) is None
    assert plan.task().fill is not None


def test_windows_off_the_stride_grid():
    """Overlap 0.3 (a step of 4 on 64 - 6 = 58): the last window is pulled back off the
    stride grid; the planned operator runs at MONAI's corners."""
    wide = scaled(Net(64, 64, depth=4, features=32), 2.0, seed=6)
    x = image(height=64, width=64, seed=5)
    expected, _ = monai_maps(wide, x, mask_size=6, overlap=0.3, mode="mean_patch")
    ours = OcclusionSensitivity(wide, mask_size=6, overlap=0.3, mode="mean_patch", verbose=False)
    ours.connection.settings.set("strategy", "incremental")
    torch.testing.assert_close(ours(x)[0], expected, atol=TOLERANCE, rtol=0)
    (plan,) = ours.plans
    assert plan.operator.name == "IncrementalOcclusion"
    ys = plan.corners[0]
    assert sorted(set(ys.tolist()))[-2:] == [56, 58]


@pytest.mark.parametrize("strategy", ["naive", "incremental"])
def test_both_operators(net, strategy):
    x = image(seed=6)
    expected, _ = monai_maps(net, x, mask_size=6, mode="mean_patch", overlap=0.6)
    ours = OcclusionSensitivity(net, mask_size=6, mode="mean_patch", overlap=0.6, verbose=False)
    ours.connection.settings.set("strategy", strategy)
    torch.testing.assert_close(ours(x)[0], expected, atol=TOLERANCE, rtol=0)
    assert ours.plans[0].operator.name == f"{strategy.capitalize()}Occlusion"


def test_resnet18():
    torch.manual_seed(7)
    model = torchvision.models.resnet18(num_classes=4).eval()   # random weights, BN in eval
    with torch.no_grad():
        model.fc.weight.mul_(10.0)
    same_as_monai(model, image(height=64, width=64, seed=7), mask_size=16, overlap=0.5)


@pytest.mark.parametrize("x,call,error,words", [
    (image().repeat(2, 1, 1, 1), {}, ValueError, "batch size of 1"),
    (torch.rand(1, 3, 8), {}, NotImplementedError, "images .1, C, H, W. or volumes"),
    (image(), dict(extra=1), NotImplementedError, "extra"),
    (image(height=4, width=4), {}, ValueError, "should be bigger than mask"),
])
def test_what_is_not_supported_says_so_in_one_line(net, x, call, error, words):
    with pytest.raises(error, match=words) as info:
        OcclusionSensitivity(net, mask_size=6, verbose=False)(x, **call)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def volume_net():
    from volume_models import blob_volume, resnet3d, sensitive_volume

    x = blob_volume(16, 18, 20, seed=1)
    return sensitive_volume(resnet3d(), x, (6, 6, 6), (0.0,)), x[None]


@pytest.mark.parametrize("kw,b_box", [
    (dict(mask_size=6, overlap=0.5), None),                                  # gaussian
    (dict(mask_size=(4, 6, 8), mode="mean_patch", overlap=0.25), None),
    (dict(mask_size=6, mode=0.0, overlap=0.5), None),
    (dict(mask_size=5, mode="mean_img", overlap=0.0), [2, 10, 3, 12, -1, -1]),
])
def test_matches_monai_on_volumes(volume_net, kw, b_box):
    model, x = volume_net
    ours = same_as_monai(model, x, b_box, **kw)
    assert "Volume:" in "\n".join(ours.plans[0].explain())


def test_bad_arguments(net):
    with pytest.raises(NotImplementedError, match="mode must be"):
        OcclusionSensitivity(net, mode="median")
    with pytest.raises(ValueError, match="overlap"):
        OcclusionSensitivity(net, mask_size=4, overlap=1.0, verbose=False)(image())
    with pytest.raises(ValueError, match="mask_size must have 2 values for a 2D input"):
        OcclusionSensitivity(net, mask_size=(4, 4, 4), verbose=False)(image())
