"""The Triton gather kernel against the torch path (interpreted on CPU: TRITON_INTERPRET=1)."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import numpy as np, torch
    from kql.cuda import gather as gpu
    from kql.operators import gather as ref
    rng = np.random.default_rng(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = 0
    for (c, h, w, ph, pw, r, rw, b) in [(3, 12, 14, 4, 5, 6, 8, 5), (8, 9, 9, 3, 3, 5, 5, 3),
                                        (2, 20, 7, 6, 2, 9, 4, 4)]:
        base = torch.randn(1, c, h, w, device=device)
        patches = torch.randn(b, c, ph, pw, device=device)
        wy = rng.integers(0, h - r + 1, b); wx = rng.integers(0, w - rw + 1, b)
        # patches inside, overlapping the window edge, and outside it
        py = wy + rng.integers(-ph, r + 1, b); px = wx + rng.integers(-pw, rw + 1, b)
        got = gpu.gather(base, patches, py, px, wy, wx, (r, rw))
        want = ref.paste_clipped(ref.windows(base, wy, wx, (r, rw)), patches, py - wy, px - wx)
        assert torch.equal(got, want), (c, h, w)
        # an expanded (stride-0) patch, as the input layer uses
        one = torch.randn(1, c, ph, pw, device=device).expand(b, -1, -1, -1)
        got = gpu.gather(base, one, wy + 1, wx + 1, wy, wx, (r, rw))
        want = ref.paste_clipped(ref.windows(base, wy, wx, (r, rw)), one.contiguous(), wy * 0 + 1, wx * 0 + 1)
        assert torch.equal(got, want)
        cases += 1
    print("ok", cases)
""")


def test_triton_gather_matches_torch():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok 3"
