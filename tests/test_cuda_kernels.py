"""The Triton kernels of ``kql.cuda`` against the torch path, interpreted on CPU.

``TRITON_INTERPRET=1`` makes Triton run a kernel on CPU tensors (it must be set before
Triton compiles anything, so each check runs in a fresh interpreter). The first check
draws random geometries (odd sizes, borders, strides, offsets, thresholded patches larger
than their windows, expanded and channels-last patches, empty batches); the second runs
whole incremental queries with ``KQL_KERNELS=triton``, the engine's CUDA path with its
device-resident corners, and compares every map with the torch path's. On a machine with
a GPU both also run on it, and each GPU map is compared with the CPU's naive map (1e-4,
TF32 off).
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

GEOMETRIES = textwrap.dedent("""
    import numpy as np, torch
    from kql.cuda import gather as gpu
    from kql.operators import gather as ref
    rng = np.random.default_rng(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = lambda v: torch.as_tensor(np.asarray(v, np.int64), device=device)
    cases = 0
    for case in range(60):
        c = int(rng.integers(1, 10)); b = int(rng.integers(0, 7))
        r, rw = int(rng.integers(1, 12)), int(rng.integers(1, 12))
        sy, sx = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        n = int(rng.integers(1, 5))                      # window corners 0..n-1 (before scale)
        h, w = (n - 1) * sy + r + int(rng.integers(0, 3)), (n - 1) * sx + rw + int(rng.integers(0, 3))
        ph, pw = int(rng.integers(1, r + 4)), int(rng.integers(1, rw + 4))   # may exceed the window
        dy, dx = int(rng.integers(-2, 3)), int(rng.integers(-2, 3))
        base = torch.randn(1, c, h, w, device=device)
        wy, wx = rng.integers(0, n, b), rng.integers(0, n, b)
        # patch corners inside, across the window's edge, and outside it
        py = wy * sy - dy + rng.integers(-ph - 1, r + 2, b)
        px = wx * sx - dx + rng.integers(-pw - 1, rw + 2, b)
        kind = case % 3
        if kind == 0:
            patches = torch.randn(b, c, ph, pw, device=device)
        elif kind == 1:                                  # the input layer's expanded colour patch
            patches = torch.randn(c, 1, 1, device=device).expand(c, ph, pw).unsqueeze(0).expand(b, -1, -1, -1)
        else:                                            # channels-last: strides the kernel must use
            patches = torch.randn(b, c, ph, pw, device=device).to(memory_format=torch.channels_last)
        got = gpu.contexts(base, patches, t(py), t(px), t(wy), t(wx), (r, rw), (dy, dx), (sy, sx))
        want = ref.gather(base, patches.contiguous(), (py, px), (wy, wx), (r, rw), offset=(dy, dx), scale=(sy, sx))
        assert got.shape == (b, c, r, rw) and torch.equal(got, want), case
        got = gpu.windows(base, t(wy), t(wx), (r, rw), (sy, sx))
        assert torch.equal(got, ref.windows(base, (wy, wx), (r, rw), (sy, sx))), case
        fy, fx = rng.integers(0, h - min(ph, h) + 1, b), rng.integers(0, w - min(pw, w) + 1, b)
        small = patches[:, :, :h, :w].contiguous()
        fy, fx = np.minimum(fy, h - small.shape[2]), np.minimum(fx, w - small.shape[3])
        got = gpu.project(base, small, t(fy), t(fx))
        assert torch.equal(got, ref.project(base, small, (fy, fx))), case
        cases += 1
    print("ok", cases)
""")

ENGINE = textwrap.dedent("""
    import os, numpy as np, torch
    import kql
    from helpers import blob_image, calibrate_batchnorm, sensitive
    from models_zoo import custom_model
    from kql.cuda import gather as gpu
    from kql.planner import precision
    precision.unsupported = lambda name, device: None    # bfloat16 whatever this CPU has

    launches = []
    real = gpu.contexts
    def counted(*args, **kwargs):
        launches.append(args[0].shape)
        return real(*args, **kwargs)
    gpu.contexts = counted

    H, W = 40, 48
    image = blob_image(H, W, seed=3)
    checked = []
    for name, settings in [("conv_dilation2", []), ("conv_stride2", []), ("padding_same", []),
                           ("max_pools", []), ("avg_pools", []), ("adaptive_avg_uneven", []),
                           ("residual_two_rf", []), ("residual_two_rf", ["SET tau = 0.6"]),
                           ("cat_inception", []), ("squeeze_excite", ["SET gates = 'frozen'"]),
                           ("residual_two_rf", ["SET delta_convolutions = 'on'"]),
                           ("conv_dilation2", ["SET delta_convolutions = 'on'"]),
                           ("residual_two_rf", ["SET precision = 'bfloat16'",
                                                "SET delta_convolutions = 'on'"])]:
        torch.manual_seed(0)
        net = sensitive(calibrate_batchnorm(custom_model(name), H, W), image, (8, 8))
        maps = {}
        for kernels in ("torch", "triton"):
            os.environ["KQL_KERNELS"] = kernels
            con = kql.connect()
            con.register_model("net", net)
            con.register_image("img", image)
            # one layout for both paths (the operator's own trial could pick either)
            for s in ["SET strategy = 'incremental'", "SET layout = 'channels_last'"] + settings:
                con.execute(s)
            before = len(launches)
            maps[kernels] = con.execute("OCCLUDE img USING net PATCH 8 STRIDE 4 COLOR black BATCH 16").heatmap
            assert (len(launches) > before) == (kernels == "triton"), (name, kernels)
            if any("delta" in s for s in settings):      # the delta path's windows and adds
                plan = con.execute("EXPLAIN OCCLUDE img USING net PATCH 8 STRIDE 4 COLOR black BATCH 16").plan
                assert "DeltaConv:" in plan, plan
        assert np.ptp(maps["torch"]) > 1e-3, name       # a map that moves: a wrong engine fails
        np.testing.assert_allclose(maps["triton"], maps["torch"], atol=1e-6, err_msg=name)
        if torch.cuda.is_available():                    # the real thing: the GPU against CPU naive
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            del os.environ["KQL_KERNELS"]
            gpu_map = con.execute("OCCLUDE img USING net PATCH 8 STRIDE 4 COLOR black BATCH 16 ON GPU").heatmap
            con.execute("SET strategy = 'naive'")
            naive = con.execute("OCCLUDE img USING net PATCH 8 STRIDE 4 COLOR black BATCH 16 ON CPU").heatmap
            low = any("bfloat16" in s for s in settings)   # against float32: bfloat16's error
            np.testing.assert_allclose(gpu_map, naive, atol=2e-2 if low else 1e-4, err_msg=name)
        checked.append(name)
    print("ok", len(checked))
""")


def _run(script: str, **env) -> str:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(TESTS), **env)
    env.pop("KQL_KERNELS", None) if "KQL_KERNELS" not in env else None
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=600, cwd=TESTS)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_context_kernel_matches_torch_on_random_geometries():
    assert _run(GEOMETRIES) == "ok 60"


def test_incremental_engine_on_the_kernels_equals_the_torch_path():
    assert _run(ENGINE) == "ok 13"
