"""The engines ``kql bench`` times (KQL's plans, a plain PyTorch loop; Captum, MONAI and
KQL's drop-ins for them: :mod:`.bench_libraries`) and the timed rounds: medians of rotated
rounds and the peak memory each engine adds."""

from __future__ import annotations

import os
import threading
import time
from types import SimpleNamespace

import torch

from .bench_libraries import library_engines

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


def build_engines(con, args, spec, band_query, queries, settings, rows):
    """Every engine to time, by name, and the ``plans`` and ``planning`` seconds its KQL
    plans fill in as they run. ``band_query``: ``(stmt, text)`` of the band at ``--batch``;
    ``queries``: the engines' own where they differ; ``rows``: the band's pixel rows."""
    from . import executor

    plans, planning = {}, {}
    con.plan_cache.lasting = None      # nor from layout trials an earlier process kept
    con.plan_cache.learning = False    # nor from scans timed before (planner.feedback)

    def planned(name):
        return _planned_runner(con, name, queries.get(name, band_query), settings[name],
                               plans, planning)
    plain_query = queries.get("naive", band_query)
    runners = {PLAIN: plain_loop_runner(executor.plan(con, *plain_query).task(), args.batch)}
    runners.update({name: planned(name) for name in settings})
    if args.crossovers:
        for name in _crossover_settings(con, *band_query, settings):
            runners[name] = planned(name)
    if not args.no_captum or args.captum or args.monai:
        runners.update(_library_engines(con, args, spec, band_query, rows, planning))
    return runners, plans, planning


def _planned_runner(con, name, query, setting, plans, planning):
    """A run of ``query`` under ``setting``, planned afresh each time; its plan and its
    planning seconds go to ``plans[name]`` and ``planning[name]``."""
    from . import executor

    def run():
        con.settings.update({"tau": "auto", "gates": "exact", "position_groups": "auto",
                             "delta_convolutions": "auto", **setting})
        con.plan_cache.clear()                     # each round plans as a first query would
        start = time.perf_counter()
        plans[name] = executor.plan(con, *query)   # planning (trace, views, costing) is timed too
        planning.setdefault(name, []).append(time.perf_counter() - start)
        return plans[name].run()
    return run


def _library_engines(con, args, spec, band_query, rows, planning):
    """Captum, MONAI and KQL's drop-ins for them on the band (:mod:`.bench_libraries`),
    Captum at the class the model predicts for the image."""
    from . import executor

    q = executor.plan(con, *band_query).query
    model = spec.composed().to(args.device)
    image = q.image[None].to(args.device)
    with torch.inference_mode():
        target = int(model(image).argmax())
    return library_engines(args, model, image, q.color, target, rows, planning)


def _crossover_settings(con, stmt, text, settings) -> list:
    """Add one engine setting per distinct crossover the planner costs; their names."""
    from . import executor
    from .planner.crossover import CROSSOVER_FRACTIONS, crossover_candidates

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


def measure(engines: dict, args):
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
