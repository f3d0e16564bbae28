"""Many images per query: a glob or an image table in, one ranked, resumable table out.

Every row's map is checked against the single-image query of its file (the
differential test of planning once and rebinding the plan per image).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import kql
from helpers import smooth_noise_image
from kql.errors import KqlPlanError
from models_zoo import sensitive_small_cnn

TESTS = os.path.dirname(os.path.abspath(__file__))
QUERY = "PATCH 6 STRIDE 4"


def model():
    torch.manual_seed(0)                 # the same weights in every process (resume test)
    return sensitive_small_cnn()


@pytest.fixture(scope="module")
def net():
    return model()


def write_images(folder, count=4, bad=True):
    folder.mkdir(exist_ok=True)
    for i in range(count):
        pixels = (smooth_noise_image(24, 30, seed=i).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    if bad:
        (folder / "img9.png").write_text("not a png")
    return folder


@pytest.fixture
def folder(tmp_path):
    return write_images(tmp_path / "scans")


def connect(net, directory=None):
    con = kql.connect(directory)
    con.register_model("net", net)
    return con


@pytest.mark.parametrize("strategy", ["incremental", "naive"])
def test_every_row_is_the_single_image_map(net, folder, strategy):
    con = connect(net)
    con.execute(f"SET strategy = '{strategy}'")
    table = con.execute(f"OCCLUDE '{folder}/*.png' USING net {QUERY}")
    assert [os.path.basename(r["path"]) for r in table] == [f"img{i}.png" for i in (0, 1, 2, 3, 9)]
    for row in table.rows[:4]:
        single = con.execute(f"OCCLUDE '{row['path']}' USING net {QUERY}")
        np.testing.assert_allclose(np.array(row["heatmap"]), single.heatmap, atol=1e-6)
        assert row["probability"] == pytest.approx(single.probability, abs=1e-6)
        assert np.ptp(single.heatmap) > 1e-4
        drop = single.drop
        assert row["drop"] == pytest.approx(float(drop.max()), abs=1e-6)
        i, j = np.unravel_index(int(np.argmax(drop)), drop.shape)
        assert (row["drop_x"], row["drop_y"], row["drop_w"], row["drop_h"]) == pytest.approx(single.box(i, j))
    # planned once: the later images reuse the first image's plan
    assert all("cache=plan" in r["plan"] for r in table.rows[1:4])
    assert strategy[:5] in table.rows[1]["plan"].lower()


def test_a_bad_image_is_a_row_with_its_error(net, folder):
    table = connect(net).execute(f"OCCLUDE '{folder}/*.png' USING net {QUERY}")
    bad = table.rows[-1]
    assert bad["error"].startswith("cannot read image file") and bad["heatmap"] is None
    assert all(r["error"] is None for r in table.rows[:-1])
    assert "1 failed" in table.render()


def test_image_tables_persist_and_rank(net, folder, tmp_path):
    catalog = str(tmp_path / "catalog")
    con = connect(net, catalog)
    assert "(4 files)" in con.execute(f"LOAD IMAGES scans FROM '{folder}/img[0-3].png'").message
    again = connect(net, catalog)                     # another session, same catalog
    rows = {r["name"]: r for r in again.execute("SHOW IMAGES").rows}
    assert rows["scans"]["source"].startswith("table of 4 files")
    table = again.execute(f"OCCLUDE scans USING net {QUERY} ORDER BY drop DESC LIMIT 3")
    drops = [r["drop"] for r in table]
    assert len(drops) == 3 and drops == sorted(drops, reverse=True)
    every = again.execute(f"OCCLUDE scans USING net {QUERY}")
    assert drops == sorted((r["drop"] for r in every), reverse=True)[:3]
    cut = sorted(r["probability"] for r in every)[1]
    kept = again.execute(f"OCCLUDE scans USING net {QUERY} WHERE probability >= {cut} "
                         f"ORDER BY probability")
    assert [r["probability"] for r in kept] == sorted(r["probability"] for r in every)[1:]


@pytest.mark.parametrize("clause, message", [
    ("ORDER BY colour", "unknown column 'colour'; use one of probability, drop"),
    ("LIMIT 0", "LIMIT must be at least 1, got 0"),
    ("INTO 'out.png'", "a many-image query writes a table: INTO '<file>.parquet'"),
])
def test_bad_ranking(net, folder, clause, message):
    with pytest.raises(KqlPlanError, match=message.replace("(", r"\(")):
        connect(net).execute(f"OCCLUDE '{folder}/*.png' USING net {QUERY} {clause}")


@pytest.mark.parametrize("clause", ["ORDER BY drop", "LIMIT 3", "WHERE drop > 0.1", "ON RAY"])
def test_ranking_needs_many_images(net, folder, clause):
    with pytest.raises(KqlPlanError, match="needs many images"):
        connect(net).execute(f"OCCLUDE '{folder}/img0.png' USING net {QUERY} {clause}")


def test_no_file_matches(net, tmp_path):
    with pytest.raises(KqlPlanError, match=r"line 1, column 9: no files match"):
        connect(net).execute(f"OCCLUDE '{tmp_path}/*.png' USING net")


def test_explain_shows_the_image_scan(net, folder):
    plan = connect(net).execute(f"EXPLAIN OCCLUDE '{folder}/*.png' USING net {QUERY} "
                                f"ORDER BY drop DESC LIMIT 2").plan.splitlines()
    assert plan[0].startswith("ImageScan: images=5, engine=local, order=drop desc, limit=2")
    assert plan[1].strip().startswith("HeatMap:")


def test_the_table_is_read_by_pandas_without_kql(net, folder, tmp_path):
    import pandas as pd

    out = tmp_path / "results.parquet"
    table = connect(net).execute(f"OCCLUDE '{folder}/*.png' USING net {QUERY} INTO '{out}'")
    frame = pd.read_parquet(out)
    assert list(frame.columns) == ["path", "height", "width", "target", "label", "probability",
                                   "rows", "cols", "heatmap", "drop", "drop_x", "drop_y",
                                   "drop_w", "drop_h", "ssim", "plan", "seconds", "error",
                                   "depth", "slices", "drop_z", "drop_d", "volume_heatmap"]
    assert frame["depth"].isna().all() and frame["volume_heatmap"].isna().all()   # images
    assert (frame["ssim"][frame["error"].isna()] == 1.0).all()       # exact maps
    assert len(frame) == 5 and frame["error"].notna().sum() == 1
    first = np.array([list(r) for r in frame["heatmap"][0]])
    np.testing.assert_allclose(first, np.array(table.rows[0]["heatmap"]))
    assert not os.path.exists(str(out) + ".partial")           # the journal is gone


def test_ctrl_c_keeps_finished_rows_and_the_rerun_skips_them(net, folder, tmp_path):
    out = tmp_path / "results.parquet"
    con = connect(net)
    query = f"OCCLUDE '{folder}/*.png' USING net {QUERY} INTO '{out}'"

    def interrupt(done, total):          # positions: 35 a map
        if done >= 2 * 35:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        con.execute(query, progress=interrupt)
    assert not out.exists()
    parts = [p for p in os.listdir(str(out) + ".partial") if p.startswith("row-")]
    assert len(parts) == 2
    table = con.execute(query)
    assert table.skipped == 2 and len(table) == 5
    fresh = connect(net).execute(f"OCCLUDE '{folder}/*.png' USING net {QUERY}")
    for a, b in zip(table.rows, fresh.rows):
        assert a["path"] == b["path"] and (a["heatmap"] is None) == (b["heatmap"] is None)
        if a["heatmap"] is not None:
            np.testing.assert_allclose(np.array(a["heatmap"]), np.array(b["heatmap"]), atol=1e-5)


def test_another_query_does_not_resume_a_journal(net, folder, tmp_path):
    out = tmp_path / "results.parquet"
    con = connect(net)

    def interrupt(done, total):          # positions: 35 a map
        if done >= 2 * 35:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        con.execute(f"OCCLUDE '{folder}/*.png' USING net {QUERY} INTO '{out}'", progress=interrupt)
    table = con.execute(f"OCCLUDE '{folder}/*.png' USING net PATCH 8 STRIDE 4 INTO '{out}'")
    assert table.skipped == 0 and len(table.rows[0]["heatmap"][0]) == (30 - 8) // 4 + 1


KILLED = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import kql
    from test_many_images import model
    con = kql.connect()
    con.register_model("net", model())

    def kill(done, total):               # positions: 35 a map
        if done >= 3 * 35:
            os.kill(os.getpid(), signal.SIGKILL)

    con.execute({query!r}, progress=kill)
""")


