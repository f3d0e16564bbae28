"""``kql bench``: naive, incremental and Captum occlusion, side by side in one process.

"pure incremental" is the seed prototype's engine: patches run up to the global boundary
(``SET crossover = 'none'``); "chosen plan" is what the optimizer picks (``auto``), and
``--crossovers`` adds every crossover the planner costs.

The engines compute the same patch positions (a band of whole grid rows around the
image centre) with the same batch size, one after the other, ``--repeat`` times (each
round in a rotated order); the median time of each is reported with the speedup against
naive, the peak memory each added to the process, and the theoretical redundancy ratio R
(seed paper 000, eqs 16-20).
Captum's ``Occlusion`` is given the band as its input and pastes it back into the image
inside the forward function, so it visits exactly the same positions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

from .errors import KqlError

PURE = "pure incremental"
PLAIN = "plain loop"


class PeakMemory:
    """Peak memory above the level at entry: the CUDA allocator's peak on a GPU, else the
    process's resident memory sampled every 2 ms."""

    def __init__(self, device: str = "cpu"):
        self.peak = 0
        self.cuda = device == "cuda"
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        _trim()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss() - self.base)


def _trim():
    """Hand freed heap pages back to the OS so each engine's peak starts from the floor."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_model(name: str, classes: int = 1000):
    """A torchvision architecture with random weights (speed does not depend on weights)."""
    from .catalog import models

    if name == models.BUILTIN:
        spec = models.builtin_efficientnet_lite0()
        return spec, spec.composed()
    import torchvision

    torch.manual_seed(0)
    kwargs = {"init_weights": False, "aux_logits": False} if name in ("inception_v3", "googlenet") else {}
    module = torchvision.models.get_model(name, weights=None, num_classes=classes, **kwargs).eval()
    spec = models.ModelSpec(name, module, models.IMAGENET_MEAN, models.IMAGENET_STD,
                            models.default_input_size(name), None, arch=name)
    return spec, spec.composed()


def band(grid_rows: int, grid_cols: int, positions: int) -> tuple[int, int]:
    """Grid rows [r0, r1) around the centre holding about ``positions`` positions."""
    rows = max(1, min(grid_rows, round(positions / grid_cols)))
    r0 = (grid_rows - rows) // 2
    return r0, r0 + rows


def captum_runner(model, image, patch, stride, color, target, batch, y0, y1):
    from captum.attr import Occlusion

    top, bottom = image[:, :, :y0], image[:, :, y1:]

    def forward(strip):
        full = torch.cat([top.expand(len(strip), -1, -1, -1), strip,
                          bottom.expand(len(strip), -1, -1, -1)], dim=2)
        return torch.softmax(model(full), dim=1)

    occ = Occlusion(forward)
    strip = image[:, :, y0:y1]
    baseline = torch.full_like(strip, float(color[0]))   # a tensor on the input's device

    def run():
        with torch.inference_mode():
            occ.attribute(strip, sliding_window_shapes=(3, *patch), strides=(3, *stride),
                          baselines=baseline, target=target, perturbations_per_eval=batch)
    return run


def plain_loop_runner(task, batch: int):
    """The loop a user writes without KQL: copy the image, paint the patch, batch the
    copies, softmax; torch's default threads, no planning, nothing reused."""
    model, image, (ph, pw) = task.model, task.image, task.patch
    color = task.color.to(image.dtype).view(3, 1, 1)

    def run():
        with torch.inference_mode():
            target = task.target if task.target is not None else int(model(image[None]).argmax())
            probs = []
            for start in range(0, task.count, batch):
                copies = []
                for y, x in zip(task.ys[start:start + batch], task.xs[start:start + batch]):
                    occluded = image.clone()
                    occluded[:, y:y + ph, x:x + pw] = color
                    copies.append(occluded)
                probs.append(torch.softmax(model(torch.stack(copies)), dim=1)[:, target])
            return SimpleNamespace(probabilities=torch.cat(probs).float().cpu().numpy())
    return run


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .planner import calibrate

    try:
        # every engine, the planner and its calibration on one thread count, then restored
        with calibrate.threads(args.threads or torch.get_num_threads()):
            return _bench(args)
    except KqlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _parser():
    p = argparse.ArgumentParser(prog="kql bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vgg16", help="torchvision builder or efficientnet_lite0")
    p.add_argument("--image", default="chelsea", help="skimage sample name")
    p.add_argument("--size", default=None, metavar="HxW",
                   help="the model's input size (default: its own, e.g. 224x224); small inputs: 96x112")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--positions", type=int, default=256, help="about this many positions")
    p.add_argument("--batch", type=int, default=16, help="batch size of every engine")
    p.add_argument("--plan-batch", default=None, metavar="N|auto",
                   help="the chosen plan's BATCH instead (auto: none given, KQL's own choice); "
                        "the other engines keep --batch")
    p.add_argument("--repeat", type=int, default=1, help="rounds of the engines; medians reported")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of every engine (default: torch's own, as a user's loop)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--no-captum", action="store_true", help="skip Captum")
    p.add_argument("--tau", type=float, default=None,
                   help="approximate: the chosen plan runs with SET tau = TAU")
    p.add_argument("--ssim", type=float, default=None,
                   help="approximate: the chosen plan runs WITH SSIM >= SSIM (tuned by CALIBRATE)")
    p.add_argument("--calibrate", default=None, metavar="IMAGES",
                   help="with --ssim: first tune on these skimage samples (comma-separated)")
    p.add_argument("--gates", default="exact", choices=("exact", "frozen"),
                   help="approximate: the chosen plan keeps global gates at their unoccluded values")
    p.add_argument("--drilldown", type=float, default=None, metavar="R",
                   help="approximate: the chosen plan runs DRILLDOWN R (stage two on R of the map)")
    p.add_argument("--speedup", type=float, default=None,
                   help="with --drilldown: its SPEEDUP (sets the stage-one stride, eq 47)")
    p.add_argument("--naive-positions", type=int, default=None, metavar="N",
                   help="time naive on a band of about N positions only (its time per position "
                        "is constant); maps are then compared with pure incremental (exact)")
    p.add_argument("--crossovers", action="store_true",
                   help="also time incremental inference at every crossover the planner costs")
    return p


