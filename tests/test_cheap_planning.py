"""Cheap decisions first: a model whose global gate (squeeze-excitation) sits early is
planned naive from one forward pass's shapes, without a torch.fx trace or views; every
other model, and every query asking for more than the exact default plan, is traced."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import kql
from helpers import plain_heatmap, sensitive, smooth_noise_image
from kql.operators import shapes
from kql.planner import physical, unoccluded
from models_zoo import small_cnn

QUERY = "OCCLUDE img USING net PATCH 8 STRIDE 4"


class EarlyGate(nn.Module):
    """A stem, then a squeeze-excitation block, then the rest of the network at full size."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pool, self.down, self.up = nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.body = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
                                    for _ in range(4)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x * torch.sigmoid(self.up(torch.relu(self.down(self.pool(x)))))
        return self.head(self.body(x))


def connection(model) -> kql.Connection:
    con = kql.connect()
    con.register_model("net", model)
    con.register_image("img", smooth_noise_image(24, 28))
    return con


def operator(con, query=QUERY) -> str:
    return con.execute("EXPLAIN " + query).plan.splitlines()[1]


@pytest.fixture
def no_trace(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was traced")
    monkeypatch.setattr(physical, "profile_model", refuse)


def test_an_early_gate_plans_naive_without_tracing(no_trace):
    torch.manual_seed(0)
    con = connection(sensitive(EarlyGate(), smooth_noise_image(24, 28)))
    line = operator(con)
    assert line.startswith("  NaiveOcclusion:"), line
    assert "reason=global gate body.pool caps incremental at" in line and "planned without tracing" in line
    assert "predicted_s=" in line and "cache=" not in line
    assert "cache=shapes" in operator(con, QUERY + " TARGET 2")      # the second plans from the cache


def test_the_untraced_naive_map_is_the_plain_loop(no_trace):
    torch.manual_seed(1)
    image = smooth_noise_image(24, 28)
    model = sensitive(EarlyGate(), image, patch=(8, 8), color=(0.0, 0.0, 0.0))
    con = connection(model)
    result = con.execute(QUERY + " COLOR black")
    expected, target = plain_heatmap(model, image, (8, 8), (4, 4), (0.0, 0.0, 0.0))
    assert result.target == target
    assert np.ptp(expected) > 1e-3                                   # the map moves
    np.testing.assert_allclose(result.heatmap, expected, atol=1e-5)


@pytest.mark.parametrize("setting", ["SET gates = 'frozen'", "SET strategy = 'incremental'",
                                     "SET tau = 0.5"])
def test_settings_that_want_more_than_the_exact_default_are_traced(setting):
    torch.manual_seed(0)
    con = connection(sensitive(EarlyGate(), smooth_noise_image(24, 28)))
    con.execute(setting)
    assert "planned without tracing" not in operator(con)


def test_a_model_without_a_gate_never_runs_the_shape_pass(monkeypatch):
    monkeypatch.setattr(unoccluded, "summarize", lambda *a, **k: pytest.fail("shape pass ran"))
    con = connection(small_cnn())
    assert "planned without tracing" not in operator(con)


def test_a_late_gate_leaves_the_decision_to_the_cost_model():
    late = nn.Sequential(*[nn.Sequential(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), nn.ReLU())
                           for i in range(5)])
    summary = shapes.summarize(nn.Sequential(late, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                             nn.Linear(8, 3)).eval(), torch.rand(3, 16, 16))
    assert summary.gate is None and summary.ratio_bound == float("inf")   # the head is no gate
    gated = shapes.summarize(EarlyGate().eval(), torch.rand(3, 16, 16))
    assert gated.gate == "pool" and 1.0 < gated.ratio_bound < 1.2
    assert gated.macs_before_gate == 16 * 16 * 8 * 27                       # the stem only


def wide_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def test_views_of_a_large_image_that_would_not_fit_are_never_built(no_trace):
    con = kql.connect()
    con.register_model("net", wide_cnn(), input_size=(1100, 1000))
    con.register_image("big", torch.rand(3, 1100, 1000))                # 1.1 megapixels
    con.execute("SET memory_limit = '256 MB'")                          # views ~200 MB x 2
    query = "OCCLUDE big USING net PATCH 400 STRIDE 600"
    line = operator(con, query)
    assert line.startswith("  NaiveOcclusion:") and "materialized views would need" in line, line
    result = con.execute(query + " COLOR black")
    expected, _ = plain_heatmap(wide_cnn(), con.catalog.resolve_image("big"), (400, 400),
                                (600, 600), (0.0, 0.0, 0.0))
    assert result.heatmap.shape == expected.shape == (2, 2)
    np.testing.assert_allclose(result.heatmap, expected, atol=1e-5)
    con.execute("SET strategy = 'incremental'")
    with pytest.raises(kql.KqlPlanError, match="materialized views.*memory_limit is 256.0 MB"):
        con.execute("EXPLAIN " + query)
