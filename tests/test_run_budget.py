"""While a query runs (issue 13): torch's out-of-memory errors halve the batch or are one
line, the scores kept per position hold no batch's logits, and a run predicted longer than
``SET confirm_seconds`` warns (API), asks (shell) or is refused (KQL text, no one to ask)."""

from __future__ import annotations

import gc
import io
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import kql
from helpers import SMALL_QUERY as QUERY
from helpers import image_connection, smooth_noise_image
from kql import shell
from kql.api import KqlWarning
from kql.operators.batches import scan
from kql.operators.task import OcclusionTask
from kql.settings import Settings
from kql.shell import Runner, Shell

pytestmark = pytest.mark.usefixtures("one_thread")     # small tensors: see conftest


@pytest.fixture
def con(small_model):
    return image_connection(model=small_model)


# -- 1. torch's out-of-memory errors -----------------------------------------------------------

class FailsOnBatches(nn.Module):
    """Fine on one image (planning), raises ``error()`` on a batch (torch.fx cannot trace
    the branch: the plain loop runs it); with ``always``, on every call from the first
    batch on (memory taken by someone else mid-query: not even one position fits)."""

    def __init__(self, error, always: bool = False):
        super().__init__()
        self.error, self.always, self.armed = error, always, False
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        if x.shape[0] > 1 or self.armed:        # (the tracer's Proxy fails here: untraceable)
            self.armed = self.always
            self.error()
        return self.head(x.mean((2, 3)))


def _allocate_a_petabyte():
    torch.empty(1 << 48, dtype=torch.float32)             # 1 PB: refused at once, nothing touched


def _raise(exc):
    def error():
        raise exc
    return error


ERRORS = [
    _allocate_a_petabyte,
    _raise(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")),
    _raise(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough "
                        "memory: you tried to allocate 9 bytes")),
    _raise(MemoryError()),
]
IDS = ["cpu-allocator", "cuda", "not-enough", "python"]


@pytest.mark.parametrize("error", ERRORS, ids=IDS)
def test_out_of_memory_halves_the_batch_and_goes_on(error):
    con = kql.connect()
    con.register_model("net", FailsOnBatches(error))
    con.register_image("img", smooth_noise_image(24, 30))
    runner = Runner(con, out=io.StringIO(), err=io.StringIO())
    assert runner.run(QUERY + " BATCH 4") == shell.EXIT_OK, runner.err.getvalue()
    assert "out of memory at batch 4, then 2: went on at batch 1" in runner.out.getvalue()


@pytest.mark.parametrize("error", ERRORS, ids=IDS)
def test_out_of_memory_at_one_position_is_one_line(error):
    con = kql.connect()
    con.register_model("net", FailsOnBatches(error, always=True))
    con.register_image("img", smooth_noise_image(24, 30))
    runner = Runner(con, out=io.StringIO(), err=io.StringIO())
    assert runner.run(QUERY + " BATCH 4") == shell.EXIT_FAILED
    err = runner.err.getvalue()
    assert err.startswith("error: out of memory running model 'net' even at batch 1 "
                          "(halved from 4; predicted "), err
    assert "free memory, or occlude a smaller image" in err and err.count("\n") == 1, err


def test_out_of_memory_at_batch_one_does_not_say_halved():
    con = kql.connect()
    net = FailsOnBatches(ERRORS[1], always=True)
    con.register_model("net", net)
    con.register_image("img", smooth_noise_image(24, 30))
    runner = Runner(con, out=io.StringIO(), err=io.StringIO())
    calls = []              # armed from the second call on: the planner's run is past

    def arm(module, args):
        calls.append(args[0].shape[0])
        module.armed = len(calls) > 1

    net.register_forward_pre_hook(arm)
    assert runner.run(QUERY + " BATCH 1") == shell.EXIT_FAILED
    err = runner.err.getvalue()
    assert err.startswith("error: out of memory running model 'net' even at batch 1 "
                          "(predicted "), err


def test_other_runtime_errors_still_blame_the_model():
    con = kql.connect()
    con.register_model("net", FailsOnBatches(_raise(RuntimeError("mat1 and mat2 shapes cannot "
                                                                  "be multiplied"))))
    con.register_image("img", smooth_noise_image(24, 30))
    with pytest.raises(kql.KqlModelError, match="model 'net' failed on the .* mat1 and mat2"):
        con.execute(QUERY + " BATCH 4")


# -- 2. the scores kept per position -------------------------------------------------------------

def _live_storage_bytes() -> int:
    """Bytes of the distinct tensor storages alive in this process."""
    seen = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")               # isinstance on torch's deprecated names
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for t in tensors:
        if t.device.type == "cpu" and not t.is_meta:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class StorageMeter:
    """A progress callback: live storage at the first and the last batch."""

    def __init__(self):
        self.first = self.last = None

    def __call__(self, done, total):
        if self.first is None:
            self.first = _live_storage_bytes()
        elif done == total:
            self.last = _live_storage_bytes()

    @property
    def growth(self) -> int:
        return self.last - self.first


def test_scan_keeps_o_positions_bytes_not_o_positions_x_classes():
    positions, classes = 2000, 1000
    task = OcclusionTask(nn.Identity(), torch.zeros(3, 4, 4), torch.zeros(3), (1, 1),
                         np.zeros(positions, np.int64), np.zeros(positions, np.int64))
    meter = StorageMeter()
    out = scan(task, torch.zeros(classes), 50, lambda items: torch.randn(items.stop - items.start,
                                                                          classes), meter)
    assert out.probabilities.shape == (positions,)
    # Kept views of [batch, classes] would grow by 2 x positions x classes x 4 = 16 MB.
    assert meter.growth < 64 * positions, meter.growth


