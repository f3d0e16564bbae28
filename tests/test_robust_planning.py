"""A planner a busy machine cannot fool: calibration rounds judged for contention and
plausibility (planner/calibrate.py), only trusted tables kept on disk, predictions
corrected by what scans took (planner/feedback.py), and no refusal on an untrusted guess
(kql/executor.py confirm_run). Contention is simulated (``$KQL_CONTENTION``, injected
rounds), never taken from the machine's real load."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import re
import time

import pytest

import kql
from helpers import sensitive, smooth_noise_image
from kql.planner import calibrate, feedback, micro_benchmarks, prior
from kql.shell import Runner
from models_zoo import small_cnn

# What a catalog's table measured beside other work held (the figures): copies
# at 1 GB/s and a per-node overhead of 33 ms on a machine that measures 66 GB/s and
# 0.1 ms quiet, and dense rates that jump between neighbouring sizes.
POISON = dict(bandwidth=1.0e9, overhead=0.033, node_overhead=0.033)


def quiet_round(device="cpu") -> calibrate.Throughput:
    return calibrate.Throughput(device, **copy.deepcopy(prior.CPU))


def busy_round(device="cpu") -> calibrate.Throughput:
    table = quiet_round(device)
    for name, value in POISON.items():
        setattr(table, name, copy.deepcopy(value))
    table.dense[2][2:] = [150e9, 52e9, 108e9]
    return table


@pytest.fixture
def rounds(monkeypatch, tmp_path):
    """Inject the micro-benchmark rounds: ``rounds.set([(table maker, busy?), ...])``;
    ``rounds.ran`` counts them. The user cache is a folder of the test's own."""
    monkeypatch.setenv("KQL_CACHE_DIR", str(tmp_path / "user-cache"))
    class Rounds:
        ran = 0

        def set(self, plan):
            queue = list(plan)

            def measure_round(device):
                make, busy = queue[min(self.ran, len(queue) - 1)]
                self.ran += 1
                monkeypatch.setenv("KQL_CONTENTION", "busy" if busy else "quiet")
                return make(device)
            monkeypatch.setattr(micro_benchmarks, "one_round", measure_round)
    calibrate._cache.clear()
    yield Rounds()
    calibrate._cache.clear()


def write_table(path, table: calibrate.Throughput) -> None:
    with open(path, "w") as fh:
        json.dump({calibrate.device_key("cpu"): dataclasses.asdict(table)}, fh)


# -- 1. calibration that cannot be poisoned ----------------------------------------------------

def test_a_poisoned_table_on_disk_is_detected_and_measured_again(tmp_path, rounds):
    """A table that says it is trusted, but whose copy rate and overheads no CPU of its
    kind produces, is never used: it is measured again, and the sound table replaces it."""
    poisoned = busy_round()
    found = calibrate.implausible(poisoned)
    assert poisoned.trusted and {"bandwidth", "dense[13]", "overhead", "node_overhead"} <= set(found)
    write_table(tmp_path / calibrate.FILE, poisoned)
    rounds.set([(quiet_round, False)])
    tp = calibrate.throughput("cpu", str(tmp_path))
    assert rounds.ran == calibrate.MIN_ROUNDS and tp.trusted
    assert tp.bandwidth == prior.CPU["bandwidth"]
    stored = json.loads((tmp_path / calibrate.FILE).read_text())[calibrate.device_key("cpu")]
    assert stored["bandwidth"] == prior.CPU["bandwidth"] and stored["trusted"] is True


def test_an_untrusted_or_old_table_on_disk_is_measured_again(tmp_path, rounds):
    for stale in (dataclasses.replace(quiet_round(), trusted=False),
                  dataclasses.replace(quiet_round(), version=7)):
        write_table(tmp_path / calibrate.FILE, stale)
        calibrate._cache.clear()
        before = rounds.ran
        rounds.set([(quiet_round, False)])
        calibrate.throughput("cpu", str(tmp_path))
        assert rounds.ran > before


