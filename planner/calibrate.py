"""Device throughput, measured once by micro-benchmarks and cached.

FLOPs alone mislead: a convolution over many small patches runs at a lower rate than one
over full images. The table here holds the achieved multiply-add rate of convolutions as
a function of the GEMM reduction depth (input channels per group x kernel area) and the
output's spatial area (corrected by a factor for the number of output channels), plus
depthwise convolutions, max and average pooling, matrix products, memory bandwidth, the
gather that builds read-in contexts and the fixed cost of one operator call. The cost
model turns MACs, window elements and bytes into seconds with it.

Element-wise ops are priced as a forward pass runs them, not at the rate of one op
repeated on one tensor: each writes a freshly allocated output amid the allocations and
frees of other layers, and an output the allocator maps from the OS (on glibc, every one
over 32 MB) pays a page fault per 4 KB. The ``stream`` row times ReLU over maps of
several sizes in the order a forward pass allocates them (large to small); the cost of a
fresh output above the sizes the convolution and pooling tables saw is added to theirs.

Plans run on torch's current thread count, the one a user's plain PyTorch loop uses; a
table is measured at that count and kept under it (:func:`device_key`). No thread
decision is ever taken from a measurement and kept: one taken on a busy machine once held
every later query on one core.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from kql.fileio import read_json, update_json
from kql.operators.layout import CHANNELS_LAST, CONTIGUOUS, in_layout

DEPTHS = (27, 144, 576, 2304, 4608)    # c_in/groups * kh * kw (27: an RGB stem)
SIDES = (2, 4, 8, 16, 32)              # output side: areas 4 .. 1024 (flat beyond)
C_OUT = 128                            # output channels of the dense table
COUTS = (16, 32, 64, 128, 256, 512)    # output channels of the correction row
STREAM_SIDES = (7, 14, 28, 56, 80, 112)   # 64-channel maps: outputs 0.2 .. 51 MB at batch 16
STREAM_CHANNELS = 64
POOL_SIDE = 16                         # output side of the pooling benchmark (64 channels)
BATCH = 16
VERSION = 7                            # of the table's layout; other versions re-measure
FILE = "calibration.json"
_cache: dict = {}


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
    maxpool: float = 1e9   # window elements/s (outputs x kernel area) of max pooling
    avgpool: float = 1e9   # the same for average pooling
    activation: float = 1e9   # bytes/s (read + written) of a transcendental activation (SiLU)
    stream: list = None    # [len(STREAM_SIDES)] bytes/s (read + written) of ReLU into a fresh
                           # output of that size, as in a forward pass (call overhead excluded)
    version: int = VERSION

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
        return windows / (self.maxpool if kind == "maxpool" else self.avgpool)

    def matmul_seconds(self, macs: float) -> float:
        return macs / self.matmul

    def bytes_seconds(self, nbytes: float, transcendental: bool = False) -> float:
        """Moving ``nbytes`` (read + written) into memory already written to: copies,
        scatters, building a batch."""
        return nbytes / (self.activation if transcendental else self.bandwidth)

    def elementwise_seconds(self, nbytes: float, out_bytes: float,
                            transcendental: bool = False) -> float:
        """An element-wise op moving ``nbytes`` into a fresh output of ``out_bytes``, as
        in a forward pass; an exp/erf activation adds what it took over ReLU warm (its
        arithmetic: the fresh memory costs both alike)."""
        seconds = nbytes / self.elementwise_rate(out_bytes)
        if transcendental:
            seconds += max(0.0, nbytes * (1 / self.activation - 1 / self.bandwidth))
        return seconds

    def fresh_seconds(self, out_bytes: float, kind: str = "conv") -> float:
        """What writing a fresh output of ``out_bytes`` costs beyond what the ``kind``
        table ('conv', 'depthwise', a pool) saw at its own largest output: nothing for
        outputs up to that size, page faults for the large maps of early layers."""
        channels = C_OUT if kind == "conv" else 64
        side = POOL_SIDE if kind in ("maxpool", "avgpool") else SIDES[-1]
        covered = self.batch * channels * side * side * 4
        if not self.stream or out_bytes <= covered:
            return 0.0
        return max(0.0, 2 * out_bytes * (1 / self.elementwise_rate(out_bytes) - 1 / self.elementwise_rate(covered)))

    def elementwise_rate(self, out_bytes: float) -> float:
        """Bytes/s (read + written) of ReLU into a fresh output of ``out_bytes``."""
        if not self.stream:
            return self.bandwidth
        sizes = [self.batch * STREAM_CHANNELS * s * s * 4 for s in STREAM_SIDES]
        return _interp1(sizes, self.stream, max(out_bytes, 1.0))

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
    for _ in range(repeat):
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
    """Run the micro-benchmarks (a few seconds on a 2-core CPU) at torch's current thread
    count, the one plans then run with."""
    result = _measure(device)
    result.threads = torch.get_num_threads()
    return result


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
    # First, before the other benchmarks leave the allocator holding their tensors' sizes.
    stream = _stream_rates(dev, batch, overhead, bandwidth)
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
    activation = 2 * big.numel() * 4 / _timed(lambda: F.silu(big), device, repeat=5)
    pooled = in_layout(torch.randn(batch, 64, POOL_SIDE + 2, POOL_SIDE + 2, device=dev), layout)
    windows = batch * 64 * POOL_SIDE * POOL_SIDE * 9
    maxpool = windows / _timed(lambda: F.max_pool2d(pooled, 3, 1), device, repeat=5)
    avgpool = windows / _timed(lambda: F.avg_pool2d(pooled, 3, 1), device, repeat=5)
    gather_rate = _gather_rate(dev, batch)
    return Throughput(device, dense, depthwise, matmul, bandwidth, max(overhead, 5e-6) * 2,
                      node_overhead=_engine_overhead(device), batch=batch,
                      gather_rate=gather_rate, cout=cout, maxpool=maxpool, avgpool=avgpool,
                      activation=activation, stream=stream)


def _stream_rates(dev, batch: int, overhead: float, bandwidth: float, rounds: int = 12) -> list:
    """Bytes/s (read + written) of ReLU into a fresh output, per size of ``STREAM_SIDES``:
    each round runs every size once, large to small as a forward pass allocates, on one of
    two inputs in turn; the median of the rounds after the first two, less the call
    overhead (at most the warm rate ``bandwidth``: small maps are all overhead)."""
    device = str(dev.type)
    maps = {s: [torch.randn(batch, STREAM_CHANNELS, s, s, device=dev) for _ in range(2)]
            for s in STREAM_SIDES}
    times: dict = {s: [] for s in STREAM_SIDES}
    for r in range(rounds):
        for side in reversed(STREAM_SIDES):
            x = maps[side][r % 2]
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            y = torch.relu(x)
            if device == "cuda":
                torch.cuda.synchronize()
            times[side].append(time.perf_counter() - start)
            del y
    rates = []
    for side in STREAM_SIDES:
        seconds = sorted(times[side][2:])[len(times[side][2:]) // 2] - overhead
        moved = 2 * batch * STREAM_CHANNELS * side * side * 4
        rates.append(min(bandwidth, moved / seconds) if seconds > 0 else bandwidth)
    return rates


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


def throughput(device: str = "cpu", directory=None, refresh: bool = False) -> Throughput:
    """Cached calibration: in this process, and in ``calibration.json`` of the catalog
    ``directory`` or, for an in-memory catalog, of the user's :func:`cache_dir`.

    A file that cannot be read or holds no sound table is measured again; one that cannot
    be written (a read-only folder, a full disk) only keeps the table in this process."""
    key = device_key(device)
    if not refresh and key in _cache:
        return _cache[key]
    folder = directory or cache_dir()
    path = os.path.join(folder, FILE) if folder else None
    stored = _read_table(path, key) if path and not refresh else None
    if stored is not None:
        _cache[key] = stored
        return stored
    result = measure(device)
    _cache[key] = result
    if path:
        with contextlib.suppress(OSError):
            _store(path, key, asdict(result))
    return result


def _read_tables(path: str) -> dict:
    """``{device key: table}`` of ``path``; empty when it is missing or unreadable."""
    try:
        stored = read_json(path)
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _read_table(path: str, key: str):
    """The sound table of ``key`` in ``path``, or None."""
    entry = _read_tables(path).get(key)
    if not isinstance(entry, dict) or entry.get("version") != VERSION:
        return None
    try:
        table = Throughput(**entry)
        return table if _sound(table) else None
    except (TypeError, ValueError, IndexError, ZeroDivisionError, OverflowError, AttributeError):
        return None


def _sound(table: Throughput) -> bool:
    """Whether every estimate of ``table`` is a finite, non-negative number of seconds
    (raises on a table whose lists have the wrong shape or type)."""
    seconds = (table.conv_seconds(1e6, 27, 16), table.conv_seconds(1e6, 27, 16, True),
               table.matmul_seconds(1e6), table.bytes_seconds(1e6), table.bytes_seconds(1e6, True),
               table.gather_seconds(1e6), table.pool_seconds(1e6, "maxpool"),
               table.elementwise_seconds(1e6, 1e8), table.fresh_seconds(1e8),
               table.pool_seconds(1e6, "avgpool"), table.overhead, table.node_overhead)
    numbers = all(isinstance(s, (int, float)) and math.isfinite(s) and s >= 0 for s in seconds)
    rows = table.stream is None or len(table.stream) == len(STREAM_SIDES)
    return numbers and rows and isinstance(table.threads, int)


def _store(path: str, key: str, table: dict) -> None:
    """Merge ``table`` into ``path`` under a lock, through a temporary file renamed into
    place: readers (another process included) see the old file or the new one, and a
    table another process wrote meanwhile stays. Raises ``OSError``."""
    update_json(path, _read_tables, lambda stored: {**stored, key: table},
                prefix=".calibration-", indent=1)