def _connection(args):
    from . import connect
    from .catalog.models import BUILTIN

    con = connect()
    spec, _ = build_model(args.model) if args.model != BUILTIN else (None, None)
    size = _size(args.size) if args.size else None
    if spec is not None:
        con.register_model(args.model, spec.module, spec.mean, spec.std, size or spec.input_size)
    elif size is not None:
        builtin = con.catalog.resolve_model(BUILTIN)
        con.register_model(BUILTIN, builtin.module, builtin.mean, builtin.std, size, builtin.labels)
    return con


def _size(text: str) -> tuple:
    """``'96x112'`` -> ``(96, 112)``.

    >>> _size("96x112")
    (96, 112)
    """
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise KqlError(f"--size must be HxW (e.g. 96x112), got '{text}'") from None
    if h < 1 or w < 1:
        raise KqlError(f"--size must be HxW with positive sides, got '{text}'")
    return h, w


def _check(args) -> None:
    from .catalog.models import BUILTIN, torchvision_builders

    if args.model != BUILTIN and args.model not in torchvision_builders():
        raise KqlError(f"unknown model '{args.model}': name a torchvision classifier "
                       f"(vgg16, resnet18, inception_v3, ...) or {BUILTIN}")
    for name in ("patch", "stride", "positions", "batch", "repeat"):
        if getattr(args, name) < 1:
            raise KqlError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise KqlError(f"--threads must be at least 1, got {args.threads}")
    if args.plan_batch not in (None, "auto") and not (args.plan_batch.isdigit() and int(args.plan_batch) >= 1):
        raise KqlError(f"--plan-batch must be a batch size of at least 1 or 'auto', got {args.plan_batch!r}")
    if args.device == "cuda":
        from .planner.devices import require_cuda

        require_cuda("--device cuda", cls=KqlError)


