"""Memory within a budget while planning (issue 13).

``SET memory_limit`` (default: a quarter of the available memory) lowers a BATCH that does
not fit, the occluded input batch included, and refuses a plan that does not fit at batch 1;
planning itself stays within it (issue 32): a forward pass is sized on fake tensors first,
and views over the limit are not built. What happens while a query runs (out of memory, the
scores kept, long runs confirmed) is in ``test_run_budget``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import kql
from helpers import SMALL_QUERY as QUERY
from helpers import image_connection
from kql.planner import memory, naive_shortcut
from kql.settings import Settings

pytestmark = pytest.mark.usefixtures("one_thread")     # small tensors: see conftest

NOTE = re.compile(r"batch=(\d+) \(BATCH (\d+) lowered to fit memory_limit ([0-9.]+ [KMG]B)\)")


@pytest.fixture
def con(small_model):
    return image_connection(model=small_model)


def operator_line(con, query: str) -> str:
    return con.execute("EXPLAIN " + query).plan.splitlines()[1]


def planned(con, query: str):
    from kql import executor
    from kql.language.parser import parse_with_text

    (stmt, text), = parse_with_text(query)
    return executor.plan(con, stmt, text)


def memory_mb(line: str) -> float:
    return float(re.search(r"memory_mb=(\d+)", line).group(1))


# -- 1. BATCH within memory_limit ---------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["naive", "incremental"])
def test_a_batch_over_the_limit_is_lowered_and_explain_says_so(con, strategy):
    con.execute(f"SET strategy = '{strategy}'")
    con.execute("SET memory_limit = '0.5 MB'")
    line = operator_line(con, QUERY + " BATCH 1000")
    match = NOTE.search(line)
    assert match, line
    batch = int(match.group(1))
    assert 1 <= batch < 30 and match.group(2) == "1000" and match.group(3) == "512.0 KB"
    lowered = con.execute(QUERY + " BATCH 1000")
    con.execute("SET memory_limit = 'auto'")
    assert "lowered" not in operator_line(con, QUERY + " BATCH 30")    # fits: as asked
    exact = con.execute(QUERY + " BATCH 30")
    np.testing.assert_allclose(lowered.heatmap, exact.heatmap, atol=1e-6)


def test_resnet18_batch_100000_is_lowered_to_the_limit():
    """The issue's case: EXPLAIN predicted 1.8 TB and it ran anyway."""
    import torchvision

    con = kql.connect()
    con.register_model("r18", torchvision.models.resnet18().eval())
    con.register_image("img", torch.rand(3, 224, 224))
    con.execute("SET memory_limit = '2 GB'")
    for strategy in ("naive", "incremental"):
        con.execute(f"SET strategy = '{strategy}'")
        line = operator_line(con, "OCCLUDE img USING r18 PATCH 4 STRIDE 1 BATCH 100000")
        match = NOTE.search(line)
        assert match and match.group(3) == "2.0 GB", line
        assert 1 <= int(match.group(1)) < 100000
        assert memory_mb(line) <= 2048, line


def test_the_planner_s_own_batch_stays_within_the_limit(con):
    con.execute("SET strategy = 'naive'")
    con.execute("SET memory_limit = '1 MB'")
    line = operator_line(con, QUERY)
    assert "lowered" not in line                          # no BATCH asked for: nothing to say
    assert int(re.search(r"batch=(\d+)", line).group(1)) < 30 and memory_mb(line) <= 1


@pytest.mark.parametrize("strategy", ["naive", "incremental", "auto"])
def test_a_plan_that_does_not_fit_at_batch_1_is_refused(con, strategy):
    con.execute(f"SET strategy = '{strategy}'")
    con.execute("SET memory_limit = 1000")                 # bytes
    with pytest.raises(kql.KqlPlanError) as err:
        con.execute(QUERY)
    message = str(err.value)
    assert "at BATCH 1 but memory_limit is 1.0 KB" in message
    assert "SET memory_limit = '1 GB' to allow it" in message and "\n" not in message


