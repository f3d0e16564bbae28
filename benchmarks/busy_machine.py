"""A planner a busy machine cannot fool: calibration, scans and feedback under load.

Burners (pure-Python busy loops in processes this script starts, each ending by itself
after ``--max-seconds``, all stopped in a ``finally``) play the other work on a shared
machine. The query is ``OCCLUDE ... PATCH 16 STRIDE 4 BATCH 16`` over a band of about
``--positions`` positions (whole grid rows around the centre, as ``kql bench`` takes
them) of chelsea; torchvision models have random weights, efficientnet_lite0 its own.

  case 1  CALIBRATE under load, then quiet: EXPLAIN ANALYZE's predicted/actual; the full
          map's prediction in a new process (``kql --catalog DIR -c``, the model's own
          size) and whether ``confirm_seconds = 3600`` refuses it (the band runs with the
          limit scaled by its share of the full map's prediction); the plan against a
          quiet CALIBRATE's (both timed when they differ).
  case 2  busy while the query runs: a plain PyTorch loop against KQL's default exact
          plan as a first query (a new connection each round), interleaved rounds:
          medians, plain/KQL (target >= 0.9), the operators KQL's scans ran.
  case 3  feedback: EXPLAIN's predicted run, then the run, 4 times quiet and 4 times
          busy on one connection (target: within 1.5x after 3 scans).

Usage (README's numbers):
  .venv/bin/python benchmarks/busy_machine.py [--cases 1,2,3] [--burners 6]
      [--models resnet18,efficientnet_lite0] [--watch-models ...|all] [--positions 128]
"""
import argparse
import contextlib
import functools
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from unittest import mock

import torch

import kql
from kql import bench, executor
from kql.catalog import images
from kql.catalog.models import BUILTIN, default_input_size
from kql.language.parser import parse

PATCH, STRIDE, BATCH, CONFIRM = 16, 4, 16, 3600
BURN = ("import sys, time\n"                  # a burner: busy until its own deadline
        "end = time.monotonic() + float(sys.argv[1])\n"
        "while time.monotonic() < end:\n    pass\n")


@contextlib.contextmanager
def burners(count: int, max_seconds: float):
    """``count`` busy-loop processes while the block runs (each also stops by itself)."""
    procs = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen([sys.executable, "-c", BURN, str(max_seconds)]))
        time.sleep(0.5 if count else 0)           # let them reach the loop
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@contextlib.contextmanager
def fresh_cache():
    """``$KQL_CACHE_DIR`` pointed at a new temporary folder for the block."""
    with tempfile.TemporaryDirectory(prefix="kql-busy-cache-") as folder, \
            mock.patch.dict(os.environ, {"KQL_CACHE_DIR": folder}):
        yield folder


@functools.lru_cache(maxsize=None)
def photo():
    return images.match_channels(images.load_sample("chelsea"), 3)[0]


@functools.lru_cache(maxsize=None)
def model(name: str):
    return bench.build_model(name)[0]


def connection(name: str, size: int, directory=None):
    """A connection holding model ``net`` (``name`` at size x size) and image ``img``."""
    spec = model(name)
    con = kql.connect(directory)
    con.register_model("net", spec.module, spec.mean, spec.std, (size, size))
    con.register_image("img", images.resize(photo(), (size, size)))
    return con


def region(size: int, positions: int) -> str:
    """``REGION (...)`` of the band of whole grid rows holding about ``positions``."""
    cells = (size - PATCH) // STRIDE + 1
    r0, r1 = bench.band(cells, cells, positions)
    y0, y1 = r0 * STRIDE, (r1 - 1) * STRIDE + PATCH
    return f" REGION (0, {y0}, {size}, {y1 - y0})"


def query(image: str, model_name: str, where: str = "") -> str:
    return f"OCCLUDE {image} USING {model_name} PATCH {PATCH} STRIDE {STRIDE}{where} BATCH {BATCH}"


def operator(plan: str) -> tuple:
    """(name, {key: value}) of the operator line (the one after ``HeatMap:``)."""
    lines = plan.splitlines()
    line = next(lines[i + 1] for i, text in enumerate(lines) if text.startswith("HeatMap:"))
    name, _, rest = line.strip().partition(": ")
    return name, dict(re.findall(r"([\w/]+)=((?:[^,(]|\([^)]*\))*)", rest))