def _bench(args) -> int:
    from . import executor
    from .language.parser import parse
    from .planner import calibrate

    _check(args)

    con = _connection(args)
    thread_count = args.threads or torch.get_num_threads()
    spec = con.catalog.resolve_model(args.model)
    h, w = spec.input_size
    from .planner.grid import OcclusionGrid

    full = OcclusionGrid(h, w, (args.patch,) * 2, (args.stride,) * 2)
    if full.problem():
        raise KqlError(full.problem())
    r0, r1 = band(*full.full_shape, args.positions)
    y0, y1 = r0 * args.stride, (r1 - 1) * args.stride + args.patch     # pixel rows of the band
    device = "GPU" if args.device == "cuda" else "CPU"
    # The sample at the model's input size: the band's REGION, in the image's own pixels,
    # is then in the model's pixels too.
    from .catalog import images

    photo = images.match_channels(images.load_sample(args.image), spec.channels)[0]
    con.register_image("bench_image", images.resize(photo, (h, w)))
    def occlude(batch: str) -> str:
        return (f"OCCLUDE bench_image USING {args.model} PATCH {args.patch} "
                f"STRIDE {args.stride} REGION (0, {y0}, {w}, {y1 - y0}){batch} ON {device}")
    text = occlude(f" BATCH {args.batch}")
    stmt = parse(text)[0]
    settings = {"naive": {"strategy": "naive"},
                PURE: {"strategy": "incremental", "crossover": "none"},
                "chosen plan": {"strategy": "auto", "crossover": "auto", "gates": args.gates,
                                "tau": args.tau if args.tau is not None else "auto"}}
    chosen_text = text
    if args.plan_batch is not None:
        chosen_text = occlude("" if args.plan_batch == "auto" else f" BATCH {int(args.plan_batch)}")
    if args.ssim is not None:
        if args.calibrate:
            samples = ", ".join(f"sample('{name.strip()}')" for name in args.calibrate.split(","))
            print(con.execute(f"CALIBRATE {args.model} ON ({samples}) PATCH {args.patch} "
                              f"STRIDE {args.stride}").message)
        chosen_text += f" WITH SSIM >= {args.ssim}"
    if args.drilldown is not None:
        chosen_text += f" DRILLDOWN {args.drilldown}" + (f" SPEEDUP {args.speedup}" if args.speedup else "")
    queries = {"chosen plan": (parse(chosen_text)[0], chosen_text)}
    if args.naive_positions:
        n0, n1 = band(*full.full_shape, args.naive_positions)
        ny0, ny1 = n0 * args.stride, (n1 - 1) * args.stride + args.patch
        naive_text = text.replace(f"REGION (0, {y0}, {w}, {y1 - y0})", f"REGION (0, {ny0}, {w}, {ny1 - ny0})")
        queries["naive"] = (parse(naive_text)[0], naive_text)
    plans, planning = {}, {}
    con.plan_cache.lasting = None      # nor from layout trials an earlier process kept
    con.plan_cache.learning = False    # nor from scans timed before (planner.feedback)

    def planned(name):
        query = queries.get(name, (stmt, text))

        def run():
            con.settings.update({"tau": "auto", "gates": "exact", **settings[name]})
            con.plan_cache.clear()                     # each round plans as a first query would
            start = time.perf_counter()
            plans[name] = executor.plan(con, *query)   # planning (trace, views, costing) is timed too
            planning.setdefault(name, []).append(time.perf_counter() - start)
            return plans[name].run()
        return run
    plain_query = queries.get("naive", (stmt, text))
    engines = {PLAIN: plain_loop_runner(executor.plan(con, *plain_query).task(), args.batch)}
    engines.update({name: planned(name) for name in settings})
    if args.crossovers:
        for name in _crossover_settings(con, stmt, text, settings):
            engines[name] = planned(name)
    if not args.no_captum:
        q = executor.plan(con, stmt, text).query
        model = spec.composed().to(args.device)
        with torch.inference_mode():
            target = int(model(q.image[None].to(args.device)).argmax())
        engines["captum"] = captum_runner(model, q.image[None].to(args.device), (args.patch,) * 2,
                                          (args.stride,) * 2, torch.tensor(q.color), target,
                                          args.batch, y0, y1)
    with calibrate.threads(thread_count):
        times, peaks, results = _measure(engines, args)
    planning = {name: ts[1:] or ts for name, ts in planning.items()}  # the warm-up's left out
    _report(args, spec, (h, w), plans, full, (r0, r1), times, peaks, results, thread_count, planning)
    return 0


