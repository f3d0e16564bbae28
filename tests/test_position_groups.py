"""Positions grouped by the region they change (planner/position_groups.py,
operators/grouped.py): the same map as the plain loop, smaller regions at the border,
and a watched scan stopped in a group still a prefix.

Grouping is forced (``physical.GROUPS_MARGIN``) so that every case runs grouped; the
maps are compared with the plain loop written in helpers, on calibrated random models
whose maps are checked not to be flat.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import kql
from helpers import calibrate_batchnorm, image_connection, plain_heatmap, sensitive, smooth_noise_image
from kql.language.parser import parse
from kql import executor
from kql.operators.grouped import GroupedOcclusion
from kql.operators.naive import NaiveOcclusion
from kql.operators.profile import ModelProfile
from kql.operators.steps import plan_steps
from kql.operators.task import StopScan
from kql.operators.trial import OperatorTrial
from kql.planner import calibrate, naive_shortcut, physical, position_groups, prior
from kql.planner.cost import incremental_cost
from models_zoo import custom_model, small_cnn

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
TABLE = calibrate.Throughput("cpu", **prior.CPU)


@pytest.fixture
def forced(monkeypatch):
    """Every plan that can be grouped is (no margin), and small images are traced."""
    monkeypatch.setattr(physical, "GROUPS_MARGIN", 1e9)
    monkeypatch.setattr(physical, "GROUPS_MIN_PIXELS", 0)
    monkeypatch.setattr(naive_shortcut, "SMALL_IMAGE", 0)


def connection(net, image):
    con = image_connection(image=image, model=net)
    con.execute("SET strategy = 'incremental'")
    return con


def sensitive_model(name: str, image, patch):
    net = custom_model(name) if name != "small_cnn" else small_cnn()
    return sensitive(calibrate_batchnorm(net, *image.shape[1:]), image, patch)


CASES = [   # (model, image h x w, patch, stride, region)
    ("small_cnn", (40, 44), (8, 8), (2, 2), None),
    ("conv_stride2", (36, 40), (6, 10), (3, 5), None),
    ("max_pools", (40, 40), (8, 8), (4, 4), None),
    ("residual_two_rf", (40, 48), (8, 8), (2, 3), None),
    ("cat_inception", (40, 40), (7, 5), (3, 2), None),
    ("conv_dilation2", (40, 40), (8, 8), (4, 4), (4, 2, 30, 34)),
]


@pytest.mark.parametrize("name,size,patch,stride,region", CASES, ids=[c[0] for c in CASES])
def test_grouped_maps_are_the_plain_loops(forced, name, size, patch, stride, region):
    image = smooth_noise_image(*size)
    net = sensitive_model(name, image, patch)
    con = connection(net, image)
    where = f" REGION ({region[0]}, {region[1]}, {region[2]}, {region[3]})" if region else ""
    query = (f"OCCLUDE img USING net PATCH {patch[0]} x {patch[1]} STRIDE {stride[0]} x "
             f"{stride[1]}{where} COLOR black")
    result = con.execute(query)
    line = result.plan.splitlines()[1]
    assert line.startswith("  IncrementalOcclusion:") and "groups=" in line, result.plan
    expected, _ = plain_heatmap(net, image, patch, stride, (0.0, 0.0, 0.0), region=region)
    assert np.ptp(expected) >= 0.02                          # the map moves
    assert result.heatmap.shape == expected.shape
    assert float(np.abs(result.heatmap - expected).max()) <= TOL
    con.execute("SET position_groups = 'off'")
    one = con.execute(query)
    assert "groups=" not in one.plan.splitlines()[1]
    assert float(np.abs(one.heatmap - result.heatmap).max()) <= TOL


def grid_positions(size, patch, stride):
    rows = np.arange((size[0] - patch[0]) // stride[0] + 1) * stride[0]
    cols = np.arange((size[1] - patch[1]) // stride[1] + 1) * stride[1]
    ys, xs = np.meshgrid(rows, cols, indexing="ij")
    return ys.ravel(), xs.ravel()


def test_border_groups_change_smaller_regions_and_fewer_macs():
    net = small_cnn().eval()
    profile = ModelProfile(net, torch.rand(3, 48, 48), "cpu")
    ys, xs = grid_positions((48, 48), (8, 8), (2, 2))
    one = plan_steps(profile, ys, xs, (8, 8))
    found = position_groups.group(profile, one, (ys, xs), TABLE, 16)
    assert found is not None and len(found.operator.members) > 1
    batches = -(-len(ys) // 16)
    single = incremental_cost(profile, one, TABLE, 16).macs * len(ys) / 16
    assert found.cost.macs * batches < single               # priced per position, all groups
    cells = {key: sum(s.size[0] * s.size[1] for s in op.steps if s.incremental)
             for key, op in found.operator.members.items()}
    largest = sum(s.size[0] * s.size[1] for s in one if s.incremental)
    assert max(cells.values()) <= largest and min(cells.values()) < largest
    # Every position in exactly one group, each group's table planned for its positions.
    groups = found.operator.groups_of(ys, xs)
    sizes = [len(op.steps[profile.image_node].y) for op in found.operator.members.values()]
    assert sorted(sizes) == sorted(np.bincount(groups)[np.bincount(groups) > 0].tolist())


def test_a_thresholded_table_is_not_grouped():
    net = small_cnn().eval()
    profile = ModelProfile(net, torch.rand(3, 40, 40), "cpu")
    ys, xs = grid_positions((40, 40), (8, 8), (4, 4))
    assert position_groups.group(profile, plan_steps(profile, ys, xs, (8, 8), tau=0.5),
                                 (ys, xs), TABLE, 16) is None


@pytest.fixture
def grouped_plan(forced):
    """A plan grouped by rows and by columns (bands set here: 3 x 3 groups)."""
    image = smooth_noise_image(40, 44)
    net = sensitive_model("small_cnn", image, (8, 8))
    query = "OCCLUDE img USING net PATCH 8 STRIDE 2 BATCH 4 COLOR black"
    planned = executor.plan(connection(net, image), parse(query)[0], query)
    assert isinstance(planned.operator, GroupedOcclusion)
    profile = planned.operator._largest.profile
    task = planned.task()
    one = plan_steps(profile, task.ys, task.xs, (8, 8))
    edges = (np.array([6, 26]), np.array([4, 30]))
    grouped = position_groups._planned(profile, one, (task.ys, task.xs), TABLE, 4, edges).operator
    assert len(grouped.members) == 9
    expected, _ = plain_heatmap(net, image, (8, 8), (2, 2), (0.0, 0.0, 0.0))
    return dataclasses.replace(planned, operator=grouped), expected.ravel()


def test_a_scan_stopped_inside_a_group_has_done_a_prefix_of_the_group_order(grouped_plan):
    planned, expected = grouped_plan
    task = planned.task()
    order = planned.operator.position_order(task.ys, task.xs)
    assert order is not None and sorted(order.tolist()) == list(range(task.count))
    ordered = dataclasses.replace(task, ys=task.ys[order], xs=task.xs[order])

    def stop(done, total):
        if done >= 37:
            raise StopScan
    result = planned.operator.run(ordered, stop)
    done = result.scores.shape[1]
    assert 37 <= done < task.count
    assert np.abs(result.probabilities - expected[order][:done]).max() <= TOL


def test_a_watched_grouped_scan_is_the_plain_loops_map(grouped_plan):
    planned, expected = grouped_plan
    task = planned.task()
    naive = NaiveOcclusion(4, planned.operator._largest.profile.base_logits)
    for chosen, other in ((planned.operator, naive), (naive, planned.operator)):
        trial = OperatorTrial(chosen, other, upfront=True, expected=(1.0, 1.0))
        assert trial.position_order(task.ys, task.xs) is not None
        result = trial.run(task)
        assert np.abs(result.probabilities - expected).max() <= TOL
        assert sum(items for _, items, _ in result.ran) == task.count


def test_the_setting_is_checked():
    con = kql.connect()
    with pytest.raises(kql.KqlPlanError, match="position_groups must be 'auto' or 'off'"):
        con.execute("SET position_groups = 'always'")


@pytest.mark.parametrize("whole", [False, True])
def test_groups_whole_where_the_one_table_covers_the_map_are_exact(forced, whole):
    """Both crossovers the grouping prices: the one table's, and with every node it hands
    on whole among the crossover nodes (a border group's region stays smaller there)."""
    image = smooth_noise_image(40, 40)
    net = sensitive_model("max_pools", image, (8, 8))
    profile = ModelProfile(net, image, "cpu")
    ys, xs = grid_positions((40, 40), (8, 8), (2, 2))
    one = plan_steps(profile, ys, xs, (8, 8))
    cross = position_groups._whole_from(one) if whole else one.crossover
    assert (cross != one.crossover) == whole                   # the model covers its map
    grouped = position_groups._planned(profile, one, (ys, xs), TABLE, 8,
                                       (np.array([8, 24]), np.array([8, 24])), cross).operator
    task = executor_task(net, image, ys, xs)
    expected, _ = plain_heatmap(net, image, (8, 8), (2, 2), (0.0, 0.0, 0.0))
    assert np.ptp(expected) >= 0.02
    result = grouped.run(task)
    assert np.abs(result.probabilities - expected.ravel()).max() <= TOL


def executor_task(net, image, ys, xs):
    from kql.operators.task import OcclusionTask
    return OcclusionTask(net, image, torch.zeros(3), (8, 8), ys, xs, device="cpu")


def test_the_exact_form_of_a_grouped_frozen_gates_plan_is_exact():
    """EXPLAIN ANALYZE compares a plan with its exact form: a grouping of tables with
    frozen gates must give every group's exact table, not itself."""
    net = custom_model("squeeze_excite").eval()
    profile = ModelProfile(net, torch.rand(3, 40, 40), "cpu")
    ys, xs = grid_positions((40, 40), (8, 8), (4, 4))
    frozen = plan_steps(profile, ys, xs, (8, 8), gates="frozen")
    grouped = position_groups._planned(profile, frozen, (ys, xs), TABLE, 8,
                                       (np.array([16]), np.array([16]))).operator
    assert grouped.approximation().kind == "frozen_gates"
    exact = grouped.exact()
    assert exact.approximation() is None
    assert all(op.steps.gates == "exact" for op in exact.members.values())



def test_a_volume_grouped_by_bands_of_every_axis_is_exact():
    """A volume's positions in 2 x 2 x 2 groups (bands of slices, rows and columns): each
    group's table is its own and smaller at the border, and the map is the plain 3D loop's."""
    from kql.operators.steps import steps_at
    from kql.operators.task import OcclusionTask
    from volume_models import blob_volume, plain_volume_map, resnet3d, sensitive_volume

    volume = blob_volume(16, 20, 24, seed=2)
    value = float(volume.mean())
    net = sensitive_volume(resnet3d(), volume, (4, 4, 4), value)
    profile = ModelProfile(net, volume, "cpu")
    axes = [np.arange(0, n - 3, 2) for n in (16, 20, 24)]
    corners = tuple(g.ravel() for g in np.meshgrid(*axes, indexing="ij"))
    one = steps_at(profile, corners, (4, 4, 4))
    edges = (np.array([8]), np.array([10]), np.array([12]))
    grouped = position_groups._planned(profile, one, corners, TABLE, 8, edges).operator
    assert len(grouped.members) == 8 and set(grouped.groups_of(*corners)) == set(range(8))
    cells = {key: sum(np.prod(s.size) for s in op.steps if s.incremental)
             for key, op in grouped.members.items()}
    assert min(cells.values()) < sum(np.prod(s.size) for s in one if s.incremental)
    task = OcclusionTask(net, volume, torch.tensor([value]), (4, 4, 4), corners[1], corners[2],
                         zs=corners[0])
    expected, _ = plain_volume_map(net, volume, (4, 4, 4), (2, 2, 2), value)
    assert np.ptp(expected) > 0.05
    found = position_groups.group(profile, one, corners, TABLE, 8)
    assert found is not None and len(found.operator.edges) == 3        # priced: bands of all three
    for operator in (grouped, found.operator):
        result = operator.run(task)
        assert np.abs(result.probabilities - expected.ravel()).max() <= TOL