def test_views_that_do_not_fit_refuse_incremental_and_auto_falls_back_to_naive(con, monkeypatch):
    monkeypatch.setattr(naive_shortcut, "SMALL_IMAGE", 0)        # the costed plans, not the shape floor
    con.execute("SET strategy = 'naive'")
    naive = planned(con, QUERY + " BATCH 1").memory_bytes
    con.execute("SET strategy = 'incremental'")
    views = planned(con, QUERY + " BATCH 1").memory_bytes
    assert naive < views                                   # the room between the two
    con.execute(f"SET memory_limit = {(naive + views) // 2}")
    with pytest.raises(kql.KqlPlanError, match=r"the incremental plan \(materialized views "
                                               r"[0-9.]+ KB\) needs [0-9.]+ KB at BATCH 1"):
        con.execute(QUERY)
    con.execute("SET strategy = 'auto'")
    line = operator_line(con, QUERY)
    assert line.strip().startswith("NaiveOcclusion:"), line
    assert re.search(r"reason=incremental needs [0-9.]+ KB > memory_limit [0-9.]+ KB$", line), line


def test_memory_limit_values_are_checked():
    s = Settings()
    for value in ("auto", "512 mb", "1.5 gb", "2GB", 10**9):
        s.set("memory_limit", value)
    for bad in ("lots", "-1 gb", "0 mb", -5, 0, True):
        with pytest.raises(kql.KqlPlanError, match="memory_limit must be 'auto', '<n> MB'"):
            s.set("memory_limit", bad)
    assert memory.allowed("1.5 gb", "cpu") == 3 * 2**29


def test_set_memory_limit_in_kql(con):
    assert con.execute("SET memory_limit = '2 GB'").message == "memory_limit = 2 gb"
    with pytest.raises(kql.KqlPlanError, match="line 1, column 1: memory_limit must be"):
        con.execute("SET memory_limit = 'plenty'")


# -- 2. the occluded input batch counts -----------------------------------------------------------

