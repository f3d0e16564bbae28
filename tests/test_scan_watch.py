"""A watched scan (operators/trial.py) hands the rest of the scan to the faster exact
operator at any batch: the map stays the plain loop's, no position is computed twice,
probes back off, a contended trial is not kept, and ``ran`` accounts for every part.

Timing is faked: the clock moves only when an operator computes positions, by the
seconds per item a test gives for that operator at that position.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from helpers import calibrate_batchnorm, plain_heatmap, sensitive, smooth_noise_image
from kql import executor
from kql.operators import trial
from kql.operators.layout import Kept
from kql.operators.task import StopScan
from kql.operators.trial import OTHER, OperatorTrial
from kql.language.parser import parse
from kql.planner import naive_shortcut, physical
from models_zoo import small_cnn
from test_operator_trial import connection

IMAGE = (40, 44)
N = 17 * 19          # positions: 81 batches of 4
QUERY = "OCCLUDE img USING net PATCH 8 STRIDE 2 BATCH 4 COLOR black"


@pytest.fixture(scope="module")
def model():
    image = smooth_noise_image(*IMAGE)
    return sensitive(calibrate_batchnorm(small_cnn(), *IMAGE), image), image


@pytest.fixture(scope="module")
def plan(model):
    """A close call's plan: its task and both exact operators (batch 4)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(physical, "CLOSE", 1e9)
        mp.setattr(naive_shortcut, "SMALL_IMAGE", 0)
        planned = executor.plan(connection(model), parse(QUERY)[0], QUERY)
    assert isinstance(planned.operator, OperatorTrial)
    assert planned.operator.chosen.batch_size == planned.operator.other.batch_size == 4
    return planned


@pytest.fixture(scope="module")
def plain(model):
    net, image = model
    heat, _ = plain_heatmap(net, image, (8, 8), (2, 2), (0.0, 0.0, 0.0))
    assert np.ptp(heat) > 1e-3                      # the map moves: a wrong part shows
    return heat


class FakeTime:
    """The clock of a watched scan: moves by ``rate(role, position)`` seconds per item an
    operator computes (role: 'chosen' or 'other'). ``parts``: (role, first position, last
    + 1) of what every part computed."""

    def __init__(self, plan, rate):
        self.names = {plan.operator.chosen.name: "chosen", plan.operator.other.name: "other"}
        self.rate, self.now, self.parts = rate, 0.0, []

    def __call__(self) -> float:
        return self.now

    def spy(self, real):
        def part(operator, task, start, stop, progress):
            role, at = self.names[operator.name], [start]

            def report(done, total):
                self.now += sum(self.rate(role, p) for p in range(at[0], done))
                at[0] = done
                progress(done, total)
            result = real(operator, task, start, stop, report)
            self.parts.append((role, start, start + result.scores.shape[1]))
            return result
        return part


@pytest.fixture
def fake(monkeypatch, plan):
    """``fake(rate)``: a FakeTime watching every part a trial runs."""
    monkeypatch.setenv("KQL_CONTENTION", "quiet")

    def make(rate):
        clock = FakeTime(plan, rate)
        monkeypatch.setattr(trial, "_part", clock.spy(trial._part))
        return clock
    return make


def watched(plan, clock, kept=None, **kwargs) -> OperatorTrial:
    return OperatorTrial(plan.operator.chosen, plan.operator.other, kept, clock=clock, **kwargs)


def assert_once_each(parts):
    """The parts computed every position exactly once, in order."""
    assert [p[1] for p in parts] == [0] + [p[2] for p in parts[:-1]], parts
    assert parts[-1][2] == N and all(p[2] > p[1] for p in parts), parts


def test_a_mid_scan_switch_keeps_the_map_exact(plan, plain, fake):
    # The chosen operator slows threefold from position 80 on; the other one does not.
    clock = fake(lambda role, p: (3.0 if p >= 80 else 1.0) if role == "chosen" else 1.2)
    result = watched(plan, clock, upfront=False, expected=(1.5, 1.2)).run(plan.task())
    np.testing.assert_allclose(result.probabilities.reshape(17, 19), plain, atol=1e-5)
    # Two slow batches make the recent time (a median of 3) slow: a probe of one batch of
    # the other at 88, faster, so it runs the rest; the probed positions are kept.
    assert clock.parts == [("chosen", 0, 88), ("other", 88, 92), ("other", 92, N)]
    assert_once_each(clock.parts)
    chosen, other = plan.operator.chosen.name, plan.operator.other.name
    assert [r[:2] for r in result.ran] == [(chosen, 88), (other, 4), (other, N - 92)]
    assert sum(r[1] for r in result.ran) == N == result.scores.shape[1]
    assert [r[2] for r in result.ran] == pytest.approx([80 + 8 * 3.0, 4 * 1.2, (N - 92) * 1.2])


