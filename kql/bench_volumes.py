"""3D occlusion of a CT-sized volume: KQL's plan against the plain PyTorch loop and MONAI.

A ResNet-style 3D network shaped like MedicalNet's ResNet10 (7x7x7 stem at stride 2, max
pool, one basic block per width, 32-64-128-256 channels by default; random weights,
BatchNorm statistics from batches of volumes like the test's; ``--model densenet121``:
MONAI's ``DenseNet121(spatial_dims=3)``, calibrated alike) on a seeded ``1 x 64^3``
volume of smooth blobs, the whole map ``OCCLUDE vol USING net PATCH 8 STRIDE 4`` (3,375
positions), the cubes painted with the volume's mean (KQL's default for volumes):

* ``kql``: the plan KQL chooses at default settings, planned once and run each round
  (its EXPLAIN and, where the plan exposes its cost, MMAC per position and the FLOP ratio
  against full inference are printed first);
* ``plain loop``: the loop a user writes: paint the cubes, batches of ``--batch``,
  forward, softmax (torch's default threads);
* ``monai``: ``monai.visualize.OcclusionSensitivity`` at the same windows
  (``mask_size = patch``, ``n_batch = --batch``, the mean as its float ``mode``, the
  overlap whose step is the stride, softmax as ``activate``); it needs ``stride <= patch``.

Rounds are interleaved, each starting one engine later. ``--plain-positions N`` times the
plain loop on about N positions spread over the map and MONAI on a slab of the volume's
first depth rows with about N windows, each scaled to the whole map by the positions it
ran (a forward pass costs the same at every position). Printed: each engine's median and
best seconds for the whole map, plain / KQL and MONAI / KQL, and the max |diff| of KQL's
map from the plain loop's on the positions the loop ran.

Usage (``kql bench --volume`` runs :func:`main`; so does benchmarks/volumes.py):
  kql bench --volume [--size 64] [--patch 8] [--stride 4] [--rounds 3]
      [--plain-positions 256] [--channels 32,64,128,256] [--model resnet10|densenet121]
      [--batch 16] [--device cpu|cuda]
"""
import argparse
import copy
import itertools
import statistics
import time
import warnings

import numpy as np
import torch
from torch import nn

from . import connect, executor
from .bench_libraries import monai_overlap
from .language.parser import parse


class BasicBlock3d(nn.Module):
    """MedicalNet's basic block: two 3x3x3 convolutions with BatchNorm; a strided 1x1x1
    projection shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm3d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm3d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet10_3d(widths, classes: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv3d(1, widths[0], 7, 2, 3, bias=False), nn.BatchNorm3d(widths[0]),
              nn.ReLU(), nn.MaxPool3d(3, 2, 1)]
    cin = widths[0]
    for i, cout in enumerate(widths):
        layers.append(BasicBlock3d(cin, cout, 1 if i == 0 else 2))
        cin = cout
    layers += [nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers).eval()


def network(name: str, widths) -> nn.Module:
    """The benchmark's 3D network: ResNet10-style of ``widths``, or MONAI's DenseNet121."""
    if name == "resnet10":
        return resnet10_3d(widths)
    from monai.networks.nets import DenseNet121

    torch.manual_seed(0)
    return DenseNet121(spatial_dims=3, in_channels=1, out_channels=2).eval()


def blob_volume(size: int, seed: int) -> torch.Tensor:
    """``[1, size, size, size]``: smooth Gaussian blobs of either sign on a gradient."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.linspace(0, 1, size)
    zs, ys, xs = axis.view(-1, 1, 1), axis.view(1, -1, 1), axis.view(1, 1, -1)
    volume = 0.2 + 0.3 * (zs + ys + xs)
    for _ in range(8):
        cz, cy, cx, r = torch.rand(4, generator=g).tolist()
        radius = 0.08 + 0.2 * r
        blob = torch.exp(-((zs - cz) ** 2 + (ys - cy) ** 2 + (xs - cx) ** 2) / (2 * radius ** 2))
        volume = volume + 1.5 * (float(torch.rand(1, generator=g)) - 0.4) * blob
    return volume[None].float().contiguous()


