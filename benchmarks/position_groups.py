"""Positions grouped by region size against one table for all, on whole maps.

For each model (torchvision, random weights; 299 px for InceptionV3, else 224), the whole
map ``OCCLUDE ... PATCH 16 STRIDE 4 BATCH 16`` runs with ``SET position_groups = 'off'``
and ``'auto'`` on one connection, plans made once, rounds interleaved; optionally the plain
PyTorch loop of ``kql bench`` (torch's default threads) in the same rounds. Printed per
model: the plans (groups, predicted seconds), the FLOP ratio of each plan against full
inference (costed), medians, and ratios side by side.

Usage (README's numbers):
  .venv/bin/python benchmarks/position_groups.py [--models resnet18,vgg16] [--rounds 2]
      [--plain]
"""
import argparse
import statistics
import time

import torch

from exact_plans import BATCH, PATCH, STRIDE, connection   # the same models, image and query
from kql import executor
from kql.bench_engines import plain_loop_runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,vgg16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--plain", action="store_true", help="time the plain loop too")
    args = parser.parse_args()
    print(f"position_groups: torch {torch.__version__} on {torch.get_num_threads()} threads, "
          f"PATCH {PATCH} STRIDE {STRIDE} BATCH {BATCH}, whole map")
    for name in args.models.split(","):
        side, con, stmt, text = connection(name)
        plans = {}
        for setting in ("off", "auto"):
            con.execute(f"SET position_groups = '{setting}'")
            plans[setting] = executor.plan(con, stmt, text)
            p = plans[setting]
            full = p.cost.macs if p.operator.plain_loop else None
            print(f"{name} {side} px, groups {setting}: {p.operator.name} "
                  f"{p.operator.describe()}, predicted {p.run_seconds:.2f} s, "
                  f"MMAC/position {p.cost.macs * p.batches / p.query.grid.count / 1e6:.0f}"
                  + (f" (full inference {full / BATCH / 1e6:.0f})" if full else ""))
        runs = {k: (lambda p=p: p.run()) for k, p in plans.items()}
        if args.plain:
            runs["plain loop"] = plain_loop_runner(plans["off"].task(), BATCH)
        seconds = {k: [] for k in runs}
        for _ in range(args.rounds):
            for key, run in runs.items():
                began = time.perf_counter()
                run()
                seconds[key].append(time.perf_counter() - began)
        median = {k: statistics.median(v) for k, v in seconds.items()}
        line = ", ".join(f"{k} {v:.2f} s" for k, v in median.items())
        ratio = median["off"] / median["auto"]
        print(f"{name}: {line} (median of {args.rounds}); one table / grouped {ratio:.2f}"
              + (f"; plain / one table {median['plain loop'] / median['off']:.2f}, plain / grouped "
                 f"{median['plain loop'] / median['auto']:.2f}" if args.plain else ""))


if __name__ == "__main__":
    main()
