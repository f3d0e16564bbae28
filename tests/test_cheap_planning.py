"""Cheap decisions first: a model whose global gate (squeeze-excitation) sits early, and a
small input where even a low estimate of the incremental plan is not cheaper than the
plain loop, are planned naive from one forward pass's shapes, without a torch.fx trace or
views; every other model, and every query asking for more than the exact default plan,
is traced."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import kql
from helpers import calibrate_batchnorm, plain_heatmap, sensitive, smooth_noise_image
from kql.operators import shapes
from kql.planner import context, model_passes, naive_shortcut, physical
from models_zoo import small_cnn

QUERY = "OCCLUDE img USING net PATCH 8 STRIDE 4"


class EarlyGate(nn.Module):
    """A stem, then a squeeze-excitation block, then the rest of the network at full size."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pool, self.down, self.up = nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
                                    for _ in range(4)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x * torch.sigmoid(self.up(torch.relu(self.down(self.pool(x)))))
        return self.head(self.body(x))


def connection(model) -> kql.Connection:
    con = kql.connect()
    con.register_model("net", model)
    con.register_image("img", smooth_noise_image(24, 28))
    return con


def operator(con, query=QUERY) -> str:
    return con.execute("EXPLAIN " + query).plan.splitlines()[1]


@pytest.fixture
def no_trace(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was traced")
    monkeypatch.setattr(context, "profile_model", refuse)


def test_an_early_gate_plans_naive_without_tracing(no_trace):
    torch.manual_seed(0)
    con = connection(sensitive(EarlyGate(), smooth_noise_image(24, 28)))
    line = operator(con)
    assert line.startswith("  NaiveOcclusion:"), line
    assert "reason=global gate body.pool caps incremental at" in line and "planned without tracing" in line
    assert "predicted_s=" in line and "cache=" not in line
    assert "cache=shapes" in operator(con, QUERY + " TARGET 2")      # the second plans from the cache


def test_the_untraced_naive_map_is_the_plain_loop(no_trace):
    torch.manual_seed(1)
    image = smooth_noise_image(24, 28)
    model = sensitive(EarlyGate(), image, patch=(8, 8), color=(0.0, 0.0, 0.0))
    con = connection(model)
    result = con.execute(QUERY + " COLOR black")
    expected, target = plain_heatmap(model, image, (8, 8), (4, 4), (0.0, 0.0, 0.0))
    assert result.target == target
    assert np.ptp(expected) > 1e-3                                   # the map moves
    np.testing.assert_allclose(result.heatmap, expected, atol=1e-5)


@pytest.mark.parametrize("setting", ["SET gates = 'frozen'", "SET strategy = 'incremental'",
                                     "SET tau = 0.5"])
def test_settings_that_want_more_than_the_exact_default_are_traced(setting):
    torch.manual_seed(0)
    con = connection(sensitive(EarlyGate(), smooth_noise_image(24, 28)))
    con.execute(setting)
    assert "planned without tracing" not in operator(con)


def test_a_model_without_a_gate_on_a_larger_image_never_runs_the_shape_pass(monkeypatch):
    monkeypatch.setattr(model_passes, "summarize", lambda *a, **k: pytest.fail("shape pass ran"))
    con = connection(small_cnn())
    con.register_image("img", smooth_noise_image(170, 160))          # past SMALL_IMAGE
    assert "planned without tracing" not in operator(con, "OCCLUDE img USING net PATCH 32 STRIDE 32")


def test_a_late_gate_leaves_the_decision_to_the_cost_model():
    late = nn.Sequential(*[nn.Sequential(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.ReLU())
                           for i in range(5)])
    summary = shapes.summarize(nn.Sequential(late, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                             nn.Linear(8, 3)).eval(), torch.rand(3, 16, 16))
    assert summary.gate is None and summary.ratio_bound == float("inf")   # the head is no gate
    gated = shapes.summarize(EarlyGate().eval(), torch.rand(3, 16, 16))
    assert gated.gate == "pool" and 1.0 < gated.ratio_bound < 1.2
    assert gated.macs_before_gate == 16 * 16 * 8 * 27                       # the stem only


class WideStemGate(nn.Module):
    """A stem that writes a large map for few MACs (a 1x1 convolution, ReLU), pooled down
    to a squeeze-excitation gate, then the network's MACs on a small map."""

    def __init__(self):
        super().__init__()
        self.stem, self.pool = nn.Sequential(nn.Conv2d(3, 32, 1), nn.ReLU()), nn.MaxPool2d(4)
        self.gate, self.squeeze = nn.AdaptiveAvgPool2d(1), nn.Conv2d(32, 32, 1)
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
                                    for _ in range(3)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 3))

    def forward(self, x):
        x = self.pool(self.stem(x))
        return self.head(self.body(x * torch.sigmoid(self.squeeze(self.gate(x)))))


