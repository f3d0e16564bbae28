"""The operators' written protocol (operators/protocol.py), and a planner that asks it.

Every physical operator has each member of :class:`OcclusionOperator`; wrappers (the
trial, drill-down, verified drill-down) answer for what they wrap; the planner and
EXPLAIN never test an operator's name or its attributes instead of asking.
"""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from kql.operators.drilldown import DrillDownOcclusion
from kql.operators.grouped import GroupedOcclusion
from kql.operators.incremental import IncrementalOcclusion
from kql.operators.naive import NaiveOcclusion
from kql.operators.precision import ReducedPrecision
from kql.operators.profile import ModelProfile
from kql.operators.protocol import OcclusionOperator
from kql.operators.steps import plan_steps
from kql.operators.trial import OperatorTrial
from kql.operators.verified import Check, VerifiedDrillDown, expected_cells

ROOT = Path(__file__).resolve().parents[1]


def incremental(tau: float = 1.0, gates: str = "exact") -> IncrementalOcclusion:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2)).eval()
    profile = ModelProfile(model, torch.rand(3, 16, 16), "cpu")
    ys = xs = np.arange(4)
    return IncrementalOcclusion(profile, plan_steps(profile, ys, xs, (4, 4), tau=tau, gates=gates), 4)


def operators() -> dict:
    naive, inc = NaiveOcclusion(4), incremental()
    coarse = (np.arange(2), np.arange(2), 1, 2)
    return {
        "naive": naive, "incremental": inc,
        "trial": OperatorTrial(inc, naive),
        "drilldown": DrillDownOcclusion(naive, inc, coarse, 0.25),
        "verified": VerifiedDrillDown(inc, (20, 20), 4, 0.02, Check(0.9)),
        "grouped": GroupedOcclusion(([8], []), {(0, 0): inc, (1, 0): incremental()}),
        "precision": ReducedPrecision(inc, "bfloat16"),
    }


@pytest.mark.parametrize("name", ["naive", "incremental", "trial", "drilldown", "verified",
                                  "grouped", "precision"])
def test_every_operator_has_the_whole_protocol(name):
    op = operators()[name]
    assert isinstance(op, OcclusionOperator)
    assert isinstance(op.describe(), dict) and isinstance(op.name, str)
    assert isinstance(op.exact(), OcclusionOperator)
    assert not isinstance(object(), OcclusionOperator)        # the check can fail


def test_operators_say_how_their_map_is_approximate():
    ops = operators()
    assert ops["naive"].approximation() is None and ops["incremental"].approximation() is None
    assert ops["trial"].approximation() is None
    assert ops["drilldown"].approximation().kind == "drilldown"
    assert ops["drilldown"].approximation().text == "drill-down fraction 0.25"
    verified = ops["verified"].approximation()
    assert verified.kind == "verified" and "SSIM>=0.9 on 8 windows" in verified.text
    assert incremental(tau=0.5).approximation().text == "tau=0.50"
    # Reduced precision: its own, unless what it wraps is approximate already; exact in
    # float32 (a stated fallback is float32 and exact).
    assert ops["precision"].approximation().text == "bfloat16"
    assert ReducedPrecision(incremental(tau=0.5), "bfloat16").approximation().kind == "tau"
    assert ops["precision"].exact() is ops["incremental"]
    assert ReducedPrecision(ops["naive"], "float32", "bfloat16: none").approximation() is None
    # A trial answers for the operator it chose.
    assert OperatorTrial(incremental(tau=0.5), NaiveOcclusion(4)).approximation().kind == "tau"


def test_plain_loop_and_layout_learning_are_asked_not_inferred():
    ops = operators()
    assert ops["naive"].plain_loop and not ops["incremental"].plain_loop
    assert OperatorTrial(ops["naive"], ops["incremental"]).plain_loop
    assert not ops["trial"].plain_loop
    assert ops["naive"].learns_layout and ops["incremental"].learns_layout
    assert ops["grouped"].learns_layout and not ops["grouped"].plain_loop
    assert ops["grouped"].position_order(np.array([9, 0]), np.array([0, 0])).tolist() == [1, 0]
    assert ops["incremental"].position_order(np.array([9, 0]), np.array([0, 0])) is None
    assert not ops["drilldown"].learns_layout and not ops["verified"].learns_layout
    assert ops["precision"].learns_layout and not ops["precision"].plain_loop
    assert ReducedPrecision(ops["naive"], "int8").plain_loop


def test_verified_drill_down_prices_its_own_lattice():
    op = VerifiedDrillDown(NaiveOcclusion(4), (30, 30), 4, 0.02, Check(0.9))
    assert op.expected_cells() == expected_cells((30, 30), 4, 0.02)
    assert op.expected_cells({4: [0.0], (4, 2): [0.0], 2: [0.0]}) == 900     # every check fails
    assert op.expected_cells() < op.expected_cells({4: [0.0], (4, 2): [1.0]}) < 900


def forks(source: str) -> list:
    """``operator.name`` compared with a string, and ``hasattr(<...operator...>, ...)``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) \
                and node.left.attr == "name" and any(isinstance(c, ast.Constant) for c in node.comparators):
            found.append(node.lineno)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "hasattr" \
                and "operator" in ast.unparse(node.args[0]):
            found.append(node.lineno)
    return found


def test_the_checker_finds_a_fork():
    assert forks('if plan.operator.name != "NaiveOcclusion":\n    pass\n') == [1]
    assert forks('x = 1\nok = hasattr(operator, "remembering")\n') == [2]
    assert forks("if plan.operator.plain_loop:\n    pass\n") == []


def test_the_planner_asks_operators_instead_of_reading_their_names():
    found = {path.name: forks(path.read_text()) for path in (ROOT / "planner").rglob("*.py")}
    assert not {k: v for k, v in found.items() if v}