@torch.no_grad()
def calibrated(model: nn.Module, size: int, passes: int = 2) -> nn.Module:
    """Running statistics = the average batch statistics of ``passes`` batches of two
    volumes like the benchmark's (a random network's are meaningless otherwise)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for p in range(passes):
        model(torch.stack([blob_volume(size, seed=100 + 2 * p + k) for k in range(2)]))
    return model.eval()


def corners(size: int, patch: int, stride: int) -> list:
    """Every cube's first voxel (z, y, x), in the map's (C) order."""
    starts = range(0, size - patch + 1, stride)
    return list(itertools.product(starts, starts, starts))


def plain_loop(model, volume, at: list, patch: int, color: float, batch: int):
    """Paint the cube at each of ``at``, batches of ``batch``, forward, softmax at the
    class predicted for ``volume``: the probabilities, float32 numpy."""
    def run():
        with torch.inference_mode():
            target = int(model(volume[None]).argmax())
            probs = []
            for start in range(0, len(at), batch):
                copies = []
                for z, y, x in at[start:start + batch]:
                    occluded = volume.clone()
                    occluded[:, z:z + patch, y:y + patch, x:x + patch] = color
                    copies.append(occluded)
                probs.append(torch.softmax(model(torch.stack(copies)), 1)[:, target])
            return torch.cat(probs).float().cpu().numpy()
    return run


class Counted(nn.Module):
    """``body``, counting the volumes it is run on."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body, self.seen = body, 0

    def forward(self, x):
        self.seen += x.shape[0]
        return self.body(x)


