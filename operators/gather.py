"""Batched window gathering: the read-in contexts of many patches at once (no Python loop).

For each batch item ``b`` the context is the window ``[wy_b, wy_b+R) x [wx_b, wx_b+Rw)`` of
the materialized (padded) input with the item's changed patch pasted in at
``(py_b, px_b)`` (seed paper 000, Algorithm 1, lines 4-8). Where :func:`kernels` says so
(CUDA tensors), one Triton kernel of ``kql.cuda.gather`` does each copy in one launch,
with the corners as int64 tensors on the device (:func:`device_corners`); otherwise the
corners are numpy arrays and torch ops do it.

>>> import numpy as np, torch
>>> base = torch.arange(16.).view(1, 1, 4, 4)
>>> patch = torch.full((2, 1, 1, 1), -1.)
>>> ctx = gather(base, patch, np.array([1, 3]), np.array([1, 0]), np.array([0, 2]),
...              np.array([0, 0]), (2, 2))
>>> ctx[:, 0].tolist()
[[[0.0, 1.0], [4.0, -1.0]], [[8.0, 9.0], [-1.0, 13.0]]]
"""

from __future__ import annotations

import os

import numpy as np
import torch


def kernels(device: torch.device) -> bool:
    """Whether the Triton kernels do the copies for tensors on ``device`` (CUDA, or any
    device with ``KQL_KERNELS=triton`` and ``TRITON_INTERPRET=1``: the tests' way)."""
    if device.type != "cuda" and os.environ.get("KQL_KERNELS") != "triton":
        return False
    from kql.cuda import gather as gpu

    return gpu.enabled(device)


def device_corners(arrays: list, device) -> list:
    """The int64 corner arrays ``arrays`` (each ``[N]``) on ``device``, in one copy."""
    if not arrays:
        return []
    flat = torch.from_numpy(np.concatenate([np.asarray(a, np.int64) for a in arrays]))
    flat = flat.to(device, non_blocking=True)
    return list(torch.split(flat, [len(a) for a in arrays]))


def _host(values) -> np.ndarray:
    return values.cpu().numpy() if isinstance(values, torch.Tensor) else values


def _index(values: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)).to(device, non_blocking=True)


def windows(base: torch.Tensor, wy, wx, size: tuple, scale: tuple = (1, 1)) -> torch.Tensor:
    """``[B, C, R, Rw]`` copies of windows of ``base`` ``[1, C, H, W]`` at ``(wy*sy, wx*sx)``
    (all inside it)."""
    if kernels(base.device):
        from kql.cuda import gather as gpu

        return gpu.windows(base, *_on(base.device, wy, wx), size, scale)
    r, rw = size
    wy, wx = _host(wy) * scale[0], _host(wx) * scale[1]
    iy, ix = _index(wy, base.device), _index(wx, base.device)
    if _channels_last(base):             # pixels of C values: copied as such, channels-last
        view = base[0].permute(1, 2, 0).unfold(0, r, 1).unfold(1, rw, 1)   # [H', W', C, R, Rw]
        return view.permute(0, 1, 3, 4, 2)[iy, ix].permute(0, 3, 1, 2)
    view = base[0].unfold(1, r, 1).unfold(2, rw, 1)          # [C, H-R+1, W-Rw+1, R, Rw]
    return view.permute(1, 2, 0, 3, 4)[iy, ix]


def _channels_last(t: torch.Tensor) -> bool:
    return t.shape[1] > 1 and t.is_contiguous(memory_format=torch.channels_last) \
        and not t.is_contiguous()


def _on(device, *corners) -> list:
    """Corners as int64 tensors on ``device`` (numpy ones copied: callers outside a scan)."""
    if all(isinstance(c, torch.Tensor) for c in corners):
        return list(corners)
    return device_corners([_host(c) for c in corners], device)


