"""Delta convolutions (operators/graph.py DeltaConv, operators/steps.py, planner/deltas.py):
a stride-1 convolution computes the change of its output from its input's change and adds
it to its view. The same maps as the plain loop on every architecture that has one, the
pieces against torch's own convolution, and the planner's per-node choice.

``SET delta_convolutions = 'on'`` forces every convolution that can run so; the maps are
judged by the differential suite's own check (naive against incremental, 1e-5 on the
probabilities, models calibrated so their maps are not flat).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kql
from helpers import (blob_image, calibrate_batchnorm, chelsea, image_connection, plain_heatmap,
                     sensitive)
from kql.operators import gather as g
from kql.operators.graph import DeltaConv
from kql.operators.profile import ModelProfile
from kql.operators.steps import can_delta, delta_gain, plan_steps
from kql.planner import calibrate, deltas, prior
from kql.planner.cost import delta_seconds, incremental_cost
from models_zoo import CUSTOM, custom_model, torchvision_model
from test_incremental import differential, occlude, operator_line

pytestmark = pytest.mark.usefixtures("one_thread")

TABLE = calibrate.Throughput("cpu", **prior.CPU)


# -- the pieces --------------------------------------------------------------------------------

@pytest.mark.parametrize("groups,dilation,kernel", [(1, 1, 3), (2, 1, 3), (4, 2, 3), (1, 1, (5, 3)),
                                                    (8, 1, 3)])
def test_delta_conv_is_the_change_of_the_convolution(groups, dilation, kernel):
    torch.manual_seed(0)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    w = torch.randn(8, 8 // groups, kh, kw)
    pad = (dilation * (kh - 1) // 2, dilation * (kw - 1) // 2)
    x = torch.randn(2, 8, 12, 13)
    dx = torch.zeros_like(x)
    dx[..., 3:7, 2:5] = torch.randn(2, 8, 4, 3)
    change = DeltaConv(w, (dilation, dilation), groups)(dx[..., 3:7, 2:5])
    full = (F.conv2d(x + dx, w, None, 1, pad, dilation, groups)
            - F.conv2d(x, w, None, 1, pad, dilation, groups))
    top, left = 3 + pad[0] - (kh - 1) * dilation, 2 + pad[1] - (kw - 1) * dilation
    assert change.shape[2:] == (4 + (kh - 1) * dilation, 3 + (kw - 1) * dilation)
    np.testing.assert_allclose(change, full[..., top:top + change.shape[2], left:left + change.shape[3]],
                               rtol=1e-5, atol=1e-4)   # the reference's own rounding: values ~10
    outside = full.clone()
    outside[..., top:top + change.shape[2], left:left + change.shape[3]] = 0
    assert float(outside.abs().max()) <= 1e-6          # nothing else changes


@pytest.mark.parametrize("channels_last", [False, True])
def test_add_at_keeps_only_what_falls_inside(channels_last):
    rng = np.random.default_rng(1)
    dst = torch.randn(5, 3, 6, 7)
    if channels_last:
        dst = dst.contiguous(memory_format=torch.channels_last)
    patches = torch.randn(5, 3, 4, 5)
    oy, ox = rng.integers(-3, 5, 5), rng.integers(-4, 6, 5)
    expected = dst.clone()
    for b in range(5):
        for i in range(4):
            for j in range(5):
                if 0 <= oy[b] + i < 6 and 0 <= ox[b] + j < 7:
                    expected[b, :, oy[b] + i, ox[b] + j] += patches[b, :, i, j]
    np.testing.assert_allclose(g.add_at(dst.clone(), patches, (oy, ox)), expected, atol=1e-6)


def test_channels_last_windows_are_the_same_windows():
    base = torch.randn(1, 6, 9, 11)
    ys, xs = np.array([0, 3, 5]), np.array([7, 0, 2])
    plain = g.windows(base, (ys, xs), (4, 4))
    pixels = g.windows(base.contiguous(memory_format=torch.channels_last), (ys, xs), (4, 4))
    assert pixels.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, pixels)


# -- the maps ----------------------------------------------------------------------------------

def forced_connection(net, image):
    con = image_connection(image=image, model=net)
    con.execute("SET delta_convolutions = 'on'")
    return con


DELTA_FREE = {"conv_stride2", "adaptive_avg_pools", "adaptive_avg_uneven", "flatten_linear_head",
              "non_square_kernels"}     # no stride-1 convolution reads a patch in these


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", sorted(CUSTOM))
def test_every_custom_operator_with_delta_convolutions(name):
    h, w = (40, 96) if name == "non_square_kernels" else (64, 80)
    image = blob_image(h, w, seed=1)
    net = sensitive(calibrate_batchnorm(custom_model(name), h, w), image, (16, 16))
    con = forced_connection(net, image)
    _, inc = differential(con, occlude("img", "net", (16, 16), (12, 16), extra="BATCH 7"), net)
    line = operator_line(inc)
    if name not in DELTA_FREE:
        assert "delta_convs=" in line and "DeltaConv:" in inc.plan, inc.plan


GEOMETRY = [   # (model, image h x w, patch, stride, extra)
    ("resnet18", (64, 80), (12, 12), (9, 11), ""),
    ("resnet18", (64, 80), (7, 3), (9, 11), "REGION (40, 24, 40, 40)"),
    ("cat_inception", (64, 80), (16, 16), (16, 16), "BATCH 1"),
    ("max_pools", (48, 96), (10, 24), (7, 5), ""),
    ("residual_two_rf", (16, 20), (6, 6), (1, 1), "BATCH 32"),
    ("vgg11", (64, 80), (8, 8), (4, 4), "REGION (20, 12, 36, 30)"),
]


@pytest.mark.parametrize("model,size,patch,stride,extra", GEOMETRY,
                         ids=[f"{c[0]}-{c[2][0]}x{c[2][1]}" for c in GEOMETRY])
def test_border_centre_and_odd_strides_with_delta_convolutions(model, size, patch, stride, extra):
    h, w = size
    if model in CUSTOM:
        image, body = blob_image(h, w, seed=3), calibrate_batchnorm(custom_model(model), h, w)
    else:
        image = chelsea(h, w)
        body = calibrate_batchnorm(torchvision_model(model), h, w, kind="photo")
    net = sensitive(body, image, patch)
    con = forced_connection(net, image)
    con.execute("SET crossover = 'none'")       # patches up to the global boundary: more deltas
    _, inc = differential(con, occlude("img", "net", patch, stride, extra=extra), net)
    assert "DeltaConv:" in inc.plan, inc.plan


def test_grouped_positions_keep_their_delta_convolutions(monkeypatch):
    from kql.planner import naive_shortcut, physical

    monkeypatch.setattr(physical, "GROUPS_MARGIN", 1e9)
    monkeypatch.setattr(physical, "GROUPS_MIN_PIXELS", 0)
    monkeypatch.setattr(naive_shortcut, "SMALL_IMAGE", 0)
    image = blob_image(40, 48, seed=2)
    net = sensitive(calibrate_batchnorm(custom_model("residual_two_rf"), 40, 48), image, (8, 8))
    con = forced_connection(net, image)
    con.execute("SET strategy = 'incremental'")
    result = con.execute("OCCLUDE img USING net PATCH 8 STRIDE 2 x 3 COLOR black")
    line = operator_line(result)
    assert "groups=" in line and "delta_convs=" in line, result.plan
    expected, _ = plain_heatmap(net, image, (8, 8), (2, 3), (0.0, 0.0, 0.0))
    assert np.ptp(expected) >= 0.02
    assert float(np.abs(result.heatmap - expected).max()) <= 1e-5


# -- the planner -------------------------------------------------------------------------------

def vgg_profile():
    torch.manual_seed(0)
    net = torchvision_model("vgg11")
    return ModelProfile(net, torch.rand(3, 96, 96))


def grid(size, patch, stride):
    g_ = np.arange((size - patch) // stride + 1) * stride
    ys, xs = np.meshgrid(g_, g_, indexing="ij")
    return ys.ravel(), xs.ravel()


def test_auto_takes_the_convolutions_priced_cheaper_as_deltas():
    profile = vgg_profile()
    positions = grid(96, 16, 8)
    on = deltas.choose(profile, positions, (16, 16), TABLE, 16, "on")
    auto = deltas.choose(profile, positions, (16, 16), TABLE, 16, "auto")
    assert deltas.choose(profile, positions, (16, 16), TABLE, 16, "off") == frozenset()
    # VGG11's eight 3x3 convolutions at 96 px: the last two read a full tensor (the patch
    # has covered the 12x12 map before them), the first six a patch
    assert auto <= on and len(on) == 6
    table = plan_steps(profile, *positions, (16, 16))
    for step in table:
        if not can_delta(step, table.steps):
            continue
        window, delta = delta_seconds(profile, step, table, TABLE, 16)
        assert (step.node in auto) == (delta < deltas.MARGIN * window)
        assert delta_gain(step, table.steps) > 1.0      # fewer multiply-adds, always


def test_delta_convolutions_do_fewer_macs_and_the_plan_says_so():
    profile = vgg_profile()
    ys, xs = grid(96, 16, 8)
    plain = plan_steps(profile, ys, xs, (16, 16))
    chosen = deltas.choose(profile, (ys, xs), (16, 16), TABLE, 16, "on")
    delta = plan_steps(profile, ys, xs, (16, 16), deltas=chosen)
    assert sum(s.delta for s in delta) == len(chosen)
    assert incremental_cost(profile, delta, TABLE, 16).macs < incremental_cost(profile, plain, TABLE, 16).macs
    names = {s.explain_name for s in delta if s.delta}
    assert names == {"DeltaConv"}


def test_off_runs_no_delta_convolution_and_a_bad_value_is_one_line():
    image = blob_image(64, 80, seed=1)
    net = sensitive(calibrate_batchnorm(custom_model("residual_two_rf"), 64, 80), image, (16, 16))
    con = forced_connection(net, image)
    con.execute("SET delta_convolutions = 'off'")
    con.execute("SET strategy = 'incremental'")
    plan = con.execute("EXPLAIN OCCLUDE img USING net PATCH 16 STRIDE 8").plan
    assert "DeltaConv" not in plan and "delta_convs" not in plan
    with pytest.raises(kql.KqlPlanError, match="delta_convolutions must be 'auto', 'on' or 'off'"):
        con.execute("SET delta_convolutions = 'always'")
