"""SET layout: the planner runs CPU batches channels-last by default, says so in EXPLAIN,
and the map does not depend on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import kql
from helpers import sensitive, smooth_noise_image
from kql.operators.layout import CHANNELS_LAST, in_layout
from models_zoo import custom_model

QUERY = "OCCLUDE img USING net PATCH 8 STRIDE 4 COLOR black"


@pytest.fixture
def con():
    image = smooth_noise_image(24, 28)
    c = kql.connect()
    c.plan_cache.lasting = None     # the connection's store only (across processes: test_lasting_layouts)
    c.register_model("net", sensitive(custom_model("max_pools"), image, (8, 8)))
    c.register_image("img", image)
    return c


@pytest.mark.parametrize("strategy,layout", [("naive", "adaptive"), ("incremental", "adaptive")])
def test_the_layout_is_explained_and_leaves_the_map_alone(con, strategy, layout):
    con.execute(f"SET strategy = '{strategy}'")
    fast = con.execute(QUERY + " BATCH 2")          # 15 batches: the naive one tries both layouts
    assert f"layout={layout}" in fast.plan.splitlines()[1], fast.plan
    con.execute("SET layout = 'contiguous'")
    plain = con.execute(QUERY + " BATCH 2")
    assert "layout=" not in plain.plan.splitlines()[1], plain.plan
    assert np.ptp(plain.heatmap) > 0.02                      # the map moves
    np.testing.assert_allclose(fast.heatmap, plain.heatmap, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", ["channels_last", "auto"])
def test_full_tensors_past_the_crossover_in_either_layout_give_the_same_map(con, layout):
    con.execute("SET strategy = 'incremental'")
    con.execute("SET crossover = 0.5")                      # full tensors from a projection
    con.execute("SET layout = 'contiguous'")
    plain = con.execute(QUERY + " BATCH 2")
    con.execute(f"SET layout = '{layout}'")
    fast = con.execute("EXPLAIN ANALYZE " + QUERY + " BATCH 2")
    assert "Project:" in fast.plan and "crossover=0.50" in fast.plan, fast.plan
    assert f"layout={'adaptive' if layout == 'auto' else layout}" in fast.plan
    assert np.ptp(plain.heatmap) > 0.02
    np.testing.assert_allclose(con.execute(QUERY + " BATCH 2").heatmap, plain.heatmap,
                               atol=1e-6, rtol=0)


def test_a_projection_is_pasted_alike_in_either_layout():
    from kql.operators import gather as g

    torch.manual_seed(0)
    base, patches = torch.rand(1, 5, 7, 9), torch.rand(3, 5, 2, 3)
    ys, xs = np.array([0, 2, 5]), np.array([1, 4, 6])
    plain = g.project(base, patches, (ys, xs))
    fast = g.project(base, patches.contiguous(memory_format=torch.channels_last), (ys, xs), True)
    assert fast.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(plain, fast)
    assert torch.equal(plain[1, :, 2:4, 4:7], patches[1])         # the patch is where it goes
    assert torch.equal(plain[0, :, 3:], base[0, :, 3:])           # the rest is the base


def test_a_bad_layout_is_one_line(con):
    with pytest.raises(kql.KqlPlanError, match="layout must be 'auto', 'channels_last' or 'contiguous'"):
        con.execute("SET layout = 'nhwc'")


def test_only_batches_of_maps_change_layout():
    maps = in_layout(torch.rand(2, 3, 5, 6), CHANNELS_LAST)
    assert maps.is_contiguous(memory_format=torch.channels_last)
    assert maps.stride() == (90, 1, 18, 3)
    vector = torch.rand(2, 3)
    assert in_layout(vector, CHANNELS_LAST) is vector


def test_the_trial_keeps_the_layout_its_timed_batches_favour():
    from kql.operators.layout import CONTIGUOUS, LayoutTrial

    trial = LayoutTrial(batches=20)
    tried = []
    for _ in range(2):                                    # one whole batch in each layout
        layout, unit = trial.next()
        tried.append(layout)
        trial.record(unit, 1.0 if layout == CONTIGUOUS else 3.0, 16)
    assert tried == [CHANNELS_LAST, CONTIGUOUS]
    assert [trial.next() for _ in range(3)] == [(CONTIGUOUS, None)] * 3
    faster = LayoutTrial(batches=20)
    for _ in range(2):
        layout, unit = faster.next()
        faster.record(unit, 1.0 if layout == CHANNELS_LAST else 3.0, 16)
    assert faster.next() == (CHANNELS_LAST, None)


def test_a_short_scan_or_a_retried_trial_batch_runs_contiguous():
    from kql.operators.layout import CONTIGUOUS, LayoutTrial

    # two batches: none would be left to gain from a trial, so none is run
    assert LayoutTrial(batches=2).next() == (CONTIGUOUS, None)
    trial = LayoutTrial(batches=20)
    assert trial.next() == (CHANNELS_LAST, 0)             # ran out of memory: never recorded
    assert trial.next() == (CONTIGUOUS, None) and trial.chosen == CONTIGUOUS


def test_the_trial_compares_time_per_item():
    from kql.operators.layout import LayoutTrial

    trial = LayoutTrial(batches=20)
    trial.record(trial.next()[1], 2.0, 16)                # channels-last: 0.125 s an item
    trial.record(trial.next()[1], 1.5, 8)                 # contiguous (a halved batch): 0.19 s
    assert trial.chosen == CHANNELS_LAST


def test_the_adaptive_naive_map_equals_the_contiguous_one():
    torch.manual_seed(0)
    from kql.operators.layout import ADAPTIVE, CONTIGUOUS
    from kql.operators.naive import NaiveOcclusion
    from kql.operators.task import OcclusionTask
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()
    image = torch.rand(3, 20, 20)
    ys, xs = [y for y in range(0, 14, 2) for _ in range(7)], [x for _ in range(7) for x in range(0, 14, 2)]
    task = OcclusionTask(net, image, torch.zeros(3), (6, 6), np.array(ys), np.array(xs), 0)
    maps = [NaiveOcclusion(10, layout=layout).run(task).probabilities for layout in (ADAPTIVE, CONTIGUOUS)]
    np.testing.assert_allclose(maps[0], maps[1], atol=1e-6)


@pytest.mark.parametrize("strategy", ["naive", "incremental"])
def test_a_trial_is_kept_for_the_next_scan_of_the_same_shape(con, monkeypatch, strategy):
    from kql.operators import layout

    units = []
    record = layout.LayoutTrial.record
    monkeypatch.setattr(layout.LayoutTrial, "record",
                        lambda self, unit, *a: units.append(unit) or record(self, unit, *a))
    con.execute(f"SET strategy = '{strategy}'")
    if strategy == "incremental":
        con.execute("SET crossover = 0.5")                  # a full part to try layouts on
    first = con.execute(QUERY + " BATCH 2")
    assert [u for u in units if u is not None] == [0, 1]   # one trial: two batches
    kept = dict(con.plan_cache.layouts)
    assert list(kept.values())[0] in ("channels_last", "contiguous") and len(kept) == 1
    again = con.execute(QUERY + " BATCH 2 TARGET 1")        # another target: same shape
    third = con.execute(QUERY + " BATCH 2 TARGET 1")
    assert [u for u in units if u is not None] == [0, 1]   # no trial since
    line = again.plan.splitlines()[1]
    assert "layout" in line.split("cache=")[1].split(",")[0]
    found = list(kept.values())[0]
    if strategy == "incremental" or found != "contiguous":  # naive names no default layout
        assert f"layout={found}" in line, line
    else:
        assert "layout=" not in line, line
    np.testing.assert_array_equal(again.heatmap, third.heatmap)     # one layout: the same bits
    assert np.ptp(first.heatmap) > 0.02
    con.register_model("net", con.catalog.resolve_model("net").module)   # re-registered: forgotten
    assert con.plan_cache.layouts == {}
    con.execute(QUERY + " BATCH 2")
    assert [u for u in units if u is not None] == [0, 1, 0, 1]
