"""3D occlusion (volumes: CT, MRI), differential: every map against the plain loop.

Each case runs one ``OCCLUDE vol USING net ...`` with ``SET strategy = 'naive'`` and
``'incremental'`` on one connection; both maps must equal ``plain_volume_map`` (one
forward pass per cube position, softmax in float64) within 1e-5, the EXPLAIN text must
name the operator that ran (no silent fallback), and the reference map must not be flat
(range > 0.05), or a wrong engine would pass. Random 3D networks are made sensitive as the
2D suite's are (``volume_models``: BatchNorm statistics of volumes like the test's, then a
logit scale and offset fitted on 27 probe cubes, the model's own float noise kept ~1e-6).

The reference itself is checked against ``monai.visualize.OcclusionSensitivity`` on the
settings under which the two compute the same windows (see ``test_reference_is_monai_*``).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import kql
from helpers import SMALL_QUERY, plain_heatmap, smooth_noise_image
from volume_models import (MODELS, VOLUMES, blob_volume, calibrate_batchnorm3d, cube, grid_cells,
                           plain_volume_map, sensitive_volume)

pytestmark = pytest.mark.usefixtures("one_thread")

PROB_TOL = 1e-5
MIN_RANGE = 0.05
KIND = {"resnet3d": "blobs", "monai_densenet": "noise", "branches3d": "blobs"}
SEED = {"resnet3d": 3, "monai_densenet": 4, "branches3d": 5}


def volume_of(model: str, shape, channels: int = 1) -> torch.Tensor:
    return VOLUMES[KIND[model]](*shape, channels=channels, seed=SEED[model])


@pytest.fixture(scope="module")
def calibrated():
    """(model name, volume shape) -> the model with BatchNorm calibrated on such volumes."""
    cache = {}

    def get(name, shape):
        if (name, shape) not in cache:
            cache[name, shape] = calibrate_batchnorm3d(MODELS[name](), shape, kind=KIND[name])
        return cache[name, shape]

    yield get
    cache.clear()


def operator_of(result) -> str:
    """The occlusion operator's name: the second line of the EXPLAIN text (as in 2D)."""
    text = result.plan or result.message
    return text.splitlines()[1].split(":")[0].strip()


def occlude(patch, stride, color=None, extra: str = "") -> str:
    """The query text: ``PATCH d x h x w`` (one number for a cube), ``COLOR (v)``, a named
    colour, or for ``color`` None no COLOR clause (the volume's mean)."""
    def size(s):
        return str(s) if np.isscalar(s) else "x".join(map(str, s))
    clauses = [f"PATCH {size(patch)}", f"STRIDE {size(stride)}"]
    if color is not None:
        clauses.append(f"COLOR {color}" if isinstance(color, str) else f"COLOR ({color})")
    return " ".join(["OCCLUDE vol USING net", *clauses, extra]).strip()


def check_engines(con, query: str, expected: np.ndarray, target: int, base: float) -> dict:
    """``query`` naive and incremental on ``con``: both equal ``expected`` (the plain loop)
    within PROB_TOL, with its target and unoccluded probability ``base``."""
    span = float(expected.max() - expected.min())
    assert span > MIN_RANGE, f"{query}: the reference map is almost flat (range {span:.3g})"
    out = {}
    for strategy, operator in (("naive", "Naive"), ("incremental", "Incremental")):
        con.execute(f"SET strategy = '{strategy}'")
        r = out[strategy] = con.execute(query)
        assert operator_of(r).startswith(operator), r.plan
        assert r.heatmap.dtype == np.float32 and r.heatmap.shape == expected.shape, \
            f"{query} ({strategy}): shape {r.heatmap.shape}, expected {expected.shape}"
        diff = np.abs(r.heatmap - expected)
        where = np.unravel_index(diff.argmax(), diff.shape)
        assert float(diff.max()) <= PROB_TOL, \
            f"{query} ({strategy}): max |diff| {diff.max():.3g} at cell {where}"
        assert r.target == target, (strategy, r.target, target)
        assert abs(r.probability - base) <= PROB_TOL, (strategy, r.probability, base)
    return out


def unoccluded(net, volume, target) -> float:
    with torch.no_grad():
        return float(torch.softmax(net(volume[None]).double(), 1)[0, target])


