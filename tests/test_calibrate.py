"""Calibration: measured once, cached in the catalog, re-measured by CALIBRATE."""

import dataclasses
import json
import os

import pytest
import torch

import kql
from kql.planner import calibrate


def test_calibrate_writes_the_catalog_and_is_reused(tmp_path, monkeypatch):
    directory = str(tmp_path / "cat")
    con = kql.connect(directory)
    message = con.execute("CALIBRATE").message
    assert message.startswith("calibrated cpu: convolutions up to ")
    with open(os.path.join(directory, calibrate.FILE)) as fh:
        stored = json.load(fh)
    (key, table), = stored.items()
    assert key == calibrate.device_key("cpu")
    assert len(table["dense"]) == len(calibrate.DEPTHS)
    assert all(rate > 0 for row in table["dense"] for rate in row)
    assert table["threads"] >= 1 and table["gather_rate"] > 0

    calibrate._cache.clear()                      # a new process: only the file is left

    def no_measuring(device):
        raise AssertionError("the cached calibration should have been used")
    monkeypatch.setattr(calibrate, "measure", no_measuring)
    tp = calibrate.throughput("cpu", directory)
    assert tp.dense == table["dense"]


def test_stale_calibration_file_is_measured_again(tmp_path, monkeypatch):
    directory = tmp_path / "cat"
    directory.mkdir()
    key = calibrate.device_key("cpu")
    (directory / calibrate.FILE).write_text(json.dumps({key: {"device": "cpu", "dense": [[1.0]]}}))
    calibrate._cache.clear()
    calls = []
    real = calibrate.measure
    monkeypatch.setattr(calibrate, "measure", lambda device: calls.append(device) or real(device))
    tp = calibrate.throughput("cpu", str(directory))
    assert calls == ["cpu"] and len(tp.dense) == len(calibrate.DEPTHS)


def _fake_measure(calls):
    real = calibrate.throughput("cpu")                  # measured once in this process
    return lambda device: calls.append(device) or dataclasses.replace(real)


def test_in_memory_catalog_keeps_calibration_in_the_user_cache(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(calibrate, "measure", _fake_measure(calls))
    monkeypatch.setenv("KQL_CACHE_DIR", str(tmp_path / "cache"))
    calibrate._cache.clear()
    first = calibrate.throughput("cpu")                   # no catalog directory
    assert calls == ["cpu"]
    stored = json.loads((tmp_path / "cache" / calibrate.FILE).read_text())
    assert stored[calibrate.device_key("cpu")]["dense"] == first.dense
    calibrate._cache.clear()                              # a new process
    assert calibrate.throughput("cpu").dense == first.dense and calls == ["cpu"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [calibrate.FILE]   # no temp left


def test_user_cache_disabled_or_unwritable(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(calibrate, "measure", _fake_measure(calls))
    monkeypatch.setenv("KQL_CACHE_DIR", "")
    calibrate._cache.clear()
    calibrate.throughput("cpu")
    assert calls == ["cpu"] and not any(tmp_path.iterdir())
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("KQL_CACHE_DIR", str(blocker / "kql"))
    calibrate._cache.clear()
    calibrate.throughput("cpu")                           # measured, not cached, no error
    assert calls == ["cpu", "cpu"] and blocker.read_text() == "not a folder"


def test_calibrate_on_gpu_without_one():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")  # CI machines have none
    with pytest.raises(kql.KqlPlanError, match="line 1, column 1: CALIBRATE ON GPU: no CUDA GPU"):
        kql.connect().execute("CALIBRATE ON GPU")


def test_plans_run_on_torch_s_thread_count_not_a_stored_decision(monkeypatch):
    """A thread count measured once (say on a busy machine) must never hold later queries:
    plans run on torch's current count, what a user's plain loop would use."""
    from helpers import smooth_noise_image
    from models_zoo import sensitive_small_cnn

    con = kql.connect()
    con.register_model("net", sensitive_small_cnn())
    con.register_image("img", smooth_noise_image(24, 30))
    tp = calibrate.throughput("cpu")
    monkeypatch.setattr(tp, "threads", 1)                   # a stored 1-thread table
    for count in (2, 1):
        with calibrate.threads(count):
            line = con.execute("EXPLAIN OCCLUDE img USING net PATCH 8 STRIDE 4").plan.splitlines()[1]
        assert f"threads={count}," in line, line
