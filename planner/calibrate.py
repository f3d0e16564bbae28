"""Device throughput, measured once by micro-benchmarks and cached.

The table is :class:`~.throughput.Throughput`; one round of its micro-benchmarks is
:func:`.micro_benchmarks.one_round`; this module runs the rounds, checks and keeps them.

FLOPs alone mislead: a convolution over many small patches runs at a lower rate than one
over full images. The table here holds the achieved multiply-add rate of convolutions as
a function of the GEMM reduction depth (input channels per group x kernel area) and the
output's spatial area (corrected by a factor for the number of output channels), plus
depthwise convolutions, max and average pooling, matrix products, memory bandwidth, the
gather that builds read-in contexts and the fixed cost of one operator call. The cost
model turns MACs, window elements and bytes into seconds with it.

Element-wise ops are priced at the copy bandwidth. A row of their own (ReLU into fresh
outputs of several sizes, page faults included) changed 14 of 44 plans for 0.97x of the
time and cost a third of a calibration round; README "Fewer moving parts" has the figures.

Plans run on torch's current thread count, the one a user's plain PyTorch loop uses; a
table is measured at that count and kept under it (:func:`device_key`). No thread
decision is ever taken from a measurement and kept: one taken on a busy machine once held
every later query on one core.

A busy machine must not poison the table (:func:`measure`): the micro-benchmarks run in
rounds, each entry keeps its best round (interference only ever adds time), the CPU share
each round got says whether other work competed (:mod:`kql.operators.contention`), and
the merged table is checked against the shape of a quiet one (:func:`implausible`, the
prior of :mod:`.prior`). A table is *trusted* when at least one round ran quiet and no
entry is implausible. Only a trusted table is kept on disk as the device's table; a table
on disk that is untrusted or implausible is measured again, never used as trusted. An
untrusted table (its implausible entries repaired from the prior) serves its process,
and is filed apart so that another process started while the machine is still busy can
use it (marked untrusted) instead of measuring as badly again; after
:data:`RETRY_SECONDS`, at a quiet moment, it is measured again.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from dataclasses import asdict

import torch

from kql.fileio import read_json, update_json
from kql.operators.contention import CpuMeter, contended

from . import micro_benchmarks, prior
from .throughput import BATCH, C_OUT, COUTS, DEPTHS, POOL_SIDE, SIDES, VERSION, Throughput

__all__ = ["BATCH", "C_OUT", "COUTS", "DEPTHS", "POOL_SIDE", "SIDES", "VERSION", "Throughput",
           "measure", "throughput", "threads", "device_key", "cache_dir", "folder_of",
           "implausible", "repair", "best_of"]

FILE = "calibration.json"
MIN_ROUNDS, MAX_ROUNDS = 2, 3          # rounds of the micro-benchmarks (more while contended)
BUSY_REPEAT = 2                        # repeats multiplied by this after a contended round
BUDGET_SECONDS = 12                    # no round starts after this (MIN_ROUNDS always run)
TOLERANCE = 8.0                        # an entry this far off the prior's shape is implausible
SLUMP = 0.5                            # a rate that falls below this of a smaller shape's
RETRY_SECONDS = 300                    # an untrusted table is measured again after this
UNTRUSTED = "#untrusted"               # the key suffix of the last untrusted table on file
_cache: dict = {}


@contextlib.contextmanager
def threads(count: int):
    """Run torch on ``count`` CPU threads, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(count)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def measure(device: str = "cpu") -> Throughput:
    """Run the micro-benchmarks at torch's current thread count, the one plans then run
    with: :data:`MIN_ROUNDS` rounds (2.5 s each on a quiet 2-core CPU), up to
    :data:`MAX_ROUNDS` while no round ran quiet or the merged table is implausible (and
    :data:`BUDGET_SECONDS` are not spent); after a contended round each timing repeats
    :data:`BUSY_REPEAT` times as often. Each entry
    keeps its best round; what is still implausible is repaired from the prior."""
    threads = torch.get_num_threads()
    tables, shares, quiet = [], [], 0
    began = time.perf_counter()
    try:
        for count in range(1, MAX_ROUNDS + 1):
            meter = CpuMeter(threads).start()
            tables.append(micro_benchmarks.one_round(device))
            share = meter.share() if device == "cpu" else None
            shares.append(1.0 if share is None else share)
            busy = contended(share)
            quiet += not busy
            micro_benchmarks.REPEAT_SCALE[0] = BUSY_REPEAT if busy else 1
            merged = best_of(tables)
            problems = implausible(merged)
            if count >= MIN_ROUNDS and (quiet and not problems
                                        or time.perf_counter() - began > BUDGET_SECONDS):
                break
    finally:
        micro_benchmarks.REPEAT_SCALE[0] = 1
    result = repair(merged, problems)
    result.threads = threads
    result.rounds, result.quiet_rounds, result.share = len(tables), quiet, min(shares)
    result.trusted = bool(quiet) and not problems
    result.measured_at = time.time()
    return result


