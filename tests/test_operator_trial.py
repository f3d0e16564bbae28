"""A close call between naive and incremental inference is settled on the scan's first
batches (operators/trial.py): the map stays exact whichever operator ran a position, the
faster one runs the rest, the outcome is kept for the next scan of that shape, short scans
and EXPLAIN ANALYZE run the chosen operator alone, and clear decisions have no trial
(tests/test_scan_watch.py: the watching that follows)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import kql
from kql import executor
from helpers import calibrate_batchnorm, plain_heatmap, sensitive, smooth_noise_image
from kql.operators import trial
from kql.operators.trial import OperatorTrial
from kql.planner import naive_shortcut, physical
from models_zoo import small_cnn

IMAGE = (40, 44)
# 17 x 19 = 323 positions: 21 batches of 16
QUERY = "OCCLUDE img USING net PATCH 8 STRIDE 2 BATCH 16 COLOR black"


@pytest.fixture
def model():
    image = smooth_noise_image(*IMAGE)
    return sensitive(calibrate_batchnorm(small_cnn(), *IMAGE), image), image


@pytest.fixture
def close(monkeypatch):
    """Every traced exact plan counts as a close call (and this small input is traced)."""
    monkeypatch.setattr(physical, "CLOSE", 1e9)
    monkeypatch.setattr(naive_shortcut, "SMALL_IMAGE", 0)


@pytest.fixture
def parts(monkeypatch):
    """(operator name, first position, last position + 1) of every part a trial ran."""
    ran = []
    real = trial._part

    def spy(operator, task, start, stop, progress):
        ran.append((operator.name, start, stop))
        return real(operator, task, start, stop, progress)
    monkeypatch.setattr(trial, "_part", spy)
    return ran


def _parsed(text: str) -> tuple:
    from kql.language.parser import parse
    return parse(text)[0], text


def connection(model) -> kql.Connection:
    net, image = model
    con = kql.connect()
    con.register_model("net", net)
    con.register_image("img", image)
    return con


def operator_line(con, query=QUERY) -> str:
    return con.execute("EXPLAIN " + query).plan.splitlines()[1]


def expected(model):
    net, image = model
    heat, _ = plain_heatmap(net, image, (8, 8), (2, 2), (0.0, 0.0, 0.0))
    assert np.ptp(heat) > 1e-3                      # the map moves: a wrong engine shows
    return heat


@pytest.mark.parametrize("switch", [1e9, 0.0])
def test_a_close_call_tries_both_and_the_map_stays_exact(model, close, parts, monkeypatch, switch):
    monkeypatch.setattr(OperatorTrial, "SWITCH", switch)     # the alternative wins / loses
    monkeypatch.setattr(OperatorTrial, "PROBE_LEFT", 10 ** 9)  # the upfront trial alone
    monkeypatch.setenv("KQL_CONTENTION", "quiet")             # its outcome is kept
    con = connection(model)
    line = operator_line(con)
    chosen = line.split(":")[0].strip()
    other = "IncrementalOcclusion" if chosen == "NaiveOcclusion" else "NaiveOcclusion"
    assert f"trial={other.replace('Occlusion', '').lower()}" in line, line
    result = con.execute(QUERY)
    np.testing.assert_allclose(result.heatmap, expected(model), atol=1e-5)
    n = 17 * 19
    tried = [(other, 0, 16), (chosen, 16, n)]                  # the alternative first
    # On a switch the chosen scan stops after its first batch (kept); the alternative runs
    # the rest.
    assert parts == (tried + [(other, 32, n)] if switch else tried), parts
    # The outcome is kept: the next scan of that shape (another target) starts with it,
    # without a trial.
    parts.clear()
    again = operator_line(con, QUERY + " TARGET 1")
    assert ("faster (kept)" if switch else "slower (kept)") in again, again
    con.execute(QUERY + " TARGET 1")
    assert parts == [(other if switch else chosen, 0, n)], parts


def test_a_re_registered_model_tries_again(model, close, parts, monkeypatch):
    monkeypatch.setattr(OperatorTrial, "SWITCH", 1e9)
    monkeypatch.setenv("KQL_CONTENTION", "quiet")
    con = connection(model)
    con.execute(QUERY)
    assert "(kept)" in operator_line(con)
    con.register_model("net", model[0])                       # re-registered: a new model
    assert "(kept)" not in operator_line(con) and "trial=" in operator_line(con)


def test_short_scans_and_explain_analyze_run_the_chosen_operator_alone(model, close, parts):
    con = connection(model)
    short = "OCCLUDE img USING net PATCH 8 STRIDE 8 BATCH 16 COLOR black"   # 4 x 5: 2 batches
    assert "trial=" not in operator_line(con, short)
    con.execute(short)
    # The operator checks too (a plan made for another scan length: a rebound image's).
    plan = executor.plan(con, *_parsed(QUERY))
    assert isinstance(plan.operator, OperatorTrial)
    short_task = dataclasses.replace(plan.task(), ys=plan.task().ys[:20], xs=plan.task().xs[:20])
    OperatorTrial(plan.operator.chosen.at(short_task.ys, short_task.xs),
                  plan.operator.other.at(short_task.ys, short_task.xs)).run(short_task)
    analyzed = con.execute("EXPLAIN ANALYZE " + QUERY).plan
    assert "trial=" in analyzed and "actual_s=" in analyzed
    assert parts == []


def test_a_clear_decision_has_no_trial(model, monkeypatch):
    monkeypatch.setattr(naive_shortcut, "SMALL_IMAGE", 0)
    monkeypatch.setattr(physical, "CLOSE", 1.0)               # no prediction is close
    assert "trial=" not in operator_line(connection(model))


def test_settings_other_than_the_default_strategy_have_no_trial(model, close):
    con = connection(model)
    for setting in ("SET strategy = 'incremental'", "SET strategy = 'naive'"):
        con.execute(setting)
        assert "trial=" not in operator_line(con), setting