def test_a_probe_that_finds_the_other_slower_does_not_switch_and_backs_off(plan, fake):
    # The chosen operator is slower than the other's prediction, which is wrong: the
    # other one is slower still. It slows to 3.2 at 100 and to 5 at 200.
    def rate(role, p):
        return (2.0 if p < 100 else 3.2 if p < 200 else 5.0) if role == "chosen" else 6.0
    clock = fake(rate)
    watched(plan, clock, upfront=False, expected=(1.0, 1.0)).run(plan.task())
    assert_once_each(clock.parts)
    probes = [p[1] for p in clock.parts if p[0] == "other"]
    # The first after two batches; the next once the chosen slowed 1.5x (3.2 >= 1.5 x 2;
    # two slow batches at 108); the third once 5 >= 1.5 x 3.2 (at 208) and twice the 27
    # batches before the second had run (54, at 216). Never a switch.
    assert probes == [8, 108, 216]
    assert all(p[2] - p[1] == 4 for p in clock.parts if p[0] == "other")
    assert clock.parts[-1][0] == "chosen"


def test_a_steady_wrong_prediction_costs_one_probe(plan, fake):
    clock = fake(lambda role, p: 2.0 if role == "chosen" else 3.0)
    watched(plan, clock, upfront=False, expected=(1.0, 1.0)).run(plan.task())
    assert clock.parts == [("chosen", 0, 8), ("other", 8, 12), ("chosen", 12, N)]


def test_a_switch_and_a_switch_back(plan, plain, fake):
    def rate(role, p):
        if role == "chosen":
            return 3.0 if 80 <= p < 200 else 1.0
        return 3.3 if p >= 200 else 1.1
    clock = fake(rate)
    result = watched(plan, clock, upfront=False, expected=(1.0, 1.1)).run(plan.task())
    np.testing.assert_allclose(result.probabilities.reshape(17, 19), plain, atol=1e-5)
    # Switched at the probe at 88; the other slows at 200, and after twice the 22 batches
    # before that probe a probe of the chosen one at 208 switches back.
    assert clock.parts == [("chosen", 0, 88), ("other", 88, 92), ("other", 92, 208),
                           ("chosen", 208, 212), ("chosen", 212, N)]
    assert sum(r[1] for r in result.ran) == N


def test_a_part_s_first_batch_is_warm_up(plan, fake):
    # A cold first batch, ten times slower, would look slower than the other's prediction.
    clock = fake(lambda role, p: (10.0 if p < 4 else 1.0) if role == "chosen" else 1.0)
    watched(plan, clock, upfront=False, expected=(1.0, 1.0)).run(plan.task())
    assert clock.parts == [("chosen", 0, N)]


@pytest.mark.parametrize("slows_at, probes", [(280, [288]), (300, [])])
def test_no_probe_near_the_end(plan, fake, slows_at, probes):
    # Slow by the second slow batch: at 288, 9 batches are left; at 308, 4 (< PROBE_LEFT).
    clock = fake(lambda role, p: (3.0 if p >= slows_at else 1.0) if role == "chosen" else 9.0)
    watched(plan, clock, upfront=False, expected=(1.0, 1.0)).run(plan.task())
    assert [p[1] for p in clock.parts if p[0] == "other"] == probes


def test_after_a_switch_the_new_operator_is_timed_afresh(plan, fake):
    # Slow from the start: one probe (after its warm-up and one timed batch) switches, and
    # the other's own times (not the chosen one's) say it need not be probed back.
    clock = fake(lambda role, p: 3.0 if role == "chosen" else 1.1)
    watched(plan, clock, upfront=False, expected=(1.0, 1.1)).run(plan.task())
    assert clock.parts == [("chosen", 0, 8), ("other", 8, 12), ("other", 12, N)]


