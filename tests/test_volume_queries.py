"""Volumes end to end through the language: files in (NIfTI), maps out (NIfTI over the
scan, orthogonal slices, Parquet, the shell's preview), many volumes per query, and a
clear one-line error for every clause a volume cannot take.

The maps themselves are checked against a plain 3D loop in tests/test_volumes.py; here
the model is small and the question is what reaches the user."""

import itertools
import math

import nibabel
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn

import kql
from kql.catalog.models import Normalize
from kql.results.nifti import map_affine
from kql.results.preview import preview
from volume_models import blob_volume, plain_volume_map

AFFINE = np.array([[0.0, 0.0, 3.0, -40.0], [2.0, 0.0, 0.0, 10.0], [0.0, 2.5, 0.0, 5.0], [0, 0, 0, 1]])


def small_net() -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
                        nn.Conv3d(4, 4, 3, padding=1), nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                        nn.Linear(4, 3))
    with torch.no_grad():
        net[-1].weight.mul_(12.0)                 # occlusions move the probabilities
    return net.eval()


@pytest.fixture
def scan(tmp_path):
    """A 12x14x16 NIfTI scan (int16 with a slope, like a CT) and a connection to it."""
    values = (blob_volume(12, 14, 16, seed=4)[0].numpy() * 1000).astype(np.int16)
    image = nibabel.Nifti1Image(values, AFFINE)
    image.header.set_slope_inter(0.5, -100.0)
    nibabel.save(image, str(tmp_path / "scan.nii.gz"))
    con = kql.connect(str(tmp_path))
    con.register_model("net", small_net(), mean=(250.0,), std=(10.0,))   # Hounsfield-like units in
    loaded = con.execute(f"LOAD IMAGE ct FROM '{tmp_path / 'scan.nii.gz'}'")
    assert loaded.message == "volume 'ct' loaded (12x14x16, 1 channel)"
    return con, tmp_path, values.astype(np.float32) * 0.5 - 100.0


def test_a_nifti_scan_is_occluded_as_the_plain_loop_does(scan):
    con, _, voxels = scan
    result = con.execute("OCCLUDE ct USING net PATCH 4 STRIDE 3")
    volume = torch.from_numpy(voxels)[None]
    normalised = nn.Sequential(Normalize((250.0,), (10.0,), 3), small_net()).eval()
    expected, target = plain_volume_map(normalised, volume, (4, 4, 4), (3, 3, 3),
                                        (float(volume.mean()),))
    assert result.heatmap.shape == (3, 4, 5) and result.target == target
    assert expected.max() - expected.min() > 0.05
    np.testing.assert_allclose(result.heatmap, expected, atol=1e-5)
    assert result.image_info["spacing"] == pytest.approx((2.0, 2.5, 3.0))
    plan = con.execute("EXPLAIN OCCLUDE ct USING net PATCH 4 STRIDE 3").plan
    assert "Volume: source=ct, size=12x14x16, patch=4x4x4, stride=3x3x3" in plan
    assert "spacing=2x2.5x3 mm" in plan and "shape=3x4x5" in plan


def test_the_nifti_map_lies_over_the_scan(scan):
    con, folder, _ = scan
    result = con.execute(f"OCCLUDE ct USING net PATCH 4x2x6 STRIDE 2 INTO '{folder / 'map.nii.gz'}'")
    saved = nibabel.load(str(folder / "map.nii.gz"))
    np.testing.assert_array_equal(np.asarray(saved.dataobj), result.heatmap)
    # Map cell (1, 2, 3) is the patch from voxel (2, 4, 6): its centre (3.5, 4.5, 8.5) in the scan.
    world = saved.affine @ [1, 2, 3, 1]
    np.testing.assert_allclose(world, AFFINE @ [3.5, 4.5, 8.5, 1])
    np.testing.assert_allclose(saved.affine, map_affine(AFFINE, (4, 2, 6), (2, 2, 2)))


