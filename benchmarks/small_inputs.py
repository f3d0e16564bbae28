"""A small input's chosen plan against a plain loop, in interleaved rounds.

``kql bench`` times each engine three times in rotated order; on a scan of 0.2-0.5 s
(a 64x64 input) its medians move by 10-20% on a shared machine. This runs more rounds,
each engine once per round in the same order, on the whole map:

  plain       the loop a user writes without KQL (``kql.bench.plain_loop_runner``),
  chosen      KQL as a first query: the plan cache cleared, planned (timed), run,
  contiguous  the same plan's task run by the naive operator in torch's default
              layout, with no layout trial (what the trial costs or saves),
  repeated    KQL as a repeated query (another target on the same image): the plan
              cache kept, so the plan and the layout trial's outcome come from it,
  new process KQL as the first query of a new process on a machine where an earlier
              one ran it: the plan cache cleared, the layout trial's outcome read from
              ``layouts.json`` (kql.planner.layout_file; a temporary folder here) when the
              warm-up round wrote it (a clear outcome on a quiet machine).

Random weights, patch 16, stride 4, batch 16, torch's default threads.

Usage: .venv/bin/python benchmarks/small_inputs.py [--model resnet18] [--size 64x64]
       [--rounds 9] [--rows N]

``--rows N`` scans a band of N pixel rows across the middle of the image instead of the
whole map (an ImageNet-size input's whole map takes minutes per engine and round).
"""
import argparse
import os
import statistics
import tempfile
import time

import kql
from kql import bench, executor
from kql.catalog import images
from kql.operators.layout import CONTIGUOUS
from kql.operators.naive import NaiveOcclusion
from kql.language.parser import parse
from kql.planner.layout_file import FILE, LastingLayouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", default="64x64", help="the model's input size, HxW")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--rows", type=int, default=None, help="a band of this many pixel rows")
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.split("x"))

    con = kql.connect()
    con.plan_cache.lasting = None                # a first query ever: no trial on file
    con.plan_cache.learning = False              # nor scans timed before (feedback)
    spec, _ = bench.build_model(args.model)
    con.register_model(args.model, spec.module, spec.mean, spec.std, (h, w))
    photo = images.match_channels(images.load_sample("chelsea"), 3)[0]
    con.register_image("img", images.resize(photo, (h, w)))
    text = f"OCCLUDE img USING {args.model} PATCH 16 STRIDE 4 BATCH 16"
    if args.rows:
        rows = max(16, min(args.rows, h))
        text += f" REGION (0, {(h - rows) // 2}, {w}, {rows})"
    stmt = parse(text)[0]
    first = executor.plan(con, stmt, text)
    planning = []

    def chosen():
        con.plan_cache.clear()
        start = time.perf_counter()
        plan = executor.plan(con, stmt, text)
        planning.append(time.perf_counter() - start)
        plan.run()

    def contiguous():
        con.plan_cache.clear()
        plan = executor.plan(con, stmt, text)
        NaiveOcclusion(16, None, CONTIGUOUS).run(plan.task())

    kept = kql.connect()                         # its own connection: never cleared
    kept.register_model(args.model, spec.module, spec.mean, spec.std, (h, w))
    kept.register_image("img", images.resize(photo, (h, w)))
    again = parse(text + " TARGET 1")[0]

    def repeated():
        executor.plan(kept, again, text + " TARGET 1").run()

    folder = tempfile.mkdtemp(prefix="kql-layouts-")
    fresh = kql.connect()
    fresh.plan_cache.lasting = LastingLayouts(folder)
    fresh.register_model(args.model, spec.module, spec.mean, spec.std, (h, w))
    fresh.register_image("img", images.resize(photo, (h, w)))

    def new_process():
        fresh.plan_cache.clear()
        executor.plan(fresh, stmt, text).run()

    engines = {"plain": bench.plain_loop_runner(first.task(), 16), "chosen": chosen,
               "contiguous": contiguous, "repeated": repeated, "new process": new_process}
    times = {name: [] for name in engines}
    for run in engines.values():
        run()                                    # warm-up: kernels, caches
    for _ in range(args.rounds):
        for name, run in engines.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{args.model} {args.size}: {first.query.grid.count} positions, {args.rounds} rounds, "
          f"chosen {first.operator.name} ({first.reason or 'costed'})")
    for name, seconds in median.items():
        print(f"  {name:<11} {seconds:7.3f} s  {median['plain'] / seconds:5.2f}x of the plain loop")
    print(f"  planning    {statistics.median(planning):7.3f} s (median)")
    on_file = os.path.exists(os.path.join(folder, FILE))
    print(f"  new process: the layout {'was' if on_file else 'was not'} on file (layouts.json "
          f"{'written by the warm-up round' if on_file else 'not written: a close call or a busy machine'})")


if __name__ == "__main__":
    main()
