"""The naive cost model's full-node prices against each node's measured time, by kind.

Runs the model's traced graph node by node (``torch.fx.Interpreter``, timed per node,
median of 3 after 3 warm-ups) on a batch of the image in channels-last (the layout the
calibration prices full-size batches in on CPU; ``--contiguous`` for torch's default),
and prints per kind of node (1x1 / kxk / grouped / depthwise convolution, pools,
element-wise ops by name) the seconds ``kql.planner.cost.full_node_cost`` predicts and the seconds measured: where
the cost model mis-prices naive plans. Random weights, torch's default threads.

Usage: .venv/bin/python benchmarks/node_costs.py [--model regnet_y_400mf] [--size 224]
       [--batch 16] [--contiguous]
"""
import argparse
import collections
import statistics
import time

import torch
import torch.fx as fx

from kql import bench
from kql.catalog import images
from kql.catalog.models import ModelSpec
from kql.operators.profile import ModelProfile
from kql.operators.steps import Local
from kql.planner.calibrate import throughput
from kql.planner.cost import full_node_cost, naive_cost


class Timed(fx.Interpreter):
    """Runs the graph, adding each node's seconds to ``seconds[name]``."""

    def __init__(self, gm):
        super().__init__(gm)
        self.seconds = collections.defaultdict(float)

    def run_node(self, n):
        start = time.perf_counter()
        out = super().run_node(n)
        self.seconds[n.name] += time.perf_counter() - start
        return out


def kind(profile, n) -> str:
    op = profile.ops.get(n)
    if isinstance(op, Local) and op.kind == "conv":
        m = profile.gm.get_submodule(n.target) if n.op == "call_module" else None
        groups, c_in = getattr(m, "groups", 1), getattr(m, "in_channels", 0)
        if groups > 1:
            return "conv depthwise" if groups == c_in else "conv grouped"
        return "conv 1x1" if getattr(m, "kernel_size", (0,))[0] == 1 else "conv kxk"
    if isinstance(op, Local):
        return op.kind
    if n.op == "call_module":
        return type(profile.gm.get_submodule(n.target)).__name__
    return getattr(n.target, "__name__", str(n.target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="regnet_y_400mf")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--contiguous", action="store_true", help="torch's default layout")
    args = parser.parse_args()
    built, _ = bench.build_model(args.model)
    spec = ModelSpec("m", built.module, built.mean, built.std, (args.size, args.size))
    photo = images.match_channels(images.load_sample("chelsea"), 3)[0]
    profile = ModelProfile(spec.composed(), images.resize(photo, (args.size, args.size)), "cpu")
    tp = throughput("cpu")
    x = profile.views[profile.image_node].expand(args.batch, -1, -1, -1).contiguous(
        memory_format=torch.contiguous_format if args.contiguous else torch.channels_last)
    runs = []
    with torch.inference_mode():
        for i in range(6):
            timed = Timed(profile.gm)
            timed.run(x)
            if i >= 3:
                runs.append(timed.seconds)
        start = time.perf_counter()
        profile.gm(x)
        whole = time.perf_counter() - start
    measured = {name: statistics.median(r[name] for r in runs) for name in runs[0]}
    predicted, actual, count = (collections.defaultdict(float), collections.defaultdict(float),
                                collections.Counter())
    for n in profile.nodes:
        if n.op.startswith("call"):
            k = kind(profile, n)
            predicted[k] += full_node_cost(profile, n, tp, args.batch)[1]
            actual[k] += measured.get(n.name, 0.0)
            count[k] += 1
    print(f"{args.model} {args.size}x{args.size} batch {args.batch}: one forward {whole:.3f} s, "
          f"naive_cost {naive_cost(profile, tp, args.batch).seconds:.3f} s, "
          f"nodes measured one by one {sum(measured.values()):.3f} s")
    for k in sorted(actual, key=lambda k: -actual[k]):
        print(f"  {k:<20} {count[k]:4d} nodes  predicted {predicted[k] * 1e3:8.1f} ms  "
              f"measured {actual[k] * 1e3:8.1f} ms  predicted/measured {predicted[k] / max(actual[k], 1e-9):.2f}")


if __name__ == "__main__":
    main()
