"""Reduced precision (operators/precision.py, planner/precision.py): ``SET precision``
runs the scans in bfloat16, float16 or int8 as an approximation the planner prices,
EXPLAIN shows and EXPLAIN ANALYZE checks against the float32 map.

The maps are judged against float32 on models calibrated so their maps move (a flat map
would match anything): close (SSIM, largest difference) and not identical (the reduced
arithmetic really ran). Whether this CPU runs bfloat16 fast does not decide what is
tested: the support check is patched where a test needs a precision to be available, and
a test of its own checks the stated fallback.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import kql
from helpers import calibrate_batchnorm, chelsea, moving, sensitive
from kql.operators import precision as ops
from kql.planner import precision
from kql.planner.cost import NodeCost, PlanCost
from kql.planner.quality import map_quality
from models_zoo import custom_model, torchvision_model

pytestmark = pytest.mark.usefixtures("one_thread")

QUERY = "OCCLUDE img USING net PATCH 16 STRIDE 8 BATCH 8"


@pytest.fixture(scope="module")
def resnet():
    image = chelsea(64, 80)
    body = calibrate_batchnorm(torchvision_model("resnet18"), 64, 80, kind="photo")
    return sensitive(body, image, (16, 16)), image


@pytest.fixture
def available(monkeypatch):
    """Every precision available on this machine, whatever its CPU (autocast runs
    bfloat16 anywhere; only its speed needs the instructions)."""
    monkeypatch.setattr(precision, "unsupported", lambda name, device: None)
    fresh()
    yield
    fresh()


def fresh() -> None:
    """No measured ratio kept, in this process or in the run's cache file."""
    precision._cache.clear()
    path = os.path.join(os.environ["KQL_CACHE_DIR"], precision.FILE)
    if os.path.exists(path):
        os.remove(path)


def connection(model, image) -> kql.Connection:
    con = kql.connect()
    con.register_model("net", model)
    con.register_image("img", image)
    return con


def heatmap(con, strategy: str, setting: str, query: str = QUERY):
    con.execute(f"SET strategy = '{strategy}'")
    con.execute(f"SET precision = '{setting}'")
    plan = con.execute("EXPLAIN " + query).plan
    return con.execute(query).heatmap, plan


def operator_line(plan: str) -> str:
    return plan.splitlines()[1]


# -- the setting -------------------------------------------------------------------------------

def test_a_precision_not_offered_is_one_line():
    con = kql.connect()
    with pytest.raises(kql.KqlError) as info:
        con.execute("SET precision = 'half'")
    message = str(info.value)
    assert "\n" not in message
    assert "precision must be 'auto', 'float32', 'bfloat16', 'float16' or 'int8'" in message


def test_auto_is_the_exact_float32_map(resnet):
    con = connection(*resnet)
    plan = con.execute("EXPLAIN " + QUERY).plan
    assert "precision" not in plan and plan.splitlines()[-1].endswith(", exact"), plan


# -- the maps ----------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["naive", "incremental"])
def test_bfloat16_map_is_close_to_float32_and_not_the_same(resnet, available, strategy):
    con = connection(*resnet)
    exact, _ = heatmap(con, strategy, "float32")
    low, plan = heatmap(con, strategy, "bfloat16")
    assert moving(exact)
    line = operator_line(plan)
    assert "precision=bfloat16" in line and line.strip().startswith(
        "NaiveOcclusion" if strategy == "naive" else "IncrementalOcclusion")
    assert "approximate: bfloat16" in plan
    assert not np.array_equal(low, exact)           # the reduced arithmetic ran
    quality = map_quality(exact, low)
    assert quality["ssim"] > 0.9 and quality["spearman"] > 0.9, quality
    assert np.abs(low - exact).max() < 0.1 * np.ptp(exact) + 0.02


