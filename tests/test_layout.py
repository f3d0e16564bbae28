"""SET layout: the planner runs CPU batches channels-last by default, says so in EXPLAIN,
and the map does not depend on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


def test_the_trial_keeps_the_layout_its_timed_batches_favour():
    from kql.operators.layout import CONTIGUOUS, LayoutTrial

    trial = LayoutTrial(batches=20)
    for i in range(4):
        trial.record(i, 1.0 if trial.layout(i) == CONTIGUOUS else 3.0)
    assert [trial.layout(i) for i in range(4, 7)] == [CONTIGUOUS] * 3
    assert LayoutTrial(batches=3).layout(0) == CHANNELS_LAST       # too short to measure
