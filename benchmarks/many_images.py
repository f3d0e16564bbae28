"""Many images per query, side by side in one run: images per minute of

  loop   a Python loop of single-image queries on one connection (today's API: every
         image planned again: trace, views, costing),
  many   one many-image query over the folder (planned once, rebound per image),
  many1  the same at one torch thread,
  ray    the same ON RAY on a local cluster of N workers at one thread each.

Images: 224x224 crops of skimage photos (rotated and flipped variants), written to a
temporary folder. EfficientNet-Lite0, patch 16, stride 8.

Usage: .venv/bin/python benchmarks/many_images.py [--images 8] [--workers 2] [--no-ray]
       [--engines loop,many,many1,ray]
"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import kql

parser = argparse.ArgumentParser()
parser.add_argument("--images", type=int, default=8)
parser.add_argument("--workers", type=int, default=2)
parser.add_argument("--no-ray", action="store_true")
parser.add_argument("--engines", default="loop,many,many1,ray")
args = parser.parse_args()


def photos(count):
    import skimage.data

    names = ("chelsea", "coffee", "astronaut", "rocket")
    for k in range(count):
        photo = getattr(skimage.data, names[k % len(names)])()
        h, w = photo.shape[:2]
        side = min(h, w)
        crop = photo[(h - side) // 2:(h + side) // 2, (w - side) // 2:(w + side) // 2]
        crop = np.rot90(crop, k // len(names) % 4)
        yield Image.fromarray(np.ascontiguousarray(crop)).resize((224, 224), Image.BILINEAR)


folder = tempfile.mkdtemp(prefix="kql-many-")
for k, im in enumerate(photos(args.images)):
    im.save(os.path.join(folder, f"img{k:03d}.png"))
files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
QUERY = "USING efficientnet_lite0 PATCH 16 STRIDE 8"


def per_minute(seconds):
    return 60.0 * len(files) / seconds


def timed(run):
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


con = kql.connect()
con.execute(f"OCCLUDE '{files[0]}' {QUERY} REGION (0, 0, 64, 64)")     # warm: calibration, imports
threads = torch.get_num_threads()
results = {}
engines = args.engines.split(",")
if "loop" in engines:
    results["loop"] = timed(lambda: [con.execute(f"OCCLUDE '{f}' {QUERY}") for f in files])
if "many" in engines:
    results["many"] = timed(lambda: con.execute(f"OCCLUDE '{folder}/*.png' {QUERY}"))
if "many1" in engines:
    torch.set_num_threads(1)
    results["many1"] = timed(lambda: con.execute(f"OCCLUDE '{folder}/*.png' {QUERY}"))
    torch.set_num_threads(threads)
if "ray" in engines and not args.no_ray:
    import ray

    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    con.execute(f"OCCLUDE '{folder}/img00[01].png' {QUERY} REGION (0, 0, 64, 64) ON RAY")   # warm the pool
    results["ray"] = timed(lambda: con.execute(f"OCCLUDE '{folder}/*.png' {QUERY} ON RAY"))
for name, seconds in results.items():
    print(f"{name:>6}: {seconds:7.1f} s, {per_minute(seconds):6.2f} images/min", flush=True)
if "loop" in results and "many" in results:
    print(f"many-image query vs loop of single-image queries: {results['loop'] / results['many']:.2f}x")
if "ray" in results and "many1" in results:
    print(f"ray ({args.workers} workers, 1 thread each) vs one process at 1 thread: "
          f"{results['many1'] / results['ray']:.2f}x")