def test_int8_runs_a_quantized_plain_loop(resnet, available):
    con = connection(*resnet)
    exact, _ = heatmap(con, "naive", "float32")
    low, plan = heatmap(con, "naive", "int8")
    assert "precision=int8" in operator_line(plan)
    assert not np.array_equal(low, exact)
    quality = map_quality(exact, low)
    assert quality["ssim"] > 0.8 and quality["spearman"] > 0.8, quality


def test_int8_incremental_says_it_runs_bfloat16(resnet, available):
    con = connection(*resnet)
    _, plan = heatmap(con, "incremental", "int8")
    assert "precision=bfloat16 (int8: plain loop only)" in operator_line(plan)


def test_int8_plain_loop_and_bfloat16_are_never_mixed_in_one_map(resnet, available):
    """A close call between naive and incremental inference tries both on the first
    batches: at int8 they compute different maps (int8 beside bfloat16), so no trial."""
    con = connection(*resnet)
    con.execute("SET precision = 'int8'")
    plan = con.execute("EXPLAIN " + QUERY).plan
    assert "watch=" not in plan and "trial=" not in plan, plan


def test_a_precision_the_device_lacks_is_a_stated_fallback(resnet, monkeypatch):
    monkeypatch.setattr(precision, "unsupported", lambda name, device: "no such instructions")
    con = connection(*resnet)
    exact, _ = heatmap(con, "incremental", "float32")
    same, plan = heatmap(con, "incremental", "bfloat16")
    assert "precision=float32 (bfloat16: no such instructions)" in operator_line(plan)
    assert "approximate" not in plan
    np.testing.assert_allclose(same, exact, atol=1e-5)   # float32 (a layout trial may differ)


def test_int8_of_a_model_torch_ao_cannot_quantize_falls_back(available):
    """A model torch.fx cannot trace runs the plain loop; torch.ao cannot quantize it
    either: float32, with torch's reason on the operator line."""
    image = chelsea(32, 32)
    con = connection(custom_model("untraceable").eval(), image)
    exact, _ = heatmap(con, "auto", "float32", "OCCLUDE img USING net PATCH 8 STRIDE 8")
    same, plan = heatmap(con, "auto", "int8", "OCCLUDE img USING net PATCH 8 STRIDE 8")
    assert "precision=float32 (int8: " in operator_line(plan), plan
    np.testing.assert_allclose(same, exact, atol=1e-5)    # float32 again (batches may differ)


def test_explain_analyze_checks_the_map_against_float32(resnet, available):
    con = connection(*resnet)
    con.execute("SET strategy = 'incremental'")
    con.execute("SET precision = 'bfloat16'")
    plan = con.execute("EXPLAIN ANALYZE " + QUERY).plan
    line = operator_line(plan)
    ssim = float(line.split("achieved_ssim=")[1].split(",")[0])
    assert 0.9 < ssim <= 1.0, line
    assert "achieved_spearman=" in line and "achieved_top10_iou=" in line


# -- int8's quantized copy ---------------------------------------------------------------------

def test_the_quantized_copy_follows_the_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.LazyLinear(2)).eval()
    image = torch.rand(3, 8, 8)
    model(image[None])
    first = ops.quantized(model, image)
    assert ops.quantized(model, image) is first             # one copy per model and image
    with torch.no_grad():
        model[0].weight.mul_(2)                              # trained further, in place
    assert ops.quantized(model, image) is not first
    assert ops.quantized(model, image + 0.1) is not ops.quantized(model, image)


# -- pricing -----------------------------------------------------------------------------------

def test_priced_scales_only_the_nodes_that_multiply():
    conv = NodeCost(step=None, macs=1e6, gather_bytes=0.0, seconds=2.0)
    copy = NodeCost(step=None, macs=0.0, gather_bytes=1e6, seconds=1.0)
    cost = PlanCost(nodes=[conv, copy], seconds=3.5, macs=1e6)
    half = precision.priced(cost, 0.5)
    assert half.seconds == pytest.approx(2.5)                # 1.0 + 1.0 + the 0.5 outside nodes
    assert [n.seconds for n in half.nodes] == [1.0, 1.0]
    whole = precision.priced(PlanCost(seconds=4.0), 0.25)     # the plain loop: one sum
    assert whole.seconds == pytest.approx(1.0)


