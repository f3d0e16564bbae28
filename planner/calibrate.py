"""Device throughput, measured once by micro-benchmarks and cached.

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
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from kql.fileio import read_json, update_json
from kql.operators.contention import CpuMeter, contended
from kql.operators.layout import CHANNELS_LAST, CONTIGUOUS, in_layout

from . import prior

DEPTHS = (27, 144, 576, 2304, 4608)    # c_in/groups * kh * kw (27: an RGB stem)
SIDES = (2, 4, 8, 16, 32)              # output side: areas 4 .. 1024 (flat beyond)
C_OUT = 128                            # output channels of the dense table
COUTS = (16, 32, 64, 128, 256, 512)    # output channels of the correction row
POOL_SIDE = 16                         # output side of the pooling benchmark (64 channels)
BATCH = 16
VERSION = 10                           # of the table's layout; other versions re-measure
FILE = "calibration.json"
MIN_ROUNDS, MAX_ROUNDS = 2, 3          # rounds of the micro-benchmarks (more while contended)
BUSY_REPEAT = 2                        # repeats multiplied by this after a contended round
BUDGET_SECONDS = 12                    # no round starts after this (MIN_ROUNDS always run)
TOLERANCE = 8.0                        # an entry this far off the prior's shape is implausible
SLUMP = 0.5                            # a rate that falls below this of a smaller shape's
RETRY_SECONDS = 300                    # an untrusted table is measured again after this
UNTRUSTED = "#untrusted"               # the key suffix of the last untrusted table on file
_cache: dict = {}
_repeat_scale = [1]                    # BUSY_REPEAT while a round runs contended


@dataclass
class Throughput:
    device: str
    dense: list            # [len(DEPTHS)][len(SIDES)] MAC/s at batch BATCH, call overhead included
    depthwise: list        # [len(SIDES)] MAC/s
    matmul: float          # MAC/s of a [B, 4096] x [4096, 4096] product (weights streamed)
    bandwidth: float       # bytes/s (read + written) of an element-wise op
    overhead: float        # seconds per operator call (dispatch, Python)
    threads: int = 1       # torch CPU threads the table was measured at (part of its key)
    node_overhead: float = 25e-6   # incremental engine bookkeeping per node and batch
    batch: int = BATCH     # the batch the convolution tables were measured at
    gather_rate: float = 1e9   # context bytes/s produced by the batched gather (with paste)
    cout: list = None      # [len(COUTS)] rate relative to C_OUT output channels
    pool: float = 1e9      # window elements/s (outputs x kernel area) of max pooling (average
                           # pooling too: its own row moved no plan and no prediction over 2%)
    version: int = VERSION
    trusted: bool = True   # a quiet round and a plausible shape (only such tables are stored)
    rounds: int = 1        # rounds measured; each entry is its best round's
    quiet_rounds: int = 1  # of them, rounds no other work competed in
    share: float = 1.0     # the lowest CPU share per thread a round got (1.0: all of it)
    repaired: list = field(default_factory=list)   # entries implausible, taken from the prior
    measured_at: float = 0.0   # time.time() when measured

    def verdict(self) -> str:
        """Whether the table is trusted, and why, in a few words."""
        rounds = f"{self.rounds} round{'s' if self.rounds != 1 else ''}"
        fixed = f"; repaired from the prior: {', '.join(self.repaired)}" if self.repaired else ""
        if self.trusted:
            return f"trusted ({rounds}, {self.quiet_rounds} quiet)"
        why = ("the machine was busy in every round" if not self.quiet_rounds
               else "implausible entries")
        return (f"NOT trusted: {why} (CPU share {self.share:.2f} per thread, {rounds}){fixed}; "
                f"used until a quiet moment, never kept as trusted")

    def conv_seconds(self, macs: float, depth: int, area: int, depthwise: bool = False,
                     c_out: int = C_OUT) -> float:
        return macs / self._conv_rate(depth, area, depthwise, c_out)

    def _conv_rate(self, depth: int, area: int, depthwise: bool, c_out: int) -> float:
        """MAC/s of a convolution of that shape, interpolated once per shape: a plan asks
        for the same few shapes hundreds of times (0.5-1.5 ms a query otherwise)."""
        key = (depth, area, depthwise, c_out)
        rates = self.__dict__.setdefault("_rates", {})
        if key not in rates:
            side = math.sqrt(max(area, 1))
            if depthwise:
                rate = _interp1(SIDES, self.depthwise, side)
            else:
                rate = _interp2(DEPTHS, SIDES, self.dense, depth, side)
                if self.cout:
                    rate *= _interp1(COUTS, self.cout, c_out)
            rates[key] = rate
        return rates[key]

    def pool_seconds(self, windows: float, kind: str) -> float:
        """Seconds to reduce ``windows`` window elements by max or average pooling."""
        return windows / self.pool

    def matmul_seconds(self, macs: float) -> float:
        return macs / self.matmul

    def bytes_seconds(self, nbytes: float) -> float:
        """Moving ``nbytes`` (read + written) into memory already written to: copies,
        scatters, building a batch."""
        return nbytes / self.bandwidth

    def elementwise_seconds(self, nbytes: float) -> float:
        """An element-wise op moving ``nbytes`` (exp/erf activations alike)."""
        return nbytes / self.bandwidth

    def gather_seconds(self, context_bytes: float) -> float:
        return context_bytes / self.gather_rate


def _interp1(xs, ys, x) -> float:
    lx = math.log(min(max(x, xs[0]), xs[-1]))
    for i in range(len(xs) - 1):
        a, b = math.log(xs[i]), math.log(xs[i + 1])
        if lx <= b:
            t = (lx - a) / (b - a)
            return math.exp((1 - t) * math.log(ys[i]) + t * math.log(ys[i + 1]))
    return ys[-1]


def _interp2(xs, ys, table, x, y) -> float:
    rows = [_interp1(ys, row, y) for row in table]
    return _interp1(xs, rows, x)


def _timed(fn, device: str, repeat: int = 3) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeat * _repeat_scale[0]):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


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
            tables.append(_measure(device))
            share = meter.share() if device == "cpu" else None
            shares.append(1.0 if share is None else share)
            busy = contended(share)
            quiet += not busy
            _repeat_scale[0] = BUSY_REPEAT if busy else 1
            merged = best_of(tables)
            problems = implausible(merged)
            if count >= MIN_ROUNDS and (quiet and not problems
                                        or time.perf_counter() - began > BUDGET_SECONDS):
                break
    finally:
        _repeat_scale[0] = 1
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


def _measure(device: str) -> Throughput:
    """Convolutions and pools are timed in the layout the planner runs full-size batches in
    on ``device`` (:mod:`kql.operators.layout`: channels-last on CPU)."""
    dev = torch.device(device)
    batch = BATCH if device == "cpu" else 4 * BATCH       # GPUs need bigger batches to fill
    layout = CHANNELS_LAST if device == "cpu" else CONTIGUOUS
    tiny = torch.randn(2, 2, device=dev)
    overhead = _timed(lambda: [torch.relu(tiny) for _ in range(100)], device) / 100
    big = torch.randn(batch, 64, 56, 56, device=dev)
    bandwidth = 2 * big.numel() * 4 / _timed(lambda: torch.relu(big), device, repeat=5)
    dense = [[_conv_rate(dev, batch, depth, C_OUT, side, layout) for side in SIDES]
             for depth in DEPTHS]
    rates = [_conv_rate(dev, batch, 576, c, 8, layout) for c in COUTS]
    cout = [r / rates[COUTS.index(C_OUT)] for r in rates]
    depthwise = []
    for side in SIDES:
        w = torch.randn(64, 1, 3, 3, device=dev)
        x = in_layout(torch.randn(batch, 64, side + 2, side + 2, device=dev), layout)
        depthwise.append(batch * 9 * 64 * side * side / _timed(lambda: F.conv2d(x, w, groups=64), device))
    a, m = torch.randn(BATCH, 4096, device=dev), torch.randn(4096, 4096, device=dev)
    matmul = BATCH * 4096 * 4096 / _timed(lambda: a @ m, device)
    pooled = in_layout(torch.randn(batch, 64, POOL_SIDE + 2, POOL_SIDE + 2, device=dev), layout)
    windows = batch * 64 * POOL_SIDE * POOL_SIDE * 9
    pool = windows / _timed(lambda: F.max_pool2d(pooled, 3, 1), device, repeat=5)
    gather_rate = _gather_rate(dev, batch)
    return Throughput(device, dense, depthwise, matmul, bandwidth, max(overhead, 5e-6) * 2,
                      node_overhead=_engine_overhead(device), batch=batch,
                      gather_rate=gather_rate, cout=cout, pool=pool)


def _conv_rate(dev, batch: int, depth: int, c_out: int, side: int, layout: str) -> float:
    """MAC/s of a 3x3 convolution with reduction depth ``depth``."""
    c_in, k = depth // 9, 3
    w = torch.randn(c_out, c_in, k, k, device=dev)
    x = in_layout(torch.randn(batch, c_in, side + k - 1, side + k - 1, device=dev), layout)
    return batch * depth * c_out * side * side / _timed(lambda: F.conv2d(x, w), str(dev.type))


def _gather_rate(dev, batch: int) -> float:
    """Bytes/s of read-in contexts built by the engine's gather (windows + pasted patches)."""
    import numpy as np

    from kql.operators.gather import gather

    base = torch.randn(1, 128, 58, 58, device=dev)
    patches = torch.randn(batch, 128, 12, 12, device=dev)
    rng = np.random.default_rng(0)
    wy, wx = rng.integers(0, 44, batch), rng.integers(0, 44, batch)
    seconds = _timed(lambda: gather(base, patches, wy + 1, wx + 1, wy, wx, (14, 14)), str(dev.type))
    return batch * 128 * 14 * 14 * 4 / seconds