def best_of(tables: list) -> Throughput:
    """Each entry at its best over ``tables`` (highest rate, lowest overhead): another
    process on the cores only ever slows a timing down. The output-channel correction is
    relative: its median."""
    first = tables[0]
    if len(tables) == 1:
        return Throughput(**asdict(first))
    merged = asdict(first)
    for name, value in merged.items():
        values = [getattr(t, name) for t in tables]
        if name == "cout" and value is not None:
            merged[name] = [statistics.median(v) for v in zip(*values)]
        elif name in _SECONDS:
            merged[name] = min(values)
        elif name == "dense":
            merged[name] = [[max(v) for v in zip(*rows)] for rows in zip(*values)]
        elif isinstance(value, list) and value and isinstance(value[0], float):
            merged[name] = [max(v) for v in zip(*values)]
        elif isinstance(value, float) and name in _RATES:
            merged[name] = max(values)
    return Throughput(**merged)


_RATES = ("matmul", "bandwidth", "gather_rate", "pool")
_SECONDS = ("overhead", "node_overhead")


def _entries(table) -> dict:
    """``{name: speed}`` of every entry (rates as they are, seconds inverted: larger is
    faster throughout); a dict for the prior, a Throughput otherwise."""
    get = table.get if isinstance(table, dict) else lambda k: getattr(table, k, None)
    out = {}
    for name in ("dense", "depthwise"):
        rows = get(name)
        if not rows:
            continue
        flat = [v for row in rows for v in row] if name == "dense" else list(rows)
        out.update({f"{name}[{i}]": float(v) for i, v in enumerate(flat)})
    out.update({name: float(get(name)) for name in _RATES})
    out.update({name: 1.0 / float(get(name)) for name in _SECONDS})
    return out


def implausible(table: Throughput, reference: dict = None) -> list:
    """The entries of ``table`` no real device of its kind produces: a dense or depthwise
    convolution rate that falls below :data:`SLUMP` of a smaller shape's (rates grow with
    the work per call); on CPU, an entry more than :data:`TOLERANCE` times off the prior
    (``reference``) scaled by the table's median convolution speed. Names, sorted.

    >>> implausible(Throughput("cpu", **{k: v for k, v in prior.CPU.items()}))
    []
    >>> bad = dict(prior.CPU, bandwidth=1e9, overhead=0.033)
    >>> implausible(Throughput("cpu", **bad))
    ['bandwidth', 'overhead']
    """
    problems = set()
    for depth, row in enumerate(table.dense):
        problems |= {f"dense[{depth * len(SIDES) + i}]" for i in _slumps(row)}
    for side in range(len(SIDES)):
        column = [row[side] for row in table.dense]
        problems |= {f"dense[{i * len(SIDES) + side}]" for i in _slumps(column)}
    problems |= {f"depthwise[{i}]" for i in _slumps(table.depthwise)}
    reference = prior.CPU if reference is None and table.device == "cpu" else reference
    if reference is not None:
        ours, theirs = _entries(table), _entries(reference)
        common = [k for k in ours if k in theirs and ours[k] > 0]
        scale = statistics.median(math.log(ours[k] / theirs[k]) for k in common
                                  if k.startswith("dense"))
        problems |= {k for k in common
                     if abs(math.log(ours[k] / theirs[k]) - scale) > math.log(TOLERANCE)}
        problems |= {k for k in ours if not ours[k] > 0}
    return sorted(problems, key=lambda k: (k.split("[")[0], len(k), k))


def _slumps(rates: list) -> set:
    """Indices of ``rates`` (ordered by growing work per call) below :data:`SLUMP` of
    the best rate before them."""
    best, out = 0.0, set()
    for i, rate in enumerate(rates):
        if rate < SLUMP * best:
            out.add(i)
        best = max(best, rate)
    return out


