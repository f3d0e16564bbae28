"""Many images per query, side by side in one run: images per minute of

  loop   a Python loop of single-image queries on one connection (today's API: every
         image planned again: trace, views, costing),
  many   one many-image query over the folder (planned once, rebound per image),
  many1  the same at one torch thread,
  ray    the same ON RAY on a local cluster of N workers at one thread each.

Images: 224x224 crops of skimage photos (rotated and flipped variants), written to a
temporary folder. EfficientNet-Lite0, patch 16, stride 8.

With ``--chunks K`` the images are split into K folders and the engines take turns on
each (the order reversed every other folder), so that the machine's drift over a long run
falls on every engine alike; each many-image query then plans its folder's first image
(K first plans in all, against the loop's one per image).

Usage: .venv/bin/python benchmarks/many_images.py [--images 8] [--workers 2] [--no-ray]
       [--engines loop,many,many1,ray] [--chunks 1]
"""
import argparse
import glob
import os
import shutil
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
parser.add_argument("--chunks", type=int, default=1)
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


root = tempfile.mkdtemp(prefix="kql-many-")
folders = [os.path.join(root, f"part{c}") for c in range(args.chunks)]
for folder in folders:
    os.makedirs(folder)
files = []
for k, im in enumerate(photos(args.images)):
    files.append(os.path.join(folders[k % args.chunks], f"img{k:03d}.png"))
    im.save(files[-1])
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
engines = [e for e in args.engines.split(",") if not (e == "ray" and args.no_ray)]
if "ray" in engines:
    import ray

    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    warm = os.path.join(root, "warm")
    os.makedirs(warm)
    for f in files[:2]:
        shutil.copy(f, warm)
    con.execute(f"OCCLUDE '{warm}/*.png' {QUERY} REGION (0, 0, 64, 64) ON RAY")   # warm the pool


def run(engine, folder):
    if engine == "loop":
        for f in sorted(glob.glob(os.path.join(folder, "*.png"))):
            con.execute(f"OCCLUDE '{f}' {QUERY}")
    elif engine == "many":
        con.execute(f"OCCLUDE '{folder}/*.png' {QUERY}")
    elif engine == "many1":
        torch.set_num_threads(1)
        try:
            con.execute(f"OCCLUDE '{folder}/*.png' {QUERY}")
        finally:
            torch.set_num_threads(threads)
    elif engine == "ray":
        con.execute(f"OCCLUDE '{folder}/*.png' {QUERY} ON RAY")


results = dict.fromkeys(engines, 0.0)
for c, folder in enumerate(folders):
    for engine in (engines if c % 2 == 0 else engines[::-1]):
        results[engine] += timed(lambda: run(engine, folder))
for name, seconds in results.items():
    print(f"{name:>6}: {seconds:7.1f} s, {per_minute(seconds):6.2f} images/min", flush=True)
if "loop" in results and "many" in results:
    print(f"many-image query vs loop of single-image queries: {results['loop'] / results['many']:.2f}x")
if "ray" in results and "many1" in results:
    print(f"ray ({args.workers} workers, 1 thread each) vs one process at 1 thread: "
          f"{results['many1'] / results['ray']:.2f}x")