def test_a_volume_png_shows_three_slices_and_parquet_keeps_the_cube(scan):
    con, folder, _ = scan
    con.execute(f"OCCLUDE ct USING net PATCH 4 STRIDE 4 INTO '{folder / 'map.png'}'")
    with Image.open(folder / "map.png") as picture:
        assert picture.width > 2 * picture.height          # three panels side by side
    result = con.execute(f"OCCLUDE ct USING net PATCH 4 STRIDE 4 INTO '{folder / 'map.parquet'}'")
    table = pq.read_table(folder / "map.parquet").to_pylist()[0]
    assert (table["size_d"], table["size_h"], table["size_w"]) == result.heatmap.shape
    assert np.array_equal(np.array(table["heatmap"], np.float32), result.heatmap)
    assert result._repr_png_().startswith(b"\x89PNG")


def test_the_shell_preview_is_the_slice_through_the_strongest_drop(scan):
    con, _, _ = scan
    result = con.execute("OCCLUDE ct USING net PATCH 4 STRIDE 2")
    text = preview(result, 60, color=False)
    cell = np.unravel_index(int(np.argmax(result.drop)), result.drop.shape)
    assert f"slice {cell[0]} of {result.heatmap.shape[0]} (axis 0)" in text
    voxel = ", ".join(str(int(c) * 2) for c in cell)
    assert f"patch at voxel ({voxel}), 4x4x4 voxels" in text
    assert "heat map 5x6x7 for class" in result.render()


def test_many_volumes_to_parquet(scan, tmp_path):
    con, folder, _ = scan
    for i in range(2):
        values = blob_volume(12, 14, 16, seed=10 + i)[0].numpy()
        nibabel.save(nibabel.Nifti1Image(values, np.eye(4)), str(folder / f"more{i}.nii"))
    rows = con.execute(f"OCCLUDE '{folder}/*.nii*' USING net PATCH 4 STRIDE 4 "
                       f"INTO '{folder / 'all.parquet'}'")
    assert len(rows) == 3 and not any(r["error"] for r in rows)
    table = pq.read_table(folder / "all.parquet")
    first = table.to_pylist()[0]
    assert (first["depth"], first["height"], first["width"]) == (12, 14, 16)
    assert (first["slices"], first["rows"], first["cols"]) == (3, 3, 4)
    assert first["heatmap"] is None and np.array(first["volume_heatmap"]).shape == (3, 3, 4)
    assert "drop=" in rows.render() and first["drop_d"] == 4


def test_a_volume_from_python_with_its_affine_and_a_resampling_model(tmp_path):
    con = kql.connect()
    con.register_model("net", small_net(), input_size=(8, 8, 8))
    con.register_volume("v", blob_volume(16, 12, 10, seed=2).numpy(), affine=np.diag([1.0, 2.0, 3.0, 1.0]))
    result = con.execute("OCCLUDE v USING net PATCH 4 STRIDE 2")
    assert result.image.shape == (1, 8, 8, 8) and result.heatmap.shape == (3, 3, 3)
    assert result.image_info["spacing"] == (1.0, 2.0, 3.0)
    assert result.image_info["orientation"] == "RAS"        # as a file's affine gives it
    con.register_volume("flat", blob_volume(16, 12, 10, seed=2).numpy(), affine=np.zeros((4, 4)))
    flat = con.execute(f"OCCLUDE flat USING net PATCH 4 STRIDE 2 INTO '{tmp_path / 'flat.png'}'")
    assert "orientation" not in flat.image_info and "spacing" not in flat.image_info
    assert (tmp_path / "flat.png").stat().st_size > 0                 # drawn in voxel units


@pytest.mark.parametrize("clause, at, message", [
    ("WITH SSIM >= 0.9", "WITH", "WITH SSIM applies to images; a volume's map is computed exactly"),
    ("DRILLDOWN 0.2", "DRILLDOWN", "DRILLDOWN applies to images"),
    ("RESIZE pad", "RESIZE", "RESIZE applies to images"),
    ("COLOR gray", "COLOR", "a volume takes COLOR mean, COLOR (value)"),
    ("COLOR (0.1, 0.2, 0.3)", "COLOR", "a volume takes COLOR mean, COLOR (value)"),
    ("PATCH 4x4 STRIDE 2", "PATCH", "PATCH needs 3 sizes here (a volume takes d x h x w, or one number), got 4x4"),
    ("PATCH 4 STRIDE 2x2", "STRIDE", "STRIDE needs 3 sizes here (a volume takes d x h x w, or one number), got 2x2"),
    ("REGION (0, 0, 8, 8)", "REGION", "REGION takes 6 numbers for this volume, got 4"),
    ("REGION (0, 0, 0, 9, 8, 8) PATCH 4", "REGION", "region (0, 0, 0, 9, 8, 8) is not inside the volume"),
    ("PATCH 20", "PATCH", "patch 20x20x20 is larger than the volume (8x8x8"),
])
def test_what_a_volume_cannot_take_is_one_line(clause, at, message):
    """One line, at the clause at fault (line and column of its keyword)."""
    con = kql.connect()
    con.register_model("net", small_net())
    con.register_volume("v", torch.rand(1, 8, 8, 8))
    query = f"OCCLUDE v USING net {clause if 'PATCH' in clause else 'PATCH 4 ' + clause}"
    with pytest.raises(kql.KqlError) as err:
        con.execute(query)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"line 1, column {query.index(at) + 1}: "), text
    assert message in text, text


