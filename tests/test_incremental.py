"""Differential tests: the incremental engine against the naive one, query by query.

Every test runs one OCCLUDE twice on one connection, ``SET strategy = 'naive'`` then
``'incremental'``, and checks that the maps agree (probabilities to 1e-5), that the
incremental plan really ran (no silent fallback), and that the naive map is not flat
(range >= 0.02): a flat map is matched by any wrong engine. Random networks are made
sensitive by ``helpers``: BatchNorm statistics calibrated on images like the test's,
then ``sensitive`` scales and offsets the logits so the target probability moves, while
keeping the network's own float noise (batched vs one by one) near 1e-6, well under 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kql
from helpers import blob_image, calibrate_batchnorm, chelsea, plain_heatmap, sensitive
from models_zoo import CUSTOM, custom_model, torchvision_model

PROB_TOL = 1e-5
# Both engines compute each output element as the same sum, but on differently sized
# tensors, so the CPU backend may pick another summation order: float32 rounding of
# ~1e-7 per operation, relative to the activations, grows with depth to ~1e-6 of the
# logits' magnitude (a few ulps of the scaled logits here; measured up to ~2e-5 on
# magnitudes <= 15). 1e-4 of max(1, |logit|) leaves a margin for that, while a wrong
# pixel or a stale view moves the logits by a visible fraction of their range. The
# magnitude is taken before ``Scaled``'s constant offset, which adds no rounding.
LOGIT_REL_TOL = 1e-4
MIN_RANGE = 0.02
COLORS = {"black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0)}


pytestmark = pytest.mark.usefixtures("one_thread")


def operator_line(result) -> str:
    """The physical occlusion operator: the second line of the EXPLAIN text."""
    return result.plan.splitlines()[1]


def differential(con, query: str, net=None, incremental_plan: bool = True):
    """Run ``query`` naive and incremental on ``con``; check they agree; return both.

    ``net``: the registered ``helpers.Scaled`` model, for the size of its logits before
    the constant offset (see above) and its own float noise; None for real weights.
    """
    out = {}
    for strategy in ("naive", "incremental"):
        con.execute(f"SET strategy = '{strategy}'")
        out[strategy] = con.execute(query)
    ref, inc = out["naive"], out["incremental"]
    assert operator_line(ref).startswith("  NaiveOcclusion:"), ref.plan
    if incremental_plan:
        assert operator_line(inc).startswith("  IncrementalOcclusion:"), inc.plan
    assert inc.target == ref.target
    assert inc.heatmap.shape == ref.heatmap.shape and inc.logits.shape == ref.logits.shape
    prob_diff = float(np.abs(inc.heatmap - ref.heatmap).max())
    logit_diff = float(np.abs(inc.logits - ref.logits).max())
    logit_scale = max(1.0, getattr(net, "magnitude", 0.0), float(np.abs(ref.logits).max()))
    floor = f"; the model's own float noise ~{net.noise:.2g}" if net is not None else ""
    where = np.unravel_index(np.abs(inc.heatmap - ref.heatmap).argmax(), ref.heatmap.shape)
    assert prob_diff <= PROB_TOL, f"{query}: max |prob diff| {prob_diff:.3g} at cell {where}{floor}"
    assert logit_diff <= LOGIT_REL_TOL * logit_scale, \
        f"{query}: max |logit diff| {logit_diff:.3g} (logit scale {logit_scale:.3g}){floor}"
    span = float(ref.heatmap.max() - ref.heatmap.min())
    assert span >= MIN_RANGE, f"{query}: the naive map is almost flat (range {span:.3g})"
    return ref, inc


def occlude(image: str, model: str, patch, stride, color="black", extra: str = "") -> str:
    """The query text; ``color`` a name or an (r, g, b) tuple."""
    (ph, pw), (sy, sx) = patch, stride
    color = color if isinstance(color, str) else "(" + ", ".join(map(str, color)) + ")"
    return (f"OCCLUDE {image} USING {model} PATCH {ph} x {pw} STRIDE {sy} x {sx} "
            f"COLOR {color} {extra}").strip()


def color_of(color, image: torch.Tensor) -> tuple:
    if color == "mean":
        return tuple(image.mean((1, 2)).tolist())
    return COLORS[color] if isinstance(color, str) else tuple(color)


# -- (c) one small custom model per operator kind --------------------------------------------

@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name", sorted(CUSTOM))
def test_custom_operator(name):
    h, w = (40, 96) if name == "non_square_kernels" else (64, 80)
    image = blob_image(h, w, seed=1)
    model = calibrate_batchnorm(custom_model(name), h, w)
    net = sensitive(model, image, (16, 16))
    con = kql.connect()
    con.register_model("net", net)
    con.register_image("img", image)
    differential(con, occlude("img", "net", (16, 16), (12, 16), extra="BATCH 7"), net)


def test_trace_copy_shares_weights_and_leaves_the_model_alone():
    from torch import nn

    from kql.operators.graph import trace

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True)).eval()
    gm = trace(model, "cpu")
    assert gm.get_submodule("0").weight is model[0].weight                 # shared, not copied
    assert gm.get_submodule("1").running_var is model[1].running_var
    assert model[2].inplace is True and gm.get_submodule("2").inplace is False
    gm = trace(model, "meta")                                              # another device: copies
    assert gm.get_submodule("0").weight.is_meta and not model[0].weight.is_meta
    assert isinstance(gm.get_submodule("0").weight, nn.Parameter)


def test_untraceable_model_falls_back_to_naive():
    image = blob_image(32, 40, seed=2)
    net = sensitive(custom_model("untraceable"), image, (12, 12))
    con = kql.connect()
    con.register_model("net", net)
    con.register_image("img", image)
    query = occlude("img", "net", (12, 12), (5, 7))
    ref, inc = differential(con, query, net, incremental_plan=False)
    assert operator_line(inc).startswith("  NaiveOcclusion:"), inc.plan
    assert "reason=" in operator_line(inc) and "strategy=naive" not in operator_line(inc), inc.plan
    con.execute("SET strategy = 'auto'")
    auto = con.execute(query)
    assert operator_line(auto).startswith("  NaiveOcclusion:") and "reason=" in operator_line(auto)
    np.testing.assert_allclose(auto.heatmap, ref.heatmap, atol=1e-6)   # layouts may differ


# -- geometry: borders, shapes, regions, batches, targets, colours ----------------------------

# (id, image h x w, patch h x w, stride sy x sx, colour, extra clauses)
GEOMETRY = [
    ("flush_edges", (64, 80), (16, 16), (16, 16), "black", ""),
    ("stride_not_dividing", (64, 80), (12, 12), (9, 11), "black", ""),
    ("rect_patch_7x3", (64, 80), (7, 3), (9, 11), "black", ""),
    ("stride1_small_image", (16, 20), (6, 6), (1, 1), "black", "BATCH 32"),
    ("stride_gt_patch", (64, 80), (6, 9), (13, 17), "black", ""),
    ("patch_full_height", (64, 80), (64, 8), (1, 12), "black", ""),
    ("patch_full_width", (48, 96), (10, 96), (7, 1), "black", ""),
    ("tall_image", (96, 48), (16, 16), (16, 16), "black", ""),
    ("region_inner", (64, 80), (8, 8), (4, 4), "black", "REGION (20, 12, 36, 30)"),
    ("region_bottom_right", (64, 80), (16, 16), (4, 4), "black", "REGION (40, 24, 40, 40)"),
    ("batch1", (64, 80), (16, 16), (16, 16), "black", "BATCH 1"),
    ("batch_gt_positions", (64, 80), (16, 16), (16, 16), "black", "BATCH 500"),
    ("target_index", (64, 80), (16, 16), (12, 16), "black", "TARGET {second}"),
    ("color_mean", (64, 80), (24, 24), (10, 14), "mean", ""),
    ("color_white", (64, 80), (16, 16), (12, 16), "white", ""),
    ("color_rgb", (64, 80), (16, 16), (12, 16), (0.9, 0.1, 0.5), ""),
]
GEOMETRY_MODELS = ["resnet18", "mobilenet_v2", "max_pools", "cat_inception",
                   "asym_pad_functional_conv"]


@pytest.fixture(scope="module")
def calibrated():
    """name -> model with BatchNorm calibrated, built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            if name in CUSTOM:
                cache[name] = calibrate_batchnorm(custom_model(name), 64, 80)
            else:
                cache[name] = calibrate_batchnorm(torchvision_model(name), 64, 80, kind="photo")
        return cache[name]

    yield get
    cache.clear()


