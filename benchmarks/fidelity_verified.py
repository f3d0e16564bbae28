"""WITH SSIM on EfficientNet-Lite0 (real weights), nothing tuned: each map is checked on
its own image (verified drill-down). Fidelity against the exact map and speed against a
plain PyTorch loop at torch's default threads (batch 16), side by side in one process.

The plain loop is timed on a band of grid rows (its time per position does not depend on
the position) right before and right after every KQL query, and each ratio is against
the mean of those two (this shared machine drifts by 2x within minutes); KQL's exact map
(which equals the plain loop's within 1e-6, see tests/test_incremental.py) is the SSIM
reference. Every KQL query plans afresh (the plan cache is cleared), as a first query on
its image would.

With ``--calibrate=a,b,c`` the model is first tuned on those photos (``CALIBRATE ... ON
(sample('a'), ...)``, same geometry): the planner then prices each starting lattice by how
often its check passed there, and may choose a tuned tau instead.

Usage: .venv/bin/python benchmarks/fidelity_verified.py ["PATCH 16 STRIDE 4"] [--calibrate=a,b] [photo ...]
"""
import sys
import time

import numpy as np
import torch

import kql
from kql.language.parser import parse_with_text
from kql.binder import bind
from kql.planner.quality import map_quality

ARGS = [a for a in sys.argv[1:] if not a.startswith("--calibrate=")]
TUNE = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--calibrate=")]
GEOMETRY = ARGS[0] if ARGS else "PATCH 16 STRIDE 4"
PHOTOS = ARGS[1:] or ["chelsea", "coffee", "astronaut", "rocket", "camera", "retina",
                          "hubble_deep_field", "immunohistochemistry", "moon", "coins",
                          "clock", "horse", "gravel", "colorwheel"]
TARGETS = (0.8, 0.9, 0.95)
BAND_ROWS = 1
con = kql.connect()


def loop_for(name: str):
    """A user's loop on a band of the grid: copy the image, paint the patch, stack 16,
    softmax. Returns (a function timing it in ms per position, the map's positions)."""
    stmt, text = parse_with_text(f"OCCLUDE sample('{name}') USING efficientnet_lite0 {GEOMETRY}")[0]
    q = bind(stmt, text, con.catalog)
    model = q.model.composed().eval()
    ys, xs = q.grid.positions()
    keep = ys < ys.min() + BAND_ROWS * q.grid.stride[0]          # the first grid rows
    ys, xs = ys[keep], xs[keep]
    (ph, pw), img = q.grid.patch, q.image

    @torch.inference_mode()
    def ms_per_position() -> float:
        target = int(model(img[None]).argmax())
        start = time.perf_counter()
        for i in range(0, len(ys), 16):
            batch = img.expand(len(ys[i:i + 16]), -1, -1, -1).clone()
            for k, (y, x) in enumerate(zip(ys[i:i + 16], xs[i:i + 16])):
                batch[k, :, y:y + ph, x:x + pw] = 0.5
            torch.softmax(model(batch), 1)[:, target]
        return (time.perf_counter() - start) / len(ys) * 1000

    return ms_per_position, q.grid.count


def timed(query: str, loop, count: int):
    """The result, and the plain loop's time for the whole map over KQL's (adjacent timings)."""
    before = loop()
    con.plan_cache.clear()
    start = time.perf_counter()
    result = con.execute(query)
    seconds = time.perf_counter() - start
    plain = (before + loop()) / 2 * count / 1000
    return result, plain / seconds, plain


print(f"torch threads (default): {torch.get_num_threads()}; {GEOMETRY}", flush=True)
if TUNE:
    names = [n for n in TUNE[0].split(",") if n]
    start = time.perf_counter()
    print(con.execute("CALIBRATE efficientnet_lite0 ON (" + ", ".join(f"sample('{n}')" for n in names)
                      + f") {GEOMETRY}").message, flush=True)
    print(f"tuning took {time.perf_counter() - start:.0f} s", flush=True)
rows = {t: [] for t in TARGETS}
exact_speed = []
for name in PHOTOS:
    loop, count = loop_for(name)
    loop()                                                   # warm-up
    base = f"OCCLUDE sample('{name}') USING efficientnet_lite0 {GEOMETRY}"
    answers = {t: timed(f"{base} WITH SSIM >= {t}", loop, count) for t in TARGETS}
    exact, speed, plain = timed(base, loop, count)
    exact_speed.append(speed)
    line = [f"{name:21s} plain {plain:5.1f} s  exact {speed:4.2f}x"]
    for t, (a, speedup, _) in answers.items():
        quality = map_quality(exact.heatmap, a.heatmap)
        achieved = quality["ssim"]
        how = (("exact" if a.check["exact"] else f"lattice {a.check['lattice']}") if a.check
               else f"tau {a.tau:.2f}" if a.tau < 1 else a.plan.splitlines()[1].split(":")[0].strip()[:9])
        rows[t].append((achieved, speedup, quality["spearman"], quality["top10_iou"]))
        line.append(f"| {t}: {how:9s} bound {a.predicted_ssim:.3f} achieved {achieved:.3f} "
                    f"rho {quality['spearman']:.3f} top-10% IoU {quality['top10_iou']:.2f} "
                    f"{speedup:5.2f}x")
    print(" ".join(line), flush=True)

print(f"\nexact (incremental) against the plain loop: median {np.median(exact_speed):.2f}x")
print("target | maps | reached target | lowest SSIM | lowest Spearman | lowest top-10% IoU | "
      "median speedup | speedups", flush=True)
for t, got in rows.items():
    ssims, speed, rho, iou = (np.array(column) for column in zip(*got))
    print(f"{t} | {len(got)} | {(ssims >= t).sum()} of {len(got)} | {ssims.min():.3f} | "
          f"{rho.min():.3f} | {iou.min():.2f} | {np.median(speed):.2f}x | "
          f"{speed.min():.2f}x - {speed.max():.2f}x", flush=True)