def test_without_expected_times_a_scan_is_only_watched(plan, fake):
    clock = fake(lambda role, p: 5.0 if role == "chosen" else 1.0)
    watched(plan, clock, upfront=False).run(plan.task())
    assert clock.parts == [("chosen", 0, N)]            # nothing to probe with


@pytest.mark.parametrize("load, kept_as", [("quiet", OTHER), ("busy", None)])
def test_an_upfront_trial_is_kept_only_when_quiet(plan, plain, fake, monkeypatch, load, kept_as):
    monkeypatch.setenv("KQL_CONTENTION", load)
    clock = fake(lambda role, p: 2.0 if role == "chosen" else 1.0)
    kept = Kept({}, ("net", "shape"))
    result = watched(plan, clock, kept).run(plan.task())
    np.testing.assert_allclose(result.probabilities.reshape(17, 19), plain, atol=1e-5)
    # The other's first batch, then the chosen one's (kept), slower: the other runs on.
    assert clock.parts == [("other", 0, 4), ("chosen", 4, 8), ("other", 8, N)]
    assert kept.layout == kept_as
    clock.parts.clear()
    watched(plan, clock, kept).run(plan.task())        # the next scan of that shape
    assert clock.parts == ([("other", 0, N)] if kept_as else
                           [("other", 0, 4), ("chosen", 4, 8), ("other", 8, N)])


def test_an_upfront_trial_that_the_chosen_wins(plan, fake):
    clock = fake(lambda role, p: 1.0 if role == "chosen" else 1.0 / 0.85)
    kept = Kept({}, ("net", "shape"))
    watched(plan, clock, kept, expected=(1.0, 1.0)).run(plan.task())
    assert clock.parts == [("other", 0, 4), ("chosen", 4, N)]
    assert kept.layout == "chosen"
    # With the other predicted twice as fast, a probe follows, but the trial counts as the
    # first: not before twice its two batches have run (at 16, not 12).
    clock.parts.clear()
    watched(plan, clock, Kept({}, "k"), expected=(1.0, 0.5)).run(plan.task())
    assert clock.parts == [("other", 0, 4), ("chosen", 4, 16), ("other", 16, 20), ("chosen", 20, N)]


def test_short_scans_and_explain_analyze_run_the_chosen_operator_alone(plan, fake):
    clock = fake(lambda role, p: 5.0 if role == "chosen" else 1.0)
    task = plan.task()
    short = dataclasses.replace(task, ys=task.ys[:20], xs=task.xs[:20])    # 5 batches
    op = OperatorTrial(plan.operator.chosen.at(short.ys, short.xs),
                       plan.operator.other.at(short.ys, short.xs), clock=clock, expected=(9, 1))
    result = op.run(short)
    assert clock.parts == [] and result.scores.shape[1] == 20
    assert [r[:2] for r in result.ran] == [(plan.operator.chosen.name, 20)]
    timings = {}
    analyzed = watched(plan, clock, expected=(9, 1)).run(task, timings=timings)
    assert clock.parts == [] and analyzed.ran == () and analyzed.scores.shape[1] == N


def test_stop_scan_returns_the_positions_done(plan):
    task = plan.task()
    full = plan.operator.chosen.run(task)

    def stop_at_12(done, total):
        if done >= 12:
            raise StopScan
    part = plan.operator.chosen.run(task, stop_at_12)
    assert part.scores.shape == (1, 12) and part.all_logits.shape == (1, 12)
    np.testing.assert_array_equal(part.scores, full.scores[:, :12])
    assert full.ran == ()                               # a plain operator's


def test_explain_names_the_trial_or_the_watch(plan):
    chosen, other = plan.operator.chosen, plan.operator.other
    short = other.name.replace("Occlusion", "").lower()
    assert OperatorTrial(chosen, other).describe()["trial"] == short
    watch = OperatorTrial(chosen, other, upfront=False, expected=(1, 2))
    items = watch.describe()
    assert items["watch"] == short and "trial" not in items
    profile = getattr(chosen, "profile", None) or getattr(other, "profile", None)
    again = watch.rebind(profile)
    assert (again.upfront, again.expected) == (False, (1.0, 2.0))
