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
    c.register_model("net", sensitive(custom_model("max_pools"), image, (8, 8)))
    c.register_image("img", image)
    return c


@pytest.mark.parametrize("strategy,layout", [("naive", "adaptive"), ("incremental", "channels_last")])
def test_the_layout_is_explained_and_leaves_the_map_alone(con, strategy, layout):
    con.execute(f"SET strategy = '{strategy}'")
    fast = con.execute(QUERY + " BATCH 2")          # 15 batches: the naive one tries both layouts
    assert f"layout={layout}" in fast.plan.splitlines()[1], fast.plan
    con.execute("SET layout = 'contiguous'")
    plain = con.execute(QUERY + " BATCH 2")
    assert "layout=" not in plain.plan.splitlines()[1], plain.plan
    assert np.ptp(plain.heatmap) > 0.02                      # the map moves
    np.testing.assert_allclose(fast.heatmap, plain.heatmap, atol=1e-6, rtol=0)


def test_a_bad_layout_is_one_line(con):
    with pytest.raises(kql.KqlPlanError, match="layout must be 'auto', 'channels_last' or 'contiguous'"):
        con.execute("SET layout = 'nhwc'")


def test_only_batches_of_maps_change_layout():
    maps = in_layout(torch.rand(2, 3, 5, 6), CHANNELS_LAST)
    assert maps.is_contiguous(memory_format=torch.channels_last)
    assert maps.stride() == (90, 1, 18, 3)
    vector = torch.rand(2, 3)
    assert in_layout(vector, CHANNELS_LAST) is vector


def test_the_trial_keeps_the_layout_its_timed_quarters_favour():
    from kql.operators.layout import CONTIGUOUS, LayoutTrial

    trial = LayoutTrial(batches=20)
    parts = trial.parts(slice(32, 48))
    assert [(p.start, p.stop) for p, _, _ in parts] == [(32, 40), (40, 48)]
    for part, layout, unit in parts:
        trial.record(unit, 1.0 if layout == CONTIGUOUS else 3.0, 8)
    assert [trial.parts(slice(48, 64))[0][1] for _ in range(3)] == [CONTIGUOUS] * 3
    assert LayoutTrial(batches=1).parts(slice(0, 16)) == [(slice(0, 16), CONTIGUOUS, None)]


def test_a_trial_on_batches_too_small_to_split_takes_one_unit_per_batch():
    from kql.operators.layout import CONTIGUOUS, LayoutTrial

    trial = LayoutTrial(batches=20)
    layouts = []
    for b in range(3):
        (part, layout, unit), = trial.parts(slice(b, b + 1))             # BATCH 1
        layouts.append(layout)
        trial.record(unit, 1.0 if layout == CHANNELS_LAST else 2.0, 1)
    assert layouts == [CHANNELS_LAST, CONTIGUOUS, CHANNELS_LAST] and trial.chosen == CHANNELS_LAST


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