def _engine_overhead(device: str) -> float:
    """Seconds per node and batch of the incremental engine on a model too small to compute:
    index building, host-to-device copies, dispatch."""
    import numpy as np
    from torch import nn

    from kql.operators.incremental import IncrementalOcclusion
    from kql.operators.profile import ModelProfile
    from kql.operators.steps import plan_steps
    from kql.operators.task import OcclusionTask

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    image = torch.rand(3, 24, 24)
    profile = ModelProfile(model, image, device)
    ys = np.arange(BATCH) % 20
    xs = ys[::-1].copy()
    steps = plan_steps(profile, ys, xs, (2, 2))
    task = OcclusionTask(model, image, torch.full((3,), 0.5), (2, 2), ys, xs, device=device)
    engine = IncrementalOcclusion(profile, steps, BATCH)
    seconds = _timed(lambda: engine.run(task), device)
    return seconds / max(1, len(profile.ops))


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
               table.elementwise_seconds(1e6), table.overhead, table.node_overhead)
    numbers = all(isinstance(s, (int, float)) and math.isfinite(s) and s >= 0 for s in seconds)
    return numbers and isinstance(table.threads, int)


def _store(path: str, key: str, table: dict) -> None:
    """Merge ``table`` into ``path`` under a lock, through a temporary file renamed into
    place: readers (another process included) see the old file or the new one, and a
    table another process wrote meanwhile stays. Raises ``OSError``."""
    update_json(path, _read_tables, lambda stored: {**stored, key: table},
                prefix=".calibration-", indent=1)
