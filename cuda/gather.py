"""Triton kernel: every read-in context of a batch of patches in one launch.

One kernel serves the three copies of incremental inference (seed paper 000, Algorithm 1
lines 4-8 and Algorithm 2), which the seed paper found to be the bottleneck on GPUs
(section 4.1, "CPU versus GPU implementation concerns"):

- contexts: item ``b``'s window ``[wy_b*sy, +R) x [wx_b*sx, +Rw)`` of a (padded)
  materialized view, with its changed patch pasted in at ``(py_b + dy, px_b + dx)``
  (clipped to the window: thresholded patches may be larger than it);
- projection: a full copy of the view per item with its patch written in (scale 0: the
  window is the whole view);
- windows: the view's windows alone (no patch).

Corners are int64 tensors on the device (uploaded once per scan by the operator); the
layer's offsets and strides are scalars of the launch, so no index array is built on
the host or copied per layer. Each program writes one block of one item's ``C x R x Rw``
context (a pixel comes from the patch inside it, else from the view). Tested on CPU with
``TRITON_INTERPRET=1`` against the torch path of ``kql.operators.gather``
(tests/test_cuda_kernels.py).
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

BLOCK = 1024
INTERPRETED_BLOCK = 1 << 16    # the interpreter's cost is per program: fewer, larger ones
# KQL_KERNELS: 'triton' runs the kernels on any tensor (CPU tensors need TRITON_INTERPRET=1:
# that is how the tests drive them end to end), 'torch' never, unset: on CUDA tensors.
SETTING = "KQL_KERNELS"


def available() -> bool:
    """Triton is importable (kernels then run on CUDA tensors, or interpreted on CPU)."""
    return triton is not None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def enabled(device: torch.device) -> bool:
    """Whether the operators use these kernels for tensors on ``device``."""
    choice = os.environ.get(SETTING, "")
    if triton is None or choice == "torch":
        return False
    if device.type == "cuda":
        return True
    return choice == "triton" and interpreted()


if triton is not None:
    @triton.jit
    def _contexts_kernel(base_ptr, patch_ptr, out_ptr, py_ptr, px_ptr, wy_ptr, wx_ptr,
                         C, HP, WP, PH, PW, R, RW,
                         s_pb, s_pc, s_ph, s_pw,
                         dy, dx, sy, sx,
                         HAS_PATCH: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        area = R * RW
        valid = offs < C * area
        c = offs // area
        r = (offs % area) // RW
        s = offs % RW
        row = tl.load(wy_ptr + b) * sy + r
        col = tl.load(wx_ptr + b) * sx + s
        base_val = tl.load(base_ptr + c * HP * WP + row * WP + col, mask=valid, other=0.0)
        if HAS_PATCH:
            pr = row - (tl.load(py_ptr + b) + dy)
            pc = col - (tl.load(px_ptr + b) + dx)
            inside = (pr >= 0) & (pr < PH) & (pc >= 0) & (pc < PW) & valid
            patch_val = tl.load(patch_ptr + b * s_pb + c * s_pc + pr * s_ph + pc * s_pw,
                                mask=inside, other=0.0)
            base_val = tl.where(inside, patch_val, base_val)
        tl.store(out_ptr + b * C * area + offs, base_val, mask=valid)


def contexts(base: torch.Tensor, patches, py: torch.Tensor, px: torch.Tensor, wy: torch.Tensor,
             wx: torch.Tensor, size: tuple, offset: tuple = (0, 0), scale: tuple = (1, 1)) -> torch.Tensor:
    """``[B, C, R, Rw]``: the windows of ``base`` ``[1, C, H, W]`` at ``(wy*sy, wx*sx)``,
    each with its item's patch of ``patches`` ``[B, C, ph, pw]`` (any strides, None for
    none) pasted in at ``(py + dy, px + dx)``; every window must lie inside ``base``."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    r, rw = size
    c, hp, wp = base.shape[1:]
    n = wy.shape[0]
    view = base[0].contiguous()
    out = torch.empty(n, c, r, rw, device=base.device, dtype=base.dtype)
    if n == 0 or r * rw == 0:
        return out
    if patches is None:
        patches, strides, ph, pw, has_patch = view, (0, 0, 0, 0), 0, 0, False
    else:
        strides, (ph, pw), has_patch = patches.stride(), patches.shape[2:], True
    block = min(INTERPRETED_BLOCK if interpreted() else BLOCK, triton.next_power_of_2(c * r * rw))
    grid = (n, triton.cdiv(c * r * rw, block))
    _contexts_kernel[grid](view, patches, out, py, px, wy, wx, c, hp, wp, ph, pw, r, rw,
                           *strides, offset[0], offset[1], scale[0], scale[1],
                           HAS_PATCH=has_patch, BLOCK=block)
    return out


def project(base: torch.Tensor, patches: torch.Tensor, py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` copies of ``base`` with each item's patch written in (Algorithm 2)."""
    return contexts(base, patches, py, px, py, px, tuple(base.shape[2:]), scale=(0, 0))


def windows(base: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor, size: tuple,
            scale: tuple = (1, 1)) -> torch.Tensor:
    """``[B, C, R, Rw]`` copies of windows of ``base`` at ``(wy*sy, wx*sx)``."""
    return contexts(base, None, wy, wx, wy, wx, size, scale=scale)