def test_a_faster_precision_is_predicted_faster(resnet, available, monkeypatch):
    monkeypatch.setattr(precision, "measure", lambda *a, **k: 3.0)
    con = connection(*resnet)
    con.execute("SET strategy = 'naive'")

    def predicted(setting):
        con.execute(f"SET precision = '{setting}'")
        line = operator_line(con.execute("EXPLAIN " + QUERY).plan)
        value = {k: float(line.split(k + "=")[1].split(",")[0]) for k in ("predicted_s", "planning_s")}
        return value["predicted_s"] - value["planning_s"]         # the scan's
    predicted("float32")                                      # the profile, planned once
    assert predicted("bfloat16") == pytest.approx(predicted("float32") / 3, rel=0.1)


def test_the_measured_ratio_is_kept_beside_the_calibration(resnet, available, monkeypatch, tmp_path):
    calls = []

    def measure(name, device, model, image, rounds=precision.ROUNDS):
        calls.append(name)
        return 2.5
    monkeypatch.setattr(precision, "measure", measure)
    model, image = resnet
    spec = connection(model, image).catalog.resolve_model("net")
    assert precision.speedup("bfloat16", "cpu", spec, image, str(tmp_path)) == 2.5
    precision._cache.clear()                                  # a new process: read from the file
    assert precision.speedup("bfloat16", "cpu", spec, image, str(tmp_path)) == 2.5
    assert calls == ["bfloat16"]
    assert (tmp_path / precision.FILE).exists()
    # Measured under load: it serves this process, and the file is left as it was.
    monkeypatch.setenv("KQL_CONTENTION", "busy")
    precision._cache.clear()
    assert precision.speedup("int8", "cpu", spec, image, str(tmp_path)) == 2.5
    precision._cache.clear()
    assert precision.speedup("int8", "cpu", spec, image, str(tmp_path)) == 2.5
    assert calls == ["bfloat16", "int8", "int8"]


def test_measure_interleaves_and_takes_the_median(monkeypatch):
    """float32 and the reduced run alternate: a machine that slows down for a while slows
    both, and the median ratio stays what the arithmetic gives. A fake clock: float32
    passes take 2 units, bfloat16 ones 1, and everything runs 10x slower for a stretch."""
    monkeypatch.delenv("KQL_PRECISION_RATIO")
    clock = {"now": 0.0, "passes": 0}

    class Timed(torch.nn.Module):
        def forward(self, x):
            clock["passes"] += 1
            busy = 10.0 if 6 <= clock["passes"] < 12 else 1.0
            clock["now"] += busy * (1.0 if torch.is_autocast_enabled("cpu") else 2.0)
            return x
    monkeypatch.setattr(precision, "_now", lambda: clock["now"])
    ratio = precision.measure("bfloat16", "cpu", Timed(), torch.rand(3, 8, 8), rounds=5)
    assert ratio == pytest.approx(2.0)


# -- under WITH SSIM: verified scans in bfloat16, checked in float32 ----------------------------

VERIFIED = "OCCLUDE img USING net PATCH 12 STRIDE 2 COLOR black"


@pytest.fixture(scope="module")
def residual():
    from helpers import residual_connection

    con = residual_connection(64, 80)
    return con, con.execute(VERIFIED).heatmap


def faster(monkeypatch, ratio: float) -> None:
    monkeypatch.setattr(precision, "measure", lambda *a, **k: ratio)