def test_volume_registration_and_channel_errors():
    con = kql.connect()
    con.register_model("net", small_net())
    for bad, message in ((torch.rand(2, 2), "must have shape [C, D, H, W]"),
                         (torch.full((1, 4, 4, 4), float("nan")), "NaN"),
                         ("scan.nii", "must be a torch tensor or a numpy array")):
        with pytest.raises(kql.KqlImageError, match=message.replace("[", r"\[").replace("]", r"\]")):
            con.register_volume("v", bad)
    with pytest.raises(kql.KqlImageError, match="affine must be a finite 4x4"):
        con.register_volume("v", torch.rand(4, 4, 4), affine=np.eye(3))
    con.register_volume("two", torch.rand(2, 8, 8, 8))
    with pytest.raises(kql.KqlError, match="the volume has 2 channel.* but model 'net' takes 1"):
        con.execute("OCCLUDE two USING net PATCH 4")
    con.register_image("img", torch.rand(1, 16, 16))
    with pytest.raises(kql.KqlError, match=r"line 1, column 9: model 'net' takes volumes \(its first "
                                           r"convolution is 3D\); img is an image"):
        con.execute("OCCLUDE img USING net")
    con.register_model("net2", nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(2)))
    with pytest.raises(kql.KqlError, match="model 'net2' takes images .*; two is a volume"):
        con.execute("OCCLUDE two USING net2 PATCH 4")
    con.register_model("flat", nn.Sequential(nn.Flatten(), nn.Linear(256, 2)))
    with pytest.raises(kql.KqlError, match="REGION takes four numbers .* for an image; six are a volume's"):
        con.execute("OCCLUDE img USING flat REGION (0, 0, 0, 4, 4, 4)")


def test_air_is_a_negative_colour_and_other_numbers_stay_unsigned():
    con = kql.connect()
    con.register_model("net", small_net())
    volume = torch.full((1, 8, 8, 8), -1000.0)
    volume[0, 2:6, 2:6, 2:6] = 40.0                       # soft tissue in air
    con.register_volume("v", volume)
    result = con.execute("OCCLUDE v USING net PATCH 4 STRIDE 4 COLOR (-1000)")
    assert "color=(-1000)" in con.execute("EXPLAIN OCCLUDE v USING net PATCH 4 COLOR (-1000)").plan
    corner = volume.clone()
    corner[0, 0:4, 0:4, 0:4] = -1000.0                    # air painted on air: nothing changes
    assert result.heatmap[0, 0, 0] == pytest.approx(result.probability, abs=1e-6)
    with pytest.raises(kql.KqlSyntaxError, match="negative numbers are not allowed"):
        con.execute("OCCLUDE v USING net PATCH -4")


def test_a_dicom_series_folder_is_loaded_and_occluded(tmp_path):
    from test_volume_files import series_folder, stack

    pixels = stack(count=8, rows=10, columns=12)
    folder = series_folder(tmp_path, pixels, [[-50.0, 20.0, 3.0 * k] for k in range(8)])
    con = kql.connect(str(tmp_path))
    con.register_model("net", small_net(), mean=(0.0,), std=(500.0,))
    con.execute(f"LOAD IMAGE series FROM '{folder}'")
    result = con.execute(f"OCCLUDE series USING net PATCH 4 STRIDE 2 INTO '{tmp_path / 'm.nii.gz'}'")
    # (i, j, k) = (column, row, slice): 12 x 10 x 8 voxels of 0.75 x 0.5 x 3 mm.
    assert result.image.shape == (1, 12, 10, 8) and result.heatmap.shape == (5, 4, 3)
    assert result.image_info["format"] == "DICOM series"
    assert result.image_info["spacing"] == pytest.approx((0.75, 0.5, 3.0))
    assert nibabel.load(str(tmp_path / "m.nii.gz")).shape == (5, 4, 3)


