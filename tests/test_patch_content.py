"""COLOR forms that paint the image's own pixels under each patch: ``gaussian`` (MONAI's
gaussian mode: the window times 1 - a Gaussian centred on it) and ``mean_patch`` (each
channel's mean of the window).

Both change only the pixels inside the patch, so the incremental engine runs them exactly:
each map is checked, naive and incremental, against a plain loop written here (paint the
window, forward, softmax), with MONAI's own kernel for ``gaussian``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import kql
from helpers import calibrate_batchnorm, chelsea, sensitive, smooth_noise_image
from kql import executor
from kql.completion import context
from kql.language.parser import parse
from kql.planner import tuning
from models_zoo import custom_model, sensitive_small_cnn, torchvision_model

PROB_TOL = 1e-5
FORMS = ("gaussian", "mean_patch")

pytestmark = pytest.mark.usefixtures("one_thread")


def painted(window: torch.Tensor, form: str) -> torch.Tensor:
    """What the patch holds over ``window`` [C, h, w]: the spec, written out."""
    if form == "mean_patch":
        return window.mean(dim=(1, 2), keepdim=True).expand_as(window)
    from monai.visualize import OcclusionSensitivity

    mul, _ = OcclusionSensitivity.gaussian_occlusion(window[None], window.shape[1:])
    return window * mul[0]


@torch.no_grad()
def plain_map(model, image, patch, stride, form) -> np.ndarray:
    """One forward pass per position, the window painted as the form says, softmax."""
    (ph, pw), (sy, sx) = patch, stride
    _, h, w = image.shape
    target = int(model(image[None])[0].argmax())
    rows, cols = (h - ph) // sy + 1, (w - pw) // sx + 1
    out = np.zeros((rows, cols), np.float32)
    for i in range(rows):
        for j in range(cols):
            y, x = i * sy, j * sx
            occluded = image.clone()
            occluded[:, y:y + ph, x:x + pw] = painted(image[:, y:y + ph, x:x + pw], form)
            out[i, j] = torch.softmax(model(occluded[None]).double(), 1)[0, target]
    return out


def connection(net, image) -> kql.Connection:
    con = kql.connect()
    con.register_model("net", net)
    con.register_image("img", image)
    return con


@pytest.fixture(scope="module")
def calibrated():
    """name -> model with BatchNorm calibrated on images like the test's, built once."""
    return {"resnet18": calibrate_batchnorm(torchvision_model("resnet18"), 64, 80, kind="photo"),
            "cat_inception": calibrate_batchnorm(custom_model("cat_inception"), 64, 80, kind="photo")}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("model", ["resnet18", "cat_inception"])
def test_naive_and_incremental_are_the_plain_loop(calibrated, model, form):
    image, patch, stride = chelsea(64, 80), (16, 12), (12, 9)
    # Sensitive to the image's mean colour, near what either form paints.
    net = sensitive(calibrated[model], image, patch, tuple(image.mean(dim=(1, 2)).tolist()))
    expected = plain_map(net, image, patch, stride, form)
    assert np.ptp(expected) >= 0.02, f"the plain map is almost flat ({np.ptp(expected):.3g})"
    con = connection(net, image)
    query = f"OCCLUDE img USING net PATCH 16 x 12 STRIDE 12 x 9 COLOR {form}"
    for strategy, operator in (("naive", "NaiveOcclusion"), ("incremental", "IncrementalOcclusion")):
        con.execute(f"SET strategy = '{strategy}'")
        result = con.execute(query)
        assert result.plan.splitlines()[1].startswith(f"  {operator}:"), result.plan
        diff = float(np.abs(result.heatmap - expected).max())
        assert diff <= PROB_TOL, f"{strategy}: max |p - plain loop| {diff:.3g}"


def wide_shallow() -> nn.Module:
    """Wide 3x3 convolutions on a 128x128 map: a patch changes a sliver of every map, so
    the cost model picks incremental inference (tests/test_cheap_planning.py)."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 4)).eval()


@pytest.mark.parametrize("form", FORMS)
def test_the_planner_chooses_incremental_for_them(form):
    con = connection(wide_shallow(), smooth_noise_image(128, 128))
    query = f"OCCLUDE img USING net PATCH 8 STRIDE 8 COLOR {form}"
    lines = con.execute("EXPLAIN " + query).plan.splitlines()
    assert lines[1].startswith("  IncrementalOcclusion:"), lines[1]
    image_line = next(line for line in lines if line.lstrip().startswith("Image:"))
    assert image_line.endswith(f", color={form}"), image_line
    plan = executor.plan(con, parse(query)[0], query)
    assert plan.task().fill is plan.query.fill is not None         # the logical query's content


def test_every_image_of_a_many_image_query_paints_its_own_pixels(tmp_path):
    for i in range(2):
        pixels = (smooth_noise_image(24, 30, seed=i).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"img{i}.png")
    con = kql.connect()
    torch.manual_seed(0)
    con.register_model("net", sensitive_small_cnn())
    clauses = "PATCH 6 STRIDE 4 COLOR mean_patch"
    table = con.execute(f"OCCLUDE '{tmp_path}/*.png' USING net {clauses}")
    assert "cache=plan" in table.rows[1]["plan"]                   # the first image's plan, rebound
    for row in table.rows:
        single = con.execute(f"OCCLUDE '{row['path']}' USING net {clauses}")
        assert np.ptp(single.heatmap) > 1e-4
        np.testing.assert_allclose(np.array(row["heatmap"]), single.heatmap, atol=1e-6)


def test_a_tuning_is_kept_per_form():
    con = connection(wide_shallow(), smooth_noise_image(32, 32))

    def key(clauses):
        text = f"OCCLUDE img USING net PATCH 8 STRIDE 8 {clauses}"
        return tuning.key(executor.plan(con, parse(text)[0], text).query)
    assert key("COLOR gaussian").endswith("color=gaussian")
    assert key("COLOR mean_patch").endswith("color=mean_patch")
    assert key("COLOR black").endswith("color=0.0000,0.0000,0.0000")


def test_the_shell_completes_them_and_a_misspelling_is_one_line():
    assert context("OCCLUDE img USING net COLOR ")[2][-2:] == ("MEAN_PATCH", "GAUSSIAN")
    con = kql.connect()
    with pytest.raises(kql.KqlSyntaxError) as info:
        con.execute("OCCLUDE img USING net\n  COLOR mean_pach")
    assert str(info.value).startswith("line 2, column 9: expected a colour (black, gray, white, "
                                      "mean, mean_patch, gaussian or (r, g, b))")
    assert str(info.value).endswith("did you mean MEAN_PATCH?")