def test_a_table_measured_under_contention_is_not_kept_on_disk(tmp_path, rounds):
    rounds.set([(busy_round, True)])
    con = kql.connect(str(tmp_path))
    message = con.execute("CALIBRATE").message
    assert "NOT trusted: the machine was busy in every round" in message, message
    assert "never kept as trusted" in message
    key = calibrate.device_key("cpu")
    assert set(json.loads((tmp_path / calibrate.FILE).read_text())) == {key + calibrate.UNTRUSTED}
    assert rounds.ran >= calibrate.MIN_ROUNDS
    tp = calibrate.throughput("cpu", str(tmp_path))            # this process keeps it
    assert not tp.trusted and tp.quiet_rounds == 0
    # Its implausible entries were repaired from the prior, at the table's own speed.
    assert {"bandwidth", "overhead", "node_overhead"} <= set(tp.repaired)
    assert tp.bandwidth > 10e9 and tp.overhead < 1e-3 and tp.node_overhead < 1e-3
    assert calibrate.implausible(tp) == []


def test_a_busy_new_process_uses_the_untrusted_table_on_file(tmp_path, rounds, monkeypatch):
    """Measuring again while the machine is still busy would fare no better (and cost a
    `kql -c` 10-30 s): the last untrusted table serves, marked so; once the machine is
    quiet, or the table is old, it is measured again; a trusted one never gives way."""
    rounds.set([(busy_round, True)])
    first = calibrate.throughput("cpu", str(tmp_path))
    calibrate._cache.clear()                                   # a new process, still busy
    monkeypatch.setenv("KQL_CONTENTION", "busy")
    again = calibrate.throughput("cpu", str(tmp_path))
    assert rounds.ran == first.rounds and not again.trusted and again.dense == first.dense
    calibrate._cache.clear()                                   # quiet now: measured again
    rounds.set([(quiet_round, False)])
    monkeypatch.setenv("KQL_CONTENTION", "quiet")
    assert calibrate.throughput("cpu", str(tmp_path)).trusted and rounds.ran > first.rounds
    ran = rounds.ran
    rounds.set([(busy_round, True)])                           # CALIBRATE under load
    assert not calibrate.throughput("cpu", str(tmp_path), refresh=True).trusted
    calibrate._cache.clear()
    assert calibrate.throughput("cpu", str(tmp_path)).trusted and rounds.ran > ran
    stored = json.loads((tmp_path / calibrate.FILE).read_text())
    assert stored[calibrate.device_key("cpu")]["trusted"] is True


def test_one_quiet_round_makes_the_merged_table_trusted(tmp_path, rounds):
    """Each entry keeps its best round: another process only ever slows a timing down."""
    rounds.set([(busy_round, True), (quiet_round, False)])
    tp = calibrate.throughput("cpu", str(tmp_path))
    assert tp.trusted and (tp.rounds, tp.quiet_rounds) == (2, 1)
    assert tp.bandwidth == prior.CPU["bandwidth"] and tp.dense[2] == prior.CPU["dense"][2]
    assert tp.overhead == prior.CPU["overhead"] and not tp.repaired
    assert (tmp_path / calibrate.FILE).exists()


def test_rounds_go_on_while_every_round_is_busy(rounds):
    rounds.set([(busy_round, True)] * 2 + [(quiet_round, False)])
    tp = calibrate.measure("cpu")
    assert rounds.ran == 3 == calibrate.MAX_ROUNDS and tp.trusted


def test_slumps_in_the_convolution_table_are_implausible():
    """Rates grow with the work per call; 150 -> 52 -> 108 GMAC/s between neighbouring
    sizes is a table no CPU produces, even with no prior to compare with (a GPU)."""
    table = quiet_round("cuda")
    table.dense[1] = [15e9, 150e9, 52e9, 108e9, 200e9]
    table.depthwise = [1e9, 9e9, 2e9, 45e9, 87e9]
    assert calibrate.implausible(table) == ["dense[7]", "depthwise[2]"]
    assert calibrate.implausible(quiet_round("cuda")) == []


def test_a_slower_cpu_of_the_same_shape_is_plausible():
    """The prior gives proportions, not speed: a CPU 5x slower throughout is sound."""
    table = quiet_round()
    slow = calibrate.Throughput(**{
        **dataclasses.asdict(table),
        "dense": [[r / 5 for r in row] for row in table.dense],
        "depthwise": [r / 5 for r in table.depthwise],
        **{k: getattr(table, k) / 5 for k in calibrate._RATES},
        **{k: getattr(table, k) * 5 for k in calibrate._SECONDS}})
    assert calibrate.implausible(slow) == []


