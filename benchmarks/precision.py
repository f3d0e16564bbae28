"""Reduced precision against float32: speed and map quality, side by side in one run.

For each model the whole map ``OCCLUDE ... PATCH 16 STRIDE s BATCH 16`` (224 px) is
planned once per ``SET precision`` ('float32', 'bfloat16', 'int8'; 'float16' with
``--float16``) on one connection, then the plans and the plain PyTorch loop of ``kql
bench`` (torch's default threads) run in interleaved rounds. Printed per model: each
plan (operator, its items, predicted seconds), the median seconds, and for each
precision its speed-up over the float32 plan and over the plain loop, and its map
against the float32 map: SSIM, Spearman rank correlation of the cells, IoU of the
top-10% drop regions (:mod:`kql.planner.quality`).

EfficientNet-Lite0 has real ImageNet weights (the built-in model, on sample photos).
ResNet18 and VGG16 have random weights, ResNet18's BatchNorm statistics taken from eight
sample photos and the logits scaled so the unoccluded image's top class has p ~ 0.6 (a
random network's softmax is flat otherwise, and any map would match a flat one).

Usage (README's table):
  .venv/bin/python benchmarks/precision.py [--models efficientnet_lite0,resnet18,vgg16]
      [--stride 8] [--rounds 2] [--photo chelsea] [--plain-positions 96] [--float16]
"""
import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch
import torchvision
from torch import nn

import kql
from kql import executor
from kql.bench_engines import plain_loop_runner
from kql.catalog import images
from kql.language.parser import parse
from kql.operators.precision import unsupported
from kql.planner.quality import map_quality

PATCH, BATCH, SIDE = 16, 16, 224
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)     # ImageNet's, as torchvision's models


class Scaled(nn.Module):
    """A random network's logits times ``scale``: its map moves with the image."""

    def __init__(self, body: nn.Module, scale: float):
        super().__init__()
        self.body, self.scale = body, scale

    def forward(self, x):
        return self.body(x) * self.scale


def moving(body: nn.Module, image: torch.Tensor, top: float = 0.6) -> nn.Module:
    """``body`` with its logits scaled so ``image``'s top class has probability ``top``."""
    with torch.inference_mode():
        logits = body(image[None])[0].double()
    low, high = 1e-3, 1e6
    for _ in range(60):
        mid = (low * high) ** 0.5
        p = torch.softmax(logits * mid, 0).max().item()
        low, high = (mid, high) if p < top else (low, mid)
    return Scaled(body, float(low)).eval()


PHOTOS = ("astronaut", "coffee", "rocket", "camera", "retina", "horse", "clock", "chelsea")