# -- geometry: cubes, anisotropic cubes, strides, regions, colours, targets -------------------

# (id, volume d x h x w, patch, stride, COLOR (None: the default, the mean), extra clauses)
CASES = [
    ("cube", (20, 20, 20), 6, 4, None, ""),
    ("anisotropic", (16, 20, 24), (4, 6, 8), (2, 3, 4), None, "BATCH 7"),
    ("stride_gt_patch", (20, 20, 20), 3, 5, None, ""),
    ("region_origin_corner", (20, 20, 20), (3, 4, 5), 2, None, "REGION (0, 0, 0, 12, 9, 7)"),
    ("region_far_corner", (20, 20, 20), 4, 2, None, "REGION (11, 12, 7, 9, 8, 13)"),
    ("region_centre", (20, 20, 20), 4, 3, None, "REGION (6, 5, 4, 10, 10, 12)"),
    ("color_value", (20, 20, 20), 6, 4, 1.75, ""),
    ("target_second", (20, 20, 20), 6, 4, "mean", "TARGET {second}"),
]


def region_of(extra: str):
    if "REGION" not in extra:
        return None
    return tuple(int(v) for v in extra.split("(")[1].split(")")[0].split(","))


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_the_plain_loop(calibrated, model, case, tmp_path):
    _, shape, patch, stride, color, extra = case
    volume = volume_of(model, shape)
    body = calibrated(model, shape)
    value = float(volume.mean()) if color in (None, "mean") else float(color)
    target = None
    if "{second}" in extra:                     # the runner-up class: not the default target
        with torch.no_grad():
            target = int(body(volume[None])[0].argsort(descending=True)[1])
        extra = extra.format(second=target)
    net = sensitive_volume(body, volume, patch, value, target)
    region = region_of(extra)
    expected, target = plain_volume_map(net, volume, patch, stride, value, target, region)
    if region is None:
        cells = zip(shape, cube(patch), cube(stride))
        assert expected.shape == tuple((n - p) // s + 1 for n, p, s in cells)
    con = kql.connect(str(tmp_path))
    con.register_model("net", net)
    con.register_volume("vol", volume)
    check_engines(con, occlude(patch, stride, color, extra), expected, target,
                  unoccluded(net, volume, target))


@pytest.mark.slow
def test_monai_densenet121_3d(tmp_path):
    """The issue's network itself: MONAI's DenseNet121(spatial_dims=3) at its smallest
    input (32^3: four halvings after the stem), cubes of 8 on a far corner's 8 positions
    (border windows on every axis) and through the centre; naive and incremental."""
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    shape = (32, 32, 32)
    body = calibrate_batchnorm3d(DenseNet121(spatial_dims=3, in_channels=1, out_channels=3), shape,
                                 passes=1)
    volume = blob_volume(*shape, seed=2)
    value = float(volume.mean())
    net = sensitive_volume(body, volume, (8, 8, 8), value)
    con = kql.connect(str(tmp_path))
    con.register_model("net", net)
    con.register_volume("vol", volume)
    for extra in ("REGION (16, 16, 16, 16, 16, 16)", "REGION (8, 8, 8, 16, 16, 16)"):
        region = region_of(extra)
        expected, target = plain_volume_map(net, volume, (8, 8, 8), (8, 8, 8), value, None, region)
        check_engines(con, occlude(8, 8, None, extra), expected, target,
                      unoccluded(net, volume, target))


@pytest.mark.parametrize("deltas", ["off", "on"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_every_layer_incremental(calibrated, model, deltas, tmp_path):
    """Pure incremental inference (``crossover = 'none'``: the cubes carried through every
    layer up to the global pool), with and without delta convolutions: the residual adds,
    dense blocks, branches, dilated and anisotropic convolutions all run on cubes, which
    small volumes at the default crossover hand to full inference early."""
    shape, patch, stride = (16, 20, 24), (4, 6, 8), (2, 3, 4)
    volume = volume_of(model, shape)
    net = sensitive_volume(calibrated(model, shape), volume, patch, float(volume.mean()))
    expected, target = plain_volume_map(net, volume, patch, stride, float(volume.mean()))
    con = kql.connect(str(tmp_path))
    con.register_model("net", net)
    con.register_volume("vol", volume)
    con.execute("SET crossover = 'none'")
    con.execute(f"SET delta_convolutions = '{deltas}'")
    out = check_engines(con, occlude(patch, stride), expected, target,
                        unoccluded(net, volume, target))
    plan = out["incremental"].plan
    assert "crossover=none" in plan.splitlines()[1], plan
    assert ("DeltaConv:" in plan) == (deltas == "on"), plan


def test_ct_intensities_from_numpy_without_a_channel_axis(tmp_path):
    """A ``[D, H, W]`` numpy volume in Hounsfield-like units (air -1000): one channel, its
    intensities as they are (no [0, 1] squeeze), the default colour its mean."""
    shape, patch, stride = (16, 18, 20), (4, 4, 6), (3, 2, 2)

    def hu(seed):
        return 1000.0 * blob_volume(*shape, seed=seed) - 1000.0

    body = calibrate_batchnorm3d(MODELS["resnet3d"](), shape, make=hu)
    volume = hu(7)
    value = float(volume.mean())
    net = sensitive_volume(body, volume, patch, value)
    expected, target = plain_volume_map(net, volume, patch, stride, value)
    con = kql.connect(str(tmp_path))
    con.register_model("net", net)
    con.register_volume("vol", volume[0].numpy())
    check_engines(con, occlude(patch, stride), expected, target, unoccluded(net, volume, target))


def test_two_channel_volume(tmp_path):
    """``[C, D, H, W]`` with C = 2 (say T1 and T2 of one MRI): one COLOR value in both."""
    shape, patch, stride = (16, 16, 16), 4, (2, 3, 3)
    body = calibrate_batchnorm3d(MODELS["branches3d"](in_channels=2), shape, channels=2)
    volume = blob_volume(*shape, channels=2, seed=8)
    net = sensitive_volume(body, volume, patch, 0.0)
    expected, target = plain_volume_map(net, volume, patch, stride, 0.0)
    con = kql.connect(str(tmp_path))
    con.register_model("net", net)
    con.register_volume("vol", volume)
    check_engines(con, occlude(patch, stride, 0.0), expected, target,
                  unoccluded(net, volume, target))


# -- EXPLAIN and the 2D API ---------------------------------------------------------------------

def test_explain_names_the_operator(calibrated, tmp_path):
    shape = (16, 16, 16)
    volume = volume_of("resnet3d", shape)
    con = kql.connect(str(tmp_path))
    con.register_model("net", calibrated("resnet3d", shape))
    con.register_volume("vol", volume)
    query = occlude(4, 2)
    for strategy, operator in (("naive", "Naive"), ("incremental", "Incremental")):
        con.execute(f"SET strategy = '{strategy}'")
        explained = con.execute(f"EXPLAIN {query}")
        assert explained.heatmap is None
        assert operator_of(explained).startswith(operator), explained.plan or explained.message
        assert "Occlusion" in operator_of(explained)


def test_images_still_give_2d_maps(small_model, tmp_path):
    """A [3, H, W] image beside a volume on one connection: the 2D query still gives the 2D
    map of the plain 2D loop, the 3D query a 3D one."""
    image = smooth_noise_image(24, 30)
    con = kql.connect(str(tmp_path))
    con.register_model("net", small_model)
    con.register_image("img", image)
    con.register_model("net3d", calibrate_batchnorm3d(MODELS["resnet3d"](), (16, 16, 16)))
    con.register_volume("vol", volume_of("resnet3d", (16, 16, 16)))
    expected, target = plain_heatmap(small_model, image, (8, 8), (4, 4), (0.0, 0.0, 0.0))
    flat = con.execute(SMALL_QUERY + " COLOR black")
    assert flat.heatmap.shape == expected.shape == (5, 6) and flat.target == target
    np.testing.assert_allclose(flat.heatmap, expected, atol=PROB_TOL, rtol=0)
    deep = con.execute("OCCLUDE vol USING net3d PATCH 8 STRIDE 4")
    assert deep.heatmap.shape == (3, 3, 3)


# -- the reference against MONAI ------------------------------------------------------------

def monai_map(model, volume, patch, stride, color, n_batch: int = 8) -> np.ndarray:
    """``monai.visualize.OcclusionSensitivity`` at the plain loop's windows: ``[classes, D,
    H, W]``, each voxel the mean probability of the windows covering it.

    The equivalence needs care. MONAI's windows are ``sliding_window_inference``'s: a step
    of ``int(mask * (1 - overlap))`` per axis (a per-axis ``overlap`` tuple from
    ``kql.bench_libraries.monai_overlap``, so ``stride <= patch``), the last window pulled
    back to ``size - mask`` where ``(size - patch) % stride != 0``: the two grids are the
    same only where that is 0 on every axis. ``mode`` must be a Python float (an int
    falls through every branch), and ``activate=True`` takes a sigmoid for a one-channel
    input, so softmax is passed as a callable. With overlap 0 the windows lie side by side
    and each voxel is one window's probability; with overlap, the plain map averaged the same
    way over the windows (``window_average``) is compared.
    """
    from monai.visualize import OcclusionSensitivity

    from kql.bench_libraries import monai_overlap

    patch, stride = cube(patch), cube(stride)
    overlap = tuple(monai_overlap(p, s) for p, s in zip(patch, stride))
    with warnings.catch_warnings():               # MONAI's own deprecation warnings
        warnings.simplefilter("ignore")
        occ = OcclusionSensitivity(model, mask_size=patch, n_batch=n_batch, verbose=False,
                                   mode=float(color), overlap=overlap,
                                   activate=lambda out: out.softmax(1))
        with torch.no_grad():
            out, _ = occ(volume[None])
    return np.asarray(out.as_tensor()[0], dtype=np.float64)


def window_average(cell_map: np.ndarray, shape, patch, stride) -> np.ndarray:
    """Each voxel's mean over the cells whose cube covers it (NaN where none does)."""
    total, count = np.zeros(shape), np.zeros(shape)
    for index in np.ndindex(*cell_map.shape):
        box = tuple(slice(i * s, i * s + p) for i, s, p in zip(index, stride, patch))
        total[box] += cell_map[index]
        count[box] += 1
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_reference_is_monai_side_by_side(calibrated, model):
    """Overlap 0, the windows side by side: MONAI's voxels are the plain loop's cells; the
    default colour (the mean) is MONAI's ``mean_img`` value."""
    shape, patch = (16, 16, 16), 4
    volume = volume_of(model, shape)
    color = float(volume.mean())
    net = sensitive_volume(calibrated(model, shape), volume, patch, color)
    expected, target = plain_volume_map(net, volume, patch, patch, color)
    assert float(expected.max() - expected.min()) > MIN_RANGE
    theirs = monai_map(net, volume, patch, patch, color)[target]
    np.testing.assert_allclose(theirs[::4, ::4, ::4], expected, atol=PROB_TOL, rtol=0)
    np.testing.assert_allclose(theirs, window_average(expected, shape, (4,) * 3, (4,) * 3),
                               atol=PROB_TOL, rtol=0)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_reference_is_monai_overlapping(calibrated, model):
    """Anisotropic cubes, strides below them: MONAI's voxels are the plain loop's cells
    averaged over the windows that cover each voxel; its first voxel is cell (0, 0, 0)."""
    shape, patch, stride = (16, 21, 24), (4, 6, 8), (2, 3, 4)
    volume = volume_of(model, shape)
    net = sensitive_volume(calibrated(model, shape), volume, patch, 0.0)
    expected, target = plain_volume_map(net, volume, patch, stride, 0.0)
    assert float(expected.max() - expected.min()) > MIN_RANGE
    theirs = monai_map(net, volume, patch, stride, 0.0)[target]
    assert abs(theirs[0, 0, 0] - expected[0, 0, 0]) <= PROB_TOL
    np.testing.assert_allclose(theirs, window_average(expected, shape, patch, stride),
                               atol=PROB_TOL, rtol=0)


def test_grid_cells_follow_the_2d_region_rule():
    """The reference's REGION rule per axis: cubes inside ``[start, start + length)``."""
    cells = grid_cells((20, 20, 20), (3, 4, 5), 2, region=(0, 0, 0, 12, 9, 7))
    assert cells == [[0, 1, 2], [0, 1, 2], [0, 1, 2, 3]]      # d (z, 7), h (y, 9), w (x, 12)
    assert grid_cells((20, 20, 20), 3, 5) == [[0, 1, 2, 3]] * 3