def test_with_ssim_runs_the_verified_scan_in_bfloat16_where_it_pays(residual, available, monkeypatch):
    from kql.operators.verified import WINDOW, windows

    con, exact = residual
    faster(monkeypatch, 3.0)
    result = con.execute(VERIFIED + " WITH SSIM >= 0.8")
    line = operator_line(result.plan)
    assert "VerifiedDrillDown" in line and "precision=bfloat16, check windows in float32" in line, line
    check = result.check
    assert check is not None and not check["exact"] and check["bound"] >= 0.8
    half = WINDOW // 2
    for r, c in windows(exact.shape, check["windows"]):          # the check's windows: float32
        np.testing.assert_allclose(result.heatmap[r - half:r + half + 1, c - half:c + half + 1],
                                   exact[r - half:r + half + 1, c - half:c + half + 1], atol=1e-5)
    assert np.abs(result.heatmap - exact).max() > 1e-5              # the rest did not
    assert map_quality(exact, result.heatmap)["ssim"] >= 0.8


def test_a_check_that_fails_everywhere_ends_with_the_float32_map(residual, available, monkeypatch):
    con, exact = residual
    faster(monkeypatch, 3.0)
    result = con.execute(VERIFIED + " WITH SSIM >= 0.9999")
    assert "precision=bfloat16" in operator_line(result.plan)
    assert result.check["exact"]
    np.testing.assert_allclose(result.heatmap, exact, atol=1e-5)   # the bfloat16 cells again


@pytest.mark.parametrize("ratio,setting", [(1.0, "auto"), (3.0, "float32")])
def test_no_bfloat16_where_it_does_not_pay_or_float32_is_asked(residual, available, monkeypatch,
                                                                ratio, setting):
    con, _ = residual
    faster(monkeypatch, ratio)
    con.execute(f"SET precision = '{setting}'")
    try:
        line = operator_line(con.execute("EXPLAIN " + VERIFIED + " WITH SSIM >= 0.8").plan)
    finally:
        con.execute("SET precision = 'auto'")
    assert "VerifiedDrillDown" in line and "precision" not in line, line


def test_the_operator_travels_to_ray_workers(resnet, available):
    """Many-image queries on Ray pickle the plan's operator."""
    import pickle

    from kql import executor
    from kql.language.parser import parse

    con = connection(*resnet)
    con.execute("SET strategy = 'naive'")
    con.execute("SET precision = 'bfloat16'")
    plan = executor.plan(con, parse(QUERY)[0], QUERY)
    back = pickle.loads(pickle.dumps(plan.operator))
    assert back.describe()["precision"] == "bfloat16"
    assert back.approximation().kind == "precision"


def test_a_tuning_that_certifies_bfloat16_runs_the_exact_map_in_it(residual, available, monkeypatch):
    """CALIBRATE records the exact map's SSIM in bfloat16 against float32; where its bound
    reaches the target, WITH SSIM may run the exact map in bfloat16 (the prediction is
    that bound, the source the tuning); never where the session asked for float32."""
    from kql import executor
    from kql.language.parser import parse
    from kql.planner import tuning

    con, _ = residual
    faster(monkeypatch, 3.0)
    query = VERIFIED + " WITH SSIM >= 0.9"
    plan = executor.plan(con, parse(query)[0], query)
    failed = (0.0,) * 5                       # the verified checks failed on every tuning image
    record = tuning.TuningRecord((0.9,), ((0.5,) * 5,), 5,
                                 checks=((2, failed), (3, failed), (4, failed)),
                                 refined=((4, failed),),
                                 precisions=(("bfloat16", (0.99, 0.995, 0.99, 0.992, 0.993)),))
    con.catalog.save_tuning("net", tuning.key(plan.query), record.to_dict())
    try:
        line = operator_line(con.execute("EXPLAIN " + query).plan)
        assert "precision=bfloat16" in line and "VerifiedDrillDown" not in line, line
        assert f"predicted_ssim={record.candidates(0.9)[-1].predicted_ssim:.3f}" in line
        assert 'tuning="tuned on 5 images"' in line
        con.execute("SET precision = 'float32'")
        line = operator_line(con.execute("EXPLAIN " + query).plan)
        assert "precision" not in line, line
    finally:
        con.execute("SET precision = 'auto'")
        con.catalog.save_tuning("net", tuning.key(plan.query), {})
