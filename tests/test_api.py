"""The Python API contract: names, heat-map shape and values, outputs, persistence."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision

import kql
from helpers import plain_heatmap, smooth_noise_image


@pytest.fixture
def con(small_model):
    c = kql.connect()
    c.register_model("net", small_model)
    return c


GEOMETRIES = [
    # (image h, w), patch, stride, region
    ((24, 30), (8, 8), (4, 4), None),           # stride divides: last patch flush with the border
    ((24, 30), (5, 7), (3, 4), None),           # rectangular patch, strides that do not divide
    ((23, 31), (6, 6), (7, 5), None),           # odd sizes, stride > patch
    ((24, 30), (24, 4), (1, 13), None),         # patch as high as the image
    ((24, 30), (6, 6), (3, 3), (2, 5, 20, 16)),  # region inside the image
    ((24, 30), (6, 6), (3, 3), (0, 0, 30, 11)),  # region touching two borders
]


@pytest.mark.parametrize("size,patch,stride,region", GEOMETRIES,
                         ids=[f"{g[0]}-p{g[1]}-s{g[2]}-r{g[3]}" for g in GEOMETRIES])
@pytest.mark.parametrize("strategy", ["naive", "incremental"])
def test_heatmap_equals_plain_loop(small_model, size, patch, stride, region, strategy):
    img = smooth_noise_image(*size)
    con = kql.connect()
    con.register_model("net", small_model)
    con.register_image("img", img)
    con.execute(f"SET strategy = '{strategy}'")
    clause = f" REGION ({region[0]}, {region[1]}, {region[2]}, {region[3]})" if region else ""
    r = con.execute(f"OCCLUDE img USING net PATCH {patch[0]} x {patch[1]} "
                    f"STRIDE {stride[0]} x {stride[1]} COLOR (0, 0, 0){clause} BATCH 5")
    ref, target = plain_heatmap(small_model, img, patch, stride, (0.0, 0.0, 0.0), region=region)
    assert ref.max() - ref.min() > 0.02, "reference map too flat for the test to mean anything"
    assert r.heatmap.dtype == np.float32 and r.heatmap.shape == ref.shape
    assert r.target == target
    np.testing.assert_allclose(r.heatmap, ref, atol=1e-5)
    assert ("IncrementalOcclusion" if strategy == "incremental" else "NaiveOcclusion") in r.plan


def test_full_map_shape_formula(con):
    con.register_image("img", smooth_noise_image(37, 50))
    r = con.execute("OCCLUDE img USING net PATCH 9 x 4 STRIDE 5 x 3")
    assert r.heatmap.shape == ((37 - 9) // 5 + 1, (50 - 4) // 3 + 1)


def test_region_map_is_a_window_of_the_full_map(con):
    con.register_image("img", smooth_noise_image(24, 30))
    full = con.execute("OCCLUDE img USING net PATCH 6 STRIDE 3").heatmap
    r = con.execute("OCCLUDE img USING net PATCH 6 STRIDE 3 REGION (4, 2, 17, 13)")
    assert r.offset == (1, 2)
    rows, cols = r.heatmap.shape
    np.testing.assert_allclose(r.heatmap, full[1:1 + rows, 2:2 + cols], atol=1e-6)


@pytest.mark.parametrize("color,rgb", [("black", (0, 0, 0)), ("white", (1, 1, 1)),
                                       ("gray", (0.5, 0.5, 0.5)), ("(0.2, 0.4, 0.9)", (0.2, 0.4, 0.9))])
def test_colors(con, small_model, color, rgb):
    img = smooth_noise_image(24, 30)
    con.register_image("img", img)
    r = con.execute(f"OCCLUDE img USING net PATCH 8 STRIDE 8 COLOR {color}")
    ref, _ = plain_heatmap(small_model, img, (8, 8), (8, 8), rgb)
    np.testing.assert_allclose(r.heatmap, ref, atol=1e-5)


def test_mean_color_is_the_image_mean(con, small_model):
    img = smooth_noise_image(24, 30)
    con.register_image("img", img)
    r = con.execute("OCCLUDE img USING net PATCH 8 STRIDE 8 COLOR mean")
    ref, _ = plain_heatmap(small_model, img, (8, 8), (8, 8), tuple(img.mean(dim=(1, 2)).tolist()))
    np.testing.assert_allclose(r.heatmap, ref, atol=1e-5)


def test_targets_and_default_connection(small_model):
    img = smooth_noise_image(24, 30)
    labels = ["a", "b", "c", "d", "e"]
    kql.connect()  # a fresh connection must not disturb the default one
    con = kql.api.default_connection()
    con.register_model("lab", small_model, labels=labels)
    con.register_image("pic", img)
    predicted = kql.execute("OCCLUDE pic USING lab PATCH 8 STRIDE 8")
    assert predicted.label == labels[predicted.target]
    other = (predicted.target + 1) % 5
    by_index = kql.execute(f"OCCLUDE pic USING lab PATCH 8 STRIDE 8 TARGET {other}")
    by_label = kql.execute(f"OCCLUDE pic USING lab PATCH 8 STRIDE 8 TARGET '{labels[other].upper()}'")
    ref, _ = plain_heatmap(small_model, img, (8, 8), (8, 8), (0.5, 0.5, 0.5), target=other)
    np.testing.assert_allclose(by_index.heatmap, ref, atol=1e-5)
    np.testing.assert_allclose(by_index.heatmap, by_label.heatmap, atol=1e-6, rtol=0)
    with torch.no_grad():
        p = torch.softmax(small_model(img[None]), 1)[0, other]
    assert by_index.probability == pytest.approx(float(p), abs=1e-6)


def test_mean_std_and_input_size(small_model):
    """Normalisation and resize happen before the module; the patch is in pixel space."""
    con = kql.connect()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    con.register_model("net", small_model, mean=mean, std=std, input_size=(24, 30))
    img = smooth_noise_image(48, 60)
    con.register_image("img", img)
    r = con.execute("OCCLUDE img USING net PATCH 8 STRIDE 8 COLOR black")
    small = torch.nn.functional.interpolate(img[None], size=(24, 30), mode="bilinear",
                                            antialias=True, align_corners=False)[0].clamp(0, 1)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    ref, _ = plain_heatmap(lambda x: small_model((x - m) / s), small, (8, 8), (8, 8), (0, 0, 0))
    np.testing.assert_allclose(r.heatmap, ref, atol=1e-5)
    assert r.image.shape == (3, 24, 30)


def test_numpy_uint8_image(con):
    arr = (smooth_noise_image(24, 30).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    con.register_image("img", arr)
    r = con.execute("OCCLUDE img USING net PATCH 8 STRIDE 8")
    assert r.heatmap.shape == (3, 3)


def test_outputs_png_npy_parquet(con, tmp_path):
    con.register_image("img", smooth_noise_image(24, 30))
    npy, png, parquet = (str(tmp_path / f"m.{e}") for e in ("npy", "png", "parquet"))
    r = con.execute(f"OCCLUDE img USING net PATCH 8 STRIDE 4 INTO '{npy}'")
    np.testing.assert_array_equal(np.load(npy), r.heatmap)
    r.save(png)
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    con.execute(f"OCCLUDE img USING net PATCH 8 STRIDE 4 INTO '{parquet}'")
    row = pq.read_table(parquet).to_pylist()[0]
    assert row["model"] == "net" and row["rows"] == 5 and row["cols"] == 6
    assert row["target"] == r.target and "INTO" in row["query"]
    np.testing.assert_allclose(np.array(row["heatmap"], np.float32), r.heatmap)
    assert sorted(os.listdir(tmp_path)) == ["m.npy", "m.parquet", "m.png"]  # no temp files left
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(npy).st_mode & 0o777 == 0o666 & ~mask       # not mkstemp's private 0600


def test_to_arrow(con):
    con.register_image("img", smooth_noise_image(24, 30))
    t = con.execute("OCCLUDE img USING net PATCH 8 STRIDE 8").to_arrow()
    assert t.num_rows == 1 and t.column("rows")[0].as_py() == 3


def test_show_and_persisted_catalog(tmp_path):
    from PIL import Image

    path = tmp_path / "pic.png"
    pixels = (smooth_noise_image(20, 26).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    weights = tmp_path / "sq.pt"
    torch.save(torchvision.models.squeezenet1_1(weights=None, num_classes=3).state_dict(), weights)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n# comment\nbird\n")
    cat_dir = str(tmp_path / "cat")
    con = kql.connect(cat_dir)
    con.execute(f"LOAD IMAGE pic FROM '{path}'; "
                f"LOAD MODEL sq FROM '{weights}' ARCH squeezenet1_1 LABELS '{labels}'")
    again = kql.connect(cat_dir)
    assert [r["name"] for r in again.execute("SHOW IMAGES").rows] == ["pic"]
    models = {r["name"]: r for r in again.execute("SHOW MODELS").rows}
    assert models["sq"]["arch"] == "squeezenet1_1" and "efficientnet_lite0" in models
    r = again.execute("OCCLUDE pic USING sq PATCH 112 STRIDE 112 TARGET 'dog'")
    assert r.heatmap.shape == (2, 2) and r.label == "dog" and r.target == 1
    with open(os.path.join(cat_dir, "catalog.json")) as fh:
        assert set(json.load(fh)["models"]) == {"sq"}


def test_load_model_infers_class_count(tmp_path):
    weights = tmp_path / "r.pt"
    net = torchvision.models.resnet18(weights=None, num_classes=7)
    torch.save({"state_dict": net.state_dict()}, weights)   # common checkpoint layout
    con = kql.connect()
    r = con.execute(f"LOAD MODEL resnet18 FROM '{weights}'")
    assert "7 classes" in r.message


def test_explain_lists_the_plan(con):
    con.register_image("img", smooth_noise_image(24, 30))
    con.execute("SET strategy = 'incremental'")
    text = con.execute("EXPLAIN OCCLUDE img USING net PATCH 8 STRIDE 4").plan
    lines = text.splitlines()
    assert lines[0].startswith("HeatMap: target=predicted, shape=5x6, positions=30")
    assert lines[1].lstrip().startswith("IncrementalOcclusion: model=net")
    assert lines[-2].lstrip().startswith("Image: source=img, size=24x30, patch=8x8, stride=4x4")


@pytest.mark.slow
def test_builtin_efficientnet_lite0_on_chelsea():
    """The real pretrained model: the cat (not the corners) drives 'Egyptian cat'."""
    r = kql.connect().execute("OCCLUDE sample('chelsea') USING efficientnet_lite0 "
                              "PATCH 56 STRIDE 56 COLOR black")
    assert r.label == "Egyptian cat" and r.probability > 0.7
    assert r.heatmap.shape == (4, 4)
    centre = r.heatmap[1:3, 1:3].min()
    corners = min(r.heatmap[0, 0], r.heatmap[0, 3], r.heatmap[3, 0], r.heatmap[3, 3])
    assert centre < corners
