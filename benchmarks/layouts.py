"""Channels-last against contiguous, per model, input size and batch size.

Prints each whole model's forward time channels-last over contiguous (below 1: channels-last
is faster) at batch 1, 2, 4 and 16: the numbers behind the layout trial's whole batches
(``kql.operators.layout.LayoutTrial``), as a layout's speed at one batch size does not
tell it at another. Random weights, torch's default threads, medians of 5-7 calls after
two warm-up calls of each layout.

Usage: .venv/bin/python benchmarks/layouts.py [--models resnet18,googlenet]
       [--sizes 64x64,80x96]
"""
import argparse
import statistics
import time

import torch

from kql.bench import build_model

BATCHES = (1, 2, 4, 16)


def median_seconds(model, x, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,squeezenet1_1,googlenet")
    parser.add_argument("--sizes", default="64x64,80x96,112x112")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    with torch.inference_mode():
        for name in args.models.split(","):
            _, model = build_model(name)
            for h, w in sizes:
                ratios = []
                for b in BATCHES:
                    x = torch.randn(b, 3, h, w)
                    last = x.contiguous(memory_format=torch.channels_last)
                    for t in (x, last, x, last):
                        model(t)
                    calls = 7 if b < 16 else 5
                    ratios.append(median_seconds(model, last, calls) / median_seconds(model, x, calls))
                cells = "  ".join(f"b{b} {r:.2f}" for b, r in zip(BATCHES, ratios))
                print(f"{name:22s} {h}x{w}  channels-last / contiguous: {cells}", flush=True)


if __name__ == "__main__":
    main()