def paste(dst: torch.Tensor, patches: torch.Tensor, oy: np.ndarray, ox: np.ndarray) -> torch.Tensor:
    """Write ``patches`` ``[B, C, ph, pw]`` into ``dst`` ``[B, C, R, Rw]`` at per-item offsets.

    Every patch must lie inside ``dst`` (see :func:`paste_clipped` otherwise).
    """
    patches = patches.to(dst.dtype)                  # a reduced-precision scan's values
    b, c, ph, pw = patches.shape
    r, rw = dst.shape[2:]
    flat = (oy[:, None, None] + np.arange(ph)[None, :, None]) * rw + ox[:, None, None] + np.arange(pw)
    if dst.is_contiguous():
        index = _index(flat.reshape(b, 1, ph * pw), dst.device).expand(b, c, ph * pw)
        dst.view(b, c, r * rw).scatter_(2, index, patches.reshape(b, c, ph * pw))
    else:                                            # channels-last: pixels of C values
        index = _index(flat.reshape(b, ph * pw, 1), dst.device).expand(b, ph * pw, c)
        dst.permute(0, 2, 3, 1).view(b, r * rw, c).scatter_(
            1, index, patches.permute(0, 2, 3, 1).reshape(b, ph * pw, c))
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


def add_at(dst: torch.Tensor, patches: torch.Tensor, oy, ox) -> torch.Tensor:
    """``dst`` [B, C, R, Rw] (a fresh copy: added to in place) plus each item's patch
    ``patches`` [B, C, ph, pw] at offset ``(oy, ox)``, keeping only the part inside ``dst``
    (offsets may be negative).

    >>> dst = torch.zeros(2, 1, 2, 3)
    >>> add_at(dst, torch.ones(2, 1, 2, 2), np.array([0, -1]), np.array([1, 0]))[:, 0].tolist()
    [[[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]]
    """
    oy, ox = _host(oy), _host(ox)
    patches = patches.to(dst.dtype)
    b, c, ph, pw = patches.shape
    r, rw = dst.shape[2:]
    if (oy == 0).all() and (ox == 0).all() and (ph, pw) == (r, rw):
        return dst.add_(patches)
    # Zeros around the patches so that every item's window of dst's size lies inside,
    # pixels of C values (channels-last) so that each copy moves a pixel's channels.
    top, left = max(0, int(oy.max())), max(0, int(ox.max()))
    bottom, right = max(0, int((r - oy - ph).max())), max(0, int((rw - ox - pw).max()))
    dev = dst.device
    padded = patches.new_zeros(b, top + ph + bottom, left + pw + right, c)
    padded[:, top:top + ph, left:left + pw] = patches.permute(0, 2, 3, 1)
    rows = _index((top - oy)[:, None] + np.arange(r), dev)
    cols = _index((left - ox)[:, None] + np.arange(rw), dev)
    items = torch.arange(b, device=dev)[:, None, None]
    change = padded[items, rows[:, :, None], cols[:, None, :]]          # [B, R, Rw, C]
    dst.permute(0, 2, 3, 1).add_(change)
    return dst


def gather(padded: torch.Tensor, patches: torch.Tensor, py, px, wy, wx, size: tuple,
           offset: tuple = (0, 0), scale: tuple = (1, 1)) -> torch.Tensor:
    """Contexts ``[B, C, R, Rw]``: windows of ``padded`` at ``(wy*sy, wx*sx)`` with each
    item's patch pasted in at ``(py + dy, px + dx)`` (``scale`` (sy, sx), ``offset`` (dy, dx):
    a layer's stride and padding, applied where the copy is made)."""
    if kernels(padded.device):
        from kql.cuda import gather as gpu

        return gpu.contexts(padded, patches.to(padded.dtype), *_on(padded.device, py, px, wy, wx),
                            size, offset, scale)
    py, px = _host(py) + offset[0], _host(px) + offset[1]
    wy, wx = _host(wy) * scale[0], _host(wx) * scale[1]
    ctx = windows(padded, wy, wx, size)
    oy, ox = py - wy, px - wx
    ph, pw = patches.shape[2:]
    if (oy >= 0).all() and (ox >= 0).all() and (oy + ph <= size[0]).all() and (ox + pw <= size[1]).all():
        return paste(ctx, patches, oy, ox)
    return paste_clipped(ctx, patches, oy, ox)


def project(base: torch.Tensor, patches: torch.Tensor, py, px,
            channels_last: bool = False) -> torch.Tensor:
    """``[B, C, H, W]`` copies of ``base`` with each item's patch written in (Algorithm 2),
    made channels-last on CPU when asked (one copy, not a copy and a conversion)."""
    if kernels(base.device):
        from kql.cuda import gather as gpu

        return gpu.project(base, patches.to(base.dtype), *_on(base.device, py, px))
    b = patches.shape[0]
    form = torch.channels_last if channels_last else torch.contiguous_format
    full = base.expand(b, *base.shape[1:]).clone(memory_format=form)
    return paste(full, patches, _host(py), _host(px))
