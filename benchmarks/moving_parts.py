"""What each calibration row buys: the plans it changes, and the scan time that buys.

For every model of the suite and every input size it plans ``OCCLUDE ... PATCH 16
STRIDE 4`` with this machine's calibration table, then again with one row of the table
*ablated* (replaced by what the cost model would use without it: no output-channel
correction, the warm copy rate for fresh outputs and for the gather, the dataclass default
per-node overhead, the dense table for depthwise convolutions and matrix products). Table
version 9 dropped the rows this found buying nothing (average pooling, SiLU: README,
*Fewer moving parts*). A row that changes no plan
buys nothing but its prediction accuracy (printed: predicted seconds ablated / full); a
plan that changes is timed both ways, side by side and interleaved (``--repeat``
rounds, medians), and the row buys the slower plan's extra time. It also prints the
seconds each row's micro-benchmark adds to a calibration round (its share of CALIBRATE).

``--trials`` times the trials instead, each against the plan without it, side by side:
the layout trial (``SET layout = 'auto'``) against each fixed layout, and the close-call
operator trial (both operators tried on the first batches) against the same plan only
watched (probed mid-scan when it runs clearly slow), where the planner calls it close.

Plans are made as a first query ever would (a new connection, no layout trials or scan
feedback on file). Random weights, torch's default threads.

Usage: .venv/bin/python benchmarks/moving_parts.py [--models vgg16,resnet18]
       [--sizes 64,112,224] [--rows cout,gather] [--repeat 3] [--no-time]
       .venv/bin/python benchmarks/moving_parts.py --trials [--stride 8]
"""
import argparse
import dataclasses
import re
import statistics
import time

import torch

import kql
from kql import bench
from kql.catalog import images
from kql.planner import calibrate, micro_benchmarks, physical

SUITE = ("vgg16,resnet18,inception_v3,mobilenet_v2,squeezenet1_1,regnet_y_400mf,regnet_x_400mf,"
         "mobilenet_v3_small,shufflenet_v2_x0_5,efficientnet_b0,efficientnet_lite0,googlenet,"
         "densenet121,resnext50_32x4d,convnext_tiny")


def _without(table, **changes):
    return dataclasses.replace(table, **changes)    # a new table: its own interpolation memo


ABLATIONS = {
    "cout": lambda t: _without(t, cout=None),
    "gather": lambda t: _without(t, gather_rate=t.bandwidth / 2),
    "node_overhead": lambda t: _without(t, node_overhead=25e-6),
    "depthwise": lambda t: _without(t, depthwise=[row for row in t.dense[0]]),
    "matmul": lambda t: _without(t, matmul=t.dense[-1][-1]),
}

# Numbers that are estimates, not decisions: a plan is the same plan when only these differ.
_ESTIMATES = re.compile(r"(predicted_m?s|naive_predicted_s|planning_s|R|gflops|gather_mb|"
                        r"memory_mb)=[0-9.]+|reason=[^\n]*|predicted [0-9.]+ s( \(naive [0-9.]+ s\))?")


def signature(plan_text: str) -> str:
    """The plan's decisions (operators, steps, crossover, layout, watch), estimates removed."""
    return _ESTIMATES.sub("", plan_text)


def difference(full: str, other: str) -> str:
    """The decisions that differ, as ``full -> ablated`` (the first few)."""
    def parts(text):
        return [p.strip() for line in signature(text).splitlines()
                for p in re.split(r",\s*|:\s+", line) if "=" in p]
    a, b = parts(full), parts(other)
    gone = [p for p in a if p not in b][:3]
    new = [p for p in b if p not in a][:3]
    return f"{' '.join(gone) or '-'} -> {' '.join(new) or '-'}"


def predicted(plan_text: str) -> float:
    """Predicted seconds of the scan (the plan's own planning time taken out)."""
    def number(key):
        return float(re.search(key + r"=([0-9.]+)", plan_text).group(1))
    return number("predicted_s") - number("planning_s")


def connect(spec, photo, size: int):
    con = kql.connect()
    con.plan_cache.lasting = None
    con.plan_cache.learning = False
    con.register_model("m", spec.module, spec.mean, spec.std, (size, size))
    con.register_image("img", images.resize(photo, (size, size)))
    return con


QUERY = "OCCLUDE img USING m PATCH 16 STRIDE 4 BATCH 16"


def timed_query(spec, photo, size: int, query: str, layout: str = "auto", close: bool = True) -> float:
    """Seconds of ``query`` (planning included) in a new connection, the close-call trial
    switched off when ``close`` is False."""
    con = connect(spec, photo, size)
    con.execute(f"SET layout = '{layout}'")
    original = physical.CLOSE
    physical.CLOSE = physical.CLOSE if close else 1.0    # no ratio is within 1x
    try:
        start = time.perf_counter()
        con.execute(query)
        return time.perf_counter() - start
    finally:
        physical.CLOSE = original


