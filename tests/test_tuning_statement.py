"""CALIBRATE <model> ON (...): parsing, binding like OCCLUDE, errors, and the catalog's
tuning records (persisted, shared between sessions, dropped when the weights change).

The tuner itself (planner/tuning.py) is replaced by a stand-in that records what it was
given, so these tests are about the statement and the catalog, not about SSIM.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import kql
from kql.language import ast
from kql.catalog import models
from kql.catalog.registry import TUNING_FILE, Catalog
from kql.binder import bind
from helpers import smooth_noise_image
from models_zoo import small_cnn


# -- a stand-in tuner ---------------------------------------------------------------------------

class FakeRecord:
    def __init__(self, images: int):
        self.images = images

    def to_dict(self) -> dict:
        return {"taus": [0.5], "ssims": [[0.9] * self.images], "images": self.images}

    def summary(self) -> str:
        return f"tuned on {self.images} images"


@pytest.fixture
def tuner(monkeypatch):
    """The stand-in's ``tune`` and ``key`` in kql.planner.tuning (the module itself where it
    is missing); ``tuner.calls`` holds each tune()'s queries and keyword arguments."""
    import kql.executor  # noqa: F401  (the planner's own imports of tuning come first)
    import kql.planner

    try:
        from kql.planner import tuning as module
    except ImportError:
        module = types.ModuleType("kql.planner.tuning")
        monkeypatch.setitem(sys.modules, "kql.planner.tuning", module)
        monkeypatch.setattr(kql.planner, "tuning", module, raising=False)
    calls = []

    def tune(queries, settings=None, directory=None, progress=None):
        calls.append({"queries": queries, "settings": settings, "directory": directory,
                      "progress": progress})
        return FakeRecord(len(queries))

    def key(query):
        return "patch={}x{};stride={}x{}".format(*query.grid.patch, *query.grid.stride)

    monkeypatch.setattr(module, "tune", tune, raising=False)
    monkeypatch.setattr(module, "key", key, raising=False)
    return types.SimpleNamespace(calls=calls)


def _connection(directory=None, model=None):
    con = kql.connect(directory)
    con.register_model("net", model if model is not None else small_cnn())
    for i in range(6):
        con.register_image(f"img{i}", smooth_noise_image(24, 30, seed=i))
    return con


@pytest.fixture
def con():
    return _connection()


def _png(path, height, width, seed=0):
    array = (smooth_noise_image(height, width, seed).permute(1, 2, 0).numpy() * 255)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return str(path)


def error_of(con, query) -> kql.KqlError:
    with pytest.raises(kql.KqlError) as info:
        con.execute(query)
    assert "\n" not in str(info.value)
    return info.value


# -- parsing ----------------------------------------------------------------------------------

def test_the_device_form_keeps_its_meaning():
    assert kql.parse("CALIBRATE; CALIBRATE ON CPU; calibrate on gpu") == [
        ast.Calibrate(), ast.Calibrate(device="cpu"), ast.Calibrate(device="gpu")]


def test_the_model_form_and_its_positions():
    text = "CALIBRATE net ON (a,\n  'b.png', sample('cat'))\n  STRIDE 2 PATCH 8 x 4"
    [stmt] = kql.parse(text)
    assert stmt == ast.CalibrateModel(
        model=ast.ModelName("net"),
        images=(ast.ImageName("a"), ast.ImageFile("b.png"), ast.SampleImage("cat")),
        patch=(8, 4), stride=(2, 2))
    assert stmt.pos == ast.Pos(1, 1) and stmt.model.pos == ast.Pos(1, 11)
    assert [image.pos for image in stmt.images] == [ast.Pos(1, 19), ast.Pos(2, 3), ast.Pos(2, 12)]
    assert stmt.pos_of("stride") == ast.Pos(3, 3) and stmt.pos_of("patch") == ast.Pos(3, 12)
    assert stmt.pos_of("color") == stmt.pos                  # no COLOR: the statement
    assert [type(n).__name__ for n in stmt.walk()] == [
        "CalibrateModel", "ModelName", "ImageName", "ImageFile", "SampleImage"]


