"""Fewer threads while other work holds the cores (operators/pacing.py): decided batch by
batch on a fake clock, for the scan only; and a real scan paced on a simulated contended
machine still gives the plain loop's map and leaves torch's thread count as it was."""

from __future__ import annotations

import numpy as np
import torch

import kql
from helpers import plain_heatmap, sensitive, smooth_noise_image
from kql.operators.pacing import ThreadPacer
from models_zoo import small_cnn


class Machine:
    """A fake clock and CPU clock: each batch takes ``seconds(threads)`` per position and
    gets ``share`` of its threads' CPU."""

    def __init__(self, seconds, share):
        self.seconds, self.share = seconds, share
        self.wall = self.cpu = 0.0
        self.threads = 2

    def batch(self, pacer, done, items=16):
        took = self.seconds(self.threads) * items
        self.wall += took
        self.cpu += took * self.threads * self.share(self.threads)
        pacer(done, None)

    def set_threads(self, n):
        self.threads = n


def run(machine, batches=20):
    pacer = ThreadPacer(2, batches, clock=lambda: machine.wall, cpu_clock=lambda: machine.cpu,
                        set_threads=machine.set_threads)
    for b in range(1, batches + 1):
        machine.batch(pacer, 16 * b)
    return pacer


def test_a_quiet_machine_keeps_every_thread(monkeypatch):
    monkeypatch.delenv("KQL_CONTENTION")                  # the share decides
    pacer = run(Machine(lambda t: 0.01 / t, lambda t: 0.95))
    assert pacer.history == [] and pacer.current == 2


def test_a_contended_machine_goes_to_one_thread_and_stays_while_it_pays(monkeypatch):
    monkeypatch.delenv("KQL_CONTENTION")
    # Two threads beside other work: each batch waits for the descheduled one (4x slower).
    pacer = run(Machine(lambda t: 0.04 if t == 2 else 0.015, lambda t: 0.25 if t == 2 else 0.9))
    assert pacer.history[:2] == [(3, 2, 1, "probe (contended)"), (4, 2, 1, "kept")]
    # Later probes of both threads lose and back off: 4 -> 7 (probe) -> back, then 6 later.
    assert [h for h in pacer.history if h[3] == "probe (again)"][0][0] == 7
    assert [h[0] for h in pacer.history if h[3] == "probe (again)"] == [7, 14]
    assert pacer.current == 1


def test_one_thread_that_does_not_pay_is_dropped_and_tried_less_often(monkeypatch):
    monkeypatch.delenv("KQL_CONTENTION")
    pacer = run(Machine(lambda t: 0.04 if t == 2 else 0.07, lambda t: 0.3), batches=40)
    probes = [h[0] for h in pacer.history if h[3].startswith("probe")]
    assert probes == [3, 10, 23] and pacer.current == 2      # gaps 6, 12 after each loss


def test_the_machine_gone_quiet_gets_its_threads_back(monkeypatch):
    monkeypatch.delenv("KQL_CONTENTION")
    quiet_after = 8
    state = {"batch": 0}

    def seconds(t):
        state["batch"] += 1
        busy = state["batch"] <= quiet_after
        return (0.04 if t == 2 else 0.015) if busy else (0.005 if t == 2 else 0.009)
    pacer = run(Machine(seconds, lambda t: 0.25 if state["batch"] <= quiet_after else 0.95))
    assert pacer.current == 2 and pacer.history[-1][3] == "kept" and pacer.history[-1][2] == 2


def test_no_probe_near_the_end_or_on_one_thread(monkeypatch):
    monkeypatch.delenv("KQL_CONTENTION")
    slow = Machine(lambda t: 0.04 if t == 2 else 0.01, lambda t: 0.2)
    assert run(slow, batches=4).history == []             # batch 3 would leave 1 batch
    one = ThreadPacer(1, 20)
    for b in range(1, 21):
        one(16 * b, None)
    assert one.history == [] and one.current == 1


def test_a_paced_scan_is_the_plain_loop_s_map_and_restores_the_threads(monkeypatch):
    """Every batch counts as contended (KQL_CONTENTION=busy): the scan probes one thread,
    and whatever it keeps, the map is the plain loop's and torch's count is restored."""
    monkeypatch.setenv("KQL_CONTENTION", "busy")
    image = smooth_noise_image(40, 44)
    net = sensitive(small_cnn(), image)
    con = kql.connect()
    con.register_model("net", net)
    con.register_image("img", image)
    before = torch.get_num_threads()
    with torch.inference_mode():
        for strategy in ("naive", "incremental"):
            con.execute(f"SET strategy = '{strategy}'")
            result = con.execute("OCCLUDE img USING net PATCH 8 STRIDE 2 BATCH 8 COLOR black")
            expected, _ = plain_heatmap(net, image, (8, 8), (2, 2), (0.0, 0.0, 0.0))
            np.testing.assert_allclose(result.heatmap, expected, atol=1e-5)
            assert torch.get_num_threads() == before
            if before > 1:
                plan = kql.executor.plan(con, kql.language.parser.parse(
                    "OCCLUDE img USING net PATCH 8 STRIDE 2 BATCH 8 COLOR black")[0], "")
                out = plan.run()
                assert out.paced and out.paced[0][1:] == (before, 1, "probe (contended)")