def seconds(items: dict, key: str):
    return float(items[key]) if key in items else None


def run_seconds(items: dict):
    """The predicted run of an operator line: ``predicted_s`` less the planning it counts."""
    predicted = seconds(items, "predicted_s")
    return None if predicted is None else predicted - (seconds(items, "planning_s") or 0.0)


def notes(items: dict) -> str:
    """The calibration and correction items of an operator line, if any."""
    shown = [f"{k}={items[k]}" for k in ("calibration", "corrected") if k in items]
    return f" ({', '.join(shown)})" if shown else ""


def timed(con, text: str):
    start = time.perf_counter()
    result = con.execute(text)
    return result, time.perf_counter() - start


# -- case 1: calibrated under load, queried quiet ----------------------------------------

def case_calibrated_busy(args, name: str) -> None:
    tag = f"case 1 {name} {args.size}x{args.size}"
    band = query("img", "net", region(args.size, args.positions))
    with fresh_cache(), tempfile.TemporaryDirectory(prefix="kql-busy-catalog-") as folder:
        con = connection(name, args.size, folder)
        with burners(args.burners, args.max_seconds):
            result, took = timed(con, "CALIBRATE")
        print(f"{tag}: CALIBRATE with {args.burners} burners ({took:.1f} s): {result.message}")
        busy_plan = operator(con.execute("EXPLAIN " + band).plan)
        items = operator(con.execute("EXPLAIN ANALYZE " + band).plan)[1]
        print(f"{tag}: quiet EXPLAIN ANALYZE after it: predicted {items['predicted_s']} s, actual "
              f"{items['actual_s']} s (both with planning {items['planning_s']} s), "
              f"predicted/actual {items.get('predicted/actual')}{notes(items)}")
        new_process(args, name, folder, tag)
    compare_plans(args, name, busy_plan, tag)


def kql_command(folder: str, text: str):
    here = os.path.join(os.path.dirname(sys.executable), "kql")
    cmd = [here] if os.path.exists(here) else [sys.executable, "-m", "kql"]
    env = {**os.environ, "KQL_PROGRESS": "0"}
    return subprocess.run(cmd + ["--catalog", folder, "--no-progress", "-c", text],
                          capture_output=True, text=True, env=env)


def new_process(args, name: str, folder: str, tag: str) -> None:
    """What ``kql -c`` predicts for the full map in a new process, and whether it refuses it."""
    size = default_input_size(name)[0] if name != BUILTIN else 224
    photo_file = os.path.join(folder, "photo.png")
    pixels = (images.resize(photo(), (size, size)).permute(1, 2, 0) * 255).round().byte().numpy()
    from PIL import Image

    Image.fromarray(pixels).save(photo_file)
    setup = f"LOAD IMAGE photo FROM '{photo_file}'; "
    if name != BUILTIN:
        weights = os.path.join(folder, f"{name}.pt")
        torch.save(model(name).module.state_dict(), weights)
        setup += f"LOAD MODEL {name} FROM '{weights}'; "
    full, band = query("photo", name), query("photo", name, region(size, args.positions))
    out = kql_command(folder, f"{setup}SET confirm_seconds = {CONFIRM}; "
                              f"EXPLAIN {full}; EXPLAIN {band}")
    if out.returncode != 0:
        print(f"{tag}: new process failed ({out.returncode}): {out.stderr.strip()}")
        return
    plans = out.stdout.split("HeatMap:")
    full_items = operator("HeatMap:" + plans[1])[1]
    p_full, p_band = run_seconds(full_items), run_seconds(operator("HeatMap:" + plans[2])[1])
    limit = CONFIRM * p_band / p_full if p_full and p_band else CONFIRM
    run = kql_command(folder, f"SET confirm_seconds = {limit:.6g}; {band}")
    refused = run.returncode != 0 and "not run" in run.stderr
    verdict = ("refused" if refused else "ran, warned: calibration not trusted"
               if "not trusted" in run.stderr else "ran (predicted under the limit)")
    if run.returncode != 0 and not refused:
        verdict = f"failed ({run.returncode}): {run.stderr.strip()[:200]}"
    print(f"{tag}: new process (kql -c, {size}x{size}): full map predicted {p_full:.1f} s after "
          f"planning {full_items['planning_s']} s{notes(full_items)}; OCCLUDE of the full map at "
          f"confirm_seconds = {CONFIRM}: {verdict}")


