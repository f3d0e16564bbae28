"""Calibration: measured once, cached in the catalog, re-measured by CALIBRATE."""

import copy
import dataclasses
import json
import os

import pytest
import torch

import kql
from kql.planner import calibrate, micro_benchmarks


def quiet_table(device="cpu"):
    """A round of micro-benchmarks as a quiet machine of the prior's kind measures it."""
    from kql.planner import prior
    return calibrate.Throughput(device, **copy.deepcopy(prior.CPU))


def test_calibrate_writes_the_catalog_and_is_reused(tmp_path, monkeypatch):
    directory = str(tmp_path / "cat")
    con = kql.connect(directory)
    monkeypatch.setattr(micro_benchmarks, "one_round", quiet_table)
    message = con.execute("CALIBRATE").message
    assert message.startswith("calibrated cpu: convolutions up to ")
    assert message.endswith("; trusted (2 rounds, 2 quiet)"), message
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


def test_the_real_micro_benchmarks_measure_every_entry():
    """What the rounds measure on this machine, whatever its load: every entry a positive
    rate, the rounds and their CPU share said (trust depends on the load: not asserted)."""
    tp = calibrate.measure("cpu")
    assert len(tp.dense) == len(calibrate.DEPTHS) and all(r > 0 for row in tp.dense for r in row)
    assert tp.gather_rate > 0 and tp.bandwidth > 0
    assert calibrate.MIN_ROUNDS <= tp.rounds <= calibrate.MAX_ROUNDS and 0 < tp.share
    assert calibrate._sound(tp) and ("trusted" in tp.verdict())


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
    return lambda device: calls.append(device) or quiet_table()


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


def _table(**fields) -> calibrate.Throughput:
    return calibrate.Throughput("cpu", [[1e9] * 5] * 5, [1e9] * 5, 1e9, 40e9, 1e-5,
                                cout=[1.0] * 6, **fields)


def test_copies_and_element_wise_ops_are_priced_at_the_copy_bandwidth():
    tp = _table()
    assert tp.bytes_seconds(1e8) == pytest.approx(1e8 / 40e9)


def test_a_table_of_an_older_version_is_measured_again(tmp_path, monkeypatch):
    """A version 9 table (with its stream row) is not read as this version's."""
    directory = tmp_path / "cat"
    directory.mkdir()
    stored = dict(dataclasses.asdict(_table()), version=9, stream=[1e9] * 6)
    key = calibrate.device_key("cpu")
    (directory / calibrate.FILE).write_text(json.dumps({key: stored}))
    calibrate._cache.clear()
    calls = []
    monkeypatch.setattr(calibrate, "measure", lambda device: calls.append(device) or _table())
    assert calibrate.throughput("cpu", str(directory)).version == calibrate.VERSION
    assert calls == ["cpu"]


def test_full_nodes_are_priced_as_a_forward_pass_runs_them():
    """ReLU at the copy bandwidth, an identity in eval mode (dropout)
    at one call's overhead, and the shape estimate summing every module's output."""
    from kql.operators import shapes
    from kql.operators.profile import ModelProfile
    from kql.planner.cost import FLOAT, full_node_cost, shape_naive_cost
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Dropout(0.5),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(8, 3)).eval()
    image = torch.rand(3, 40, 40)
    profile = ModelProfile(model, image, "cpu")
    slow = calibrate.Throughput("cpu", [[1e9] * 5] * 5, [1e9] * 5, 1e9, 10e9, 1e-5, cout=[1.0] * 6)
    fast = _table()
    nodes = {n.target: n for n in profile.nodes}
    relu, dropout = nodes["2"], nodes["1"]
    out = 16 * 8 * 40 * 40 * FLOAT
    for tp in (slow, fast):
        assert full_node_cost(profile, dropout, tp, 16) == (0.0, tp.overhead)
        assert full_node_cost(profile, relu, tp, 16)[1] == pytest.approx(
            tp.overhead + tp.bytes_seconds(2 * out))
    summary = shapes.summarize(model, image)
    assert sum(summary.output_bytes) == summary.activation_bytes
    assert len(summary.output_bytes) == len(model)
    assert shape_naive_cost(summary, slow, 16, image.shape).seconds > \
        shape_naive_cost(summary, fast, 16, image.shape).seconds
