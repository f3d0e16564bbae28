"""The small-input shortcut against the full planner, model by model and size by size.

For each (model, size) it prints what the full planner chooses (trace, views, costing;
the shortcut disabled), its predicted naive and incremental runs (the incremental one at
``SET strategy = 'incremental'``), the shape pass's naive price and incremental floor
(``planner.cost.shape_incremental_floor``), and whether the shortcut would plan naive
without tracing. The shortcut is sound where it fires only on rows the full planner also
runs naive, and the floor stays below the costed incremental plan.

Random weights, patch 16, stride 4, batch 16, torch's default threads.

Usage: .venv/bin/python benchmarks/shape_decisions.py [--models resnet18,shufflenet_v2_x0_5]
       [--sizes 64x64,80x96,112x112]
"""
import argparse

import kql
from kql import bench, executor
from kql.catalog import images
from kql.operators.shapes import summarize
from kql.language.parser import parse
from kql.planner import calibrate, naive_shortcut, physical
from kql.planner.cost import shape_incremental_floor, shape_naive_cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,shufflenet_v2_x0_5,convnext_tiny")
    parser.add_argument("--sizes", default="64x64,80x96,112x112")
    args = parser.parse_args()
    tp = calibrate.throughput("cpu", None)
    naive_shortcut.SMALL_IMAGE = 0                  # the full planner, for comparison
    print(f"{'model':<20} {'size':<8} {'full planner':<12} {'naive s':>8} {'incr. s':>8} "
          f"{'shape naive':>11} {'floor':>7}  shortcut")
    for name in args.models.split(","):
        for size in args.sizes.split(","):
            h, w = (int(v) for v in size.split("x"))
            con = kql.connect()
            spec, _ = bench.build_model(name)
            con.register_model(name, spec.module, spec.mean, spec.std, (h, w))
            photo = images.match_channels(images.load_sample("chelsea"), 3)[0]
            con.register_image("img", images.resize(photo, (h, w)))
            text = f"OCCLUDE img USING {name} PATCH 16 STRIDE 4 BATCH 16"
            chosen = executor.plan(con, parse(text)[0], text)
            con.execute("SET strategy = 'naive'")
            naive = executor.plan(con, parse(text)[0], text)
            con.execute("SET strategy = 'incremental'")
            incremental = executor.plan(con, parse(text)[0], text)
            summary = summarize(spec.composed().eval(), con.catalog.resolve_image("img"))
            batches = naive.batches
            shape_naive = shape_naive_cost(summary, tp, 16, (3, h, w)).seconds * batches
            floor = shape_incremental_floor(summary, (16, 16), tp, 16)
            if floor is None:
                verdict, floor_text = "none (not priced)", "-"
            else:
                floor = floor * batches + summary.seconds
                verdict = "naive" if floor > physical.NAIVE_MARGIN * shape_naive else "trace"
                floor_text = f"{floor:.3f}"
            print(f"{name:<20} {size:<8} {chosen.operator.name.replace('Occlusion', ''):<12} "
                  f"{naive.run_seconds:>8.3f} {incremental.run_seconds:>8.3f} "
                  f"{shape_naive:>11.3f} {floor_text:>7}  {verdict}")


if __name__ == "__main__":
    main()