def test_an_untrusted_table_is_measured_again_at_a_quiet_moment(rounds, monkeypatch):
    rounds.set([(busy_round, True)])
    first = calibrate.throughput("cpu")
    assert not first.trusted
    assert calibrate.throughput("cpu") is first               # not at once
    monkeypatch.setattr(first, "measured_at", first.measured_at - calibrate.RETRY_SECONDS - 1)
    monkeypatch.setenv("KQL_CONTENTION", "busy")
    assert calibrate.throughput("cpu") is first               # not while busy
    rounds.set([(quiet_round, False)])
    monkeypatch.setenv("KQL_CONTENTION", "quiet")
    assert calibrate.throughput("cpu").trusted


# -- 2. no refusal on a bad guess --------------------------------------------------------------

@pytest.fixture
def con():
    image = smooth_noise_image(40, 44)
    c = kql.connect()
    c.register_model("net", sensitive(small_cnn(), image))
    c.register_image("img", image)
    return c


QUERY = "OCCLUDE img USING net PATCH 8 STRIDE 4 BATCH 16"


def test_an_untrusted_prediction_runs_with_a_warning(con, rounds):
    rounds.set([(busy_round, True)])
    calibrate.throughput("cpu")
    con.execute("SET confirm_seconds = 0")
    out, err = io.StringIO(), io.StringIO()
    assert Runner(con, out=out, err=err).run(QUERY + ";") == 0        # kql -c: no one to ask
    assert re.match(r"warning: OCCLUDE is predicted to run \d+ s \(\d+ s to \d+ s\) from a "
                    r"calibration measured under load, not trusted: running it", err.getvalue())
    plan = con.execute("EXPLAIN " + QUERY).plan
    assert "calibration=untrusted" in plan.splitlines()[1]


def test_a_trusted_prediction_is_refused_with_its_range(con, rounds):
    rounds.set([(quiet_round, False)])
    calibrate.throughput("cpu")
    con.execute("SET confirm_seconds = 0")
    err = io.StringIO()
    assert Runner(con, out=io.StringIO(), err=err).run(QUERY + ";") == 1
    assert re.search(r"not run: OCCLUDE is predicted to run \d+ s \(\d+ s to \d+ s; over "
                     r"confirm_seconds = 0\)", err.getvalue()), err.getvalue()
    assert "calibration=" not in con.execute("EXPLAIN " + QUERY).plan


# -- 3. predictions learn from scans -----------------------------------------------------------

def _predicted(con, query=QUERY) -> tuple:
    line = con.execute("EXPLAIN " + query).plan.splitlines()[1]
    found = re.search(r"corrected=x([\d.]+) \((\d+) scans?", line)
    return line, (float(found.group(1)), int(found.group(2))) if found else None


def test_feedback_moves_predictions_toward_observed_times(con):
    """Each scan records observed/predicted; the next plan of that shape is multiplied
    by the median of those ratios, and EXPLAIN says by how many scans."""
    con.execute("SET strategy = 'incremental'")        # one kind: the choice is not the subject
    line, corrected = _predicted(con)
    assert corrected is None and "corrected=" not in line
    plan = kql.executor.plan(con, kql.language.parser.parse(QUERY)[0], QUERY)
    base = plan.run_seconds
    assert plan.learner is not None and plan.correction.scans == 0
    kind, shape, per_item, _ = plan.learner.expected[0]
    count = plan.query.grid.count * 100             # three long scans, as a fake clock times them
    for ratio in (4.0, 2.0, 3.0):
        plan.learner.learn((), ratio * per_item * count, count)
    again = kql.executor.plan(con, kql.language.parser.parse(QUERY)[0], QUERY)
    assert again.correction.scans == 3 and again.correction.factor == pytest.approx(3.0)
    assert again.run_seconds == pytest.approx(3.0 * base, rel=1e-6)
    assert _predicted(con)[1] == (3.0, 3)
    assert again.trusted and again.correction.settled
    low, high = again.run_range                     # the spread of what the scans took
    assert low == pytest.approx(2.0 * base, rel=1e-6) and high == pytest.approx(4.0 * base, rel=1e-6)


def test_a_real_scan_records_its_ratio(con, monkeypatch):
    monkeypatch.setattr(feedback, "MIN_SECONDS", 0.0)      # this scan is short
    con.execute("SET strategy = 'naive'")
    con.execute(QUERY)
    line, corrected = _predicted(con)
    assert corrected is not None and corrected[1] == 1, line
    stored = json.loads(open(os.path.join(calibrate.cache_dir(), feedback.FILE)).read())
    assert stored["version"] == feedback.VERSION and len(stored["entries"]) == 2   # shape, kind
    con.execute("EXPLAIN ANALYZE " + QUERY)           # hooks slow it: it teaches nothing
    assert _predicted(con)[1][1] == 1


