"""The picture of a 3D occlusion map over its scan (kql/results/volume_overlay.py).

A synthetic CT (air at -1000 HU, a bright blob) and a map set by hand whose drop peaks at
a known cell, so that the slices, the marker and the colours can be predicted. The voxel
drop is checked against the plain per-voxel loop.
"""

from __future__ import annotations

import io
import itertools
import os
import time

import matplotlib.figure
import numpy as np
import pytest
import torch
from PIL import Image

from kql.errors import KqlPlanError
from kql.results import volume_overlay as vo

SHAPE = (24, 20, 16)
PATCH, STRIDE, OFFSET = (4, 4, 4), (2, 2, 2), (0, 0, 0)
PEAK = (6, 2, 4)          # the cell of the largest drop
BASE = 0.9


def grid(shape):
    return np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"))


def blob_volume() -> torch.Tensor:
    """``[1, 24, 20, 16]`` in Hounsfield units: air with a bright blob near voxel (14, 6, 10)."""
    g = grid(SHAPE)
    blob = np.exp(-((g - np.array([14, 6, 10])[:, None, None, None]) ** 2).sum(0) / 8)
    return torch.tensor(-1000 + 1400 * blob, dtype=torch.float32)[None]


def cells(shape=SHAPE, patch=PATCH, stride=STRIDE):
    return tuple((s - p) // st + 1 for s, p, st in zip(shape, patch, stride))


def peaked_map(peak=PEAK, depth=0.6) -> np.ndarray:
    """Scores: ``BASE`` far away, ``BASE - depth`` at ``peak``, a smooth bowl between."""
    g = grid(cells())
    bowl = np.exp(-((g - np.array(peak)[:, None, None, None]) ** 2).sum(0) / 3)
    return (BASE - depth * bowl).astype(np.float32)


@pytest.fixture(scope="module")
def volume():
    return blob_volume()


@pytest.fixture(scope="module")
def values():
    return peaked_map()


def panels(fig):
    """The three slice panels (not the colour bar's axes)."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def marker(ax):
    (line,) = [line for line in ax.get_lines() if line.get_label() == "strongest cell"]
    return float(line.get_xdata()[0]), float(line.get_ydata()[0])


def picture(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float64) / 255


# -- the strongest cell and the preview slice -----------------------------------------------

def test_strongest_cell_is_the_largest_drop(values):
    assert vo.strongest_cell(values, BASE) == PEAK


def test_strongest_cell_ties_go_to_the_first_in_c_order():
    values = np.full((3, 4, 5), BASE, np.float32)
    values[2, 0, 0] = values[1, 3, 4] = values[1, 3, 2] = 0.2
    assert vo.strongest_cell(values, BASE) == (1, 3, 2)


def test_strongest_cell_skips_nan_cells():
    values = np.full((2, 2, 2), BASE, np.float32)
    values[0, 0, 0], values[1, 1, 0] = np.nan, 0.5
    assert vo.strongest_cell(values, BASE) == (1, 1, 0)


def test_preview_slice_is_the_plane_through_the_strongest_cell(values):
    index, plane = vo.preview_slice(values, BASE)
    assert index == PEAK[0]
    assert plane.dtype == np.float32 and plane.shape == values.shape[1:]
    np.testing.assert_array_equal(plane, values[PEAK[0]])
    assert np.unravel_index(np.argmin(plane), plane.shape) == PEAK[1:]
    plane[:] = 0                                   # a copy: the map stays as it was
    assert values[PEAK].item() != 0


def test_a_map_must_be_3d():
    with pytest.raises(KqlPlanError, match="3D map"):
        vo.strongest_cell(np.zeros((4, 4)), BASE)


# -- the voxel drop against the plain loop --------------------------------------------------

def naive_voxel_drop(values, base, shape, patch, stride, offset):
    """Every voxel, every cell: the mean drop of the cells whose patch holds the voxel."""
    drop = base - np.asarray(values, np.float64)
    out = np.full(shape, np.nan)
    for voxel in itertools.product(*[range(n) for n in shape]):
        found = [drop[cell] for cell in np.ndindex(drop.shape)
                 if all((o + c) * s <= v < (o + c) * s + p
                        for v, c, p, s, o in zip(voxel, cell, patch, stride, offset))]
        if found:
            out[voxel] = np.mean(found)
    return out


CASES = {
    "stride < patch": ((9, 8, 7), (3, 4, 3), (3, 2, 2), (2, 3, 2), (0, 0, 0)),
    "stride > patch: NaN gaps": ((9, 8, 10), (3, 2, 3), (2, 2, 1), (3, 3, 4), (0, 0, 0)),
    "offset != 0": ((10, 9, 8), (2, 3, 2), (3, 2, 4), (2, 2, 2), (1, 0, 2)),
    "patches past the edge": ((6, 6, 6), (3, 3, 3), (4, 4, 4), (2, 2, 2), (0, 0, 0)),
}


@pytest.mark.parametrize("case", CASES)
def test_voxel_drop_matches_the_plain_loop(case):
    shape, map_shape, patch, stride, offset = CASES[case]
    values = np.random.default_rng(0).uniform(0.1, 1.0, map_shape).astype(np.float32)
    got = vo.voxel_drop(values, BASE, shape, patch, stride, offset)
    want = naive_voxel_drop(values, BASE, shape, patch, stride, offset)
    assert got.shape == shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)   # NaN where NaN
    if case.startswith("stride > patch"):
        assert np.isnan(got).any() and not np.isnan(got).all()


def test_voxel_drop_counts_a_nan_cell_as_not_covering():
    values = np.array([[[0.5, np.nan]]])
    got = vo.voxel_drop(values, 1.0, (1, 1, 4), (1, 1, 2), (1, 1, 2), (0, 0, 0))[0, 0]
    np.testing.assert_allclose(got, [0.5, 0.5, np.nan, np.nan])


def test_voxel_drop_is_fast_on_a_64_cube():
    values = np.random.default_rng(1).uniform(0, 1, (15, 15, 15)).astype(np.float32)
    start = time.perf_counter()
    got = vo.voxel_drop(values, 1.0, (64, 64, 64), (8, 8, 8), (4, 4, 4), (0, 0, 0))
    assert time.perf_counter() - start < 0.5
    assert got.shape == (64, 64, 64) and not np.isnan(got).any()


# -- the figure -----------------------------------------------------------------------------

def test_three_panels_and_one_colour_bar(volume, values):
    fig = vo.slices_figure(volume, values, BASE, PATCH, STRIDE, OFFSET, title="P(lesion)")
    assert len(panels(fig)) == 3 and len(fig.axes) == 4
    assert fig._suptitle.get_text().startswith("P(lesion)\nunoccluded 0.900")


def test_panel_titles_name_the_axes_and_the_slice(volume, values):
    fig = vo.slices_figure(volume, values, BASE, PATCH, STRIDE, OFFSET)
    middle = vo.centre(PEAK, PATCH, STRIDE, OFFSET)          # (14.0, 6.0, 10.0)
    assert middle == (14.0, 6.0, 10.0)
    assert [ax.get_title() for ax in panels(fig)] == \
        ["axis 0 (i) = 14", "axis 1 (j) = 6", "axis 2 (k) = 10"]


@pytest.mark.parametrize("orientation, names", [
    ("RAS", ("sagittal", "coronal", "axial")),
    ("lps", ("sagittal", "coronal", "axial")),
    ("SAR", ("axial", "coronal", "sagittal")),
    ("PIL", ("coronal", "axial", "sagittal")),
])
def test_an_orientation_names_the_planes(volume, values, orientation, names):
    fig = vo.slices_figure(volume, values, BASE, PATCH, STRIDE, OFFSET, orientation=orientation)
    titles = [ax.get_title() for ax in panels(fig)]
    assert [t.split("\n")[0] for t in titles] == list(names)
    assert titles[0].endswith("axis 0 (i) = 14")


@pytest.mark.parametrize("orientation", ["RA", "RRS", "XYZ", "RASL"])
def test_a_bad_orientation_is_refused(volume, values, orientation):
    with pytest.raises(KqlPlanError, match="orientation"):
        vo.slices_figure(volume, values, BASE, PATCH, STRIDE, OFFSET, orientation=orientation)


def test_the_marker_sits_at_the_strongest_cells_centre(volume):
    offset = (1, 0, 1)
    shifted = peaked_map((5, 2, 3))
    fig = vo.slices_figure(volume, shifted, BASE, PATCH, STRIDE, offset)
    i, j, k = vo.centre((5, 2, 3), PATCH, STRIDE, offset)
    assert (i, j, k) == (14.0, 6.0, 10.0)
    # Panel t drops axis t: rows are the lower remaining axis, columns the higher.
    assert [marker(ax) for ax in panels(fig)] == [(k, j), (k, i), (j, i)]
    heights = [ax.images[0].get_array().shape[:2] for ax in panels(fig)]
    assert heights == [(20, 16), (24, 16), (24, 20)]


def test_spacing_sets_each_panels_aspect(volume, values):
    fig = vo.slices_figure(volume, values, BASE, PATCH, STRIDE, OFFSET, spacing=(3.0, 0.8, 0.5))
    assert [ax.get_aspect() for ax in panels(fig)] == [0.8 / 0.5, 3.0 / 0.5, 3.0 / 0.8]


def test_the_drop_is_red_and_uncovered_voxels_stay_grey(volume):
    # Patch 2 every 4 voxels along k: the odd pairs of columns are gaps (NaN).
    values = np.full((11, 9, 4), BASE, np.float32)
    values[6:8, 1:4, 2] = 0.3              # every cell covering i = 14, j = 4..7, k = 8, 9
    fig = vo.slices_figure(volume, values, BASE, (4, 4, 2), (2, 2, 4), (0, 0, 0))
    rgb = np.asarray(panels(fig)[0].images[0].get_array())       # [j, k, 3] at i = 14
    peak = rgb[4:8, 8:10]
    assert (peak[..., 0] > peak[..., 2] + 0.2).all()
    gaps = rgb[:, [2, 3, 6, 7, 10, 11, 14, 15]]
    np.testing.assert_allclose(gaps[..., 0], gaps[..., 2])       # grey: r = g = b
    np.testing.assert_allclose(gaps[..., 1], gaps[..., 2])


def test_the_scan_is_windowed_by_percentiles(volume, values):
    fig = vo.slices_figure(volume, values, BASE, PATCH, STRIDE, OFFSET, alpha=0.0)
    rgb = np.asarray(panels(fig)[0].images[0].get_array())
    assert rgb.min() == 0.0 and rgb.max() == 1.0                 # air black, the blob white
    assert 0.5 < rgb[6, 10, 0] <= 1.0


# -- the PNG --------------------------------------------------------------------------------

def test_write_png_decodes(volume, values, tmp_path):
    path = str(tmp_path / "scan.png")
    vo.write_png(path, volume, values, BASE, PATCH, STRIDE, OFFSET, title="P(lesion)",
                 orientation="RAS", spacing=(2.5, 0.8, 0.8))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 100
    assert os.listdir(tmp_path) == ["scan.png"]


def test_changing_the_map_changes_the_pixels(volume, values):
    first = picture(vo.png_bytes(volume, values, BASE, PATCH, STRIDE, OFFSET))
    again = picture(vo.png_bytes(volume, values, BASE, PATCH, STRIDE, OFFSET))
    other = picture(vo.png_bytes(volume, peaked_map(depth=0.3), BASE, PATCH, STRIDE, OFFSET))
    np.testing.assert_array_equal(first, again)
    assert first.shape == other.shape and np.abs(first - other).max() > 0.2


def test_overlay_options_reach_the_picture(volume, values):
    plain = picture(vo.png_bytes(volume, values, BASE, PATCH, STRIDE, OFFSET))
    cool = picture(vo.png_bytes(volume, values, BASE, PATCH, STRIDE, OFFSET, colormap="coolwarm"))
    assert np.abs(plain - cool).max() > 0.1
    with pytest.raises(KqlPlanError, match="overlay_alpha"):
        vo.png_bytes(volume, values, BASE, PATCH, STRIDE, OFFSET, alpha=2)
    with pytest.raises(KqlPlanError, match="unknown overlay option"):
        vo.png_bytes(volume, values, BASE, PATCH, STRIDE, OFFSET, colour="red")


def test_a_failed_write_leaves_nothing(volume, values, tmp_path, monkeypatch):
    path = tmp_path / "scan.png"

    def broken(self, target, **kw):
        with open(target, "wb") as fh:
            fh.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(OSError):
        vo.write_png(str(path), volume, values, BASE, PATCH, STRIDE, OFFSET)
    assert os.listdir(tmp_path) == []
    path.write_bytes(b"old")
    with pytest.raises(OSError):
        vo.write_png(str(path), volume, values, BASE, PATCH, STRIDE, OFFSET)
    assert os.listdir(tmp_path) == ["scan.png"] and path.read_bytes() == b"old"
