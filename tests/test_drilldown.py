"""Adaptive drill-down: stage two is the exact map on its cells, the rest interpolates
stage one, and the stage-one stride follows eq 47."""

from __future__ import annotations

import numpy as np
import pytest

import kql
from helpers import residual_connection
from kql.operators.drilldown import interpolate, speedup_of, stage_one_stride
from kql.planner.tuning import heatmap_ssim

pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 64, 80
QUERY = "OCCLUDE img USING net PATCH 12 STRIDE 2 COLOR black"


@pytest.fixture(scope="module")
def con():
    return residual_connection(H, W)


@pytest.mark.parametrize("strategy", ["naive", "incremental"])
def test_stage_two_is_exact_on_its_cells_and_the_rest_interpolates(con, strategy):
    con.execute(f"SET strategy = '{strategy}'")
    exact = con.execute(QUERY)
    drilled = con.execute(QUERY + " DRILLDOWN 0.25 SPEEDUP 3")
    assert drilled.heatmap.shape == exact.heatmap.shape
    same = np.abs(drilled.heatmap - exact.heatmap) <= 1e-5
    n = exact.heatmap.size
    assert same.sum() >= int(np.ceil(0.25 * n))             # every stage-two cell is exact
    assert same[::4, ::4].all()                              # and so is every stage-one cell
    assert same.sum() < n                                      # and the rest is interpolated
    # the exact cells are where the map drops most: their mean is below the others'
    assert exact.heatmap[same].mean() < exact.heatmap[~same].mean()
    assert heatmap_ssim(exact.heatmap, drilled.heatmap) > 0.8
    assert "approximate: drill-down fraction 0.25" in drilled.render()
    assert "approximate" not in exact.render()
    con.execute("SET strategy = 'auto'")


def test_explain_shows_both_stages_and_analyze_the_achieved_ssim(con):
    lines = con.execute("EXPLAIN ANALYZE " + QUERY + " DRILLDOWN 0.25 SPEEDUP 3").plan.splitlines()
    assert lines[1].lstrip().startswith("DrillDownOcclusion:") and "fraction=0.25" in lines[1]
    assert "stage-one stride 8x8" in lines[1] and "achieved_ssim=" in lines[1]
    assert lines[2].lstrip().startswith("StageOne ") and lines[3].lstrip().startswith("StageTwo ")


def test_stage_one_stride_and_speedup_follow_eqs_46_47():
    s1 = stage_one_stride(2, 0.25, 3.0)
    assert s1 == 8                   # sqrt(3 / 0.25) * 2 = 6.93, up to a multiple of 2 (3.46 -> 4)
    assert 3.0 <= speedup_of((s1, s1), (2, 2), 0.25) < 3.3     # at least the SPEEDUP asked for
    assert speedup_of((6, 6), (2, 2), 0.25) < 3.0               # the multiple below falls short
    assert stage_one_stride(4, 0.25, 3.0) == 16 and stage_one_stride(3, 0.1, 6.0) == 12
    assert stage_one_stride(4, 0.001, 1.001) == 8        # at least twice the stage-two stride


def test_interpolation_is_bilinear_and_clamped():
    coarse = np.array([[0.0, 2.0], [4.0, 6.0]])
    got = interpolate(coarse, np.array([0, 8]), np.array([0, 8]), np.array([0, 4, 8, 12]),
                      np.array([0, 4, 8, 12]))
    assert got.tolist() == [0.0, 3.0, 6.0, 6.0]


def test_a_speedup_that_leaves_no_stage_one_position_is_refused(con):
    with pytest.raises(kql.KqlPlanError, match=r"line 1, column \d+: DRILLDOWN: the stage-one stride"):
        con.execute("OCCLUDE img USING net PATCH 40 STRIDE 3 REGION (2, 2, 50, 50) DRILLDOWN 0.1 SPEEDUP 9.9")


def test_one_stage_one_cell_is_a_constant_first_guess(con):
    drilled = con.execute("OCCLUDE img USING net PATCH 40 STRIDE 20 DRILLDOWN 0.5 SPEEDUP 1.9")
    exact = con.execute("OCCLUDE img USING net PATCH 40 STRIDE 20")
    assert (np.abs(drilled.heatmap - exact.heatmap) <= 1e-5).sum() >= exact.heatmap.size // 2
