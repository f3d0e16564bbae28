"""How far exact incremental inference can go on a model: FLOP ratios of its region plans.

For each model (torchvision, random weights; 299 px for InceptionV3, else 224) and the
whole map ``OCCLUDE ... PATCH 16 STRIDE 4 BATCH 16``, the default plan's crossover and
delta convolutions are kept and only the regions change. Printed per model, the FLOP
ratio (full inference over the costed multiply-adds per position) of:

* ``one table``: every position at the largest region (the seed paper's step table);
* ``groups``: the planner's chosen grouping (bands of rows and columns);
* ``per batch``: positions sorted by their distance to the border, each batch of 16 its
  own table (a region per batch: what grouping could reach with a table per batch);
* ``per position``: every position its own border-clipped region, the bound of any
  grouping of this engine's exact regions (sampled on every third position).

Each is printed with the delta convolutions the planner chose, with every eligible one,
and with none. Nothing is timed: the measured speed is the FLOP ratio times the plan's
efficiency (benchmarks/exact_plans.py measures that).

Usage (the note on issue 34):
  .venv/bin/python benchmarks/region_bounds.py [--models vgg16,resnet18,inception_v3]
"""
import argparse

import numpy as np

from exact_plans import BATCH, connection
from kql import executor
from kql.operators.graph import Local
from kql.operators.steps import plan_steps
from kql.planner.cost import incremental_cost


class _MacsOnly:
    """A throughput table that prices nothing: only the multiply-adds are read."""

    batch = 1.0

    def __getattr__(self, name):
        return (lambda *args, **kwargs: 0.0) if name.endswith("seconds") else 1.0


def _inner(operator):
    """The incremental operator(s) of a plan: the members of a grouping, or the one."""
    for attribute in ("inner", "chosen"):
        operator = getattr(operator, attribute, operator)
    return operator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16,resnet18,inception_v3")
    args = parser.parse_args()
    tp = _MacsOnly()
    for name in args.models.split(","):
        side, con, stmt, text = connection(name)
        plan = executor.plan(con, stmt, text)
        con.execute("SET strategy = 'naive'")
        full = executor.plan(con, stmt, text).cost.macs / BATCH
        operator = _inner(plan.operator)
        members = list(getattr(operator, "members", {}).values())
        first = members[0] if members else operator
        profile, table = first.profile, first.steps
        task = plan.task()
        ys, xs = np.asarray(task.ys), np.asarray(task.xs)
        n = len(ys)

        def macs(deltas, at=None) -> float:
            pick = slice(None) if at is None else at
            t = plan_steps(profile, ys[pick], xs[pick], table.patch, table.crossover, table.tau,
                           table.gates, deltas)
            return incremental_cost(profile, t, tp, len(ys[pick])).macs

        border_y = np.minimum(ys - ys.min(), ys.max() - ys)
        border_x = np.minimum(xs - xs.min(), xs.max() - xs)
        order = np.lexsort((border_x, border_y))
        eligible = frozenset(s.node for s in table if isinstance(s.op, Local) and s.op.delta is not None)
        grouped = plan.cost.macs * plan.batches / n if members else None
        print(f"{name} {side} px, {n} positions, full inference {full / 1e6:.0f} MMAC; "
              f"default plan: {plan.operator.describe()}")
        for label, deltas in (("chosen deltas", table.deltas), ("every delta", eligible),
                              ("no deltas", frozenset())):
            one = macs(deltas) / n
            batches = sum(macs(deltas, order[s:s + BATCH]) for s in range(0, n, BATCH)) / n
            sample = range(0, n, 3)
            alone = float(np.mean([macs(deltas, np.array([i])) for i in sample]))
            groups = (f"groups {full / grouped:.2f}, " if grouped and deltas == table.deltas else "")
            print(f"  {label:<14} FLOP ratio: one table {full / one:.2f}, {groups}per batch "
                  f"{full / batches:.2f}, per position {full / alone:.2f}")


if __name__ == "__main__":
    main()
