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


@pytest.fixture(autouse=True)
def no_lasting_layouts(monkeypatch):
    """No layout trial outcome is kept across connections unless a test asks for it
    (tests/test_lasting_layouts.py passes its own quiet-machine check): in this process
    every machine counts as busy, and each test starts without the outcomes a CLI
    subprocess of an earlier test kept in the run's cache. Whether a plan runs a trial
    stays the test's own business, whatever the load of the machine."""
    from kql.planner import lasting

    monkeypatch.setattr(lasting, "machine_busy", lambda: True)
    path = os.path.join(os.environ["KQL_CACHE_DIR"], "layouts.json")
    if os.path.exists(path):
        os.remove(path)
    yield


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
