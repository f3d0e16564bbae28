"""What CALIBRATE costs and what it returns, on EfficientNet-Lite0 (real weights).

1. ``CALIBRATE efficientnet_lite0 ON (sample(a), sample(b), sample(c)) <geometry>``: its
   time per photo against the plain PyTorch loop's time for one map of the same geometry
   (torch's default threads, batch 16, timed on a band of grid rows and scaled to the
   whole map, right before and after CALIBRATE), and its message.
2. ``WITH SSIM >= T`` on photos the tuning never saw, with the tuning and without it (a
   second connection; both warmed up by one query on a tuning photo), interleaved per
   photo in alternating order, each planned afresh: the plan, seconds, SSIM against the
   exact map. A tuning must never make a query slower than no tuning.

Usage: .venv/bin/python benchmarks/calibrate_cost.py ["PATCH 16 STRIDE 4"] [--target 0.9]
           [--tune chelsea,astronaut,rocket] [--test coffee,retina,gravel,camera]
"""
import argparse
import dataclasses
import statistics
import tempfile
import time

import torch

import kql
from kql import executor
from kql.bench_engines import plain_loop_runner
from kql.language.parser import parse
from kql.planner.quality import map_quality

BAND_ROWS = 2


def plain_seconds(con, geometry: str, photo: str) -> float:
    """The plain loop's seconds for a whole map, timed on a band of grid rows."""
    text = f"OCCLUDE sample('{photo}') USING efficientnet_lite0 {geometry} BATCH 16"
    plan = executor.plan(con, parse(text)[0], text)
    task = plan.task()
    rows, cols = plan.query.grid.shape
    part = dataclasses.replace(task, ys=task.ys[:BAND_ROWS * cols], xs=task.xs[:BAND_ROWS * cols])
    run = plain_loop_runner(part, 16)
    began = time.perf_counter()
    run()
    return (time.perf_counter() - began) * task.count / part.count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("geometry", nargs="?", default="PATCH 16 STRIDE 4")
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--tune", default="chelsea,astronaut,rocket")
    parser.add_argument("--test", default="coffee,retina,gravel,camera")
    args = parser.parse_args()
    tune, test = args.tune.split(","), args.test.split(",")
    print(f"calibrate_cost: {args.geometry}, torch {torch.__version__} on "
          f"{torch.get_num_threads()} threads")
    tuned = kql.connect(tempfile.mkdtemp(prefix="kql-calibrate-"))
    plain = kql.connect()
    before = plain_seconds(plain, args.geometry, tune[0])
    said = []
    tuned.on_warning = said.append
    images = ", ".join(f"sample('{p}')" for p in tune)
    began = time.perf_counter()
    out = tuned.execute(f"CALIBRATE efficientnet_lite0 ON ({images}) {args.geometry}")
    took = time.perf_counter() - began
    after = plain_seconds(plain, args.geometry, tune[0])
    loop = (before + after) / 2
    print(f"said first: {said[0] if said else '(nothing)'}")
    print(f"CALIBRATE: {took:.1f} s for {len(tune)} photos, {took / len(tune):.1f} s per photo; "
          f"plain loop map {loop:.1f} s ({before:.1f} before, {after:.1f} after): "
          f"{took / len(tune) / loop:.2f} plain-loop maps per photo")
    print(f"  {out.message}")
    warm = (f"OCCLUDE sample('{tune[0]}') USING efficientnet_lite0 {args.geometry} "
            f"WITH SSIM >= {args.target}")
    for con in (tuned, plain):              # both planned once: models, measured ratios
        con.execute(warm)
    ratios = []
    for n, photo in enumerate(test):
        query = (f"OCCLUDE sample('{photo}') USING efficientnet_lite0 {args.geometry} "
                 f"WITH SSIM >= {args.target}")
        exact = plain.execute(query.split(" WITH")[0]).heatmap
        seconds, how = {}, {}
        pair = [("tuned", tuned), ("untuned", plain)]
        for name, con in (pair if n % 2 == 0 else pair[::-1]):
            con.plan_cache.clear()
            began = time.perf_counter()
            result = con.execute(query)
            seconds[name] = time.perf_counter() - began
            line = result.plan.splitlines()[1]
            lattice = f" lattice {result.check['lattice']}" if result.check else ""
            how[name] = (f"{line.split(':')[0].strip()}{lattice}, SSIM "
                         f"{map_quality(exact, result.heatmap)['ssim']:.3f}")
        ratios.append(seconds["untuned"] / seconds["tuned"])
        print(f"  {photo}: tuned {seconds['tuned']:.2f} s ({how['tuned']}); untuned "
              f"{seconds['untuned']:.2f} s ({how['untuned']}); untuned / tuned {ratios[-1]:.2f}")
    print(f"median untuned / tuned: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