@pytest.mark.parametrize("model", GEOMETRY_MODELS)
@pytest.mark.parametrize("case", GEOMETRY, ids=[g[0] for g in GEOMETRY])
def test_geometry(calibrated, model, case):
    _, (h, w), patch, stride, color, extra = case
    image = blob_image(h, w, seed=3) if model in CUSTOM else chelsea(h, w)
    body = calibrated(model)
    target = None
    if "{second}" in extra:                     # the runner-up class: not the default target
        with torch.no_grad():
            target = int(body(image[None])[0].argsort(descending=True)[1])
        extra = extra.format(second=target)
    net = sensitive(body, image, patch, color_of(color, image), target)
    con = kql.connect()
    con.register_model("net", net)
    con.register_image("img", image)
    ref, _ = differential(con, occlude("img", "net", patch, stride, color, extra), net)
    rows, cols = (h - patch[0]) // stride[0] + 1, (w - patch[1]) // stride[1] + 1
    if "REGION" not in extra:
        assert ref.heatmap.shape == (rows, cols)
    if target is not None:
        assert ref.target == target


@pytest.mark.parametrize("crossover", ["'none'", "1", "0.6", "0.2"])
@pytest.mark.parametrize("model", ["resnet18", "cat_inception"])
def test_every_crossover_is_exact(calibrated, model, crossover):
    """Pure incremental inference (patches carried up to the global boundary, the seed
    prototype), the crossover where a patch covers its map, and earlier ones. The 24x24
    patch covers the late feature maps, so the engines really differ there."""
    image = blob_image(64, 80, seed=3) if model in CUSTOM else chelsea(64, 80)
    patch = (24, 24)
    net = sensitive(calibrated(model), image, patch)
    con = kql.connect()
    con.register_model("net", net)
    con.register_image("img", image)
    con.execute(f"SET crossover = {crossover}")
    _, inc = differential(con, occlude("img", "net", patch, (10, 14), extra="BATCH 6"), net)
    expected = "none" if crossover == "'none'" else f"{float(crossover):.2f}"
    assert f"crossover={expected}," in operator_line(inc), inc.plan


