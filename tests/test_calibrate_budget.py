"""CALIBRATE that pays for itself (planner/tuning.py ``tune``): per image the exact map
once, the thresholded maps from the largest tau down until one falls below the floor or
they have used the budget, progress counted in positions over every map planned, and
what a tuning on this many images can promise said before it starts.

The maps come from a stand-in for ``maps_at`` with SSIMs and seconds chosen by the test,
so what is asserted is the tuner's bookkeeping; tests/test_approximate.py tunes real
models end to end.
"""

from __future__ import annotations

import numpy as np
import pytest

import kql
from helpers import smooth_noise_image
from kql import executor
from kql.planner import approximate, tuning
from models_zoo import sensitive_small_cnn


@pytest.fixture
def queries():
    con = kql.connect()
    con.register_model("net", sensitive_small_cnn())
    for i in range(3):
        con.register_image(f"i{i}", smooth_noise_image(24, 30, seed=i))
    text = "CALIBRATE net ON (i0, i1, i2) PATCH 4 STRIDE 1"
    [stmt] = kql.parse(text)
    return executor.bind_calibration(con, stmt, text)


def exact_map(shape) -> np.ndarray:
    rows, cols = shape
    y, x = np.mgrid[0:rows, 0:cols]
    return (0.5 + 0.4 * np.sin(y / 3.0) * np.cos(x / 4.0)).astype(np.float32)


def stand_in(monkeypatch, noise: dict, seconds: dict, log: list):
    """``maps_at`` whose map at tau is the exact one plus ``noise[tau]`` of random noise,
    taking ``seconds[tau]``; ``log`` gets each tau computed and whether the generator was
    closed."""
    def maps_at(query, device, taus, progress=None, reduced=()):
        exact = exact_map(query.grid.shape)
        rng = np.random.default_rng(0)
        try:
            for tau in (1.0,) + tuple(reduced) + tuple(taus):
                log.append(tau)
                if progress is not None:
                    progress(query.grid.count // 2, query.grid.count)
                found = exact + noise.get(tau, 0.0) * rng.standard_normal(exact.shape).astype(np.float32)
                yield tau, found, seconds.get(tau, 1.0)
        finally:
            log.append("closed")
    monkeypatch.setattr(approximate, "maps_at", maps_at)


def test_thresholded_maps_stop_below_the_floor(queries, monkeypatch):
    log = []
    stand_in(monkeypatch, {0.9: 0.001, 0.8: 0.01, 0.7: 0.5}, {}, log)
    record = tuning.tune(queries, budget=100, reduced=())
    # Per image: the exact map, tau 0.9, 0.8 and 0.7 (below the floor), then stop.
    assert log == [1.0, 0.9, 0.8, 0.7, "closed"] * 3
    assert record.ssims[0][0] > 0.95 and record.ssims[2][0] < tuning.FLOOR
    assert all(v == tuning.NOT_MEASURED for row in record.ssims[3:] for v in row)
    assert record.choose(0.9).tau == 0.8                      # a measured tau is chosen
    assert record.predicted(0.5) is None                      # an unmeasured one never
    assert "tau 0.6, 0.5, 0.4, 0.3, 0.2: not measured on every image" in record.summary()
    # drill-down's tables hold every tau too, the unmeasured ones never chosen
    for _, _, table in record.drills:
        assert len(table) == 1 + len(tuning.TAUS) and table[4][0] == tuning.NOT_MEASURED


def test_thresholded_maps_stop_at_the_budget(queries, monkeypatch):
    log = []
    stand_in(monkeypatch, {}, {1.0: 1.0, 0.9: 1.5, 0.8: 1.5, 0.7: 1.5}, log)
    record = tuning.tune(queries, budget=3.0, reduced=())
    # 2 exact maps' worth for thresholded ones: tau 0.9 (1.5 s) and 0.8 (3 s in all).
    assert log == [1.0, 0.9, 0.8, "closed"] * 3
    assert record.ssims[1][0] == pytest.approx(1.0) and record.ssims[2][0] == tuning.NOT_MEASURED


def test_progress_counts_positions_over_every_map_planned(queries, monkeypatch):
    stand_in(monkeypatch, {0.9: 0.5}, {}, [])
    seen = []
    tuning.tune(queries, progress=lambda done, total: seen.append((done, total)), reduced=())
    count = queries[0].grid.count
    total = 3 * (1 + len(tuning.TAUS)) * count
    assert {t for _, t in seen} == {total}
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[-1] == total        # never back, and to the end
    assert any(0 < d < count for d in done)                  # within a map, not per image


def test_the_exact_map_in_bfloat16_is_tuned_first_and_becomes_a_candidate(queries, monkeypatch):
    log = []
    stand_in(monkeypatch, {"bfloat16": 0.02, 0.9: 0.5}, {1.0: 1.0, "bfloat16": 0.6}, log)
    record = tuning.tune(queries, reduced=("bfloat16",))
    assert log[:3] == [1.0, "bfloat16", 0.9]                   # before the thresholded maps
    [(name, values)] = record.precisions
    assert name == "bfloat16" and len(values) == 3 and 0.9 < min(values) < 0.999
    found = [c for c in record.candidates(0.9) if c.precision == "bfloat16"]
    assert found and found[0].tau == 1.0 and found[0].predicted_ssim >= 0.9
    assert not [c for c in record.candidates(0.999) if c.precision]     # not past its bound
    again = tuning.TuningRecord.from_dict(record.to_dict())             # kept in the catalog
    assert again.precisions == record.precisions
    assert "bfloat16: SSIM >= " in record.summary()


def test_what_a_tuning_can_promise_is_said_first(monkeypatch):
    said = []
    monkeypatch.setattr(approximate, "maps_at", lambda *a, **k: iter(()))
    monkeypatch.setattr(tuning, "tune", lambda *a, **k: said.append("tuned") or
                        tuning.TuningRecord((0.9,), ((0.9,),), 1))
    con = kql.connect()
    con.register_model("net", sensitive_small_cnn())
    con.register_image("img", smooth_noise_image(24, 30))
    con.on_warning = said.append
    result = con.execute("CALIBRATE net ON (img) PATCH 4 STRIDE 2")
    assert said[0].startswith("tuning on 1 image: the bound is its SSIM less 0.05")
    assert said[1] == "tuned"
    assert "fewer than 5, the bound is loose" in result.message
    three = tuning.what_it_can_promise(3)
    assert f"mean - {tuning.tolerance_factor(3):.2f} sd" in three       # 4.26
    assert "with 5 images 2.74" in three and "add images" in three
    assert "add images" not in tuning.what_it_can_promise(8)