def plan_gflops(plan) -> Optional[float]:
    """The GFLOPs the planner costed ``plan`` at (a drill-down: stage one and its fraction
    of stage two, eq 46); None when it was planned without a cost."""
    if plan.stages:
        one, two = (plan_gflops(p) for p in plan.stages)
        fraction = plan.operator.fraction
        return None if one is None or two is None else one + fraction * two
    if plan.cost is None:
        return None
    return 2 * plan.cost.macs * plan.batches / 1e9


def flop_ratio(naive, plan) -> Optional[float]:
    """Naive's GFLOPs per position over ``plan``'s (per position of ``plan``'s grid)."""
    a, b = plan_gflops(naive), plan_gflops(plan)
    if not a or not b:
        return None
    return (a / naive.query.grid.count) / (b / plan.query.grid.count)


def _crossover_settings(con, stmt, text, settings) -> list:
    """Add one engine setting per distinct crossover the planner costs; their names."""
    from . import executor
    from .planner.physical import CROSSOVER_FRACTIONS, crossover_candidates

    con.settings.update(settings[PURE])
    plan = executor.plan(con, stmt, text)
    profile = getattr(plan.operator, "profile", None)
    if profile is None:                        # the model cannot run incrementally
        return []
    names = []
    for steps in crossover_candidates(profile, plan.query.grid.positions(), plan.query.grid.patch,
                                      CROSSOVER_FRACTIONS):
        names.append(f"crossover {steps.crossover.label}")
        settings[names[-1]] = {"strategy": "incremental", "crossover": steps.crossover.fraction}
    return names


def _measure(engines: dict, args):
    times = {k: [] for k in engines}
    peaks = {k: 0 for k in engines}
    results = {name: run() for name, run in engines.items()}      # warm-up: kernels, caches
    names = list(engines)
    for r in range(max(1, args.repeat)):
        # Each round starts one engine later: the engine timed right after another one
        # inherits its heap and caches, so no engine always follows the same one.
        for name in names[r % len(names):] + names[:r % len(names)]:
            run = engines[name]
            with PeakMemory(args.device) as mem:
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], mem.peak)
    return times, peaks, results