def test_both_engines_match_the_plain_loop():
    """Pins the grid semantics both engines share: rows, columns and REGION windowing."""
    image = blob_image(50, 70, seed=4)
    patch, stride, region = (9, 5), (6, 7), (10, 5, 48, 40)
    net = sensitive(calibrate_batchnorm(custom_model("residual_two_rf"), 50, 70), image, patch)
    con = kql.connect()
    con.register_model("net", net)
    con.register_image("img", image)
    query = occlude("img", "net", patch, stride, extra="REGION (10, 5, 48, 40)")
    ref, inc = differential(con, query, net)
    expected, _ = plain_heatmap(net, image, patch, stride, (0.0, 0.0, 0.0), region=region)
    assert ref.heatmap.shape == expected.shape == (6, 6)
    np.testing.assert_allclose(ref.heatmap, expected, atol=PROB_TOL, rtol=0)
    np.testing.assert_allclose(inc.heatmap, expected, atol=PROB_TOL, rtol=0)


# -- (a) torchvision architectures with random weights ----------------------------------------

def arch(name, size=(64, 80), must_be_incremental=True, slow=False):
    return pytest.param(name, size, must_be_incremental, id=name,
                        marks=[pytest.mark.slow] if slow else [])


# (name, image h x w, must run incrementally). Where a fallback to naive would be
# acceptable, the comment says which plan the engine chose when this file was written.
TORCHVISION = [
    arch("vgg16", slow=True),
    arch("resnet18"),
    arch("inception_v3", (80, 96), slow=True),              # needs >= 75x75
    arch("googlenet", slow=True),
    arch("mobilenet_v2"),
    arch("densenet121", slow=True),
    arch("squeezenet1_1"),
    arch("regnet_y_400mf"),
    arch("regnet_x_400mf"),
    arch("mobilenet_v3_small", must_be_incremental=False),  # ran IncrementalOcclusion
    arch("shufflenet_v2_x0_5", must_be_incremental=False),  # ran IncrementalOcclusion
    arch("efficientnet_b0", must_be_incremental=False, slow=True),   # ran IncrementalOcclusion
    arch("convnext_tiny", must_be_incremental=False, slow=True),     # ran IncrementalOcclusion
    arch("resnext50_32x4d", must_be_incremental=False, slow=True),   # ran IncrementalOcclusion
]


@pytest.mark.parametrize("name,size,must_be_incremental", TORCHVISION)
def test_torchvision(name, size, must_be_incremental):
    h, w = size
    image = chelsea(h, w)
    body = calibrate_batchnorm(torchvision_model(name), h, w, kind="photo")
    patch = (20, 20) if h >= 80 else (16, 16)
    stride = (20, 19) if h >= 80 else (12, 16)
    net = sensitive(body, image, patch)
    con = kql.connect()
    con.register_model("net", net)
    con.register_image("img", image)
    differential(con, occlude("img", "net", patch, stride, extra="BATCH 8"), net,
                 incremental_plan=must_be_incremental)


# -- (b) the built-in EfficientNet-Lite0 with its real weights --------------------------------

@pytest.mark.slow
def test_builtin_efficientnet_lite0():
    """Real weights, so no calibration; the built-in resizes the cat to 224x224 itself."""
    import skimage.data

    con = kql.connect()
    con.register_image("cat", skimage.data.chelsea())          # uint8 HxWx3, 300x451
    query = ("OCCLUDE cat USING efficientnet_lite0 PATCH 32 STRIDE 48 COLOR black "
             "REGION (33, 0, 386, 300) BATCH 8")         # the 451x300 photo's pixels
    ref, _ = differential(con, query)          # real weights: logits judged by their own size
    assert ref.heatmap.shape == (5, 3)         # model columns 48, 96, 144 fit in x = 16..209