def test_views_over_memory_limit_run_the_plain_loop_and_say_why(monkeypatch):
    from kql import executor
    from kql.language.parser import parse
    from kql.planner import naive_shortcut
    from volume_models import resnet3d

    monkeypatch.setattr(naive_shortcut, "SMALL_IMAGE", 0)      # the costed plans, not the shape floor
    con = kql.connect()
    con.register_model("net", resnet3d())
    con.register_volume("v", blob_volume(24, 24, 24, seed=1))
    query = "OCCLUDE v USING net PATCH 4 STRIDE 4 BATCH 1"
    needs = {}
    for strategy in ("naive", "incremental"):
        con.execute(f"SET strategy = '{strategy}'")
        needs[strategy] = executor.plan(con, parse(query)[0], query).memory_bytes
    assert needs["naive"] < needs["incremental"]              # the volume's views
    con.execute(f"SET memory_limit = {(needs['naive'] + needs['incremental']) // 2}")
    with pytest.raises(kql.KqlPlanError, match="the incremental plan .* needs .* at BATCH 1"):
        con.execute(query)
    con.execute("SET strategy = 'auto'")
    line = con.execute("EXPLAIN " + query).plan.splitlines()[1]
    assert line.strip().startswith("NaiveOcclusion:"), line
    assert "reason=incremental needs" in line and "memory_limit" in line, line


def test_the_shape_pass_counts_a_volume_networks_work():
    """The cheap planning pass (module hooks, no trace) sees Conv3d layers and follows a
    cube's region through them, so a volume is priced, not taken for a small image."""
    from torch.utils.flop_counter import FlopCounterMode

    from kql.operators.shapes import summarize
    from volume_models import resnet3d

    net, volume = resnet3d(), blob_volume(16, 20, 24, seed=1)
    summary = summarize(net, volume)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net(volume[None])
    assert summary.macs == pytest.approx(counter.get_total_flops() / 2, rel=1e-6)
    regions = summary.changed((4, 4, 4))
    first = next(r for r, hop in zip(regions, summary.hops) if hop.conv is not None)
    assert len(first) == 3 and 1 < math.prod(first) < math.prod(summary.hops[0].out)


@pytest.mark.parametrize("form", ["gaussian", "mean_patch"])
def test_the_volume_under_the_cube_repainted(form):
    """COLOR gaussian (the cube's voxels times 1 - MONAI's Gaussian) and COLOR mean_patch
    (each channel's mean of the cube's voxels) paint each cube from the volume itself:
    both engines against a loop that cuts the cubes out with slices."""
    from kql.operators.fills import gaussian_kernel
    from volume_models import resnet3d, sensitive_volume

    volume = blob_volume(12, 14, 16, seed=1)
    net = sensitive_volume(resnet3d(), volume, (4, 4, 6), (float(volume.mean()),))
    con = kql.connect()
    con.register_model("net", net)
    con.register_volume("v", volume)
    kernel = gaussian_kernel((4, 4, 6))
    with torch.no_grad():
        target = int(net(volume[None]).argmax())
        expected = []
        for z, y, x in itertools.product(range(0, 9, 2), range(0, 11, 2), range(0, 11, 2)):
            occluded = volume.clone()
            cube = occluded[:, z:z + 4, y:y + 4, x:x + 6]
            cube.copy_(cube * kernel if form == "gaussian" else cube.mean(dim=(1, 2, 3), keepdim=True).expand_as(cube))
            expected.append(float(torch.softmax(net(occluded[None]).double(), 1)[0, target]))
    expected = np.array(expected, np.float32).reshape(5, 6, 6)
    assert expected.max() - expected.min() > 0.02
    for strategy in ("naive", "incremental"):
        con.execute(f"SET strategy = '{strategy}'")
        result = con.execute(f"OCCLUDE v USING net PATCH 4x4x6 STRIDE 2 COLOR {form}")
        np.testing.assert_allclose(result.heatmap, expected, atol=1e-5, err_msg=strategy)
