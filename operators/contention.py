"""Whether other work was competing for the CPU while something was measured.

Timings taken while other processes hold the cores are slow by a factor that no later
measurement shares: a calibration row, a trial batch or a scan measured then tells about
that moment, not about the machine. The direct signal: the CPU time this process got
against the wall time it waited, per thread it ran (:class:`CpuMeter`); a thread that the
scheduler keeps off its core for other processes' work gets less CPU than wall (quiet:
0.83-0.89 over a calibration round on 2 threads; beside six CPU-bound processes 0.18-0.23).
Where no share was measured (a GPU, whose waits say nothing; a check between
measurements) the processes runnable right now count (:func:`runnable_busy`); the
1-minute load average (:func:`load_busy`) lags a minute behind and is kept for decisions
that last beyond the process.

>>> meter = CpuMeter(threads=2, clock=iter([0.0, 1.0]).__next__, cpu_clock=iter([0.0, 1.9]).__next__)
>>> round(meter.start().share(), 2)
0.95
>>> judged(0.95, busy_now=True), judged(0.3, busy_now=False), judged(None, busy_now=True)
(False, True, True)

``$KQL_CONTENTION`` set to ``quiet`` or ``busy`` overrides both signals (the test suite
sets ``quiet``, so that what a test sees does not depend on the machine's load; tests of
contended runs set ``busy``).
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

# A quiet process on its threads gets at least this share of CPU per thread and wall
# second (OpenMP threads spin while they wait for each other, so a quiet multi-threaded
# op measures 0.9-1.0; beside six CPU-bound processes on two cores it measured 0.2-0.4).
QUIET_SHARE = 0.7


class CpuMeter:
    """CPU seconds this process got per thread and wall second, between :meth:`start`
    and :meth:`share` (1.0: every thread ran the whole time)."""

    def __init__(self, threads: int = 1, clock: Callable[[], float] = time.perf_counter,
                 cpu_clock: Callable[[], float] = time.process_time):
        self.threads = max(1, int(threads))
        self.clock, self.cpu_clock = clock, cpu_clock
        self._wall = self._cpu = None

    def start(self) -> "CpuMeter":
        self._wall, self._cpu = self.clock(), self.cpu_clock()
        return self

    def share(self) -> float:
        """The share since :meth:`start` (1.0 when no wall time passed)."""
        wall = self.clock() - self._wall
        cpu = self.cpu_clock() - self._cpu
        if wall <= 0:
            return 1.0
        return max(0.0, cpu / (wall * self.threads))


def load_busy() -> bool:
    """Whether the 1-minute load average exceeds the cores (unknown: busy). This process
    counts in it: a scan on all cores loads them as much as there are."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except (OSError, AttributeError):
        return True


def runnable_busy() -> bool:
    """Whether more processes are runnable right now than there are cores, besides the
    one asking (``/proc/loadavg``'s fourth field; elsewhere :func:`load_busy`)."""
    try:
        with open("/proc/loadavg") as fh:
            running = int(fh.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return load_busy()
    return running - 1 > (os.cpu_count() or 1)


def judged(share: Optional[float], busy_now: bool) -> bool:
    """Whether a measurement that got ``share`` of its threads' CPU ran beside other work;
    with no share (None), whether the machine is ``busy_now``."""
    if share is not None:
        return share < QUIET_SHARE
    return busy_now


def contended(share: Optional[float] = None) -> bool:
    """:func:`judged` on this machine now, unless ``$KQL_CONTENTION`` says."""
    forced = os.environ.get("KQL_CONTENTION", "")
    if forced in ("quiet", "busy"):
        return forced == "busy"
    return judged(share, runnable_busy() if share is None else False)


def ran_contended(meter: Optional[CpuMeter]) -> bool:
    """:func:`contended` over the span ``meter`` measured (None: no share, a GPU's run)."""
    return contended(meter.share() if meter is not None else None)
