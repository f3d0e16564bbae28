"""The physical planner's crossover: what each policy computes, and what it is priced at."""

import re

import pytest
import torch
from torch import nn

import kql
from conftest import blob_image, sensitive
from kql.operators.incremental import PURE, Crossover, IncrementalModel
from kql.planner import calibrate
from kql.planner.cost import incremental_cost, plan_sizes
from kql.planner.physical import CROSSOVER_FRACTIONS, crossover_at, crossover_candidates


def tapering_cnn() -> nn.Module:
    """Feature maps 32 -> 16 -> 8 -> 4: a 12x12 patch covers the last two whole."""
    torch.manual_seed(5)
    layers, c = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()], 8
    for _ in range(3):
        layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.ReLU(),
                   nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU()]
        c *= 2
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3)).eval()


PATCH = (12, 12)


@pytest.fixture(scope="module")
def engine():
    return IncrementalModel(tapering_cnn(), blob_image(32, 32, seed=2))


def convs(engine):
    return [n for n in engine.nodes if n.op == "call_module" and
            isinstance(engine.gm.get_submodule(n.target), nn.Conv2d)]


def test_pure_carries_full_sized_patches_to_the_global_boundary(engine):
    pure, covered = plan_sizes(engine, PATCH, PURE), plan_sizes(engine, PATCH, Crossover())
    full = [n for n in convs(engine) if pure[n] == tuple(engine.views[n].shape[2:])]
    assert len(full) >= 2                     # the 8x8 and 4x4 maps are covered whole
    for n in full:
        assert covered[n] is None             # handed on as full tensors at fraction 1
    partial = [n for n in convs(engine) if n not in full]
    assert partial and all(pure[n] == covered[n] is not None for n in partial)


def test_pure_is_priced_above_the_crossover_at_fraction_one(engine):
    tp = calibrate.throughput("cpu")
    pure = incremental_cost(engine, tp, plan_sizes(engine, PATCH, PURE), 8)
    covered = incremental_cost(engine, tp, plan_sizes(engine, PATCH, Crossover()), 8)
    assert pure.macs == covered.macs          # the same convolutions, at the same sizes
    assert pure.seconds > covered.seconds     # plus the full-sized contexts it gathers
    assert sum(c.gather_bytes for c in pure.nodes) > sum(c.gather_bytes for c in covered.nodes)


def test_earlier_crossovers_cut_before_more_nodes(engine):
    natural = plan_sizes(engine, PATCH, Crossover())
    assert crossover_at(engine, natural, None) is PURE
    assert crossover_at(engine, natural, 1.0) == Crossover()
    sets = [crossover_at(engine, natural, f).nodes for f in (0.9, 0.5, 0.2)]
    assert sets[0] <= sets[1] <= sets[2] and sets[2]
    candidates = crossover_candidates(engine, PATCH, CROSSOVER_FRACTIONS)
    assert candidates[0] == (1.0, Crossover())
    assert len({c for _, c in candidates}) == len(candidates)         # no policy twice
    assert all(f is not None for f, _ in candidates)                 # auto never costs pure


@pytest.mark.parametrize("setting,shown", [("'none'", "none"), ("1", "1.00"), ("0.5", "0.50"),
                                           ("'auto'", None)])
def test_setting_reaches_the_plan(setting, shown):
    con = kql.connect()
    con.register_model("net", sensitive(tapering_cnn(), (3, 32, 32)))
    con.register_image("img", blob_image(32, 32, seed=2))
    con.execute("SET strategy = 'incremental'")
    con.execute(f"SET crossover = {setting}")
    line = con.execute("EXPLAIN OCCLUDE img USING net PATCH 12 STRIDE 10 BATCH 4").plan.splitlines()[1]
    found = re.search(r"crossover=([a-z0-9.]+),", line).group(1)
    if shown is None:
        assert found != "none" and 0 < float(found) <= 1     # a fraction the planner costs
    else:
        assert found == shown