def test_a_glob_is_one_image_glob_node():
    [stmt] = kql.parse("CALIBRATE net ON 'cats/*.png' COLOR mean")
    assert stmt.images == (ast.ImageGlob("cats/*.png"),) and stmt.images[0].pos == ast.Pos(1, 18)
    assert stmt.color == ast.ColorNamed("mean")


def test_no_images_is_a_syntax_error():
    with pytest.raises(kql.KqlSyntaxError, match=r"^line 1, column 19: CALIBRATE needs at least one image"):
        kql.parse("CALIBRATE net ON ()")


# -- binding and running ------------------------------------------------------------------------

def test_each_image_is_bound_as_occlude_binds_it(con, tuner):
    text = "CALIBRATE net ON (img0, img1, img2, img3, img4) PATCH 8 STRIDE 2 x 3 COLOR black"
    result = con.execute(text)
    assert result.kind == "set" and result.message == "tuned on 5 images"
    [call] = tuner.calls
    assert call["settings"] is con.settings and call["directory"] is None
    queries = call["queries"]
    assert [q.image_label for q in queries] == ["img0", "img1", "img2", "img3", "img4"]
    occlude = kql.parse("OCCLUDE img3 USING net PATCH 8 STRIDE 2 x 3 COLOR black")[0]
    expected = bind(occlude, text, con.catalog)
    assert queries[3].grid == expected.grid and queries[3].color == expected.color
    assert torch.equal(queries[3].image, expected.image)
    assert queries[3].model is expected.model


def test_defaults_are_occludes(con, tuner):
    con.execute("CALIBRATE net ON (img0, img1, img2, img3, img4)")
    query = tuner.calls[0]["queries"][0]
    assert query.grid.patch == (16, 16) and query.grid.stride == (4, 4)
    assert query.color_label == "gray"


def test_the_record_is_saved_under_the_tuners_key(con, tuner):
    con.execute("CALIBRATE net ON (img0, img1, img2, img3, img4) PATCH 8")
    assert con.catalog.tuning("net", "patch=8x8;stride=4x4") == {
        "taus": [0.5], "ssims": [[0.9] * 5], "images": 5}
    assert con.catalog.tuning("net", "patch=16x16;stride=4x4") is None


def test_images_are_resized_per_model(tuner):
    con = kql.connect()
    con.register_model("net", small_cnn(), input_size=(20, 20))
    con.register_image("big", smooth_noise_image(40, 50))
    con.register_image("small", smooth_noise_image(24, 30))
    con.execute("CALIBRATE net ON (big, small, sample('coffee')) PATCH 4")
    assert [tuple(q.image.shape) for q in tuner.calls[0]["queries"]] == [(3, 20, 20)] * 3


def test_fewer_than_five_images_says_the_bound_is_loose(con, tuner):
    message = con.execute("CALIBRATE net ON (img0, img1)").message
    assert message == "tuned on 2 images; tuned on 2 images: fewer than 5, the bound is loose"
    assert con.execute("CALIBRATE net ON (img0)").message.endswith(
        "; tuned on 1 image: fewer than 5, the bound is loose")


def test_a_glob_expands_sorted_and_skips_folders(con, tuner, tmp_path):
    for name in ("c.png", "a.png", "b.png"):
        _png(tmp_path / name, 24, 30)
    (tmp_path / "d.png").mkdir()                   # a folder is not an image
    con.execute(f"CALIBRATE net ON '{tmp_path}/*.png'")
    labels = [q.image_label for q in tuner.calls[0]["queries"]]
    assert labels == [f"'{tmp_path}/{name}'" for name in ("a.png", "b.png", "c.png")]


def test_progress_reaches_the_tuner(con, tuner):
    def progress(done, total):
        pass
    con.execute("CALIBRATE net ON (img0)", progress=progress)
    assert tuner.calls[0]["progress"] is progress