def test_a_short_scan_teaches_nothing(con):
    plan = kql.executor.plan(con, kql.language.parser.parse(QUERY)[0], QUERY)
    assert plan.learner.learn((), feedback.MIN_SECONDS / 2, plan.query.grid.count) == []
    assert plan.learner.learn((), feedback.MIN_SECONDS * 2, plan.query.grid.count) != []


def test_one_wild_scan_cannot_swing_the_median():
    store = feedback.Feedback(None)
    for ratio in (1.0, 1.1, 1e6, 0.9, 1.0):
        store.record("cpu", "NaiveOcclusion", "s", ratio)
    found = store.correction("cpu", "NaiveOcclusion", "s")
    assert found.factor == 1.0 and found.high == feedback.CLIP and found.scans == 5
    for ratio in (2.0,) * feedback.KEEP:               # the machine changed: it follows
        store.record("cpu", "NaiveOcclusion", "s", ratio)
    assert store.correction("cpu", "NaiveOcclusion", "s").factor == 2.0


def test_a_whole_kind_is_corrected_after_enough_scans():
    store = feedback.Feedback(None)
    store.record("cpu", "IncrementalOcclusion", "a", 0.1)
    store.record("cpu", "IncrementalOcclusion", "b", 0.1)
    assert store.correction("cpu", "IncrementalOcclusion", "c").scans == 0
    store.record("cpu", "IncrementalOcclusion", "d", 0.1)
    assert store.correction("cpu", "IncrementalOcclusion", "c") == feedback.Correction(0.1, 3, "kind", 0.1, 0.1)
    assert store.correction("cpu", "NaiveOcclusion", "c").scans == 0


def test_a_kind_s_correction_expires_a_shape_s_stays(tmp_path, monkeypatch):
    """Scans slowed x50 by a busy spell teach the kind; once the spell is KIND_TTL past,
    unseen shapes are predicted by the table again, while the shapes that ran keep theirs."""
    store = feedback.Feedback(str(tmp_path))
    for shape in "abc":
        store.record("cpu", "IncrementalOcclusion", shape, 50.0)
    assert store.correction("cpu", "IncrementalOcclusion", "unseen").factor == 50.0
    later = time.time() + feedback.KIND_TTL + 1
    monkeypatch.setattr(feedback.time, "time", lambda: later)
    fresh = feedback.Feedback(str(tmp_path))
    assert fresh.correction("cpu", "IncrementalOcclusion", "unseen").scans == 0
    assert fresh.correction("cpu", "IncrementalOcclusion", "a").factor == 50.0


def test_feedback_files_that_cannot_be_read_or_written(tmp_path):
    (tmp_path / feedback.FILE).write_text("{not json")
    store = feedback.Feedback(str(tmp_path))
    assert store.correction("cpu", "NaiveOcclusion", "s").scans == 0
    store.record("cpu", "NaiveOcclusion", "s", 2.0)
    assert json.loads((tmp_path / feedback.FILE).read_text())["version"] == feedback.VERSION
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    stuck = feedback.Feedback(str(blocker / "kql"))
    stuck.record("cpu", "NaiveOcclusion", "s", 2.0)            # kept in this process, no error
    assert stuck.correction("cpu", "NaiveOcclusion", "s").scans == 1
    assert blocker.read_text() == "not a folder"


def test_calibrate_forgets_the_feedback_of_the_old_table(tmp_path, rounds):
    rounds.set([(quiet_round, False)])
    con = kql.connect(str(tmp_path))
    store = feedback.Feedback(str(tmp_path))
    store.record(calibrate.device_key("cpu"), "NaiveOcclusion", "s", 2.0)
    store.record("cuda:another", "NaiveOcclusion", "s", 2.0)
    con.execute("CALIBRATE")
    feedback._memory.clear()                                     # as a new process reads it
    assert store.correction(calibrate.device_key("cpu"), "NaiveOcclusion", "s").scans == 0
    assert store.correction("cuda:another", "NaiveOcclusion", "s").scans == 1