def calibrated(body: nn.Module) -> nn.Module:
    """``body`` with its BatchNorm statistics taken from eight sample photos (the defaults,
    mean 0 and variance 1, let a random ResNet's activations drift until its map is
    noise)."""
    norms = [m for m in body.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        return body
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    batch = torch.stack([(images.resize(images.match_channels(images.load_sample(p), 3)[0],
                                        (SIDE, SIDE)) - mean) / std for p in PHOTOS])
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                          # a plain average over the batch
    body.train()
    with torch.no_grad():
        body(batch)
    return body.eval()


def connection(name: str, photo: str) -> tuple:
    con = kql.connect()
    picture = images.match_channels(images.load_sample(photo), 3)[0]
    con.register_image("img", images.resize(picture, (SIDE, SIDE)))
    if name == "efficientnet_lite0":
        return con, name
    torch.manual_seed(0)
    body = calibrated(getattr(torchvision.models, name)().eval())
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    scaled = moving(body, (images.resize(picture, (SIDE, SIDE)) - mean) / std)
    con.register_model("net", scaled, mean=MEAN, std=STD)
    return con, "net"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="efficientnet_lite0,resnet18,vgg16")
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--photo", default="chelsea")
    parser.add_argument("--plain-positions", type=int, default=96,
                        help="time the plain loop on about this many positions, scaled to the map")
    parser.add_argument("--float16", action="store_true", help="also float16")
    parser.add_argument("--with-ssim", type=float, default=None,
                        help="instead: WITH SSIM >= T on EfficientNet-Lite0, precision 'auto' "
                             "(may verify in bfloat16) against 'float32', on --photos")
    parser.add_argument("--photos", default="chelsea,rocket,retina,gravel,coffee")
    args = parser.parse_args()
    if args.with_ssim is not None:
        return with_ssim(args)
    precisions = ["float32", "bfloat16", "int8"] + (["float16"] if args.float16 else [])
    print(f"precision: torch {torch.__version__} on {torch.get_num_threads()} threads, "
          f"PATCH {PATCH} STRIDE {args.stride} BATCH {BATCH}, {SIDE} px, photo {args.photo}")
    for p in precisions:
        why = unsupported(p, "cpu")
        print(f"  {p}: {'supported' if why is None else why}")
    for name in args.models.split(","):
        con, model = connection(name, args.photo)
        text = f"OCCLUDE img USING {model} PATCH {PATCH} STRIDE {args.stride} BATCH {BATCH}"
        stmt = parse(text)[0]
        plans = {}
        for p in precisions:
            con.execute(f"SET precision = '{p}'")
            plan = executor.plan(con, stmt, text)
            plans[p] = plan
            print(f"{name}, {p}: {plan.operator.name} {plan.operator.describe()}, "
                  f"predicted {plan.run_seconds:.2f} s")
        task = plans["float32"].task()
        step = max(1, task.count // args.plain_positions) if args.plain_positions else 1
        part = dataclasses.replace(task, ys=task.ys[::step], xs=task.xs[::step])
        runs = {p: (lambda plan=plan: plan.run()) for p, plan in plans.items()}
        runs["plain loop"] = plain_loop_runner(part, BATCH)
        scale = {k: 1.0 for k in runs}
        scale["plain loop"] = task.count / part.count
        seconds, maps = {k: [] for k in runs}, {}
        for r in range(args.rounds):
            order = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]
            for key in order:
                began = time.perf_counter()
                out = runs[key]()
                seconds[key].append((time.perf_counter() - began) * scale[key])
                if key != "plain loop":
                    maps[key] = np.asarray(out.probabilities).reshape(task.count)
        took = {k: statistics.median(v) for k, v in seconds.items()}
        print(f"{name} (median of {args.rounds}): " + ", ".join(f"{k} {v:.2f} s" for k, v in took.items()))
        shape = plans["float32"].query.grid.shape
        exact = maps["float32"].reshape(shape)
        print(f"  float32 map: range {np.ptp(exact):.4f}")
        for p in precisions[1:]:
            q = map_quality(exact, maps[p].reshape(shape))
            print(f"  {p}: {took['float32'] / took[p]:.2f}x the float32 plan, "
                  f"{took['plain loop'] / took[p]:.2f}x the plain loop; SSIM {q['ssim']:.3f}, "
                  f"Spearman {q['spearman']:.3f}, top-10% IoU {q['top10_iou']:.2f}")
        print(f"  float32 plan: {took['plain loop'] / took['float32']:.2f}x the plain loop")


def with_ssim(args) -> None:
    """``WITH SSIM >= T`` on Lite0 under 'auto' and 'float32', interleaved per photo, each
    planned afresh; fidelity against KQL's exact float32 map, speed against each other."""
    print(f"WITH SSIM >= {args.with_ssim}: EfficientNet-Lite0, PATCH {PATCH} STRIDE {args.stride}, "
          f"torch {torch.__version__} on {torch.get_num_threads()} threads")
    ratios = []
    for photo in args.photos.split(","):
        con = kql.connect()
        con.plan_cache.learning = False
        query = (f"OCCLUDE sample('{photo}') USING efficientnet_lite0 PATCH {PATCH} "
                 f"STRIDE {args.stride}")
        exact = con.execute(query).heatmap
        took, maps, how = {}, {}, {}
        for r in range(args.rounds):
            for setting in (["auto", "float32"] if r % 2 == 0 else ["float32", "auto"]):
                con.execute(f"SET precision = '{setting}'")
                con.plan_cache.clear()
                began = time.perf_counter()
                out = con.execute(f"{query} WITH SSIM >= {args.with_ssim}")
                took.setdefault(setting, []).append(time.perf_counter() - began)
                maps[setting] = out.heatmap
                line = out.plan.splitlines()[1]
                how[setting] = ("bfloat16" if "precision=bfloat16" in line else "float32") + \
                    (f", lattice {out.check['lattice']}" if out.check else "")
        med = {k: statistics.median(v) for k, v in took.items()}
        ratios.append(med["float32"] / med["auto"])
        cells = ", ".join(f"{k}: {med[k]:.2f} s ({how[k]}), SSIM "
                          f"{map_quality(exact, maps[k])['ssim']:.3f}" for k in ("float32", "auto"))
        print(f"  {photo}: {cells}; float32 / auto {ratios[-1]:.2f}")
    print(f"median float32 / auto: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