# -- errors -------------------------------------------------------------------------------------

def test_an_unknown_model(con, tuner):
    err = error_of(con, "CALIBRATE nope ON ('missing/*.png')")
    assert isinstance(err, kql.KqlModelError)
    assert str(err) == "line 1, column 11: unknown model 'nope'; SHOW MODELS lists the registered ones"
    assert tuner.calls == []


def test_an_unknown_image_points_at_it(con, tuner):
    err = error_of(con, "CALIBRATE net ON (img0,\n  what)")
    assert isinstance(err, kql.KqlImageError) and (err.line, err.column) == (2, 3)


def test_a_glob_matching_nothing(con, tuner, tmp_path):
    text = f"CALIBRATE net\n  ON '{tmp_path}/*.png' PATCH 8"
    err = error_of(con, text)
    assert isinstance(err, kql.KqlPlanError)
    assert str(err) == f"line 2, column 6: no files match '{tmp_path}/*.png'"
    assert err.context().splitlines()[1] == "       ^"
    assert tuner.calls == []


def test_a_glob_matching_a_file_that_is_no_image(con, tuner, tmp_path):
    _png(tmp_path / "a.png", 24, 30)
    (tmp_path / "b.png").write_text("not a picture")
    err = error_of(con, f"CALIBRATE net ON '{tmp_path}/*.png'")
    assert isinstance(err, kql.KqlImageError)
    assert str(err) == (f"line 1, column 18: cannot read image file '{tmp_path}/b.png': "
                        f"not an image format Pillow knows")


def test_images_of_different_sizes_for_a_model_without_an_input_size(con, tuner, tmp_path):
    con.register_image("a", smooth_noise_image(64, 80))
    con.register_image("b", smooth_noise_image(32, 32))
    err = error_of(con, "CALIBRATE net ON (a, b) PATCH 8")
    assert isinstance(err, kql.KqlPlanError)
    assert str(err) == ("line 1, column 22: CALIBRATE: images must have the same size after the "
                        "model's resize; got 64x80 ('a') and 32x32 ('b')")
    path = _png(tmp_path / "c.png", 32, 32)
    err = error_of(con, f"CALIBRATE net ON (a, sample('coffee'), '{path}')")
    assert "got 64x80 ('a') and 400x600 (sample('coffee'))" in str(err)


def test_geometry_errors_point_at_the_calibrate_clause(con, tuner):
    err = error_of(con, "CALIBRATE net ON (img0, img1)\n  PATCH 25 x 4")
    assert str(err) == ("line 2, column 3: patch 25x4 is larger than the image "
                        "(24x30 after the model's resize)")
    err = error_of(con, "CALIBRATE net ON (img0) COLOR (2, 0, 0)")
    assert (err.line, err.column) == (1, 25) and "colour components must lie in [0, 1]" in str(err)


# -- the catalog's tuning records ------------------------------------------------------------------

def test_records_persist_across_connections(tmp_path, tuner):
    directory = str(tmp_path / "cat")
    model = small_cnn()
    con = _connection(directory, model)
    con.execute("CALIBRATE net ON (img0, img1, img2, img3, img4)")
    assert os.path.exists(os.path.join(directory, TUNING_FILE))
    again = _connection(directory, copy.deepcopy(model))    # same weights, another object
    assert again.catalog.tuning("net", "patch=16x16;stride=4x4")["images"] == 5


def test_records_of_other_weights_are_not_returned(tmp_path, tuner):
    directory = str(tmp_path / "cat")
    model = small_cnn()
    con = _connection(directory, model)
    con.execute("CALIBRATE net ON (img0)")
    key = "patch=16x16;stride=4x4"
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[0].weight[0, 0, 0, 0] += 1e-3
    con.register_model("net", changed)                        # re-registered: other weights
    assert con.catalog.tuning("net", key) is None
    con.register_model("net", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(2)))
    assert con.catalog.tuning("net", key) is None              # another model, same name
    con.register_model("net", model)                          # the tuned weights again
    assert con.catalog.tuning("net", key) is not None
    assert _connection(directory, changed).catalog.tuning("net", key) is None