def monai_runner(model, volume, args, color: float, depth_rows: int):
    """MONAI's OcclusionSensitivity at the plan's windows, over the first ``depth_rows``
    rows of windows along depth (a ``b_box`` slab; all when it covers the volume); the run
    returns the number of windows it ran."""
    from monai.visualize import OcclusionSensitivity

    counted = Counted(model).eval()     # MONAI restores its mode, and train() recurses
    occ = OcclusionSensitivity(counted, mask_size=args.patch, n_batch=args.batch, verbose=False,
                               mode=float(color), overlap=monai_overlap(args.patch, args.stride),
                               activate=lambda out: out.softmax(1))
    depth = (depth_rows - 1) * args.stride + args.patch     # the slab's voxels along depth
    # MONAI widens a box by (mask - 1) // 2 on each side before sliding; this undoes it.
    b_box = None if depth >= args.size else [0, depth - (args.patch - 1) // 2, -1, -1, -1, -1]

    def run():
        counted.seen = 0
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            occ(volume[None], b_box=b_box)
        if volume.is_cuda:
            torch.cuda.synchronize()
        return counted.seen
    return run


def kql_plan(model, volume, args):
    """``(connection, plan, text, EXPLAIN text, FLOP-ratio line or None)`` of the query."""
    con = connect()
    con.plan_cache.lasting = None       # planned as a first query: no layout trial kept before,
    con.plan_cache.learning = False     # no correction from earlier scans, none recorded
    con.register_model("net", model)
    con.register_volume("vol", volume)
    text = f"OCCLUDE vol USING net PATCH {args.patch} STRIDE {args.stride}"
    stmt = parse(text)[0]
    plan = executor.plan(con, stmt, text)
    explain = "\n".join(plan.explain())       # the EXPLAIN text of the plan timed
    con.execute("SET strategy = 'naive'")
    naive = executor.plan(con, stmt, text)
    con.execute("SET strategy = 'auto'")
    try:
        full = naive.cost.macs / naive.batch
        per = plan.cost.macs * plan.batches / plan.query.grid.count
        if plan.operator.name == naive.operator.name:   # a naive plan may skip its costing
            per = full
        flops = (f"MMAC/position {per / 1e6:.0f} (full inference {full / 1e6:.0f}: "
                 f"FLOP ratio {full / per:.2f})")
    except (AttributeError, TypeError, ZeroDivisionError):
        flops = None                            # the plan exposes no cost
    return con, plan, text, explain, flops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="kql bench --volume", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="the volume's side (voxels)")
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--channels", default="32,64,128,256", help="the network's widths")
    parser.add_argument("--batch", type=int, default=16, help="the plain loop's and MONAI's")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--plain-positions", type=int, default=0,
                        help="time the plain loop and MONAI on about this many positions, "
                             "scaled to the whole map (0: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="the plain loop's and MONAI's device (KQL's plan picks its own)")
    parser.add_argument("--model", default="resnet10", choices=("resnet10", "densenet121"),
                        help="MedicalNet-shaped ResNet10 (--channels) or MONAI's DenseNet121")
    parser.add_argument("--no-monai", action="store_true")
    parser.add_argument("--no-kql", action="store_true", help="time the plain loop and MONAI only")
    args = parser.parse_args(argv)
    widths = [int(c) for c in args.channels.split(",")]
    model = calibrated(network(args.model, widths), args.size)
    volume = blob_volume(args.size, seed=0)
    color = float(volume.mean())
    at = corners(args.size, args.patch, args.stride)
    side = (args.size - args.patch) // args.stride + 1
    name = f"ResNet10-3D {args.channels}" if args.model == "resnet10" else "MONAI DenseNet121-3D"
    print(f"volumes: torch {torch.__version__} on {torch.get_num_threads()} threads, {name}, "
          f"1x{args.size}^3, PATCH {args.patch} STRIDE {args.stride}: "
          f"{len(at)} positions ({side}^3), plain loop and MONAI at batch {args.batch} "
          f"on {args.device}")

    runs, scale, results = {}, {}, {}
    if not args.no_kql:
        con, plan, text, explain, flops = kql_plan(model, volume, args)
        print(explain)
        print(f"kql: {plan.operator.name} on {plan.device}, "
              f"planned in {plan.planning_seconds:.2f} s"
              + (f", {flops}" if flops else ""))
        results["kql map"] = con.execute(text).heatmap      # warm-up; the map to compare
        runs["kql"], scale["kql"] = plan.run, 1.0
    device_model, device_volume = copy.deepcopy(model).to(args.device), volume.to(args.device)
    step = max(1, len(at) // args.plain_positions) if args.plain_positions else 1
    picked = list(range(0, len(at), step))
    runs["plain loop"] = plain_loop(device_model, device_volume, [at[i] for i in picked],
                                    args.patch, color, args.batch)
    scale["plain loop"] = len(at) / len(picked)
    if not args.no_monai and args.stride <= args.patch:
        rows = (max(1, round(args.plain_positions / side ** 2)) if args.plain_positions else side)
        runs["monai"] = monai_runner(device_model, device_volume, args, color, rows)
    elif not args.no_monai:
        print(f"monai: left out: its windows leave no gaps "
              f"(stride {args.stride} > patch {args.patch})")

    with torch.inference_mode():                           # warm-up: kernels, allocator
        device_model(device_volume[None].repeat(args.batch, 1, 1, 1, 1))
    seconds = {k: [] for k in runs}
    for r in range(args.rounds):
        order = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]
        for name in order:
            began = time.perf_counter()
            out = runs[name]()
            took = time.perf_counter() - began
            if name == "monai":
                scale["monai"] = len(at) / out             # the windows it ran
            results.setdefault(name, out)
            seconds[name].append(took * scale[name])
    ran = {k: f"{round(len(at) / scale[k])} positions" for k in runs if k != "kql"}
    print("timed on " + ", ".join(f"{k} {v}" for k, v in ran.items()) + ", scaled to the whole map")
    report(seconds, results, picked, side, args.rounds)
    return 0


def report(seconds: dict, results: dict, picked: list, side: int, rounds: int) -> None:
    for label, pick in (("median", statistics.median), ("best", min)):
        took = {k: pick(v) for k, v in seconds.items()}
        line = ", ".join(f"{k} {v:.2f} s" for k, v in took.items())
        if "kql" in took:
            line += "; " + ", ".join(f"{k} / kql {took[k] / took['kql']:.2f}x"
                                     for k in took if k != "kql")
        print(f"whole map ({label} of {rounds}): {line}")
    if "kql map" in results:
        kql_map = results["kql map"]
        assert kql_map.shape == (side,) * 3, kql_map.shape
        ours = kql_map.reshape(-1)[picked]
        diff = np.abs(ours - results["plain loop"])
        print(f"max |kql - plain loop| {diff.max():.2e} over {len(picked)} positions "
              f"(map range {kql_map.max() - kql_map.min():.3f})")


if __name__ == "__main__":
    raise SystemExit(main())
