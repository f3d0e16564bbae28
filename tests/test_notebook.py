"""Notebook display (Result._repr_png_ / _repr_html_) and the Python API's progress and
model-mode handling (kql/api.py)."""

from __future__ import annotations

import base64
import copy
import html
import re

import numpy as np
import pytest
import torch
from torch import nn

import kql
from helpers import smooth_noise_image
from kql.errors import KqlPlanError
from models_zoo import sensitive_small_cnn

PNG = b"\x89PNG\r\n\x1a\n"
QUERY = "OCCLUDE img USING net PATCH 6 STRIDE 4"
LABELS = [f"<b>&{i}" for i in range(5)]


@pytest.fixture(scope="module")
def con():
    con = kql.connect()
    con.register_model("net", sensitive_small_cnn(), labels=LABELS)
    con.register_image("img", smooth_noise_image(24, 30))
    return con


@pytest.fixture(scope="module")
def result(con):
    return con.execute(QUERY)


def test_repr_png_is_png_bytes(result):
    png = result._repr_png_()
    assert isinstance(png, bytes) and png[:8] == PNG


def test_repr_html_has_the_image_and_an_escaped_summary(result):
    page = result._repr_html_()
    match = re.search(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert match and base64.b64decode(match.group(1))[:8] == PNG
    assert html.escape(result.label) in page and "<b>&" not in page
    drop = result.probability - result.heatmap
    row, col = np.unravel_index(np.argmax(drop), drop.shape)
    x, y, w, h = result.box(row, col)
    assert f"at cell ({row}, {col})" in page
    assert f"({x:.0f}, {y:.0f}, {w:.0f}, {h:.0f})" in page
    assert f"{result.probability:.4f}" in page and "net" in page and "5x7" in page
    lines = result.plan.splitlines()
    summary = next((l.strip() for l in lines if l.strip().startswith("Summary:")), lines[0])
    assert html.escape(summary) in page


def test_repr_html_of_other_kinds(con):
    show = con.execute("SHOW SETTINGS")._repr_html_()
    assert show.startswith("<table>") and "<th>setting</th>" in show and "overlay_scale" in show
    explain = con.execute(f"EXPLAIN {QUERY}")
    assert explain._repr_html_().startswith("<pre>") and explain._repr_png_() is None
    set_ = con.execute("SET tau = 1")._repr_html_()
    assert set_ == "<pre>tau = 1</pre>"


def test_progress_true_draws_a_bar_on_stderr(con, capsys):
    con.execute(QUERY, progress=True)
    assert "occlude" in capsys.readouterr().err


def test_progress_callable_counts_to_the_total(con):
    calls = []
    result = con.execute(QUERY,
                         progress=lambda done, total: calls.append((done, total)))
    total = result.heatmap.size
    assert calls and calls[-1] == (total, total)
    assert all(t == total and 0 <= d <= total for d, t in calls)


@pytest.mark.parametrize("progress", ["yes", 1, [True]])
def test_progress_of_another_kind_is_a_one_line_plan_error(con, progress):
    with pytest.raises(KqlPlanError, match=r"^progress must be True, False, None or a "
                                           r"callable progress\(done, total\), got "):
        con.execute(QUERY, progress=progress)
    with pytest.raises(KqlPlanError):
        con.run(QUERY, progress=progress)        # refused before anything runs


def test_progress_off(con, capsys):
    con.execute(QUERY, progress=False)
    con.execute(QUERY, progress=None)
    assert capsys.readouterr().err == ""


def trained_net() -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Dropout(0.5), nn.Conv2d(6, 8, 3, stride=2), nn.BatchNorm2d(8),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        for _ in range(3):                        # running statistics that are not 0 and 1
            net(torch.rand(4, 3, 24, 30) * 2)
    return net


@pytest.mark.parametrize("strategy", ["naive", "incremental"])
def test_training_mode_is_kept_and_the_map_is_in_eval_mode(strategy):
    net = trained_net().train()
    reference = copy.deepcopy(net).eval()
    stats = net[1].running_mean.clone()
    con = kql.connect()
    con.register_model("net", net, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert all(m.training for m in net.modules())          # registering changes nothing
    con.register_model("ref", reference, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    con.register_image("img", smooth_noise_image(24, 30))
    con.execute(f"SET strategy = '{strategy}'")
    got = con.execute("OCCLUDE img USING net PATCH 6 STRIDE 4")
    want = con.execute("OCCLUDE img USING ref PATCH 6 STRIDE 4")
    assert all(m.training for m in net.modules())
    assert not any(m.training for m in reference.modules())
    torch.testing.assert_close(net[1].running_mean, stats)    # no training-mode forward
    np.testing.assert_allclose(got.heatmap, want.heatmap, atol=1e-5)


def test_mode_is_restored_after_a_failing_statement():
    net = trained_net().train()
    con = kql.connect()
    con.register_model("net", net)
    con.register_image("img", smooth_noise_image(24, 30))
    with pytest.raises(kql.KqlError):
        con.execute("OCCLUDE img USING net PATCH 6 STRIDE 4 TARGET 99")
    assert all(m.training for m in net.modules())