def test_a_gate_s_bound_counts_the_seconds_of_the_large_maps_before_it():
    """What runs before the first gate is all exact incremental inference can save; on
    memory-bound early layers that is far more of the time than of the MACs."""
    from kql.planner.calibrate import Throughput
    from kql.planner.cost import shape_ratio_bound

    def table(bandwidth):
        return Throughput("cpu", [[1e10] * 5] * 5, [1e10] * 5, 1e10, bandwidth, 1e-6, cout=[1.0] * 6)
    summary = shapes.summarize(WideStemGate().eval(), torch.rand(3, 64, 64))
    assert summary.gate == "gate" and summary.ratio_bound < 1.1     # 3% of the MACs come first
    assert summary.before_gate == (1, 3)                              # the stem conv; conv, ReLU, pool
    free_bytes, slow_bytes = table(1e15), table(1e9)
    assert shape_ratio_bound(summary, free_bytes, 16) < 1.1           # time follows the MACs
    assert shape_ratio_bound(summary, slow_bytes, 16) > 1.5           # the stem's map dominates
    no_gate = shapes.summarize(small_cnn().eval(), torch.rand(3, 24, 24))
    assert shape_ratio_bound(no_gate, slow_bytes, 16) == float("inf")


def wide_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def test_views_of_a_large_image_that_would_not_fit_are_never_built(no_trace):
    con = kql.connect()
    con.register_model("net", wide_cnn(), input_size=(1100, 1000))
    con.register_image("big", torch.rand(3, 1100, 1000))                # 1.1 megapixels
    con.execute("SET memory_limit = '256 MB'")                          # views ~200 MB x 2
    query = "OCCLUDE big USING net PATCH 400 STRIDE 600"
    line = operator(con, query)
    assert line.startswith("  NaiveOcclusion:") and "materialized views would need" in line, line
    result = con.execute(query + " COLOR black")
    expected, _ = plain_heatmap(wide_cnn(), con.catalog.resolve_image("big"), (400, 400),
                                (600, 600), (0.0, 0.0, 0.0))
    assert result.heatmap.shape == expected.shape == (2, 2)
    np.testing.assert_allclose(result.heatmap, expected, atol=1e-5)
    con.execute("SET strategy = 'incremental'")
    with pytest.raises(kql.KqlPlanError, match="materialized views.*memory_limit is 256.0 MB"):
        con.execute("EXPLAIN " + query)


# -- small inputs ---------------------------------------------------------------------------

