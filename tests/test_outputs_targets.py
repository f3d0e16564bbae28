"""Output scoring (OUTPUT, detected), several targets from one scan (TARGET (...), TOP k),
geometry in the user's pixels (RESIZE, REGION, Result.box) and channel matching.

Every map is checked against an independent loop written here (one forward pass per
position, the score computed by hand), on sensitive random networks whose maps move.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import kql
from helpers import smooth_noise_image
from kql.errors import KqlPlanError, KqlSyntaxError
from models_zoo import sensitive_small_cnn

PATCH, STRIDE = 6, 4


@torch.no_grad()
def loop_outputs(model, image, patch=PATCH, stride=STRIDE, color=0.5):
    """``[rows, cols, classes]``: the model's raw outputs with the patch at every cell."""
    c, h, w = image.shape
    rows, cols = (h - patch) // stride + 1, (w - patch) // stride + 1
    out = []
    for i in range(rows):
        for j in range(cols):
            x = image.clone()
            x[:, i * stride:i * stride + patch, j * stride:j * stride + patch] = color
            out.append(model(x[None])[0])
    return torch.stack(out).reshape(rows, cols, -1).double()


def connect(model, image, name="net"):
    con = kql.connect()
    con.register_model(name, model)
    con.register_image("img", image)
    return con


@pytest.fixture(scope="module")
def net():
    return sensitive_small_cnn()


@pytest.fixture(scope="module")
def image():
    return smooth_noise_image(24, 30)


def occlude(con, clauses="", strategy="auto", model="net"):
    con.execute(f"SET strategy = '{strategy}'")
    return con.execute(f"OCCLUDE img USING {model} PATCH {PATCH} STRIDE {STRIDE} {clauses}")


def explain(con, clauses="", model="net"):
    return con.execute(f"EXPLAIN OCCLUDE img USING {model} PATCH {PATCH} STRIDE {STRIDE} "
                       f"{clauses}").plan


# -- output scoring ---------------------------------------------------------------------------

class OneLogit(nn.Module):
    """A binary classifier: one output unit."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x)[:, :1] - self.body(x)[:, 1:2]


@pytest.mark.parametrize("strategy", ["naive", "incremental"])
def test_one_output_unit_is_scored_with_a_sigmoid(net, image, strategy):
    model = OneLogit(net).eval()
    con = connect(model, image)
    result = occlude(con, strategy=strategy)
    expected = torch.sigmoid(loop_outputs(model, image)[..., 0]).numpy()
    assert result.output == "sigmoid" and result.output_note == "one output unit"
    assert np.ptp(expected) > 1e-3                   # the map moves: a wrong engine shows
    np.testing.assert_allclose(result.heatmap, expected, atol=2e-5)
    assert "output=sigmoid (one output unit)" in explain(con)


def test_a_model_ending_in_softmax_gets_no_second_one(net, image):
    model = nn.Sequential(net, nn.Softmax(dim=1)).eval()
    con = connect(model, image)
    result = occlude(con)
    expected = loop_outputs(model, image)[..., result.target].numpy()
    assert result.output == "probability"
    np.testing.assert_allclose(result.heatmap, expected, atol=2e-5)
    assert np.ptp(expected) > 1e-3
    assert "output=probability (outputs already sum to 1)" in explain(con)


@pytest.mark.parametrize("output", ["logits", "sigmoid", "softmax"])
def test_output_clause_as_asked(net, image, output):
    con = connect(net, image)
    result = occlude(con, f"TARGET 2 OUTPUT {output}")
    raw = loop_outputs(net, image)
    expected = {"logits": raw[..., 2], "sigmoid": torch.sigmoid(raw[..., 2]),
                "softmax": torch.softmax(raw, -1)[..., 2]}[output].numpy()
    np.testing.assert_allclose(result.heatmap, expected, atol=2e-5)
    np.testing.assert_allclose(result.drop, result.probability - result.heatmap)
    assert result.output == output


def test_output_probability_on_logits_is_what_was_asked(net, image):
    """OUTPUT probability takes the outputs as they are: the user's word over detection."""
    con = connect(net, image)
    result = occlude(con, "TARGET 1 OUTPUT probability")
    np.testing.assert_allclose(result.heatmap, loop_outputs(net, image)[..., 1].numpy(), atol=2e-5)


