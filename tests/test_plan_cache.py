"""The plan cache: a repeated or slightly changed query reuses the model's profile; a
re-registered model or image does not."""

from __future__ import annotations

import numpy as np
import pytest

import kql
from helpers import smooth_noise_image
from models_zoo import sensitive_small_cnn, small_cnn

QUERY = "OCCLUDE img USING net PATCH 8 STRIDE 4"


def planned(con, query: str) -> str:
    return con.execute("EXPLAIN " + query).plan.splitlines()[1]


@pytest.fixture
def con():
    c = kql.connect()
    c.register_model("net", sensitive_small_cnn())
    c.register_image("img", smooth_noise_image(24, 30))
    c.execute("SET strategy = 'incremental'")
    return c


def test_a_repeated_or_changed_query_reuses_the_profile(con):
    assert "cache=" not in planned(con, QUERY)
    for query in (QUERY, QUERY + " COLOR black", QUERY.replace("STRIDE 4", "STRIDE 3"),
                  QUERY + " TARGET 1", QUERY.replace("PATCH 8", "PATCH 6")):
        assert "cache=profile" in planned(con, query), query


def test_a_cached_plan_computes_the_same_map(con):
    first = con.execute(QUERY + " COLOR black")
    again = con.execute(QUERY + " COLOR black")
    assert "cache=profile" in again.plan.splitlines()[1]
    np.testing.assert_allclose(first.heatmap, again.heatmap, atol=1e-6, rtol=0)


def test_re_registering_the_model_or_the_image_invalidates(con):
    before = con.execute(QUERY)
    con.register_model("net", small_cnn(classes=5))          # other weights, same name
    line = planned(con, QUERY)
    assert "cache=" not in line
    after = con.execute(QUERY)
    fresh = kql.connect()
    fresh.register_model("net", con.catalog.resolve_model("net").module)
    fresh.register_image("img", smooth_noise_image(24, 30))
    fresh.execute("SET strategy = 'incremental'")
    np.testing.assert_allclose(after.heatmap, fresh.execute(QUERY).heatmap, atol=1e-6, rtol=0)
    assert not np.array_equal(before.heatmap, after.heatmap)
    con.register_image("img", smooth_noise_image(24, 30, seed=9))   # other pixels, same name
    assert "cache=graph" in planned(con, QUERY)             # its own views, the model's trace
    assert "cache=profile" in planned(con, QUERY)


def test_another_image_reuses_the_models_trace_and_gets_its_own_map(con, monkeypatch):
    from kql.planner import model_passes

    traces = []
    real = model_passes.trace
    monkeypatch.setattr(model_passes, "trace", lambda *a: traces.append(1) or real(*a))
    con.execute(QUERY)
    maps = {}
    for seed in (3, 4):
        con.register_image("img", smooth_noise_image(24, 30, seed=seed))
        result = con.execute(QUERY)
        assert "cache=graph" in result.plan.splitlines()[1]
        maps[seed] = result.heatmap
    assert len(traces) == 1
    con.register_model("net", small_cnn(classes=5))          # another model: traced again
    assert "cache=" not in planned(con, QUERY) and len(traces) == 2
    for seed, heatmap in maps.items():                       # each map is its own image's
        fresh = kql.connect()
        fresh.register_model("net", sensitive_small_cnn())
        fresh.register_image("img", smooth_noise_image(24, 30, seed=seed))
        fresh.execute("SET strategy = 'incremental'")
        np.testing.assert_allclose(heatmap, fresh.execute(QUERY).heatmap, atol=1e-6, rtol=0)
    assert not np.array_equal(maps[3], maps[4])
