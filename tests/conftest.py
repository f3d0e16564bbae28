"""pytest set-up and shared fixtures. The helpers live in ``helpers`` (images,
``sensitive``, the plain occlusion loop) and ``models_zoo`` (the models)."""

import os
import tempfile

import pytest

from models_zoo import sensitive_small_cnn


def pytest_configure(config):
    # Calibrations of in-memory catalogs go to a cache of this test run (shared with the
    # CLI subprocesses), never to the user's ~/.cache/kql.
    os.environ["KQL_CACHE_DIR"] = tempfile.mkdtemp(prefix="kql-test-cache-")


@pytest.fixture
def small_model():
    return sensitive_small_cnn()