def _plans(con, text) -> tuple:
    """The naive plan (forced) and the default plan of ``text``."""
    con.execute("SET strategy = 'naive'")
    naive = kql.executor.plan(con, kql.language.parser.parse(text)[0], text)
    con.execute("SET strategy = 'auto'")
    return naive, kql.executor.plan(con, kql.language.parser.parse(text)[0], text)


def test_the_other_operator_borrows_a_correction_under_load(con, monkeypatch):
    """Scans timed only the chosen plan, 4x slower than priced (a busy machine slows every
    plan alike): the other plan is corrected as much, and the choice stands."""
    from kql.planner import naive_shortcut

    monkeypatch.setattr(naive_shortcut, "SMALL_IMAGE", 0)      # traced: both plans priced
    text = QUERY.replace("STRIDE 4", "STRIDE 1")            # 77 batches: a watched scan
    before = kql.executor.plan(con, kql.language.parser.parse(text)[0], text)
    assert before.operator.describe()["watch"] in ("naive", "incremental")
    name, shape, _, _ = before.learner.expected[0]
    for _ in range(3):
        before.learner.store.record(before.learner.device, name, shape, 4.0)
    after = kql.executor.plan(con, kql.language.parser.parse(text)[0], text)
    assert after.operator.name == before.operator.name
    assert after.operator.expected == pytest.approx(tuple(4 * e for e in before.operator.expected))
    assert "corrected=x4.00 (3 scans)" in after.explain()[1]


def test_a_kind_s_correction_is_lent_too(con, monkeypatch):
    """Busy scans of other models' incremental plans (a kind corrected x12) and no naive
    scan yet: the naive plan of a new model borrows x12; the choice is the cost model's."""
    from kql.planner import naive_shortcut

    monkeypatch.setattr(naive_shortcut, "SMALL_IMAGE", 0)
    text = QUERY.replace("STRIDE 4", "STRIDE 1")
    before = kql.executor.plan(con, kql.language.parser.parse(text)[0], text)
    for n in range(3):
        before.learner.store.record(before.learner.device, "IncrementalOcclusion", f"other {n}", 12.0)
    after = kql.executor.plan(con, kql.language.parser.parse(text)[0], text)
    assert after.operator.name == before.operator.name
    assert after.operator.expected == pytest.approx(tuple(12 * e for e in before.operator.expected))


def test_feedback_flips_a_plan_the_cost_model_got_wrong(con):
    """The naive plan observed 10x slower than priced on this shape while incremental
    scans elsewhere ran as priced: the cost model is wrong about naive here, and the next
    plan is incremental."""
    text = QUERY.replace("BATCH 16", "BATCH 4")
    naive, auto = _plans(con, text)
    _, shape, _, _ = naive.learner.expected[0]
    store, device = naive.learner.store, naive.learner.device
    for n in range(3):
        store.record(device, "NaiveOcclusion", shape, 10.0)
        store.record(device, "IncrementalOcclusion", f"another shape {n}", 1.0)
    flipped = kql.executor.plan(con, kql.language.parser.parse(text)[0], text)
    assert flipped.operator.name == "IncrementalOcclusion"
    assert flipped.correction.scope == "kind"


# -- 4. trial outcomes measured under contention serve their scan only -------------------------

def test_a_layout_trial_under_contention_is_not_kept(monkeypatch):
    from kql.operators.layout import Kept, LayoutTrial

    for signal, kept_after in (("busy", None), ("quiet", "contiguous")):
        monkeypatch.setenv("KQL_CONTENTION", signal)
        kept = Kept({}, ("net", 16))
        trial = LayoutTrial(batches=10, kept=kept)
        trial.record(trial.next()[1], 2.0, 16)
        trial.record(trial.next()[1], 1.0, 16)
        assert trial.chosen == "contiguous" and kept.layout == kept_after


def test_the_cpu_share_tells_contention_apart():
    from kql.operators import contention

    ticks = iter([0.0, 1.0, 0.0, 1.0])
    cpu = iter([0.0, 1.8, 0.0, 0.4])
    meter = contention.CpuMeter(2, clock=lambda: next(ticks), cpu_clock=lambda: next(cpu))
    assert meter.start().share() == pytest.approx(0.9)
    assert meter.start().share() == pytest.approx(0.2)
    assert not contention.judged(0.9, busy_now=True) and contention.judged(0.2, busy_now=False)
    assert contention.judged(None, busy_now=True) and not contention.judged(None, busy_now=False)