def test_normalisation_is_part_of_the_fingerprint(tuner):
    con = _connection()
    model = con.catalog.resolve_model("net").module
    con.execute("CALIBRATE net ON (img0)")
    con.register_model("net", model, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    assert con.catalog.tuning("net", "patch=16x16;stride=4x4") is None


def test_an_in_memory_catalog_keeps_records_for_the_connection(con, tuner):
    con.execute("CALIBRATE net ON (img0, img1)")
    assert con.catalog.tuning("net", "patch=16x16;stride=4x4")["images"] == 2
    assert _connection().catalog.tuning("net", "patch=16x16;stride=4x4") is None


def test_the_fingerprint_is_computed_once_per_registration(con, tuner, monkeypatch):
    calls = []
    real = models.weights_fingerprint
    monkeypatch.setattr(models, "weights_fingerprint", lambda m: calls.append(m) or real(m))
    con.register_model("net", small_cnn())
    con.execute("CALIBRATE net ON (img0)")
    for _ in range(5):
        con.catalog.tuning("net", "patch=16x16;stride=4x4")
    assert len(calls) == 1
    con.register_model("net", small_cnn())
    con.catalog.tuning("net", "patch=16x16;stride=4x4")
    assert len(calls) == 2


def test_two_writers_merge_their_keys(tmp_path):
    directory = str(tmp_path / "cat")
    first, second = Catalog(directory), Catalog(directory)
    net, other = small_cnn(), small_cnn(classes=3)
    for cat in (first, second):
        cat.register_model(models.ModelSpec("net", net))
        cat.register_model(models.ModelSpec("other", other))
    first.save_tuning("net", "k1", {"a": 1})
    second.save_tuning("net", "k2", {"b": 2})     # read the file again: k1 stays
    second.save_tuning("other", "k1", {"c": 3})
    first.save_tuning("net", "k1", {"a": 4})      # replaces its own key only
    reader = Catalog(directory)
    reader.register_model(models.ModelSpec("net", net))
    reader.register_model(models.ModelSpec("other", other))
    assert [reader.tuning("net", "k1"), reader.tuning("net", "k2"), reader.tuning("other", "k1")] == [
        {"a": 4}, {"b": 2}, {"c": 3}]


def test_saving_drops_the_records_of_other_weights(tmp_path):
    directory = str(tmp_path / "cat")
    cat = Catalog(directory)
    cat.register_model(models.ModelSpec("net", small_cnn()))
    cat.save_tuning("net", "k1", {"a": 1})
    torch.manual_seed(5)
    cat.register_model(models.ModelSpec("net", torch.nn.Linear(2, 2)))
    cat.save_tuning("net", "k2", {"b": 2})
    with open(os.path.join(directory, TUNING_FILE)) as fh:
        stored = json.load(fh)
    assert list(stored["models"]["net"]) == ["k2"]


def test_records_are_copies(con):
    record = {"taus": [0.5]}
    con.catalog.save_tuning("net", "k", record)
    record["taus"].append(0.2)
    got = con.catalog.tuning("net", "k")
    got["taus"].append(0.1)
    assert con.catalog.tuning("net", "k") == {"taus": [0.5]}


def test_records_must_be_json(con):
    with pytest.raises(TypeError):
        con.catalog.save_tuning("net", "k", {"tensor": torch.zeros(1)})


def test_an_unreadable_tuning_file_counts_as_empty(tmp_path):
    directory = tmp_path / "cat"
    directory.mkdir()
    (directory / TUNING_FILE).write_text("{ not json")
    cat = Catalog(str(directory))
    cat.register_model(models.ModelSpec("net", small_cnn()))
    assert cat.tuning("net", "k") is None
    cat.save_tuning("net", "k", {"a": 1})
    assert Catalog(str(directory)).tuning("nope", "k") is None    # no record: no model lookup
    assert cat.tuning("net", "k") == {"a": 1}
