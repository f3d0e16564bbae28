"""Quality beyond SSIM (planner/quality.py): Spearman's rank correlation of the cells and
the overlap of the strongest-drop cells, against scipy and by hand, and as EXPLAIN
ANALYZE reports them for an approximate map against the exact one."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from helpers import blob_image, calibrate_batchnorm, image_connection, sensitive
from kql.planner.quality import map_quality, spearman, top_cells, top_overlap
from models_zoo import custom_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_spearman_is_scipys_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 6, (5, 7)).astype(float)        # many ties
        b = a + rng.normal(0, 2, a.shape)
        assert spearman(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel()).statistic, abs=1e-12)


def test_top_overlap_counts_the_strongest_drops():
    exact = np.linspace(0, 1, 100).reshape(10, 10)          # cells 0..9 drop most
    approx = exact.copy()
    approx.flat[[0, 1]] = 1.0                               # two of the ten lose their drop
    assert top_cells(exact).tolist() == list(range(10))
    # 8 shared of the 12 cells in either top ten
    assert top_overlap(exact, approx) == pytest.approx(8 / 12)
    assert top_overlap(exact, exact) == 1.0


def test_explain_analyze_reports_all_three_against_the_exact_map():
    image = blob_image(48, 56, seed=2)
    net = sensitive(calibrate_batchnorm(custom_model("residual_two_rf"), 48, 56), image, (8, 8))
    con = image_connection(image=image, model=net)
    con.execute("SET strategy = 'incremental'")
    query = "OCCLUDE img USING net PATCH 8 STRIDE 2 COLOR black"
    exact = con.execute(query).heatmap
    con.execute("SET tau = 0.4")
    approx = con.execute(query).heatmap
    assert not np.allclose(exact, approx)                    # a real approximation
    plan = con.execute("EXPLAIN ANALYZE " + query).plan
    line = plan.splitlines()[1]
    want = map_quality(exact, approx)
    for key, digits in (("ssim", 3), ("spearman", 3), ("top10_iou", 2)):
        shown = float(line.split(f"achieved_{key}=")[1].split(",")[0])
        assert shown == pytest.approx(want[key], abs=10 ** -digits), (key, line)
    assert "Spearman" in plan and "top-10% IoU" in plan
    assert 0.0 <= want["top10_iou"] <= 1.0 and -1.0 <= want["spearman"] <= 1.0
