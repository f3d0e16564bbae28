"""The calibration table: what a device achieves per kind of work, and the seconds it
predicts for a convolution, a pool, a matrix product, a copy, a gather or a call.

Measured by :mod:`.micro_benchmarks`, merged, checked and kept by :mod:`.calibrate`; the
cost model (:mod:`.cost`) prices plans with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DEPTHS = (27, 144, 576, 2304, 4608)    # c_in/groups * kh * kw (27: an RGB stem)
SIDES = (2, 4, 8, 16, 32)              # output side: areas 4 .. 1024 (flat beyond)
C_OUT = 128                            # output channels of the dense table
COUTS = (16, 32, 64, 128, 256, 512)    # output channels of the correction row
POOL_SIDE = 16                         # output side of the pooling benchmark (64 channels)
BATCH = 16
VERSION = 10                           # of the table's layout; other versions re-measure


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
        """Moving ``nbytes`` (read + written): copies, scatters, building a batch, and
        element-wise ops (exp/erf activations alike)."""
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
