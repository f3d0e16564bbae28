"""Planning time of a first and a repeated query (another colour, then another stride) on
one connection, against one batch-1 forward pass of the model (torch's default threads).

Usage: .venv/bin/python benchmarks/plan_cache.py [model ...]   (default: efficientnet_lite0 resnet18 vgg16)
"""
import re
import sys
import time

import torch

import kql
from kql.bench import build_model

for name in sys.argv[1:] or ["efficientnet_lite0", "resnet18", "vgg16"]:
    con = kql.connect()
    spec, module = build_model(name)
    if name != "efficientnet_lite0":
        con.register_model(name, spec.module, spec.mean, spec.std, spec.input_size)
    base = f"EXPLAIN OCCLUDE sample('chelsea') USING {name} PATCH 16 STRIDE 4"
    times = []
    for query in (base, base + " COLOR black", base.replace("STRIDE 4", "STRIDE 8")):
        line = con.execute(query).plan.splitlines()[1]
        times.append(float(re.search(r"planning_s=([0-9.]+)", line).group(1)))
    image = torch.rand(1, 3, *spec.input_size)
    with torch.inference_mode():
        module(image)
        start = time.perf_counter()
        for _ in range(5):
            module(image)
        forward = (time.perf_counter() - start) / 5
    print(f"{name}: first query plans in {times[0]:.3f}s; repeated (other colour) {times[1]:.3f}s, "
          f"(other stride) {times[2]:.3f}s; one batch-1 forward pass {forward:.3f}s", flush=True)
