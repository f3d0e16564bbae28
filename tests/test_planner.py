"""The physical planner's crossover: what each policy computes, and what it is priced at."""

import re

import pytest
import torch
from torch import nn

import kql
from helpers import sensitive, smooth_noise_image
from kql.operators.profile import ModelProfile
from kql.operators import steps as modes
from kql.operators.steps import PURE, Crossover, plan_steps
from kql.planner import calibrate
from kql.planner.cost import centre, incremental_cost
from kql.planner.crossover import CROSSOVER_FRACTIONS, crossover_at, crossover_candidates


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
def profile():
    return ModelProfile(tapering_cnn(), smooth_noise_image(32, 32, seed=2))


def at_centre(profile, crossover):
    y, x = centre(profile, PATCH)
    return plan_steps(profile, [y], [x], PATCH, crossover)


def convs(profile):
    return [n for n in profile.nodes if isinstance(profile.module(n), nn.Conv2d)]


def test_pure_carries_full_sized_patches_to_the_global_boundary(profile):
    pure, covered = at_centre(profile, PURE), at_centre(profile, Crossover())
    full = [n for n in convs(profile) if pure[n].size == profile.map_size(n)]
    assert len(full) >= 2                     # the 8x8 and 4x4 maps are covered whole
    for n in full:
        assert pure[n].mode == modes.PATCH
        assert covered.changed_size(n) is None    # handed on as full tensors at fraction 1
    # the first covered map is computed on its patch and handed on; the later ones run in full
    assert [covered[n].mode for n in full] == [modes.COVER] + [modes.FULL] * (len(full) - 1)
    partial = [n for n in convs(profile) if n not in full]
    assert partial and all(pure.changed_size(n) == covered.changed_size(n) is not None
                           for n in partial)


def test_pure_is_priced_above_the_crossover_at_fraction_one(profile):
    tp = calibrate.throughput("cpu")
    pure = incremental_cost(profile, at_centre(profile, PURE), tp, 8)
    covered = incremental_cost(profile, at_centre(profile, Crossover()), tp, 8)
    assert pure.macs == covered.macs          # the same convolutions, at the same sizes
    assert pure.seconds > covered.seconds     # plus the full-sized contexts it gathers
    assert pure.gather_bytes > covered.gather_bytes


def test_earlier_crossovers_cut_before_more_nodes(profile):
    natural = at_centre(profile, Crossover())
    assert crossover_at(profile, natural, None) is PURE
    assert crossover_at(profile, natural, 1.0) == Crossover()
    sets = [crossover_at(profile, natural, f).nodes for f in (0.9, 0.5, 0.2)]
    assert sets[0] <= sets[1] <= sets[2] and sets[2]
    y, x = centre(profile, PATCH)
    candidates = crossover_candidates(profile, ([y], [x]), PATCH, CROSSOVER_FRACTIONS)
    assert candidates[0].crossover == Crossover() and candidates[0].crossover.fraction == 1.0
    assert len({c.crossover for c in candidates}) == len(candidates)        # no policy twice
    assert all(c.crossover.fraction is not None for c in candidates)      # auto never costs pure


def test_one_size_per_node_fits_every_position(profile):
    """The step table's patch of a node is the largest over the query's positions, so the
    region each position changes lies inside its patch."""
    import numpy as np

    ys, xs = np.meshgrid(np.arange(0, 21, 3), np.arange(0, 21, 3), indexing="ij")
    table = plan_steps(profile, ys.ravel(), xs.ravel(), PATCH, PURE)
    for y, x in zip(ys.ravel(), xs.ravel()):
        alone = plan_steps(profile, [y], [x], PATCH, PURE)
        i = int(np.flatnonzero((table[profile.nodes[0]].y == y) & (table[profile.nodes[0]].x == x))[0])
        for n in convs(profile):
            h, w = alone[n].size
            top, left = alone[n].y[0], alone[n].x[0]
            assert table[n].y[i] <= top and top + h <= table[n].y[i] + table[n].size[0]
            assert table[n].x[i] <= left and left + w <= table[n].x[i] + table[n].size[1]


@pytest.mark.parametrize("setting,shown", [("'none'", "none"), ("1", "1.00"), ("0.5", "0.50"),
                                           ("'auto'", None)])
def test_setting_reaches_the_plan(setting, shown):
    con = kql.connect()
    con.register_model("net", sensitive(tapering_cnn(), smooth_noise_image(32, 32)))
    con.register_image("img", smooth_noise_image(32, 32, seed=2))
    con.execute("SET strategy = 'incremental'")
    con.execute(f"SET crossover = {setting}")
    line = con.execute("EXPLAIN OCCLUDE img USING net PATCH 12 STRIDE 10 BATCH 4").plan.splitlines()[1]
    found = re.search(r"crossover=([a-z0-9.]+),", line).group(1)
    if shown is None:
        assert found != "none" and 0 < float(found) <= 1     # a fraction the planner costs
    else:
        assert found == shown
