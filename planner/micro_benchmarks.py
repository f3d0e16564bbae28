"""The micro-benchmarks of one calibration round: a convolution of each depth and output
size, depthwise, pooling, a matrix product, copies, the engine's gather and its
bookkeeping, the cost of one call. :mod:`.calibrate` runs them in rounds and keeps each
entry's best.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from kql.operators.layout import CHANNELS_LAST, CONTIGUOUS, in_layout

from .throughput import BATCH, C_OUT, COUTS, DEPTHS, POOL_SIDE, SIDES, Throughput

REPEAT_SCALE = [1]             # calibrate.BUSY_REPEAT while a round runs contended


def timed(fn, device: str, repeat: int = 3) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeat * REPEAT_SCALE[0]):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def one_round(device: str) -> Throughput:
    """Convolutions and pools are timed in the layout the planner runs full-size batches in
    on ``device`` (:mod:`kql.operators.layout`: channels-last on CPU)."""
    dev = torch.device(device)
    batch = BATCH if device == "cpu" else 4 * BATCH       # GPUs need bigger batches to fill
    layout = CHANNELS_LAST if device == "cpu" else CONTIGUOUS
    tiny = torch.randn(2, 2, device=dev)
    overhead = timed(lambda: [torch.relu(tiny) for _ in range(100)], device) / 100
    big = torch.randn(batch, 64, 56, 56, device=dev)
    bandwidth = 2 * big.numel() * 4 / timed(lambda: torch.relu(big), device, repeat=5)
    dense = [[_conv_rate(dev, batch, depth, C_OUT, side, layout) for side in SIDES]
             for depth in DEPTHS]
    rates = [_conv_rate(dev, batch, 576, c, 8, layout) for c in COUTS]
    cout = [r / rates[COUTS.index(C_OUT)] for r in rates]
    depthwise = []
    for side in SIDES:
        w = torch.randn(64, 1, 3, 3, device=dev)
        x = in_layout(torch.randn(batch, 64, side + 2, side + 2, device=dev), layout)
        depthwise.append(batch * 9 * 64 * side * side / timed(lambda: F.conv2d(x, w, groups=64), device))
    a, m = torch.randn(BATCH, 4096, device=dev), torch.randn(4096, 4096, device=dev)
    matmul = BATCH * 4096 * 4096 / timed(lambda: a @ m, device)
    pooled = in_layout(torch.randn(batch, 64, POOL_SIDE + 2, POOL_SIDE + 2, device=dev), layout)
    windows = batch * 64 * POOL_SIDE * POOL_SIDE * 9
    pool = windows / timed(lambda: F.max_pool2d(pooled, 3, 1), device, repeat=5)
    gather_rate = _gather_rate(dev, batch)
    return Throughput(device, dense, depthwise, matmul, bandwidth, max(overhead, 5e-6) * 2,
                      node_overhead=_engine_overhead(device), batch=batch,
                      gather_rate=gather_rate, cout=cout, pool=pool)


def _conv_rate(dev, batch: int, depth: int, c_out: int, side: int, layout: str) -> float:
    """MAC/s of a 3x3 convolution with reduction depth ``depth``."""
    c_in, k = depth // 9, 3
    w = torch.randn(c_out, c_in, k, k, device=dev)
    x = in_layout(torch.randn(batch, c_in, side + k - 1, side + k - 1, device=dev), layout)
    return batch * depth * c_out * side * side / timed(lambda: F.conv2d(x, w), str(dev.type))


def _gather_rate(dev, batch: int) -> float:
    """Bytes/s of read-in contexts built by the engine's gather (windows + pasted patches)."""
    import numpy as np

    from kql.operators.gather import gather

    base = torch.randn(1, 128, 58, 58, device=dev)
    patches = torch.randn(batch, 128, 12, 12, device=dev)
    rng = np.random.default_rng(0)
    wy, wx = rng.integers(0, 44, batch), rng.integers(0, 44, batch)
    seconds = timed(lambda: gather(base, patches, (wy + 1, wx + 1), (wy, wx), (14, 14)), str(dev.type))
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
    seconds = timed(lambda: engine.run(task), device)
    return seconds / max(1, len(profile.ops))
