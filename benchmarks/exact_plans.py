"""The exact plans beyond the seed paper, on whole maps, against the plain PyTorch loop.

For each model (torchvision, random weights; 299 px for InceptionV3, else 224), the whole
map ``OCCLUDE ... PATCH 16 STRIDE 4 BATCH 16`` runs under three settings on one
connection, plans made once, rounds interleaved with the plain loop of ``kql bench``
(torch's default threads):

* ``paper``: one region size for every position, every convolution over its window
  (``SET position_groups = 'off'``, ``SET delta_convolutions = 'off'``): the seed
  paper's algorithm with KQL's crossover;
* ``groups``: positions grouped by region size, convolutions over their windows;
* ``default``: what the planner picks (groups and delta convolutions where priced cheaper).

Printed per model: each plan (operator items, predicted seconds, MMAC per position and the
FLOP ratio against full inference, as costed), the medians and the best rounds (other work
on a shared machine only ever slows a run down), and the ratios side by side: plain loop /
plan, and efficiency (measured ratio / FLOP ratio). ``--plain-positions N`` times the plain
loop on about N positions spread over the map and scales it to the whole map (its time per
position is the same at every position), so that VGG16's 6-11 minute loop does not set the
length of each round.

Usage (README's numbers):
  .venv/bin/python benchmarks/exact_plans.py [--models vgg16,resnet18,inception_v3]
      [--rounds 2] [--no-plain] [--plain-positions 352]
"""
import argparse
import dataclasses
import statistics
import time

import torch
import torchvision

import kql
from kql import executor
from kql.bench_engines import plain_loop_runner
from kql.catalog import images
from kql.language.parser import parse

PATCH, STRIDE, BATCH = 16, 4, 16
VARIANTS = {"paper": {"position_groups": "off", "delta_convolutions": "off"},
            "groups": {"position_groups": "auto", "delta_convolutions": "off"},
            "default": {"position_groups": "auto", "delta_convolutions": "auto"}}


def model_of(name: str):
    kwargs = {"aux_logits": False, "init_weights": False} if name == "inception_v3" else {}
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(**kwargs).eval()


def connection(name: str) -> tuple:
    """``(side, connection, statement, text)``: the model as "net", chelsea at its input
    size as "img", and the whole-map query."""
    side = 299 if name == "inception_v3" else 224
    con = kql.connect()
    con.register_model("net", model_of(name))
    photo = images.match_channels(images.load_sample("chelsea"), 3)[0]
    con.register_image("img", images.resize(photo, (side, side)))
    text = f"OCCLUDE img USING net PATCH {PATCH} STRIDE {STRIDE} BATCH {BATCH}"
    return side, con, parse(text)[0], text


def plans_of(name: str) -> tuple:
    side, con, stmt, text = connection(name)
    plans = {}
    for variant, settings in VARIANTS.items():
        for key, value in settings.items():
            con.execute(f"SET {key} = '{value}'")
        plans[variant] = executor.plan(con, stmt, text)
    con.execute("SET strategy = 'naive'")
    naive = executor.plan(con, stmt, text)
    full = naive.cost.macs / naive.batch
    return side, plans, full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16,resnet18,inception_v3")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-plain", action="store_true", help="leave the plain loop out")
    parser.add_argument("--plain-positions", type=int, default=0,
                        help="time the plain loop on about this many positions spread over the "
                             "map, scaled to the whole map (0: all)")
    args = parser.parse_args()
    print(f"exact_plans: torch {torch.__version__} on {torch.get_num_threads()} threads, "
          f"PATCH {PATCH} STRIDE {STRIDE} BATCH {BATCH}, whole map")
    for name in args.models.split(","):
        side, plans, full = plans_of(name)
        flops = {}
        for variant, p in plans.items():
            per = p.cost.macs * p.batches / p.query.grid.count
            flops[variant] = full / per
            print(f"{name} {side} px, {variant}: {p.operator.name} {p.operator.describe()}, "
                  f"predicted {p.run_seconds:.2f} s, MMAC/position {per / 1e6:.0f} "
                  f"(full inference {full / 1e6:.0f}: FLOP ratio {flops[variant]:.2f})")
        runs = {k: (lambda p=p: p.run()) for k, p in plans.items()}
        scale = {k: 1.0 for k in runs}
        if not args.no_plain:
            task = plans["paper"].task()
            step = max(1, task.count // args.plain_positions) if args.plain_positions else 1
            part = dataclasses.replace(task, ys=task.ys[::step], xs=task.xs[::step])
            runs["plain loop"] = plain_loop_runner(part, BATCH)
            scale["plain loop"] = task.count / part.count     # its time per position is the same anywhere
        seconds = {k: [] for k in runs}
        for r in range(args.rounds):
            order = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]
            for key in order:
                began = time.perf_counter()
                runs[key]()
                seconds[key].append((time.perf_counter() - began) * scale[key])
        for label, pick in (("median", statistics.median), ("best", min)):
            took = {k: pick(v) for k, v in seconds.items()}
            print(f"{name} ({label} of {args.rounds}): " + ", ".join(f"{k} {v:.2f} s" for k, v in took.items())
                  + f"; paper / default {took['paper'] / took['default']:.2f}")
            if "plain loop" in took:
                for variant in plans:
                    ratio = took["plain loop"] / took[variant]
                    print(f"  plain / {variant} {ratio:.2f} (FLOP ratio {flops[variant]:.2f}, "
                          f"efficiency {ratio / flops[variant]:.2f})")


if __name__ == "__main__":
    main()