def pinned(plan: tuple) -> str:
    """SET statements that make the planner choose ``plan``'s operator and crossover."""
    name, items = plan
    if name.startswith("Naive"):
        return "SET strategy = 'naive'; SET crossover = 'auto'"
    label = items.get("crossover", "")
    number = re.match(r"[\d.]+", label)
    crossover = number.group(0) if number else ("'none'" if label == "none" else "'auto'")
    return f"SET strategy = 'incremental'; SET crossover = {crossover}"


def compare_plans(args, name: str, busy_plan: tuple, tag: str) -> None:
    """The busy table's plan against a quiet CALIBRATE's, timed on the band if they differ."""
    band = query("img", "net", region(args.size, args.positions))
    with fresh_cache(), tempfile.TemporaryDirectory(prefix="kql-quiet-catalog-") as folder:
        con = connection(name, args.size, folder)
        result, took = timed(con, "CALIBRATE")
        print(f"{tag}: quiet CALIBRATE ({took:.1f} s): {result.message}")
        quiet_plan = operator(con.execute("EXPLAIN " + band).plan)
        described = {k: f"{plan[0]} crossover={plan[1].get('crossover', '-')}"
                     for k, plan in (("busy", busy_plan), ("quiet", quiet_plan))}
        if described["busy"] == described["quiet"]:
            print(f"{tag}: plan after busy CALIBRATE {described['busy']}: same plan (ratio 1.00)")
            return
        settings = {"busy": pinned(busy_plan),
                    "quiet": "SET strategy = 'auto'; SET crossover = 'auto'"}
        times = {"busy": [], "quiet": []}
        for r in range(args.repeat):
            for which in ("busy", "quiet") if r % 2 == 0 else ("quiet", "busy"):
                con.execute(settings[which])
                items = operator(con.execute("EXPLAIN ANALYZE " + band).plan)[1]
                times[which].append(seconds(items, "actual_s"))
        busy_s, quiet_s = (statistics.median(times[k]) for k in ("busy", "quiet"))
        print(f"{tag}: plan after busy CALIBRATE {described['busy']} ({busy_s:.2f} s), after quiet "
              f"{described['quiet']} ({quiet_s:.2f} s): chosen/quiet {busy_s / quiet_s:.2f} "
              f"(median of {args.repeat})")


# -- case 2: busy while the query runs ---------------------------------------------------

def case_busy_scan(args) -> None:
    with fresh_cache():
        result, took = timed(kql.connect(), "CALIBRATE")
        print(f"case 2: quiet CALIBRATE ({took:.1f} s): {result.message}")
        for name in args.watch_models:              # burners anew per model: none expires
            with burners(args.burners, args.max_seconds):
                race(args, name)


def race(args, name: str) -> None:
    """The plain loop against KQL as a first query, interleaved rounds."""
    text = query("img", "net", region(args.size, args.positions))
    stmt = parse(text)[0]
    first = executor.plan(connection(name, args.size), stmt, text)
    ran = []

    def kql_run():
        con = connection(name, args.size)            # a first query: nothing planned yet
        start = time.perf_counter()
        out = executor.plan(con, stmt, text).run()
        ran.append((", ".join(f"{op} {items}" for op, items, _ in getattr(out, "ran", ()))
                    or first.operator.name) + _threads(out))
        return time.perf_counter() - start

    plain = bench.plain_loop_runner(first.task(), BATCH)

    def plain_run():
        start = time.perf_counter()
        plain()
        return time.perf_counter() - start
    engines = {"plain": plain_run, "KQL": kql_run}
    for run in engines.values():
        run()                                        # warm-up: kernels, caches
    times = {k: [] for k in engines}
    for r in range(args.repeat):
        for k in list(engines)[::1 if r % 2 == 0 else -1]:
            times[k].append(engines[k]())
    plain_s, kql_s = statistics.median(times["plain"]), statistics.median(times["KQL"])
    print(f"case 2 {name} {args.size}x{args.size}, {first.query.grid.count} positions, "
          f"{args.burners} burners: plain {plain_s:.2f} s, KQL {kql_s:.2f} s (median of "
          f"{args.repeat}), plain/KQL {plain_s / kql_s:.2f} (target >= 0.9); KQL planned "
          f"{first.operator.name}, its scans ran: {' | '.join(ran[1:] or ran)}")


