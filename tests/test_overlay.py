"""Overlays a person can read (kql/results/overlay.py): the map over the photo at its own
resolution, coloured around the unoccluded score, honest about noise.

Maps are set by hand on a real result (a drop here, a rise there, noise) so that the
colour of each pixel can be predicted.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

import kql
from helpers import smooth_noise_image
from kql.results import overlay
from kql.errors import KqlPlanError
from models_zoo import sensitive_small_cnn

QUERY = "OCCLUDE img USING net PATCH 6 STRIDE 4"


@pytest.fixture(scope="module")
def net():
    return sensitive_small_cnn()


def occlude(net, image, query=QUERY, **register):
    con = kql.connect()
    con.register_model("net", net, **register)
    con.register_image("img", image)
    return con.execute(query)


@pytest.fixture(scope="module")
def result(net):
    return occlude(net, smooth_noise_image(24, 30))


def with_map(result, values):
    """``result`` with its (first) map replaced by ``values``."""
    values = np.asarray(values, np.float32)
    return dataclasses.replace(result, heatmap=values, heatmaps=values[None],
                               base_scores=[result.probability])


def centre(result, row, col):
    """The pixel (y, x) at the centre of cell (row, col)'s patch."""
    x, y, w, h = result.box(row, col)
    return int(y + h / 2), int(x + w / 2)


def picture(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float64) / 255


def grey_of(result):
    rgb = result.original.permute(1, 2, 0).double().numpy()
    return rgb @ np.array([0.299, 0.587, 0.114])


@pytest.fixture(scope="module")
def drop_and_rise(result):
    p0 = result.probability
    values = np.full(result.heatmap.shape, p0)
    values[1, 1] = p0 - 0.4          # a patch here lowers the score: the region matters
    values[3, 5] = min(p0 + 0.3, 1.0)
    return with_map(result, values)


def test_drop_red_rise_blue_unchanged_left_alone(drop_and_rise):
    image = overlay.overlay_image(drop_and_rise)
    red, green, blue = image[centre(drop_and_rise, 1, 1)]
    assert red > blue + 0.2 and red > green
    red, green, blue = image[centre(drop_and_rise, 3, 5)]
    assert blue > red + 0.1
    y, x = centre(drop_and_rise, 4, 1)          # far from both: the grey photo, untouched
    np.testing.assert_allclose(image[y, x], grey_of(drop_and_rise)[y, x], atol=1e-6)


def test_drawn_at_the_original_resolution_and_aspect(net):
    photo = smooth_noise_image(36, 60, seed=3)
    result = occlude(net, photo, QUERY + " RESIZE pad", input_size=(24, 24))
    assert overlay.overlay_image(result).shape == (36, 60, 3)
    width, height = Image.open(io.BytesIO(overlay.png_bytes(result))).size
    assert width > 1.4 * height                 # the 5:3 photo, not the model's square


def test_noise_stays_pale_on_the_absolute_and_auto_scales(result):
    rng = np.random.default_rng(0)
    noise = with_map(result, result.probability + rng.uniform(-1e-3, 1e-3, result.heatmap.shape))
    saturation = lambda img: float((img.max(2) - img.min(2)).mean())
    for scale in ("absolute", "auto"):
        image = overlay.overlay_image(noise, scale=scale)
        assert np.abs(image - grey_of(noise)[:, :, None]).max() < 0.02
        assert saturation(image) < 0.005
    assert saturation(overlay.overlay_image(noise, scale="relative")) > 0.05   # noise blown up


def test_value_range_is_centred_and_floored():
    assert overlay.value_range([0.2586, 0.26], 0.2593, "softmax", "auto") == (0.2093, 0.3093)
    assert overlay.value_range([0.1, 0.9], 0.6, "softmax", "auto") == (0.1, 1.1)
    assert overlay.value_range([0.59], 0.6, "sigmoid", "absolute") == (0.0, 1.2)
    assert overlay.value_range([3.0], 3.1, "logits", "auto") == (2.6, 3.6)


def test_colour_bar_marks_the_unoccluded_score(drop_and_rise):
    p0 = drop_and_rise.probability
    fig = overlay.figure(drop_and_rise)
    marks = [line for ax in fig.axes for line in ax.lines
             if np.allclose(line.get_ydata(), p0)]
    assert marks, "no line at the unoccluded score"
    labels = [t.get_text() for ax in fig.axes for t in ax.get_yticklabels()]
    assert f"{p0:.3f} unoccluded" in labels


def test_probability_bar_stays_inside_0_1(drop_and_rise):
    fig = overlay.figure(drop_and_rise, scale="absolute")
    bar = next(ax for ax in fig.axes if ax.lines)
    low, high = sorted(bar.get_ylim())
    assert low >= 0.0 and high <= 1.0


def test_one_channel_image_renders():
    torch.manual_seed(0)
    grey_model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(),
                                     torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                     torch.nn.Linear(4, 3)).eval()
    result = occlude(grey_model, smooth_noise_image(24, 30, seed=5)[:1])
    assert result.original.shape[0] == 1
    png = overlay.png_bytes(result)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert overlay.overlay_image(result).shape == (24, 30, 3)


