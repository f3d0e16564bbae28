"""Several targets from one scan: the time of TARGET TOP 5 against TARGET PREDICTED on the
same positions, same plan (medians of rounds, each a fresh run of both, interleaved).

Usage: .venv/bin/python benchmarks/targets.py [model ...] [--rounds N]
       (default: resnet18 efficientnet_lite0; 224x224 chelsea, patch 16, stride 8, a region)
"""
import statistics
import sys
import time

import kql
from kql.bench import build_model

args = sys.argv[1:]
rounds = int(args[args.index("--rounds") + 1]) if "--rounds" in args else 3
names = [a for i, a in enumerate(args) if not a.startswith("--") and (i == 0 or args[i - 1] != "--rounds")]
for name in names or ["resnet18", "efficientnet_lite0"]:
    con = kql.connect()
    spec, _ = build_model(name)
    if name != "efficientnet_lite0":
        con.register_model(name, spec.module, spec.mean, spec.std, spec.input_size)
    base = (f"OCCLUDE sample('chelsea') USING {name} PATCH 16 STRIDE 8 "
            f"REGION (0, 0, 451, 150) BATCH 16")
    con.execute(base)                                   # warm: plan cache, calibration
    times = {"one": [], "five": []}
    for _ in range(rounds):
        for key, clause in (("one", " TARGET PREDICTED"), ("five", " TARGET TOP 5")):
            start = time.perf_counter()
            result = con.execute(base + clause)
            times[key].append(time.perf_counter() - start)
    one, five = statistics.median(times["one"]), statistics.median(times["five"])
    print(f"{name}: {result.heatmap.size} positions; 1 target {one:.2f}s, 5 targets {five:.2f}s "
          f"-> {five / one:.3f}x the time of one", flush=True)