def _report(args, spec, size, plans, full, rows, times, peaks, results, thread_count, planning):
    chosen = plans["chosen plan"]
    n = chosen.query.grid.count
    count = {name: plans[name].query.grid.count if name in plans else n for name in times}
    count[PLAIN] = count["naive"]
    naive_rate = statistics.median(times["naive"]) / count["naive"]
    plain_rate = statistics.median(times[PLAIN]) / count[PLAIN]
    reference = "naive" if count["naive"] == n else PURE
    print(f"kql bench: {spec.name}, image {size[0]}x{size[1]}, patch {args.patch}, stride "
          f"{args.stride}, {n} positions (grid rows {rows[0]}..{rows[1] - 1} of "
          f"{full.full_shape[0]}x{full.full_shape[1]}), batch {args.batch}, "
          f"{thread_count} thread(s), {args.device}, {max(1, args.repeat)} round(s)")
    if reference != "naive":
        print(f"naive timed on {count['naive']} of the positions; maps compared with {reference} (exact)")
    from .planner.tuning import heatmap_ssim

    print(f"{'engine':<18} {'ms/position':>12} {'planning s':>11} {'vs plain':>9} {'full map':>9} "
          f"{'vs naive':>9} {'peak MB':>9} {'max |dp| vs naive':>18} {'SSIM vs naive':>14}")
    shape = chosen.query.grid.shape
    plain_map = plain_rate * full.count
    for name, ts in times.items():
        rate = statistics.median(ts) / count[name]
        plan_s = statistics.median(planning[name]) if name in planning else 0.0
        scan_rate = max(rate - plan_s / count[name], 1e-9)      # per position, after planning
        full_map = plain_map / (plan_s + scan_rate * full.count)
        diff = ssim = "-"
        mine = getattr(results[name], "probabilities", None)
        if mine is not None and len(mine) == n:
            ref = results[reference].probabilities
            diff = f"{np.abs(mine - ref).max():.1e}"
            ssim = f"{heatmap_ssim(ref.reshape(shape), mine.reshape(shape)):.3f}"
        print(f"{name:<18} {1000 * rate:>12.2f} {plan_s:>11.2f} {plain_rate / rate:>8.2f}x "
              f"{full_map:>8.2f}x {naive_rate / rate:>8.2f}x {peaks[name] / 2**20:>9.0f} {diff:>18} "
              f"{ssim:>14}")
    print(f"ms/position and vs plain: this run's {n} positions, planning included; full map: "
          f"the ratio for all {full.count} positions (planning once, then this scan rate)")
    actual = statistics.median(times["chosen plan"])
    own = "".join(f", {k} {v}" for k, v in chosen.operator.describe().items())
    if chosen.batch != args.batch:
        own += f", batch {chosen.batch}"
    print(f"chosen plan: {chosen.operator.name}{own}; predicted {chosen.predicted_seconds:.2f}s, actual {actual:.2f}s "
          f"(predicted/actual {chosen.predicted_seconds / actual:.2f})")
    if chosen.approximation is not None:
        a = chosen.approximation
        bound = "unknown" if a.predicted_ssim is None else f"{a.predicted_ssim:.3f}"
        print(f"approximation: tau {a.tau:.2f} ({a.source}), predicted SSIM >= {bound}")
    ratio = "not computed (planned without tracing)" if chosen.ratio is None else f"{chosen.ratio:.2f}"
    print(f"theoretical R = Q/Q_inc (eqs 16-20, patch at the centre): {ratio}")
    bounds = {name: flop_ratio(plans["naive"], plans[name]) for name in ("chosen plan", PURE)}
    if all(b is not None for b in bounds.values()):
        print(f"FLOP ratio vs the plain loop (its GFLOPs / the plan's, per position, as costed): "
              f"chosen plan {bounds['chosen plan']:.2f}x, {PURE} {bounds[PURE]:.2f}x: what each "
              f"plan's speedup is at equal GFLOP/s (a compute-bound CPU cannot go far past it)")
    swept = [PURE] + [name for name in times if name.startswith("crossover ")]
    if len(swept) > 1:
        pure = statistics.median(times[PURE])
        print(f"{'crossover':<18} {'nodes':>6} {'predicted s':>12} {'actual s':>9} {'vs pure':>8}")
        for name in swept:
            plan = plans[name]
            crossover = plan.operator.steps.crossover
            label = "none (pure)" if crossover.fraction is None else crossover.label
            if chosen.operator.describe().get("crossover") == crossover.label:
                label += " (chosen)"
            t = statistics.median(times[name])
            print(f"{label:<18} {len(crossover.nodes):>6} "
                  f"{plan.predicted_seconds:>12.2f} {t:>9.2f} {pure / t:>7.2f}x")