def repair(table: Throughput, problems: list, reference: dict = None) -> Throughput:
    """``table`` with the entries named in ``problems`` taken from the prior, scaled by
    the median speed of the sound dense entries against it (unchanged where there is
    no prior, or no sound dense entry to scale by)."""
    reference = prior.CPU if reference is None and table.device == "cpu" else reference
    fixed = Throughput(**asdict(table))
    if not problems or reference is None:
        return fixed
    ours, theirs = _entries(table), _entries(reference)
    sound = [math.log(ours[k] / theirs[k]) for k in ours
             if k.startswith("dense") and k not in problems and ours[k] > 0]
    if not sound:
        return fixed
    scale = math.exp(statistics.median(sound))
    for key in problems:
        name, _, index = key.partition("[")
        value = theirs[key] * scale
        if name in _SECONDS:
            setattr(fixed, name, 1.0 / value)
        elif not index:
            setattr(fixed, name, value)
        elif name == "dense":
            i = int(index[:-1])
            fixed.dense[i // len(SIDES)][i % len(SIDES)] = value
        else:
            getattr(fixed, name)[int(index[:-1])] = value
    fixed.repaired = sorted({k.split("[")[0] for k in problems})
    fixed.__dict__.pop("_rates", None)
    return fixed


def device_key(device: str) -> str:
    if device == "cuda":
        return "cuda:" + torch.cuda.get_device_name()
    return f"cpu:{os.cpu_count()}cores:{torch.get_num_threads()}threads"


def cache_dir():
    """Where calibrations live when the catalog is in memory: ``$KQL_CACHE_DIR`` (empty:
    nowhere), else ``$XDG_CACHE_HOME/kql`` or ``~/.cache/kql``."""
    env = os.environ.get("KQL_CACHE_DIR")
    if env is not None:
        return env or None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kql")


def folder_of(directory):
    """Where the calibration (and what is kept with it) of a catalog ``directory`` lives:
    that folder, or for an in-memory catalog (None) :func:`cache_dir`."""
    return directory or cache_dir()


def throughput(device: str = "cpu", directory=None, refresh: bool = False) -> Throughput:
    """Cached calibration: in this process, and in ``calibration.json`` of the catalog
    ``directory`` or, for an in-memory catalog, of the user's :func:`cache_dir`.

    A file that cannot be read or holds no sound table is measured again; one that cannot
    be written (a read-only folder, a full disk) only keeps the table in this process."""
    key = device_key(device)
    if not refresh and key in _cache and not _retry(_cache[key]):
        return _cache[key]
    folder = folder_of(directory)
    path = os.path.join(folder, FILE) if folder else None
    stored = _stored(path, key) if path and not refresh else None
    if stored is not None:
        _cache[key] = stored
        return stored
    result = measure(device)
    _cache[key] = result
    if path:                  # an untrusted table never takes a trusted one's place
        with contextlib.suppress(OSError):
            _store(path, key if result.trusted else key + UNTRUSTED, asdict(result))
    return result


def _stored(path: str, key: str):
    """The table on file to use: the trusted one; else, while the machine is busy (so that
    measuring again would fare no better), the last untrusted one, for at most
    :data:`RETRY_SECONDS` (EXPLAIN says ``calibration=untrusted``); else None."""
    tables = _read_tables(path)                     # one read for both entries
    trusted = _table_of(tables, key)
    if trusted is not None:
        return trusted
    last = _table_of(tables, key + UNTRUSTED, trusted=False)
    if last is not None and time.time() - last.measured_at < RETRY_SECONDS and contended():
        return last
    return None


def _retry(table: Throughput) -> bool:
    """Whether an untrusted table of this process is due to be measured again: measured
    over :data:`RETRY_SECONDS` ago, and the machine looks quiet now."""
    return (not table.trusted and time.time() - table.measured_at > RETRY_SECONDS
            and not contended())


def _read_tables(path: str) -> dict:
    """``{device key: table}`` of ``path``; empty when it is missing or unreadable."""
    try:
        stored = read_json(path)
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _table_of(tables: dict, key: str, trusted: bool = True):
    """The sound, plausible table of ``key`` in ``tables`` (a file's
    :func:`_read_tables`): a trusted one, or with ``trusted`` False an untrusted one; or
    None."""
    entry = tables.get(key)
    if not isinstance(entry, dict) or entry.get("version") != VERSION:
        return None
    try:
        table = Throughput(**entry)
        fit = _sound(table) and table.trusted == trusted and not implausible(table)
        return table if fit else None
    except (TypeError, ValueError, IndexError, ZeroDivisionError, OverflowError,
            AttributeError, statistics.StatisticsError):
        return None


def _sound(table: Throughput) -> bool:
    """Whether every estimate of ``table`` is a finite, non-negative number of seconds
    (raises on a table whose lists have the wrong shape or type)."""
    seconds = (table.conv_seconds(1e6, 27, 16), table.conv_seconds(1e6, 27, 16, True),
               table.matmul_seconds(1e6), table.bytes_seconds(1e6),
               table.gather_seconds(1e6), table.pool_seconds(1e6, "maxpool"),
               table.overhead, table.node_overhead)
    numbers = all(isinstance(s, (int, float)) and math.isfinite(s) and s >= 0 for s in seconds)
    return numbers and isinstance(table.threads, int)


def _store(path: str, key: str, table: dict) -> None:
    """Merge ``table`` into ``path`` under a lock, through a temporary file renamed into
    place: readers (another process included) see the old file or the new one, and a
    table another process wrote meanwhile stays. Raises ``OSError``."""
    update_json(path, _read_tables, lambda stored: {**stored, key: table},
                prefix=".calibration-", indent=1)
