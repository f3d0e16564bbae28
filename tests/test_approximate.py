"""WITH SSIM: the planner picks tau from a tuning, explains it, and keeps its promise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kql
from helpers import blob_image, calibrate_batchnorm, sensitive
from kql.planner.tuning import TuningRecord, heatmap_ssim, tolerance_factor
from models_zoo import custom_model

H, W = 64, 80
QUERY = "OCCLUDE {img} USING net PATCH 12 STRIDE 4 COLOR black"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def con():
    c = kql.connect()
    images = [blob_image(H, W, seed=s) for s in range(8)]
    model = sensitive(calibrate_batchnorm(custom_model("residual_two_rf"), H, W), images[0], (12, 12))
    c.register_model("net", model)
    for i, image in enumerate(images):
        c.register_image(f"i{i}", image)
    c.execute("SET strategy = 'incremental'")
    return c


def operator_line(result) -> str:
    return result.plan.splitlines()[1]


def test_no_tuning_checks_the_map_on_the_image_itself_and_says_so():
    c = kql.connect()
    model = sensitive(calibrate_batchnorm(custom_model("residual_two_rf"), H, W), blob_image(H, W), (12, 12))
    c.register_model("net", model)
    c.register_image("img", blob_image(H, W, seed=3))
    dense = QUERY.format(img="img").replace("STRIDE 4", "STRIDE 2")          # a 27x35 map
    exact = c.execute(dense)
    asked = c.execute(dense + " WITH SSIM >= 0.9")
    # nothing tuned: a verified drill-down measures the map it makes (or it is exact)
    assert asked.check is not None and asked.tau == 1.0
    assert asked.tuning.startswith("checked on 8 windows of this map")
    assert asked.predicted_ssim >= 0.9 and heatmap_ssim(exact.heatmap, asked.heatmap) >= 0.9
    line = operator_line(c.execute("EXPLAIN " + dense + " WITH SSIM >= 0.9"))
    assert line.lstrip().startswith("VerifiedDrillDown:") and "ssim_target=0.90" in line
    assert 'tuning="checked on' in line
    # a 14x18 map: the check's windows would cover most of it, so the map is exact, and says so
    small = c.execute(QUERY.format(img="img") + " WITH SSIM >= 0.9")
    assert small.check is None and small.tau == 1.0 and small.predicted_ssim == 1.0
    assert small.tuning.startswith("default")
    np.testing.assert_allclose(small.heatmap, c.execute(QUERY.format(img="img")).heatmap,
                               atol=1e-6, rtol=0)


def test_tuned_threshold_is_chosen_explained_and_holds_on_other_images(con):
    message = con.execute("CALIBRATE net ON (i0, i1, i2, i3, i4) PATCH 12 STRIDE 4 COLOR black").message
    assert "tuned on 5 images" in message
    result = con.execute(QUERY.format(img="i6") + " WITH SSIM >= 0.9")
    line = operator_line(result)
    # the tuning found something cheaper than the exact map: a tau, drill-down, or both
    assert result.tau < 1.0 or line.lstrip().startswith("DrillDownOcclusion"), result.plan
    assert result.predicted_ssim >= 0.9 and result.tuning == "tuned on 5 images"
    assert f"tau={result.tau:.2f}" in line and "predicted_ssim=" in line and "predicted_speedup=" in line
    speedup = float(line.split("predicted_speedup=")[1].split(",")[0])
    assert speedup > 1.0
    for held_out in ("i5", "i6", "i7"):                   # images the tuning never saw
        exact = con.execute(QUERY.format(img=held_out))
        approx = con.execute(QUERY.format(img=held_out) + " WITH SSIM >= 0.9")
        assert heatmap_ssim(exact.heatmap, approx.heatmap) >= 0.9, held_out
    analyze = operator_line(con.execute("EXPLAIN ANALYZE " + QUERY.format(img="i7") + " WITH SSIM >= 0.9"))
    achieved = float(analyze.split("achieved_ssim=")[1].split(",")[0])
    assert achieved >= 0.9
    # a stricter target never picks a smaller (cheaper, coarser) tau
    strict = con.execute(QUERY.format(img="i6") + " WITH SSIM >= 0.99")
    assert strict.tau >= result.tau


def test_user_tau_wins_over_the_tuning(con):
    con.execute("SET tau = 0.5")
    try:
        result = con.execute(QUERY.format(img="i6") + " WITH SSIM >= 0.9")
    finally:
        con.execute("SET tau = 'auto'")
    assert result.tau == 0.5 and result.tuning == "user"


@pytest.mark.parametrize("text,message", [
    ("SET tau = 0", "tau must be 'auto' or a fraction in (0, 1]"),
    ("SET tau = 1.5", "tau must be 'auto' or a fraction in (0, 1]"),
    ("SET tau = 'fast'", "tau must be 'auto' or a fraction in (0, 1]"),
    ("OCCLUDE i0 USING net WITH SSIM >= 1.2", "SSIM target must lie in (0, 1]"),
])
def test_bad_quality_settings(con, text, message):
    with pytest.raises(kql.KqlError, match=r"line 1, column \d+: " + message.replace("(", r"\(")
                       .replace(")", r"\)").replace("]", r"\]").replace("[", r"\[")):
        con.execute(text)


def test_bound_is_conservative_and_monotone():
    record = TuningRecord((0.9, 0.7, 0.5), ((0.99,) * 6, (0.97, 0.9, 0.95, 0.96, 0.93, 0.97),
                                            (0.9, 0.5, 0.8, 0.85, 0.7, 0.9)), 6)
    values = np.array(record.ssims[1])
    assert record.bound(1) <= values.min()
    assert record.bound(1) <= values.mean() - tolerance_factor(6) * values.std(ddof=1) + 1e-12
    assert record.choose(0.85).tau == 0.7        # 0.5's bound is far below the target
    assert record.choose(0.995).tau == 1.0       # nothing reaches it: the exact map
    assert TuningRecord.from_dict(record.to_dict()) == record


def test_drill_down_candidates_are_tuned_and_priced(con):
    """The tuning measures drill-down too; a query with its own DRILLDOWN is not re-tuned."""
    from kql.planner.tuning import key

    con.execute("CALIBRATE net ON (i0, i1, i2, i3, i4) PATCH 12 STRIDE 4 COLOR black")
    plan = con.execute("EXPLAIN " + QUERY.format(img="i6") + " DRILLDOWN 0.5 SPEEDUP 1.5 WITH SSIM >= 0.9").plan
    assert "fraction=0.50" in plan.splitlines()[1]          # the query's own drill-down kept
    record = TuningRecord.from_dict(con.catalog.tuning("net", key(_bound(con, "i6"))))
    assert [(r, s) for r, s, _ in record.drills] == [(0.25, 3.0), (0.1, 6.0)]
    assert all(len(table) == 1 + len(record.taus) for _, _, table in record.drills)
    assert all(len(row) == 5 for _, _, table in record.drills for row in table)


def _bound(con, image):
    from kql.language.parser import parse_with_text
    from kql.binder import bind

    stmt, text = parse_with_text(QUERY.format(img=image))[0]
    return bind(stmt, text, con.catalog)


@pytest.mark.slow
def test_promise_holds_on_the_real_model_for_photos_it_was_not_tuned_on():
    """EfficientNet-Lite0 with its ImageNet weights: tuned on three skimage photos, the
    chosen plan keeps its SSIM target on two others (coarse grid: 13x13 maps)."""
    c = kql.connect()
    geometry = "PATCH 32 STRIDE 16"
    c.execute(f"CALIBRATE efficientnet_lite0 ON (sample('astronaut'), sample('coffee'), "
              f"sample('rocket')) {geometry}")
    for name in ("chelsea", "retina"):
        query = f"OCCLUDE sample('{name}') USING efficientnet_lite0 {geometry}"
        exact = c.execute(query)
        assert float(exact.heatmap.max() - exact.heatmap.min()) > 0.05      # a real map
        for target in (0.8, 0.9):
            approx = c.execute(query + f" WITH SSIM >= {target}")
            assert "tuned on 3 images" in approx.tuning and approx.predicted_ssim >= target
            assert heatmap_ssim(exact.heatmap, approx.heatmap) >= target, (name, target)