def _threads(out) -> str:
    """Where the scan's thread pacer (kql.operators.pacing) settled, if it moved."""
    kept = [(batch, to) for batch, _, to, why in out.paced if why == "kept"]
    return "".join(f" ({to} thread{'s' if to > 1 else ''} from batch {b})" for b, to in kept)


# -- case 3: feedback convergence --------------------------------------------------------

def case_feedback(args) -> None:
    name, tag = args.feedback_model, f"case 3 {args.feedback_model} {args.size}x{args.size}"
    band = query("img", "net", region(args.size, args.positions))
    with fresh_cache():
        con = connection(name, args.size)
        result, took = timed(con, "CALIBRATE")
        print(f"{tag}: quiet CALIBRATE ({took:.1f} s): {result.message}")
        last = {}
        for phase, count in (("quiet", 0), ("busy", args.burners)):
            with burners(count, args.max_seconds):
                for i in range(1, 5):
                    last[phase] = scan_once(con, band, f"{tag}: {phase} run {i}")
        print(f"{tag}: after 3 scans predicted/actual quiet {last['quiet']:.2f}, busy "
              f"{last['busy']:.2f} (target: within 1.5x)")


def scan_once(con, band: str, tag: str) -> float:
    """EXPLAIN's predicted run, then the run (which feeds back); prints both, returns
    predicted/actual."""
    name, items = operator(con.execute("EXPLAIN " + band).plan)
    predicted = run_seconds(items) or float("nan")
    result, took = timed(con, band)
    actual = result.seconds or took
    print(f"{tag}: {name} predicted {predicted:.2f} s (predicted_s {items.get('predicted_s')} less "
          f"planning_s {items.get('planning_s')}), actual {actual:.2f} s, predicted/actual "
          f"{predicted / actual:.2f}, corrected={items.get('corrected', '-')}"
          + (f", calibration={items['calibration']}" if "calibration" in items else ""))
    return predicted / actual


# -- the command ------------------------------------------------------------------------

def parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="1,2,3", help="which cases to run, e.g. 1,3")
    p.add_argument("--burners", type=int, default=6, help="busy-loop processes while busy")
    p.add_argument("--max-seconds", type=float, default=900, help="each burner's own deadline")
    p.add_argument("--positions", type=int, default=128, help="about this many positions (a band)")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds (medians)")
    p.add_argument("--models", default=f"resnet18,{BUILTIN}", help="case 1's models")
    p.add_argument("--watch-models", default=f"resnet18,{BUILTIN},mobilenet_v3_small,inception_v3",
                   help="case 2's models; 'all': the 15 of benchmarks/plan_choices.py")
    p.add_argument("--feedback-model", default="resnet18", help="case 3's model")
    p.add_argument("--size", type=int, default=224, help="the models' square input side")
    return p


def header() -> None:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"busy_machine: {os.cpu_count()} cores, load average {load}, torch {torch.__version__} "
          f"on {torch.get_num_threads()} threads")
    print("command: " + shlex.join([os.path.relpath(sys.executable), *sys.argv]))


def main() -> None:
    args = parser().parse_args()
    if args.burners < 0 or args.positions < 1 or args.repeat < 1:
        parser().error("--burners must be at least 0, --positions and --repeat at least 1")
    sys.stdout.reconfigure(line_buffering=True)
    if args.watch_models == "all":
        from plan_choices import SUITE            # benchmarks/ is on sys.path (the script's)

        args.watch_models = SUITE
    args.watch_models = args.watch_models.split(",")
    cases = set(args.cases.split(","))
    header()
    if "1" in cases:
        for name in args.models.split(","):
            case_calibrated_busy(args, name)
    if "2" in cases:
        case_busy_scan(args)
    if "3" in cases:
        case_feedback(args)


if __name__ == "__main__":
    main()