# -- several targets ----------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["naive", "incremental"])
def test_several_targets_are_the_single_target_maps(net, image, strategy):
    con = connect(net, image)
    many = occlude(con, "TARGET (3, predicted, 0)", strategy)
    predicted = occlude(con, "", strategy).target
    assert many.targets == [3, predicted, 0]
    assert many.heatmaps.shape == (3,) + many.heatmap.shape
    softmax = torch.softmax(loop_outputs(net, image), -1).numpy()
    for k, target in enumerate(many.targets):
        single = occlude(con, f"TARGET {target}", strategy)
        np.testing.assert_allclose(many.heatmaps[k], single.heatmap, atol=1e-6)
        np.testing.assert_allclose(many.heatmaps[k], softmax[..., target], atol=2e-5)
        assert many.base_scores[k] == pytest.approx(single.probability, abs=1e-6)
    np.testing.assert_allclose(many.drops[0], many.base_scores[0] - many.heatmaps[0])


def test_top_k_are_the_likeliest_classes(net, image):
    con = connect(net, image)
    result = occlude(con, "TARGET TOP 3")
    base = torch.softmax(net(image[None])[0].detach(), 0)
    assert result.targets == torch.argsort(base, descending=True)[:3].tolist()
    assert result.base_scores == sorted(result.base_scores, reverse=True)
    softmax = torch.softmax(loop_outputs(net, image), -1).numpy()
    for k, target in enumerate(result.targets):
        np.testing.assert_allclose(result.heatmaps[k], softmax[..., target], atol=2e-5)
    plan = explain(con, "TARGET TOP 3")
    assert "target=top 3 ({})".format(", ".join(map(str, result.targets))) in plan


def test_several_targets_through_drilldown_match_the_exact_cells(net, image):
    con = connect(net, image)
    con.execute("SET strategy = 'auto'")
    result = con.execute("OCCLUDE img USING net PATCH 4 STRIDE 2 TARGET TOP 2 DRILLDOWN 0.3")
    exact = con.execute("OCCLUDE img USING net PATCH 4 STRIDE 2 TARGET TOP 2")
    assert result.heatmaps.shape == exact.heatmaps.shape
    same = np.isclose(result.heatmaps, exact.heatmaps, atol=1e-5).all(axis=0)
    assert same.mean() >= 0.3                         # stage one's cells and stage two's


def test_several_targets_saved(net, image, tmp_path):
    import pyarrow.parquet as pq

    con = connect(net, image)
    result = occlude(con, "TARGET (1, 2)")
    for ext in ("npy", "parquet", "png"):
        result.save(str(tmp_path / f"maps.{ext}"))
    assert np.load(tmp_path / "maps.npy").shape == result.heatmaps.shape
    table = pq.read_table(tmp_path / "maps.parquet").to_pylist()
    assert [row["target"] for row in table] == [1, 2]
    np.testing.assert_allclose(np.array(table[1]["heatmap"]), result.heatmaps[1])
    assert (tmp_path / "maps.png").stat().st_size > 1000
    assert "2 heat maps" in result.render()