def test_side_by_side_is_wider(drop_and_rise):
    one = Image.open(io.BytesIO(overlay.png_bytes(drop_and_rise))).size
    two = Image.open(io.BytesIO(overlay.png_bytes(drop_and_rise, panels="side_by_side"))).size
    assert two[0] > 1.5 * one[0] and abs(two[1] - one[1]) < 0.2 * one[1]


def test_contour_changes_pixels_only_when_a_drop_shows(drop_and_rise, result):
    on, off = (picture(overlay.png_bytes(drop_and_rise, contour=c)) for c in ("on", "off"))
    assert on.shape == off.shape and np.abs(on - off).max() > 0.3
    flat = with_map(result, np.full(result.heatmap.shape, result.probability - 1e-4))
    on, off = (overlay.png_bytes(flat, contour=c) for c in ("on", "off"))
    assert on == off                 # a 0.0001 drop is no region to outline


def test_blocks_are_flat_within_a_cell_smooth_is_not(drop_and_rise):
    drop_and_rise = dataclasses.replace(drop_and_rise,
                                        original=torch.full_like(drop_and_rise.original, 0.5))
    y, x = centre(drop_and_rise, 1, 1)
    blocks = overlay.overlay_image(drop_and_rise, style="blocks")
    smooth = overlay.overlay_image(drop_and_rise)
    np.testing.assert_allclose(blocks[y - 1, x - 1], blocks[y + 1, x + 1])
    assert not np.allclose(smooth[y - 1, x - 1], smooth[y + 1, x + 1])


def test_colour_base_keeps_the_photo(drop_and_rise):
    image = overlay.overlay_image(drop_and_rise, base="colour")
    y, x = centre(drop_and_rise, 4, 1)
    rgb = drop_and_rise.original.permute(1, 2, 0).double().numpy()
    np.testing.assert_allclose(image[y, x], rgb[y, x], atol=1e-6)


def test_logits_render_unclipped(net):
    result = occlude(net, smooth_noise_image(24, 30), QUERY + " OUTPUT logits")
    fig = overlay.figure(result)
    bar = next(ax for ax in fig.axes if ax.lines)
    low, high = overlay.value_range(result.heatmap, result.probability, "logits", "auto")
    assert sorted(bar.get_ylim()) == pytest.approx([low, high])


def test_save_takes_overlay_options(drop_and_rise, tmp_path):
    path = str(tmp_path / "m.png")
    drop_and_rise.save(path, scale="absolute", style="blocks", colormap="coolwarm")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(KqlPlanError, match="^overlay_scale must be 'auto', 'absolute' or "
                                           "'relative', got 'log'$"):
        drop_and_rise.save(path, scale="log")
    with pytest.raises(KqlPlanError, match="^unknown overlay option 'colour'; options: "):
        drop_and_rise.save(str(tmp_path / "m.npy"), colour="red")


@pytest.mark.parametrize("statement, message", [
    ("SET overlay_alpha = 2", "overlay_alpha must be a number from 0 to 1, got 2"),
    ("SET overlay_colormap = 'nope'", "overlay_colormap must be a matplotlib colour map"),
    ("SET overlay_style = 'dots'", "overlay_style must be 'smooth' or 'blocks', got 'dots'"),
    ("SET overlay_panels = 'grid'", "overlay_panels must be 'overlay' or 'side_by_side'"),
    ("SET overlay_contour = yes", "overlay_contour must be 'on' or 'off', got 'yes'"),
    ("SET overlay_base = 'sepia'", "overlay_base must be 'grey' or 'colour', got 'sepia'"),
])
def test_bad_settings_are_one_line_plan_errors(statement, message):
    with pytest.raises(KqlPlanError) as err:
        kql.connect().execute(statement)
    assert message in str(err.value) and "\n" not in str(err.value).split(" at ")[0]


def test_settings_reach_the_overlay(drop_and_rise, tmp_path):
    con = kql.connect()
    con.execute("SET overlay_scale = 'absolute'; SET overlay_colormap = 'RdBu_r'; "
                "SET overlay_contour = off")
    options = overlay.options_from(con.settings)
    assert options["scale"] == "absolute" and options["contour"] == "off"
    assert options["colormap"] == "rdbu_r"      # SET lower-cases; the map is found anyway
    image = overlay.overlay_image(drop_and_rise, **options)
    red, _, blue = image[centre(drop_and_rise, 1, 1)]
    assert blue > red                           # the reversed map: drops blue
    drop_and_rise.save(str(tmp_path / "m.png"), **options)


def test_colour_bar_labels_stay_clear_of_the_next_panel(net):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    result = occlude(net, smooth_noise_image(24, 30), QUERY + " TARGET TOP 3")
    for options in ({}, {"panels": "side_by_side"}):
        fig = overlay.figure(result, **options)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
        photos = [ax for ax in fig.axes if ax.images]          # the panels, not the bars
        bars = [ax for ax in fig.axes if not ax.images]
        assert len(bars) == 3 and len(photos) == 3 + bool(options)
        for bar in bars:
            label = bar.yaxis.label.get_window_extent(renderer)
            ticks = bar.yaxis.get_tightbbox(renderer)
            right = [ax for ax in photos if ax.get_window_extent(renderer).x0 > bar.get_window_extent(renderer).x0]
            for ax in right[:1]:
                box = ax.get_window_extent(renderer)
                assert not label.overlaps(box) and ticks.x1 <= box.x0, (options, label, box)
