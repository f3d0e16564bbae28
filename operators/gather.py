"""Batched window gathering: the read-in contexts of many patches at once (no Python loop).

For each batch item ``b`` the context is the window ``[wy_b, wy_b+R) x [wx_b, wx_b+Rw)`` of
the materialized (padded) input with the item's changed patch pasted in at
``(py_b, px_b)`` (seed paper 000, Algorithm 1, lines 4-8). On CUDA the Triton kernel in
``kql.cuda.gather`` does the same in one pass.

>>> import numpy as np, torch
>>> base = torch.arange(16.).view(1, 1, 4, 4)
>>> patch = torch.full((2, 1, 1, 1), -1.)
>>> ctx = gather(base, patch, np.array([1, 3]), np.array([1, 0]), np.array([0, 2]),
...              np.array([0, 0]), (2, 2))
>>> ctx[:, 0].tolist()
[[[0.0, 1.0], [4.0, -1.0]], [[8.0, 9.0], [-1.0, 13.0]]]
"""

from __future__ import annotations

import numpy as np
import torch


def _index(values: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)).to(device, non_blocking=True)


def windows(base: torch.Tensor, wy: np.ndarray, wx: np.ndarray, size: tuple) -> torch.Tensor:
    """``[B, C, R, Rw]`` copies of windows of ``base`` ``[1, C, H, W]`` (all inside it)."""
    r, rw = size
    view = base[0].unfold(1, r, 1).unfold(2, rw, 1)          # [C, H-R+1, W-Rw+1, R, Rw]
    return view.permute(1, 2, 0, 3, 4)[_index(wy, base.device), _index(wx, base.device)]


def paste(dst: torch.Tensor, patches: torch.Tensor, oy: np.ndarray, ox: np.ndarray) -> torch.Tensor:
    """Write ``patches`` ``[B, C, ph, pw]`` into ``dst`` ``[B, C, R, Rw]`` at per-item offsets.

    Every patch must lie inside ``dst`` (see :func:`paste_clipped` otherwise).
    """
    b, c, ph, pw = patches.shape
    r, rw = dst.shape[2:]
    flat = (oy[:, None, None] + np.arange(ph)[None, :, None]) * rw + ox[:, None, None] + np.arange(pw)
    index = _index(flat.reshape(b, 1, ph * pw), dst.device).expand(b, c, ph * pw)
    dst.view(b, c, r * rw).scatter_(2, index, patches.reshape(b, c, ph * pw))
    return dst


def paste_clipped(dst: torch.Tensor, patches: torch.Tensor, oy: np.ndarray, ox: np.ndarray) -> torch.Tensor:
    """Like :func:`paste`, keeping only the part of each patch that falls inside ``dst``."""
    b, _, ph, pw = patches.shape
    r, rw = dst.shape[2:]
    dev = dst.device
    pr = np.arange(r)[None, :] - oy[:, None]                   # patch row per window row
    pc = np.arange(rw)[None, :] - ox[:, None]
    inside = torch.from_numpy(((pr >= 0) & (pr < ph))[:, :, None] & ((pc >= 0) & (pc < pw))[:, None, :])
    items = torch.arange(b, device=dev)[:, None, None]
    vals = patches[items, :, _index(pr.clip(0, ph - 1), dev)[:, :, None],
                   _index(pc.clip(0, pw - 1), dev)[:, None, :]].permute(0, 3, 1, 2)
    return torch.where(inside.to(dev)[:, None], vals, dst)


def gather(padded: torch.Tensor, patches: torch.Tensor, py: np.ndarray, px: np.ndarray,
           wy: np.ndarray, wx: np.ndarray, size: tuple) -> torch.Tensor:
    """Contexts ``[B, C, R, Rw]``: windows of ``padded`` with each item's patch pasted in.

    ``py, px`` and ``wy, wx`` are the patch and window corners in ``padded``'s coordinates.
    """
    if padded.is_cuda:
        from kql.cuda import gather as gpu

        if gpu.available():
            return gpu.gather(padded, patches, py, px, wy, wx, size)
    ctx = windows(padded, wy, wx, size)
    oy, ox = py - wy, px - wx
    ph, pw = patches.shape[2:]
    if (oy >= 0).all() and (ox >= 0).all() and (oy + ph <= size[0]).all() and (ox + pw <= size[1]).all():
        return paste(ctx, patches, oy, ox)
    return paste_clipped(ctx, patches, oy, ox)


def project(base: torch.Tensor, patches: torch.Tensor, py: np.ndarray, px: np.ndarray) -> torch.Tensor:
    """``[B, C, H, W]`` copies of ``base`` with each item's patch written in (Algorithm 2)."""
    b = patches.shape[0]
    full = base.expand(b, *base.shape[1:]).clone()
    return paste(full, patches, py, px)