def trials(args, photo) -> None:
    """Each trial against the plan without it, interleaved ``args.repeat`` times."""
    query = QUERY.replace("STRIDE 4", f"STRIDE {args.stride}")
    variants = {"auto": {}, "channels_last": {"layout": "channels_last"},
                "contiguous": {"layout": "contiguous"}, "no close trial": {"close": False}}
    print("ratios: seconds of the variant / seconds with every trial (medians)")
    for name in args.models.split(","):
        spec, _ = bench.build_model(name)
        for size in (int(s) for s in args.sizes.split(",")):
            try:
                con = connect(spec, photo, size)
                plan = con.execute("EXPLAIN " + query).plan.splitlines()[1].strip()
            except kql.KqlError as exc:
                print(f"{name:<20} {size:>3}  error: {exc}", flush=True)
                continue
            close = "trial=" in plan
            names = [v for v in variants if close or v != "no close trial"]
            times = {v: [] for v in names}
            for v in names:                       # warm: first calls allocate, load kernels
                timed_query(spec, photo, size, query, **variants[v])
            for _ in range(args.repeat):
                for v in names:
                    times[v].append(timed_query(spec, photo, size, query, **variants[v]))
            base = statistics.median(times["auto"])
            cells = ", ".join(f"{v} {statistics.median(times[v]) / base:.2f}" for v in names[1:])
            print(f"{name:<20} {size:>3}  {plan.split(':')[0]:<21} {base:6.2f} s  {cells}", flush=True)


def with_table(table, fn):
    """Run ``fn`` while the planner's calibration is ``table``."""
    original = calibrate.throughput
    calibrate.throughput = lambda device="cpu", directory=None, refresh=False: table
    try:
        return fn()
    finally:
        calibrate.throughput = original


def explain(spec, photo, size: int, table) -> str:
    con = connect(spec, photo, size)
    return with_table(table, lambda: con.execute("EXPLAIN " + QUERY).plan)


def scan_seconds(spec, photo, size: int, table) -> float:
    con = connect(spec, photo, size)
    start = time.perf_counter()
    with_table(table, lambda: con.execute(QUERY))
    return time.perf_counter() - start


def row_seconds(device: str = "cpu") -> dict:
    """Seconds one calibration round spends on each ablatable row's micro-benchmark."""
    from kql.operators.layout import CHANNELS_LAST, in_layout
    import torch.nn.functional as F
    dev, batch = torch.device(device), calibrate.BATCH

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    w = torch.randn(64, 1, 3, 3)
    a, m = torch.randn(batch, 4096), torch.randn(4096, 4096)

    def depthwise():
        for side in calibrate.SIDES:
            x = in_layout(torch.randn(batch, 64, side + 2, side + 2), CHANNELS_LAST)
            micro_benchmarks.timed(lambda: F.conv2d(x, w, groups=64), device)
    return {
        "cout": timed(lambda: [micro_benchmarks._conv_rate(dev, batch, 576, c, 8, CHANNELS_LAST)
                               for c in calibrate.COUTS]),
        "gather": timed(lambda: micro_benchmarks._gather_rate(dev, batch)),
        "node_overhead": timed(lambda: micro_benchmarks._engine_overhead(device)),
        "depthwise": timed(depthwise),
        "matmul": timed(lambda: micro_benchmarks.timed(lambda: a @ m, device)),
        "whole round": timed(lambda: micro_benchmarks.one_round(device)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=SUITE)
    parser.add_argument("--sizes", default="64,112,224")
    parser.add_argument("--rows", default=",".join(ABLATIONS))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-time", action="store_true", help="plans only, time nothing")
    parser.add_argument("--trials", action="store_true", help="time the trials, not the rows")
    parser.add_argument("--stride", type=int, default=4, help="of the trials' query")
    args = parser.parse_args()
    if args.trials:
        trials(args, images.match_channels(images.load_sample("chelsea"), 3)[0])
        return
    rows = args.rows.split(",")
    table = calibrate.throughput("cpu")
    print(f"calibration: {table.verdict()}, torch threads {torch.get_num_threads()}")
    print("seconds per calibration round: " + ", ".join(
        f"{k} {v:.2f}" for k, v in row_seconds().items()), flush=True)
    photo = images.match_channels(images.load_sample("chelsea"), 3)[0]
    changed = {row: [] for row in rows}
    for name in args.models.split(","):
        spec, _ = bench.build_model(name)
        for size in (int(s) for s in args.sizes.split(",")):
            try:
                explain(spec, photo, size, table)     # warm: the first plan pays imports
                full = explain(spec, photo, size, table)
            except kql.KqlError as exc:          # InceptionV3 refuses 64x64
                print(f"{name:<20} {size:>3}  error: {exc}", flush=True)
                continue
            cells = []
            for row in rows:
                ablated = ABLATIONS[row](table)
                text = explain(spec, photo, size, ablated)
                ratio = predicted(text) / predicted(full)
                if signature(text) == signature(full):
                    cells.append(f"{row} same (pred x{ratio:.2f})")
                    continue
                cell = f"{row} CHANGED [{difference(full, text)}] (pred x{ratio:.2f})"
                if not args.no_time:
                    times = {"full": [], "ablated": []}
                    for _ in range(args.repeat):       # interleaved: load hits both alike
                        times["full"].append(scan_seconds(spec, photo, size, table))
                        times["ablated"].append(scan_seconds(spec, photo, size, ablated))
                    slower = statistics.median(times["ablated"]) / statistics.median(times["full"])
                    cell += f" ablated/full scan {slower:.2f}"
                    changed[row].append((name, size, slower))
                else:
                    changed[row].append((name, size, None))
                cells.append(cell)
            first = full.splitlines()[1].strip().split(":")[0]
            print(f"{name:<20} {size:>3}  {first:<21} " + "; ".join(cells), flush=True)
    print("\nrow: plans changed (ablated/full scan time)")
    for row in rows:
        detail = ", ".join(f"{n} {s}" + (f" {r:.2f}" if r is not None else "") for n, s, r in changed[row])
        print(f"  {row}: {len(changed[row])} {detail}")


if __name__ == "__main__":
    main()