@pytest.mark.parametrize("strategy", ["naive", "incremental"])
def test_a_long_map_with_a_1000_class_head_does_not_grow(strategy):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 1000)).eval()
    con = kql.connect()
    con.register_model("net", net)
    con.register_image("img", smooth_noise_image(32, 32))
    con.execute(f"SET strategy = '{strategy}'")
    meter = StorageMeter()
    result = con.execute("OCCLUDE img USING net PATCH 2 STRIDE 1 BATCH 16", progress=meter)
    positions = result.heatmap.size                      # 31 x 31 = 961
    assert meter.growth < 64 * positions, meter.growth   # views: 961 x 1000 x 8 = 7.7 MB


# -- 3. long runs are confirmed ----------------------------------------------------------------

def test_the_api_warns_and_runs(con):
    con.execute("SET confirm_seconds = 0")
    with pytest.warns(KqlWarning, match=r"^OCCLUDE is predicted to run \d+ s \(\d+ s to \d+ s; "
                                        r"over confirm_seconds = 0\); running it") as caught:
        result = con.execute(QUERY)
    assert result.heatmap.shape == (5, 6)
    assert caught[0].filename == __file__               # it names the caller's line
    con.execute("SET confirm_seconds = none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        con.execute(QUERY)
        con.execute("SET confirm_seconds = 600")           # the default: a quick map is quiet
        con.execute(QUERY)


def test_confirm_seconds_values_are_checked():
    s = Settings()
    assert s["confirm_seconds"] == 600
    for value in ("none", 0, 3600, 0.5):
        s.set("confirm_seconds", value)
    for bad in (-1, "never", "600"):
        with pytest.raises(kql.KqlPlanError, match="confirm_seconds must be 'none' or a number"):
            s.set("confirm_seconds", bad)


def _runner(con, ask=None):
    return Runner(con, out=io.StringIO(), err=io.StringIO(), ask=ask)


def test_kql_text_with_no_one_to_ask_is_refused(con):
    """``kql -c``, files and piped input: a clear line saying how to go on."""
    runner = _runner(con)
    status = runner.run(f"SET confirm_seconds = 0;\n{QUERY};\nSHOW MODELS;")
    assert status == shell.EXIT_FAILED
    err = runner.err.getvalue().splitlines()
    assert err[0].startswith("error: line 2, column 1: not run: OCCLUDE is predicted to run ")
    assert err[0].endswith("no one to confirm it here; to run it, SET confirm_seconds = none first")
    assert err[1:] == ["  " + QUERY + ";", "  ^"]
    assert runner.out.getvalue() == "confirm_seconds = 0\n"        # nothing after it ran


def test_piped_shell_input_is_refused(con):
    runner = _runner(con)
    status = shell.piped(Shell(runner), io.StringIO(f"SET confirm_seconds = 0;\n{QUERY};\n"))
    assert status == 0                                 # the shell goes on after an error
    assert "not run: OCCLUDE is predicted" in runner.err.getvalue()
    assert "heat map" not in runner.out.getvalue().lower()


@pytest.mark.parametrize("answer,runs", [("y", True), ("YES", True), ("n", False), ("", False)])
def test_the_shell_asks_default_no(con, answer, runs):
    questions = []

    def ask(question):
        questions.append(question)
        return answer
    runner = _runner(con, ask)
    runner.run(f"SET confirm_seconds = 0; {QUERY};")
    assert len(questions) == 1 and questions[0].endswith("). Run it? [y/N] ")
    assert (runner.err.getvalue() == "") == runs, runner.err.getvalue()
    assert ("heat map 5x6" in runner.out.getvalue()) == runs
    if not runs:
        assert runner.err.getvalue().startswith("error: line 1, column 26: not run (answered no): "
                                                "OCCLUDE is predicted to run ")
        assert "; SET confirm_seconds = none to skip the question" in runner.err.getvalue()


def test_the_interactive_shell_asks_at_its_prompt(con):
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    runner = _runner(con)
    with create_pipe_input() as keys:
        keys.send_text(f"SET confirm_seconds = 0;\r{QUERY};\ry\r{QUERY};\rn\r\\q\r")
        status = shell.interactive(Shell(runner), input=keys, output=DummyOutput())
    assert status == 0
    out = runner.out.getvalue()
    assert out.startswith("confirm_seconds = 0\n") and out.count("heat map 5x6") == 1, out
    assert runner.err.getvalue().count("not run (answered no):") == 1, runner.err.getvalue()


def test_explain_analyze_is_confirmed_too_and_explain_is_not(con):
    runner = _runner(con)
    assert runner.run(f"SET confirm_seconds = 0; EXPLAIN {QUERY};") == shell.EXIT_OK
    assert runner.run(f"EXPLAIN ANALYZE {QUERY};") == shell.EXIT_FAILED
    assert "not run: OCCLUDE is predicted" in runner.err.getvalue()


def test_cli_command_refuses_a_long_run(tmp_path):
    from PIL import Image

    path = tmp_path / "img.png"
    Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(path)
    proc = subprocess.run(
        [sys.executable, "-m", "kql", "--no-progress", "-c",
         f"SET confirm_seconds = 0; OCCLUDE '{path}' USING efficientnet_lite0 PATCH 56 STRIDE 56"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "not run: OCCLUDE is predicted to run" in proc.stderr
    assert "SET confirm_seconds = none first" in proc.stderr and "Traceback" not in proc.stderr