def test_kill_9_mid_way_then_resume(folder, tmp_path):
    out = tmp_path / "results.parquet"
    query = f"OCCLUDE '{folder}/*.png' USING net {QUERY} INTO '{out}'"
    env = {**os.environ, "PYTHONPATH": TESTS}
    run = subprocess.run([sys.executable, "-c", KILLED.format(tests=TESTS, query=query)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == -9, run.stderr[-2000:]
    assert not out.exists()
    con = connect(model())
    table = con.execute(query)
    assert table.skipped == 3 and len(table) == 5 and out.exists()
    fresh = connect(model()).execute(f"OCCLUDE '{folder}/*.png' USING net {QUERY}")
    for a, b in zip(table.rows, fresh.rows):      # another process: plans may differ by rounding
        assert a["path"] == b["path"] and (a["heatmap"] is None) == (b["heatmap"] is None)
        if a["heatmap"] is not None:
            np.testing.assert_allclose(np.array(a["heatmap"]), np.array(b["heatmap"]), atol=1e-5)


USER_MODULE = """
import os
import torch
from torch import nn

DRIVER = {driver}


class UserNet(nn.Module):
    \"\"\"A small CNN of the user's own, in a file no installed package provides.\"\"\"

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def _rebuilt(state):
    if os.getpid() != DRIVER:
        raise RuntimeError("this model cannot be rebuilt\\nin a worker")
    net = UserNet()
    net.load_state_dict(state)
    return net


class DriverOnlyNet(UserNet):
    \"\"\"Unpickles in the driver only: its workers fail as they start.\"\"\"

    def __reduce__(self):
        return _rebuilt, (self.state_dict(),)
"""


@pytest.fixture(scope="module")
def ray_started():
    """Ray as KQL starts it (``ON RAY`` with no cluster running); shut down after."""
    import ray                                  # the ray extra: `make test` installs it
    yield ray
    ray.shutdown()


def user_module(tmp_path):
    """A module file of the user's own in ``tmp_path``, imported from that path."""
    import importlib.util

    path = tmp_path / "user_net.py"
    path.write_text(USER_MODULE.format(driver=os.getpid()))
    name = f"user_net_{os.getpid()}_{id(path)}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module                  # as the importlib recipe does
    spec.loader.exec_module(module)
    return module


def test_ray_gives_the_local_rows(net, folder, ray_started, capfd):
    con = connect(net)
    local = con.execute(f"OCCLUDE '{folder}/*.png' USING net {QUERY}")
    on_ray = con.execute(f"OCCLUDE '{folder}/*.png' USING net {QUERY} ON RAY ORDER BY path")
    assert [r["path"] for r in on_ray] == [r["path"] for r in local]
    for a, b in zip(local.rows, on_ray.rows):
        assert a["error"] == b["error"]
        if a["heatmap"] is not None:
            np.testing.assert_allclose(np.array(a["heatmap"]), np.array(b["heatmap"]), atol=1e-6)
    noise = capfd.readouterr()
    assert noise.out == "" and noise.err == "", noise        # Ray's logs stay out of the terminal


def test_ray_gives_a_volume_glob_the_local_rows(tmp_path, ray_started):
    import nibabel
    from test_volume_queries import small_net
    from volume_models import blob_volume

    for i in range(2):
        nibabel.save(nibabel.Nifti1Image(blob_volume(12, 14, 16, seed=i)[0].numpy(), np.eye(4)),
                     str(tmp_path / f"scan{i}.nii.gz"))
    con = kql.connect()
    con.register_model("net", small_net())
    query = f"OCCLUDE '{tmp_path}/*.nii.gz' USING net PATCH 4 STRIDE 4"
    local, on_ray = con.execute(query), con.execute(query + " ON RAY ORDER BY path")
    assert [r["path"] for r in on_ray] == [r["path"] for r in local]
    for a, b in zip(local.rows, on_ray.rows):
        assert a["error"] is None and b["error"] is None and b["depth"] == 12
        np.testing.assert_allclose(np.array(a["volume_heatmap"]), np.array(b["volume_heatmap"]), atol=1e-6)


def test_ray_runs_a_model_from_the_users_own_module_file(folder, tmp_path, ray_started, capfd):
    module = user_module(tmp_path)
    torch.manual_seed(0)
    con = kql.connect()
    con.register_model("mine", module.UserNet())
    local = con.execute(f"OCCLUDE '{folder}/*.png' USING mine {QUERY}")
    on_ray = con.execute(f"OCCLUDE '{folder}/*.png' USING mine {QUERY} ON RAY ORDER BY path")
    assert [r["path"] for r in on_ray] == [r["path"] for r in local]
    assert sum(r["heatmap"] is not None for r in on_ray) == 4
    for a, b in zip(local.rows, on_ray.rows):
        assert a["error"] == b["error"]
        if a["heatmap"] is not None:
            np.testing.assert_allclose(np.array(a["heatmap"]), np.array(b["heatmap"]), atol=1e-6)
    torch.manual_seed(0)
    con.register_model("fails", module.DriverOnlyNet())
    capfd.readouterr()
    with pytest.raises(kql.KqlError) as failed:
        con.execute(f"OCCLUDE '{folder}/*.png' USING fails {QUERY} ON RAY")
    message = str(failed.value)
    assert "Ray" in message and "cannot be rebuilt" in message and "\n" not in message
    assert capfd.readouterr().err == ""


def test_on_ray_without_ray_says_how_to_install(net, folder, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(kql.KqlError, match=r"ON RAY needs the ray extra: pip install 'kql\[ray\]'"):
        connect(net).execute(f"OCCLUDE '{folder}/*.png' USING net {QUERY} ON RAY")
