"""kql.integrations.captum.Occlusion against captum.attr.Occlusion on the same inputs.

The models are built so that their maps vary (weights scaled up, a flatten + linear head
that depends on where a feature is): a flat map would let a wrong engine pass. Every
comparison is at Captum's attribution scale, within 1e-4. ``Result.attribution`` (a KQL
query's map in Captum's convention) is checked here too.
"""

import numpy as np
import pytest
import torch
import torchvision
from captum.attr import Occlusion as CaptumOcclusion
from torch import nn

import kql
from helpers import scaled
from kql.integrations.captum import Occlusion

TOLERANCE = 1e-4


class Residual(nn.Module):
    """conv, ReLU, max pool, a residual add, a position-dependent linear head."""

    def __init__(self, size: int, classes: int = 5, softmax: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * (size // 2) ** 2, classes)
        self.out = nn.Softmax(dim=1) if softmax else nn.Identity()

    def forward(self, x):
        y = self.pool(torch.relu(self.stem(x)))
        y = torch.relu(y + self.body(y))
        return self.out(self.head(y.flatten(1)))


@pytest.fixture(scope="module")
def net():
    return scaled(Residual(16), 3.0)


@pytest.fixture(scope="module")
def softmax_net():
    return scaled(Residual(16, softmax=True), 4.0, seed=1)


def images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def same_as_captum(model, x, **kw) -> Occlusion:
    kw.setdefault("perturbations_per_eval", 16)          # Captum's batch; KQL plans its own
    expected = CaptumOcclusion(model).attribute(x, **kw)
    ours = Occlusion(model)
    got = ours.attribute(x, **kw)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert float(expected.std()) > 50 * TOLERANCE          # a map that varies
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
    return ours


BASELINES = {
    "none": lambda x: None,
    "scalar": lambda x: 0.25,
    "per_channel": lambda x: torch.tensor([0.1, 0.5, 0.9]).view(3, 1, 1),
    "per_pixel": lambda x: torch.rand(x.shape[1:], generator=torch.Generator().manual_seed(5)),
    "per_example": lambda x: torch.rand(x.shape, generator=torch.Generator().manual_seed(6)),
}


@pytest.mark.parametrize("n,baseline,window,strides", [
    (1, "none", (3, 4, 4), (1, 2, 2)),            # square; the stride divides the image
    (3, "scalar", (3, 5, 3), (3, 4, 2)),          # rectangular; the last windows cut
    (3, "per_channel", (3, 6, 6), 4),             # an int stride; cut in both directions
    (1, "per_pixel", (3, 5, 3), (3, 4, 2)),
    (3, "per_pixel", (3, 6, 6), 4),
    (3, "per_example", (3, 4, 4), (1, 2, 2)),
    (1, "per_example", (3, 6, 6), 4),
])
def test_matches_captum(net, n, baseline, window, strides):
    x = images(n, seed=n)
    target = 1 if n == 1 else [0, 3, 4]
    same_as_captum(net, x, sliding_window_shapes=window, strides=strides,
                   baselines=BASELINES[baseline](x), target=target)


def test_model_ending_in_softmax(softmax_net):
    x = images(3, seed=7)
    same_as_captum(softmax_net, x, sliding_window_shapes=(3, 3, 5), strides=(1, 2, 3),
                   target=torch.tensor([2, 2, 0]), baselines=0.5)


@pytest.mark.parametrize("window,strides", [((1, 4, 4), (1, 3, 3)), ((2, 4, 4), (2, 4, 4))])
def test_windows_over_some_channels(net, window, strides):
    """A window over fewer channels than the image's (the last one cut at the channels'
    end): the patch keeps the other channels' pixels."""
    x = images(2, seed=3)
    same_as_captum(net, x, sliding_window_shapes=window, strides=strides, target=[1, 2],
                   baselines=BASELINES["per_pixel"](x))


@pytest.mark.parametrize("strategy", ["naive", "incremental"])
def test_both_operators_paint_per_position_content(strategy):
    """Both engines under the planner: a per-pixel baseline painted by the naive and the
    incremental operator gives Captum's map."""
    model = scaled(Residual(32), 2.0, seed=3)
    x = images(1, size=32, seed=4)
    expected = CaptumOcclusion(model).attribute(x, (3, 6, 6), strides=(1, 4, 4), target=2,
                                                baselines=BASELINES["per_pixel"](x))
    ours = Occlusion(model)
    ours.connection.settings.set("strategy", strategy)
    got = ours.attribute(x, (3, 6, 6), strides=(1, 4, 4), target=2,
                         baselines=BASELINES["per_pixel"](x))
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)
    assert {p.operator.name for p in ours.plans} == {f"{strategy.capitalize()}Occlusion"}
    assert all(p.task().fill is not None for p in ours.plans)


class Deep(nn.Module):
    """Residual convolutions at the input's resolution: incremental inference pays."""

    def __init__(self, size: int, width: int = 16, depth: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.body = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in range(depth))
        self.pool = nn.MaxPool2d(4)
        self.head = nn.Linear(width * (size // 4) ** 2, 5)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        for conv in self.body:
            y = y + torch.relu(conv(y))
        return self.head(self.pool(y).flatten(1))


def test_the_planner_picks_incremental_inference():
    """Convolutions at the input's resolution, windows small against the image: the
    planner's own choice (no strategy set) is incremental inference, here painting a
    per-pixel baseline. (Above 160x160 pixels: below, the choice also weighs a timed
    forward pass, and a busy machine can tip it.)"""
    model = scaled(Deep(176, width=8, depth=2), 1.5, seed=2)
    x = images(1, size=176, seed=8)
    ours = same_as_captum(model, x, sliding_window_shapes=(3, 16, 16), strides=(1, 16, 16),
                          target=3, baselines=BASELINES["per_pixel"](x))
    assert [p.operator.name for p in ours.plans] == ["IncrementalOcclusion"]
    assert "IncrementalOcclusion" in "\n".join(ours.plans[0].explain())


def test_resnet18():
    torch.manual_seed(4)
    model = torchvision.models.resnet18(num_classes=10).eval()   # random weights, BN in eval
    with torch.no_grad():
        model.fc.weight.mul_(10.0)
    x = images(1, size=64, seed=9)
    same_as_captum(model, x, sliding_window_shapes=(3, 12, 8), strides=(1, 10, 7), target=6,
                   baselines=BASELINES["per_channel"](x))


def test_an_untraceable_forward_func_runs_the_plain_loop_and_says_so():
    model = scaled(Deep(32), 1.5, seed=2)
    forward = lambda inputs: model(inputs) * 2.0         # noqa: E731: a plain callable
    x = images(1, size=32, seed=2)
    expected = CaptumOcclusion(forward).attribute(x, (3, 6, 6), strides=3, target=1,
                                                  perturbations_per_eval=16)
    ours = Occlusion(forward)
    ours.connection.settings.set("strategy", "incremental")   # asked for, and impossible
    torch.testing.assert_close(ours.attribute(x, (3, 6, 6), strides=3, target=1), expected,
                               atol=TOLERANCE, rtol=0)
    assert {p.operator.name for p in ours.plans} == {"NaiveOcclusion"}
    assert "torch.fx cannot trace" in ours.plans[0].reason


def test_one_output_per_example_needs_no_target():
    model = nn.Sequential(Residual(16, classes=1)).eval()
    scaled(model, 3.0, seed=5)
    same_as_captum(model, images(2), sliding_window_shapes=(3, 4, 4), strides=2)


def test_a_tuple_of_one_input_gives_a_tuple(net):
    x = images(1)
    got = Occlusion(net).attribute((x,), ((3, 4, 4),), strides=((1, 3, 3),), target=0)
    expected = CaptumOcclusion(net).attribute((x,), ((3, 4, 4),), strides=((1, 3, 3),), target=0)
    assert isinstance(got, tuple) and len(got) == 1
    torch.testing.assert_close(got[0], expected[0], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("call,error,words", [
    (dict(additional_forward_args=(1,)), NotImplementedError, "additional_forward_args"),
    (dict(target=None), NotImplementedError, "target=None"),
    (dict(target=[1, 2]), ValueError, "2 entries for 1 examples"),
    (dict(strides=(1, 5, 5)), ValueError, "cannot be larger than sliding window"),
    (dict(baselines=torch.zeros(2, 16, 16)), ValueError, "do not broadcast"),
    (dict(sliding_window_shapes=(4, 4)), ValueError, "tuple of 3 ints"),
])
def test_what_is_not_supported_says_so_in_one_line(net, call, error, words):
    kw = dict(sliding_window_shapes=(3, 4, 4), strides=2, target=1) | call
    with pytest.raises(error, match=words) as info:
        Occlusion(net).attribute(images(1), **kw)
    assert "\n" not in str(info.value)


def test_refuses_several_inputs_and_a_training_model(net):
    with pytest.raises(NotImplementedError, match="one input tensor"):
        Occlusion(net).attribute((images(1), images(1)), ((3, 4, 4), (3, 4, 4)), target=0)
    training = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(392, 2))
    with pytest.raises(ValueError, match="model.eval"):
        Occlusion(training).attribute(images(1), (3, 4, 4), target=0)


# -- Result.attribution ------------------------------------------------------------------------

def query_result(model, image, patch: int, stride: int):
    con = kql.connect()
    con.register_model("net", model)
    con.register_image("img", image)
    return con.execute(f"OCCLUDE img USING net PATCH {patch} STRIDE {stride} COLOR (0, 0, 0) "
                       f"OUTPUT logits TARGET (1, 4)")


def test_result_attribution_is_captums_map(net):
    x = images(1, seed=11)
    r = query_result(net, x[0], 4, 2)                   # 2 divides 16 - 4: no cut windows
    expected = CaptumOcclusion(net).attribute(x, (3, 4, 4), strides=(1, 2, 2), target=[4])
    assert r.attributions.shape == (2, 16, 16) and r.attribution.dtype == np.float32
    np.testing.assert_allclose(r.attributions[1], expected[0, 0].numpy(), atol=TOLERANCE)
    first = CaptumOcclusion(net).attribute(x, (3, 4, 4), strides=(1, 2, 2), target=1)
    np.testing.assert_allclose(r.attribution, first[0, 0].numpy(), atol=TOLERANCE)


def test_result_attribution_is_nan_where_no_patch_lies(net):
    r = query_result(net, images(1, seed=12)[0], 3, 5)  # stride > patch, and a border left
    covered = np.zeros((16, 16), bool)
    for y in range(0, 14, 5):
        for x in range(0, 14, 5):
            covered[y:y + 3, x:x + 3] = True
    assert (np.isnan(r.attribution) == ~covered).all()
    # each covered pixel lies under one patch: its cell's drop
    np.testing.assert_allclose(r.attribution[5, 10], r.drop[1, 2], atol=1e-6)
