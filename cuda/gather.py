"""Triton kernel: gather the read-in contexts of a batch of patches in one pass.

Each program copies one block of one (item, channel) context: a pixel comes from the
item's changed patch when it lies inside it, else from the materialized (padded) view.
It replaces the copy loop the seed paper found to be the bottleneck of incremental
inference on GPUs (seed paper 000, section 4.1, "CPU versus GPU implementation
concerns"). Tested on CPU with ``TRITON_INTERPRET=1`` against the torch path in
``kql.operators.gather``.
"""

from __future__ import annotations

import os

import numpy as np
import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None


def available() -> bool:
    """Triton is importable (kernels then run on CUDA tensors, or interpreted on CPU)."""
    return triton is not None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    @triton.jit
    def _gather_kernel(base_ptr, patch_ptr, out_ptr, py_ptr, px_ptr, wy_ptr, wx_ptr,
                       C, HP, WP, PH, PW, R, RW,
                       s_pb, s_pc, s_ph, s_pw,
                       BLOCK: tl.constexpr):
        item_channel = tl.program_id(0)
        block = tl.program_id(1)
        b = item_channel // C
        c = item_channel % C
        offs = block * BLOCK + tl.arange(0, BLOCK)
        valid = offs < R * RW
        r = offs // RW
        s = offs % RW
        row = tl.load(wy_ptr + b) + r
        col = tl.load(wx_ptr + b) + s
        pr = row - tl.load(py_ptr + b)
        pc = col - tl.load(px_ptr + b)
        in_patch = (pr >= 0) & (pr < PH) & (pc >= 0) & (pc < PW) & valid
        base_val = tl.load(base_ptr + c * HP * WP + row * WP + col, mask=valid & ~in_patch, other=0.0)
        patch_val = tl.load(patch_ptr + b * s_pb + c * s_pc + pr * s_ph + pc * s_pw,
                            mask=in_patch, other=0.0)
        out = tl.where(in_patch, patch_val, base_val)
        tl.store(out_ptr + item_channel * R * RW + offs, out, mask=valid)


def gather(padded: torch.Tensor, patches: torch.Tensor, py: np.ndarray, px: np.ndarray,
           wy: np.ndarray, wx: np.ndarray, size: tuple) -> torch.Tensor:
    """Same contract as :func:`kql.operators.gather.gather` (windows inside ``padded``)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    b, c, ph, pw = patches.shape
    r, rw = size
    dev = padded.device
    base = padded[0].contiguous()
    out = torch.empty(b, c, r, rw, device=dev, dtype=padded.dtype)
    idx = [torch.as_tensor(np.ascontiguousarray(v, dtype=np.int64), device=dev) for v in (py, px, wy, wx)]
    block = min(1024, triton.next_power_of_2(r * rw))
    grid = (b * c, triton.cdiv(r * rw, block))
    _gather_kernel[grid](base, patches, out, *idx, c, base.shape[1], base.shape[2], ph, pw, r, rw,
                         *patches.stride(), BLOCK=block)
    return out
