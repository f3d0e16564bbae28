"""A batch that runs out of memory is halved and the query goes on (simulated OOM).

An allocator failure is simulated where it would happen: in the model's forward pass
(the naive operator) and in the incremental engine's context gathering. Every map must
still equal the exact map, and the halving must be reported (Result, shell text,
EXPLAIN ANALYZE); an error that is not about memory is never retried.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.fx
from torch import nn

import kql
from helpers import blob_image, calibrate_batchnorm, residual_connection, sensitive
from kql.operators import gather as g
from models_zoo import custom_model

pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 64, 80
QUERY = "OCCLUDE img USING net PATCH 12 STRIDE 8 COLOR black BATCH 16"


class Fails(nn.Module):
    """``inner``, except that a batch of more than ``fits`` images raises ``error`` (and
    with ``every``, every call from the first batch of more than one image on: the
    planner's passes on the unoccluded image fit, then nothing does)."""

    def __init__(self, inner: nn.Module, fits: int, error: Exception, every: bool = False):
        super().__init__()
        self.inner, self.fits, self.error, self.every = inner, fits, error, every
        self.batches: list = []

    def forward(self, x):            # torch.fx cannot trace the test: the model runs naive
        if isinstance(x, torch.fx.Proxy):
            raise torch.fx.proxy.TraceError("data-dependent control flow")
        self.batches.append(x.shape[0])
        if self.every and x.shape[0] > 1:
            self.fits = 0
        if x.shape[0] > self.fits:
            raise self.error
        return self.inner(x)


def oom() -> Exception:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.fixture(scope="module")
def exact():
    return residual_connection(H, W).execute(QUERY).heatmap


def connection(model: nn.Module) -> kql.Connection:
    c = kql.connect()
    c.register_model("net", model)
    c.register_image("img", blob_image(H, W, seed=5))
    c.execute("SET strategy = 'naive'")
    return c


def test_naive_halves_a_batch_that_runs_out_of_memory(exact):
    net = residual_connection(H, W).catalog.resolve_model("net").module
    failing = Fails(net, fits=5, error=oom())
    result = connection(failing).execute(QUERY)
    assert result.halved == (16, 8)
    np.testing.assert_allclose(result.heatmap, exact, atol=1e-5)
    assert np.ptp(exact) > 0.05                            # the map moves: a wrong one fails
    assert "out of memory at batch 16, then 8: went on at batch 4" in result.render()


def test_an_error_that_is_not_memory_is_not_retried():
    net = residual_connection(H, W).catalog.resolve_model("net").module
    failing = Fails(net, fits=5, error=RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    c = connection(failing)
    with pytest.raises(kql.KqlError, match="mat1 and mat2") as info:
        c.execute(QUERY)
    assert "\n" not in str(info.value)
    assert [b for b in failing.batches if b > 1] == [16]   # the first batch, once


def test_one_position_that_does_not_fit_is_one_clear_error():
    net = residual_connection(H, W).catalog.resolve_model("net").module
    failing = Fails(net, fits=64, error=oom(), every=True)
    c = connection(failing)
    with pytest.raises(kql.KqlError, match="out of memory running model 'net'") as info:
        c.execute(QUERY)
    assert "\n" not in str(info.value)
    # the first batch (the layout trial's channels-last unit), then halved from 16 down
    # to one
    assert [b for b in failing.batches if b > 1] == [16, 8, 4, 2]
    assert failing.batches[-1] == 1


def test_incremental_halves_when_gathering_runs_out_of_memory(exact, monkeypatch):
    c = residual_connection(H, W)
    c.execute("SET strategy = 'incremental'")
    real = g.gather
    sizes = []

    def gather(padded, patches, *args, **kwargs):
        sizes.append(patches.shape[0])
        if patches.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(padded, patches, *args, **kwargs)

    monkeypatch.setattr(g, "gather", gather)
    result = c.execute(QUERY)
    assert result.halved == (16, 8)
    assert max(sizes) == 16 and sizes[-1] <= 4
    np.testing.assert_allclose(result.heatmap, exact, atol=1e-5)
    plan = c.execute("EXPLAIN ANALYZE " + QUERY).plan
    assert "IncrementalOcclusion" in plan and "batch_halved=16->8->4" in plan