def test_a_large_image_with_a_modest_batch_is_lowered():
    """The naive operator holds batch x 3 x H x W floats of occluded images (and their
    masks) through the whole forward pass: a downsampling model's activations are small,
    but a 512x512 image at BATCH 64 is ~0.8 GB of input alone."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.AvgPool2d(16), nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 3)).eval()
    con = kql.connect()
    con.register_model("net", net)
    con.register_image("big", torch.rand(3, 512, 512))
    con.execute("SET strategy = 'naive'")
    con.execute("SET memory_limit = '256 MB'")
    line = operator_line(con, "OCCLUDE big USING net PATCH 64 STRIDE 32 BATCH 64")
    match = NOTE.search(line)
    assert match, line
    assert int(match.group(1)) * memory.occluded_bytes((3, 512, 512)) <= 256 * 2**20
    assert memory.occluded_bytes((3, 512, 512)) == 13 * 512 * 512


# -- 3. planning itself within memory_limit (issue 32) ----------------------------------------------

class KeepsSize(nn.Module):
    """Fully convolutional, no resize, its maps made by functions (no module hook sees
    them); ``real`` records the size of every real (not fake) image it ran on."""

    def __init__(self, width: int = 48, depth: int = 1):
        super().__init__()
        self.depth = depth
        torch.manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(width, 3, 3, 3) * 0.2)
        self.w2 = nn.Parameter(torch.randn(width, width, 3, 3) * 0.05)
        self.head = nn.Linear(width, 4)
        self.real = []
        self.register_forward_pre_hook(self._seen)

    def _seen(self, module, args):
        if type(args[0]).__name__ != "FakeTensor":
            self.real.append(tuple(args[0].shape[2:]))

    def forward(self, x):
        x = torch.relu(nn.functional.conv2d(x, self.w1, padding=1))
        for _ in range(self.depth):
            x = torch.relu(nn.functional.conv2d(x, self.w2, padding=1))
        return self.head(x.mean((2, 3)))


def test_planning_a_large_image_is_refused_before_its_forward_pass_runs():
    """EXPLAIN ... PATCH 1 STRIDE 1 on a large image with a model that keeps its size used
    13.5 GB in planning (8000x8000, memory_limit 5.5 GB), and was not refused: the pass
    is now sized on fake tensors first. Here 1100x1000: each map 211 MB."""
    net = KeepsSize()
    con = kql.connect()
    con.register_model("net", net)
    con.register_image("big", torch.rand(3, 1100, 1000))
    con.execute("SET memory_limit = '128 MB'")
    with pytest.raises(kql.KqlPlanError) as err:
        con.execute("EXPLAIN OCCLUDE big USING net PATCH 1 STRIDE 1")
    message = str(err.value)
    assert message.startswith("line 1, column 17: planning runs model 'net' once on the "
                              "1100x1000 image; one forward pass needs "), message
    needed = float(re.search(r"needs ([0-9.]+) MB at BATCH 1", message).group(1))
    assert 2 * 211 <= needed <= 4 * 211 and "memory_limit is 128.0 MB" in message, message
    assert "\n" not in message and net.real == []       # no real pass at full size


def test_sizing_on_fake_tensors_leaves_the_model_as_it_was():
    """A forward pass that caches a tensor in its module keeps no fake tensor there."""
    from kql.operators.shapes import peak_bytes

    class Caching(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.register_buffer("cached", None)

        def forward(self, x):
            self.ones, self.cached = x.new_ones(x.shape[1:]), x.mean()
            return self.conv(x + self.ones)

    net, x = Caching().eval(), torch.zeros(1, 3, 16, 16)
    assert peak_bytes(net, x) >= 2 * 3 * 16 * 16 * 4 + 4 * 14 * 14 * 4
    assert not hasattr(net, "ones") and net.cached is None
    assert net(x).shape == (1, 4, 14, 14) and not net.ones.is_meta


def test_views_that_would_not_fit_are_not_built_and_the_plain_loop_is_planned(monkeypatch):
    """A small image's profile (its views) is sized first too: views over the limit keep
    only their shapes, enough to plan, and incremental inference is not chosen."""
    from kql.operators.profile import ModelProfile

    net, image = KeepsSize(32, depth=6).eval(), torch.rand(3, 160, 160)    # maps of 3.1 MB
    kept = ModelProfile(net, image)
    shapes_only = ModelProfile(net, image, memory_limit=24 << 20)
    assert kept.shapes_only is None and kept.view_bytes() > 40 << 20
    assert shapes_only.view_bytes() == kept.view_bytes()      # meta tensors of the same shapes
    assert 0.95 < shapes_only.shapes_only / kept.view_bytes() < 1.2     # estimated, unbuilt
    maps = [n for n in shapes_only.dynamic if shapes_only.views[n].dim() == 4]
    assert maps and all(shapes_only.views[n].is_meta for n in maps)
    shapes = {n.name: v.shape for n, v in kept.views.items()}
    assert all(shapes_only.views[n].shape == shapes[n.name] for n in maps)
    torch.testing.assert_close(shapes_only.base_logits, net(image[None])[0])
    con = kql.connect()
    con.register_model("net", net)
    con.register_image("img", image)
    monkeypatch.setattr(naive_shortcut, "SMALL_IMAGE", 0)        # the costed plans, not the shape floor
    con.execute("SET memory_limit = '24 MB'")
    line = operator_line(con, "OCCLUDE img USING net PATCH 16 STRIDE 16")
    assert line.strip().startswith("NaiveOcclusion:") and "incremental needs" in line, line
    con.execute("SET strategy = 'incremental'")
    with pytest.raises(kql.KqlPlanError, match="materialized views"):
        con.execute("EXPLAIN OCCLUDE img USING net PATCH 16 STRIDE 16")
    # The shapes-only profile is cached: a limit raised later builds the views after all
    # (incremental inference on the cached meta tensors could not run).
    con.execute("SET memory_limit = '1 GB'")
    line = operator_line(con, "OCCLUDE img USING net PATCH 16 STRIDE 16")
    assert line.strip().startswith("IncrementalOcclusion:") and "cache=profile" not in line, line
    heat = con.execute("OCCLUDE img USING net PATCH 16 STRIDE 16").heatmap
    con.execute("SET strategy = 'naive'")
    np.testing.assert_allclose(heat, con.execute("OCCLUDE img USING net PATCH 16 STRIDE 16").heatmap,
                               atol=1e-5)