def deep_narrow() -> nn.Module:
    """Eight 3x3 convolutions on the full map: a patch's change grows over all of it."""
    torch.manual_seed(2)
    layers = []
    for i in range(8):
        layers += [nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    return calibrate_batchnorm(net, 24, 28).eval()


def wide_shallow() -> nn.Module:
    """Two wide 3x3 convolutions on a 128x128 map, then pooling: a patch changes 1/150
    of it, so incremental inference saves nearly every MAC."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 4)).eval()


def test_a_small_input_where_incremental_cannot_pay_plans_naive_without_tracing(no_trace, monkeypatch):
    # The decision, not the estimate (tested below against the costed plans): a floor
    # above the naive plan's time.
    monkeypatch.setattr(naive_shortcut, "shape_incremental_floor", lambda *a: 10.0)
    image = smooth_noise_image(24, 28)
    model = sensitive(deep_narrow(), image, patch=(12, 12), color=(0.0, 0.0, 0.0))
    con = connection(model)
    query = "OCCLUDE img USING net PATCH 12 STRIDE 4"
    line = operator(con, query)
    assert line.startswith("  NaiveOcclusion:"), line
    assert "reason=small input: incremental at least" in line and "planned without tracing" in line
    result = con.execute(query + " COLOR black")
    expected, _ = plain_heatmap(model, image, (12, 12), (4, 4), (0.0, 0.0, 0.0))
    assert np.ptp(expected) > 1e-3
    np.testing.assert_allclose(result.heatmap, expected, atol=1e-5)


def test_a_small_input_the_shapes_cannot_price_is_traced(monkeypatch):
    monkeypatch.setattr(naive_shortcut, "shape_incremental_floor", lambda *a: None)
    con = connection(deep_narrow())
    assert "planned without tracing" not in operator(con)


def test_a_small_input_where_incremental_pays_is_traced():
    con = kql.connect()
    con.register_model("net", wide_shallow())
    con.register_image("img", smooth_noise_image(128, 128))
    line = operator(con, "OCCLUDE img USING net PATCH 8 STRIDE 8")
    assert line.startswith("  IncrementalOcclusion:"), line


def test_the_shape_pass_region_follows_windows_and_strides():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 2)).eval()
    summary = shapes.summarize(net, torch.rand(3, 16, 16))
    regions = summary.changed((4, 4))
    assert regions[:5] == [(6, 6), (6, 6), (3, 3), (5, 5), (5, 5)]   # +2, same, /2, +2, same
    assert regions[5:] == [(), (), ()]                               # pooled: no map is left
    assert shapes.summarize(net, torch.rand(3, 8, 8)).changed((8, 8))[3] == (4, 4)   # clipped


class Residual(nn.Module):
    """A residual block whose sum is a function (``+``): its reader takes the latest
    output of that size, the wider branch here."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 5, padding=2)
        self.skip, self.after = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.after(self.skip(x) + self.b(self.a(x))).mean((2, 3))


def test_the_shape_pass_region_joins_branches_through_functions():
    regions = shapes.summarize(Residual().eval(), torch.rand(3, 20, 20)).changed((2, 2))
    # in the order they ran: skip 2, a 2 (both read the image), b 6, after: the sum's
    # latest writer of its size is b, 6 + 2
    assert regions == [(2, 2), (2, 2), (6, 6), (8, 8)]


@pytest.mark.parametrize("arch, size", [("resnet18", 64), ("shufflenet_v2_x0_5", 64),
                                        ("mobilenet_v2", 96), ("googlenet", 112), ("vgg16", 64),
                                        ("squeezenet1_1", 80), ("densenet121", 64),
                                        ("convnext_tiny", 64)])
def test_the_incremental_floor_lies_below_the_costed_incremental_plan(arch, size):
    """The shape estimate must never price incremental inference above what the full
    planner predicts for it, or a small input would go naive where incremental pays."""
    from kql import executor
    from kql.language.parser import parse
    from kql.planner import calibrate
    from kql.planner.cost import shape_incremental_floor
    from models_zoo import torchvision_model
    con = kql.connect()
    con.register_model("net", torchvision_model(arch), input_size=(size, size))
    con.register_image("img", smooth_noise_image(size, size))
    con.execute("SET strategy = 'incremental'")
    text = "OCCLUDE img USING net PATCH 16 STRIDE 8 BATCH 16"
    plan = executor.plan(con, parse(text)[0], text)
    summary = shapes.summarize(con.catalog.resolve_model("net").composed().eval(),
                               con.catalog.resolve_image("img"))
    floor = shape_incremental_floor(summary, (16, 16), calibrate.throughput("cpu", None), 16)
    assert 0 < floor <= plan.cost.seconds, (floor, plan.cost.seconds)


class PixelMLP(nn.Module):
    """A linear layer over every pixel between two convolutions, as ConvNeXt's blocks."""

    def __init__(self):
        super().__init__()
        self.conv, self.mlp = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 6)
        self.last = nn.Conv2d(6, 4, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    def forward(self, x):
        x = self.mlp(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(self.last(x))


def test_a_linear_layer_over_every_pixel_is_a_1x1_convolution_of_the_changed_region():
    summary = shapes.summarize(PixelMLP().eval(), torch.rand(3, 16, 16))
    assert not summary.pixel_linear
    assert [c.depth for c in summary.convs] == [27, 4, 54]           # the linear: depth 4
    assert summary.linear_macs == 4 * 2                             # the head only
    assert [h.in_channels for h in summary.hops[:3]] == [3, 4, 6]   # read in their layouts
    regions = summary.changed((4, 4))
    # conv 4+2, the linear (channels-last) keeps it, the last conv 6+2
    assert regions[:2] == [(6, 6), (6, 6)] and regions[2] == (8, 8), regions


def test_linear_layers_over_tokens_leave_the_decision_to_the_cost_model():
    from kql.planner import calibrate
    from kql.planner.cost import shape_incremental_floor

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.mlp = nn.Conv2d(3, 4, 4, stride=4), nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.mlp(self.conv(x).flatten(2).transpose(1, 2)).mean(1))
    summary = shapes.summarize(Tokens().eval(), torch.rand(3, 16, 16))
    assert summary.pixel_linear
    assert shape_incremental_floor(summary, (4, 4), calibrate.throughput("cpu", None), 16) is None


class PaddedConv(nn.Conv2d):
    """A convolution holding its own padding module (EfficientNet-Lite0's 'same' padding)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pad = nn.ZeroPad2d(1)

    def forward(self, x):
        return super().forward(self.pad(x))


def test_a_convolution_with_children_of_its_own_is_counted():
    net = nn.Sequential(PaddedConv(3, 4, 3), nn.ReLU(), PaddedConv(4, 4, 3),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    summary = shapes.summarize(net, torch.rand(3, 8, 8))
    assert [c.depth for c in summary.convs] == [27, 36]
    assert summary.macs == 8 * 8 * 4 * (27 + 36) + 4 * 2
    regions = [r for h, r in zip(summary.hops, summary.changed((2, 2))) if h.conv is not None]
    assert regions == [(4, 4), (6, 6)]                        # +2 each, the padding no growth
