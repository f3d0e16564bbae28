"""WITH SSIM on EfficientNet-Lite0 (real weights): tune on 5 photos, test on 3 others,
against a plain PyTorch loop at torch's default threads (the user's alternative).

Usage: .venv/bin/python benchmarks/fidelity_lite0.py ["PATCH 16 STRIDE 8"]
"""
import sys, time
import numpy as np, torch, kql
from kql.language.parser import parse_with_text
from kql.binder import bind
from kql.planner.quality import map_quality

G = sys.argv[1] if len(sys.argv) > 1 else "PATCH 16 STRIDE 8"
con = kql.connect()
tune = ["astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"]
test = ["chelsea", "retina", "camera"]
t = time.time()
print(con.execute("CALIBRATE efficientnet_lite0 ON (" + ", ".join(f"sample('{n}')" for n in tune) + f") {G}").message, flush=True)
print(f"tuning took {time.time() - t:.0f}s", flush=True)

def plain(name):
    stmt, text = parse_with_text(f"OCCLUDE sample('{name}') USING efficientnet_lite0 {G}")[0]
    q = bind(stmt, text, con.catalog)
    model = q.model.composed().eval()
    ys, xs = q.grid.positions()
    (ph, pw), img = q.grid.patch, q.image
    out = []
    start = time.perf_counter()
    with torch.inference_mode():
        target = int(model(img[None]).argmax())
        for i in range(0, len(ys), 16):
            batch = img.expand(len(ys[i:i + 16]), -1, -1, -1).clone()
            for k, (y, x) in enumerate(zip(ys[i:i + 16], xs[i:i + 16])):
                batch[k, :, y:y + ph, x:x + pw] = 0.5
            out.append(torch.softmax(model(batch), 1)[:, target])
    return torch.cat(out).numpy().reshape(q.grid.shape), time.perf_counter() - start

print(f"torch threads (default): {torch.get_num_threads()}", flush=True)
for name in test:
    ref, tp = plain(name)
    for target in (0.8, 0.9, 0.95):
        q = f"OCCLUDE sample('{name}') USING efficientnet_lite0 {G} WITH SSIM >= {target}"
        t0 = time.perf_counter(); a = con.execute(q); ta = time.perf_counter() - t0
        how = a.plan.splitlines()[1].split(":")[0].strip()
        got = map_quality(ref, a.heatmap)
        print(f"{name:10s} target {target}: {how} tau {a.tau:.2f} predicted {a.predicted_ssim:.3f} "
              f"achieved {got['ssim']:.3f} (Spearman {got['spearman']:.3f}, top-10% IoU "
              f"{got['top10_iou']:.2f})  plain loop {tp:.1f}s kql {ta:.1f}s "
              f"speedup {tp / ta:.2f}x", flush=True)
