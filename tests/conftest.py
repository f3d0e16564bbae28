"""pytest set-up and shared fixtures. The helpers live in ``helpers`` (images,
``sensitive``, the plain occlusion loop) and ``models_zoo`` (the models)."""

import os
import tempfile

import pytest
import torch

from models_zoo import sensitive_small_cnn


def pytest_configure(config):
    # Calibrations of in-memory catalogs go to a cache of this test run (shared with the
    # CLI subprocesses), never to the user's ~/.cache/kql.
    os.environ["KQL_CACHE_DIR"] = tempfile.mkdtemp(prefix="kql-test-cache-")
    seed_calibration()


def seed_calibration() -> None:
    """The CPU table of this run, at 1 and 2 threads: the prior KQL ships (a quiet
    machine's table), trusted, in this process and in the run's cache file (the CLI
    subprocesses read it). Plans then price the same way whatever the machine's load
    while the suite runs; tests of measuring itself (tests/test_calibrate.py,
    tests/test_robust_planning.py) clear it and measure, or inject their own."""
    import copy
    import dataclasses

    from kql.planner import calibrate, prior

    for threads in (1, 2):
        with calibrate.threads(threads):
            key = calibrate.device_key("cpu")
        table = calibrate.Throughput(device="cpu", threads=threads, **copy.deepcopy(prior.CPU))
        calibrate._cache[key] = table
        calibrate._store(os.path.join(os.environ["KQL_CACHE_DIR"], calibrate.FILE), key,
                         dataclasses.asdict(table))


@pytest.fixture(autouse=True)
def seeded_tables():
    """Each test ends with this process's calibration tables as it found them: a test of
    measuring that leaves its own (a flat synthetic table, a measured one) in the cache
    would otherwise price the plans of the tests after it."""
    from kql.planner import calibrate

    before = dict(calibrate._cache)
    yield
    calibrate._cache.clear()
    calibrate._cache.update(before)


@pytest.fixture(autouse=True)
def no_lasting_layouts(monkeypatch):
    """No layout trial outcome is kept across connections unless a test asks for it
    (tests/test_lasting_layouts.py passes its own quiet-machine check): in this process
    every machine counts as busy, and each test starts without the outcomes a CLI
    subprocess of an earlier test kept in the run's cache. Whether a plan runs a trial
    stays the test's own business, whatever the load of the machine."""
    from kql.planner import layout_file

    monkeypatch.setattr(layout_file, "machine_busy", lambda: True)
    path = os.path.join(os.environ["KQL_CACHE_DIR"], "layouts.json")
    if os.path.exists(path):
        os.remove(path)
    yield


@pytest.fixture(autouse=True)
def float32_pace(monkeypatch):
    """Reduced precision measured as fast as float32 (``$KQL_PRECISION_RATIO``, inherited
    by the CLI subprocesses), none kept from an earlier test: a WITH SSIM plan, which may
    run bfloat16 where it pays, does not depend on this CPU's bfloat16 or its load.
    tests/test_precision.py measures and injects its own ratios."""
    from kql.planner import precision

    monkeypatch.setenv("KQL_PRECISION_RATIO", "1")
    precision._cache.clear()
    path = os.path.join(os.environ["KQL_CACHE_DIR"], precision.FILE)
    if os.path.exists(path):
        os.remove(path)
    yield


@pytest.fixture(autouse=True)
def no_scan_feedback(monkeypatch):
    """Each test starts without the observed/predicted ratios of earlier tests' scans
    (planner/feedback.py), and measures as on a quiet machine (operators/contention.py)
    unless it says otherwise: what a plan predicts and keeps does not depend on the test
    order or on the machine's load. tests/test_robust_planning.py tests both."""
    from kql.planner import feedback

    monkeypatch.setenv("KQL_CONTENTION", "quiet")
    path = os.path.join(os.environ["KQL_CACHE_DIR"], feedback.FILE)
    if os.path.exists(path):
        os.remove(path)
    feedback._memory.clear()
    yield
    feedback._memory.clear()


@pytest.fixture
def small_model():
    return sensitive_small_cnn()


@pytest.fixture(scope="module")
def one_thread():
    """Run this module on one intra-op thread, then restore the setting.

    The tensors here are small, so a second thread gains little; but when another
    process holds one of two cores, OpenMP's barriers made a 2-thread forward pass
    10-60x slower on the shared development machine (DenseNet: 0.07 s -> 4 s).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