@pytest.mark.parametrize("query, message", [
    ("TARGET (1, 1)", "TARGET names the same class twice"),
    ("TARGET TOP 50", "TARGET TOP 50: model 'net' has only 5 classes"),
    ("TARGET (1, 99)", "target class 99 is out of range"),
])
def test_bad_targets(net, image, query, message):
    con = connect(net, image)
    with pytest.raises(KqlPlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        occlude(con, query)


def test_top_zero_is_a_syntax_error():
    with pytest.raises(KqlSyntaxError, match="column 34: TARGET TOP needs at least 1 class"):
        kql.connect().execute("OCCLUDE img USING net TARGET TOP 0")


# -- geometry in the user's pixels -----------------------------------------------------------

@pytest.fixture(scope="module")
def photo():
    return smooth_noise_image(36, 60, seed=3)           # 3:5, not the model's square


def square_connection(net, photo, mean=None):
    con = kql.connect()
    con.register_model("sq", net, input_size=(24, 24), mean=mean,
                       std=(1.0, 1.0, 1.0) if mean else None)
    con.register_image("img", photo)
    return con


@pytest.mark.parametrize("mode, resized, border", [
    ("squash", (24, 24), (0, 0)), ("crop", (24, 40), (0, 8)), ("pad", (14, 24), (5, 0))])
def test_resize_modes(net, photo, mode, resized, border):
    from kql.binder import fit
    from kql.planner.frame import Frame

    frame = Frame.fitting((36, 60), (24, 24), mode)
    assert (frame.resized, frame.border) == (resized, border)
    con = square_connection(net, photo)
    result = occlude(con, f"RESIZE {mode}", model="sq")
    seen = fit(photo, frame)
    assert tuple(result.image.shape) == (3, 24, 24)
    torch.testing.assert_close(result.image, seen)
    expected = torch.softmax(loop_outputs(net, seen), -1)[..., result.target].numpy()
    np.testing.assert_allclose(result.heatmap, expected, atol=2e-5)
    if mode != "squash":
        assert f"resize={mode} 36x60->24x24" in explain(con, f"RESIZE {mode}", model="sq")


def test_pad_border_is_the_models_neutral_colour(net, photo):
    con = square_connection(net, photo, mean=(0.2, 0.4, 0.6))
    result = occlude(con, "RESIZE pad", model="sq")
    torch.testing.assert_close(result.image[:, 0, 0], torch.tensor([0.2, 0.4, 0.6]))


def test_region_and_boxes_are_in_original_pixels(net, photo):
    con = square_connection(net, photo)
    whole = occlude(con, "RESIZE crop", model="sq")
    # The photo became 24x40 and the crop cut its first 8 columns: 12 original ones, at
    # 1.5 per model pixel. The map's first patch starts at original column 12; a REGION
    # over original columns 12..48 covers model columns 0..24: the whole map.
    x, y, w, h = whole.box(0, 0)
    assert (x, y, w, h) == pytest.approx((12.0, 0.0, PATCH * 1.5, PATCH * 1.5))
    region = occlude(con, "RESIZE crop REGION (12, 0, 36, 36)", model="sq")
    assert region.heatmap.shape == whole.heatmap.shape
    half = occlude(con, "RESIZE crop REGION (12, 0, 18, 36)", model="sq")     # model cols 0..12
    cols = (12 - PATCH) // STRIDE + 1
    np.testing.assert_allclose(half.heatmap, whole.heatmap[:, :cols])
    assert half.box(0, 0) == pytest.approx(whole.box(0, 0))


def test_region_outside_the_original_image(net, photo):
    con = square_connection(net, photo)
    with pytest.raises(KqlPlanError, match=r"region \(40, 0, 30, 10\) is not inside the image "
                                           r"\(60 wide, 36 high\)"):
        occlude(con, "REGION (40, 0, 30, 10)", model="sq")


def test_png_is_drawn_on_the_original_image(net, photo, tmp_path):
    from PIL import Image

    con = square_connection(net, photo)
    result = occlude(con, "RESIZE pad", model="sq")
    assert tuple(result.original.shape) == (3, 36, 60)
    from kql.results.output import _extent

    # The 36x60 photo became 14x24 on 5 border rows above and below: the map, in the
    # photo's pixels (2.5 per model pixel), reaches past its top and bottom edges.
    left, right, bottom, top = _extent(result)
    assert top < 0 < left < right <= 60 and bottom > 36
    path = tmp_path / "map.png"
    result.save(str(path))
    width, height = Image.open(path).size
    assert width > height                                 # the 5:3 photo, not the square


# -- channels ------------------------------------------------------------------------------------

def test_grey_image_on_an_rgb_model_is_repeated_and_said(net):
    grey = smooth_noise_image(24, 30, seed=5)[:1]
    con = connect(net, grey)
    result = occlude(con)
    rgb = grey.expand(3, -1, -1)
    expected = torch.softmax(loop_outputs(net, rgb), -1)[..., result.target].numpy()
    np.testing.assert_allclose(result.heatmap, expected, atol=2e-5)
    assert "channels=grey image repeated to 3 channels" in explain(con)


def test_rgb_image_on_a_grey_model_is_converted(image):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    con = connect(model, image)
    result = occlude(con, "OUTPUT logits COLOR (0.2, 0.4, 0.6)")
    grey = (image * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    luma = 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6
    expected = loop_outputs(model, grey, color=luma)[..., result.target].numpy()
    np.testing.assert_allclose(result.heatmap, expected, atol=1e-5)
    assert np.ptp(expected) > 1e-4
    assert "RGB image converted to grey (luma)" in explain(con)
