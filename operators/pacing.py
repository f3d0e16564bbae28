"""Fewer threads while other work holds the cores, decided batch by batch within a scan.

An OpenMP op waits at its end for every one of its threads; when the scheduler takes one
thread off its core for another process, the op waits for it. Beside six CPU-bound
processes on two cores, four batch-16 passes of MobileNetV3-small (224 px) took 1.4-7.7 s
on torch's 2 threads and 0.69-0.95 s on one; ResNet18 6.3-7.8 s against 5.0-5.9 s. Quiet,
two threads win (1.4x, 1.8x). So a plain loop at torch's default threads is a weak floor
on a busy machine, and a scan can do better than it.

:class:`ThreadPacer` is a scan's progress callback. After each batch it has the batch's
seconds per position and the CPU share the process got (:mod:`.contention`). When a batch
ran contended on all threads, the next batch runs on one thread (a probe); the scan keeps
whichever count ran faster per position by :data:`ThreadPacer.SWITCH`. On one thread it
probes all threads again after a back-off that doubles each time a probe loses, so the
scan returns to them once the machine is quiet. Every decision lasts for the scan only:
no thread count measured on a busy machine is ever kept.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

from . import contention
from .task import Progress


class ThreadPacer:
    SWITCH = 0.90       # a probe's seconds per position over the current count's, at most
    FIRST = 3           # batches before the first probe (warm-up, the layout trial)
    LEFT = 2            # batches left after a probe, at least
    RECENT = 3          # the current count's recent time: the median of this many batches

    def __init__(self, threads: int, total_batches: int, progress: Progress = None,
                 clock: Callable[[], float] = time.perf_counter,
                 cpu_clock: Callable[[], float] = time.process_time,
                 set_threads: Callable[[int], None] = torch.set_num_threads):
        self.full, self.current = max(1, int(threads)), max(1, int(threads))
        self.total_batches, self.progress = total_batches, progress
        self.clock, self.cpu_clock, self.set_threads = clock, cpu_clock, set_threads
        self.batches, self.recent = 0, []
        self.probe_from = None          # (the count probed from, its recent time per item)
        self.next_probe, self.gap = self.FIRST, self.FIRST
        self.history: list = []         # (batch, threads from, threads to, why)
        self.start()

    def start(self) -> "ThreadPacer":
        self._mark = (self.clock(), self.cpu_clock(), None)
        return self

    def __call__(self, done: int, total: int) -> None:
        wall, cpu, before = self._mark
        now, used = self.clock(), self.cpu_clock()
        items = done - (before if before is not None else 0)
        if items > 0 and now > wall:
            share = (used - cpu) / ((now - wall) * self.current)
            self._after_batch((now - wall) / items, share)
        if self.progress is not None:
            self.progress(done, total)
        self._mark = (self.clock(), self.cpu_clock(), done)     # not the callback's own time

    def _after_batch(self, rate: float, share: float) -> None:
        self.batches += 1
        if self.probe_from is not None:
            self._judge_probe(rate)
            return
        self.recent.append(rate)
        left = self.total_batches - self.batches
        if self.full == 1 or self.batches < self.next_probe or left < self.LEFT:
            return
        if self.current == self.full and contention.contended(share):
            self._probe(1, "contended")
        elif self.current != self.full:
            self._probe(self.full, "again")

    def _probe(self, threads: int, why: str) -> None:
        self.probe_from = (self.current, statistics.median(self.recent[-self.RECENT:]))
        self._switch(threads, f"probe ({why})")

    def _judge_probe(self, rate: float) -> None:
        before, base = self.probe_from
        self.probe_from = None
        if rate <= self.SWITCH * base:
            self.recent = [rate]                 # the probe won: go on at its count
            self.gap = self.FIRST
            self.history.append((self.batches, before, self.current, "kept"))
        else:
            self._switch(before, "back")
            self.gap *= 2
        self.next_probe = self.batches + self.gap

    def _switch(self, threads: int, why: str) -> None:
        self.history.append((self.batches, self.current, threads, why))
        self.current = threads
        self.set_threads(threads)


def paced(threads: int, total_batches: int, device: str, progress: Progress) -> Optional[ThreadPacer]:
    """A pacer for a CPU scan on more than one thread, else None."""
    if device != "cpu" or threads <= 1:
        return None
    return ThreadPacer(threads, total_batches, progress)
