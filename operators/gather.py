"""Batched window gathering: the read-in contexts of many patches at once (no Python loop).

For each batch item ``b`` the context is the window ``[wy_b, wy_b+R) x [wx_b, wx_b+Rw)`` of
the materialized (padded) input with the item's changed patch pasted in at
``(py_b, px_b)`` (seed paper 000, Algorithm 1, lines 4-8). Corners come as one array per
spatial axis (``(ys, xs)``; a volume's ``(zs, ys, xs)``) and every copy is the same code
for any number of axes. Where :func:`kernels` says so (CUDA tensors of images), one
Triton kernel of ``kql.cuda.gather`` does each copy in one launch, with the corners as
int64 tensors on the device (:func:`device_corners`); otherwise the corners are numpy
arrays and torch ops do it.

>>> import numpy as np, torch
>>> base = torch.arange(16.).view(1, 1, 4, 4)
>>> patch = torch.full((2, 1, 1, 1), -1.)
>>> ctx = gather(base, patch, (np.array([1, 3]), np.array([1, 0])),
...              (np.array([0, 2]), np.array([0, 0])), (2, 2))
>>> ctx[:, 0].tolist()
[[[0.0, 1.0], [4.0, -1.0]], [[8.0, 9.0], [-1.0, 13.0]]]
"""

from __future__ import annotations

import math
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


def _device_path(t: torch.Tensor) -> bool:
    """The Triton kernels copy images' maps; a volume's go through torch ops everywhere."""
    return t.dim() == 4 and kernels(t.device)


def windows(base: torch.Tensor, at: tuple, size: tuple, scale: tuple = None) -> torch.Tensor:
    """``[B, C, *size]`` copies of windows of ``base`` ``[1, C, *S]`` starting at
    ``at[a] * scale[a]`` on each axis ``a`` (all inside it).

    >>> windows(torch.arange(27.).view(1, 1, 3, 3, 3), (np.array([1]), np.array([0]),
    ...         np.array([1])), (1, 2, 2))[0, 0].tolist()
    [[[10.0, 11.0], [13.0, 14.0]]]
    """
    n = len(size)
    scale = scale or (1,) * n
    if _device_path(base):
        from kql.cuda import gather as gpu

        return gpu.windows(base, *_on(base.device, *at), size, scale)
    index = tuple(_index(_host(c) * s, base.device) for c, s in zip(at, scale))
    if _channels_last(base):             # pixels of C values: copied as such, channels-last
        view = base[0].movedim(0, -1)                         # [*S, C]
        for a in range(n):
            view = view.unfold(a, size[a], 1)                 # [*S', C, *size]
        return view.movedim(n, -1)[index].movedim(-1, 1)     # copied as [B, *size, C]
    view = base[0]
    for a in range(n):
        view = view.unfold(1 + a, size[a], 1)                 # [C, *S', *size]
    return view.movedim(0, n)[index]


def _channels_last(t: torch.Tensor) -> bool:
    return t.shape[1] > 1 and t.is_contiguous(memory_format=_pixels(t)) and not t.is_contiguous()


def _pixels(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last_3d if t.dim() == 5 else torch.channels_last


def _on(device, *corners) -> list:
    """Corners as int64 tensors on ``device`` (numpy ones copied: callers outside a scan)."""
    if all(isinstance(c, torch.Tensor) for c in corners):
        return list(corners)
    return device_corners([_host(c) for c in corners], device)


def _flat(offsets: tuple, extents: tuple, dims: tuple) -> np.ndarray:
    """``[B, *extents]``: each item's flat index into a ``dims`` array of the cells of the
    box of ``extents`` at its ``offsets``."""
    flat = np.zeros((len(offsets[0]),) + (1,) * len(extents), np.int64)
    for a, (o, e) in enumerate(zip(offsets, extents)):
        shape = [1] * len(extents)
        shape[a] = e
        flat = flat * dims[a] + (o.reshape((-1,) + (1,) * len(extents))
                                 + np.arange(e).reshape(shape)[None])
    return flat


def paste(dst: torch.Tensor, patches: torch.Tensor, at: tuple) -> torch.Tensor:
    """Write ``patches`` ``[B, C, *p]`` into ``dst`` ``[B, C, *R]`` at per-item offsets
    ``at`` (one array per axis). Every patch must lie inside ``dst`` (see
    :func:`paste_clipped` otherwise).
    """
    patches = patches.to(dst.dtype)                  # a reduced-precision scan's values
    b, c, *p = patches.shape
    r = dst.shape[2:]
    cells, total = math.prod(p), math.prod(r)
    flat = _flat(tuple(_host(o) for o in at), tuple(p), tuple(r))
    if dst.is_contiguous():
        index = _index(flat.reshape(b, 1, cells), dst.device).expand(b, c, cells)
        dst.view(b, c, total).scatter_(2, index, patches.reshape(b, c, cells))
    else:                                            # channels-last: pixels of C values
        index = _index(flat.reshape(b, cells, 1), dst.device).expand(b, cells, c)
        dst.movedim(1, -1).view(b, total, c).scatter_(
            1, index, patches.movedim(1, -1).reshape(b, cells, c))
    return dst


def paste_clipped(dst: torch.Tensor, patches: torch.Tensor, at: tuple) -> torch.Tensor:
    """Like :func:`paste`, keeping only the part of each patch that falls inside ``dst``."""
    b, _, *p = patches.shape
    r = dst.shape[2:]
    n, dev = len(r), dst.device
    inside = np.ones((b,) + (1,) * n, bool)
    index = []
    for a in range(n):
        shape = [1] * n
        shape[a] = r[a]
        pos = (np.arange(r[a])[None, :] - _host(at[a])[:, None])      # patch index per window cell
        inside = inside & ((pos >= 0) & (pos < p[a])).reshape((b,) + tuple(shape))
        index.append(_index(pos.clip(0, p[a] - 1).reshape((b,) + tuple(shape)), dev))
    items = torch.arange(b, device=dev).reshape((b,) + (1,) * n)
    vals = patches.to(dst.dtype)[(items, slice(None), *index)].movedim(-1, 1)
    return torch.where(torch.from_numpy(inside).to(dev)[:, None], vals, dst)


def add_at(dst: torch.Tensor, patches: torch.Tensor, at: tuple) -> torch.Tensor:
    """``dst`` [B, C, *R] (a fresh copy: added to in place) plus each item's patch
    ``patches`` [B, C, *p] at offset ``at`` (one array per axis), keeping only the part
    inside ``dst`` (offsets may be negative).

    >>> dst = torch.zeros(2, 1, 2, 3)
    >>> add_at(dst, torch.ones(2, 1, 2, 2), (np.array([0, -1]), np.array([1, 0])))[:, 0].tolist()
    [[[0.0, 1.0, 1.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]]
    """
    at = tuple(_host(o) for o in at)
    patches = patches.to(dst.dtype)
    b, c, *p = patches.shape
    r = tuple(dst.shape[2:])
    n = len(r)
    if all((o == 0).all() for o in at) and tuple(p) == r:
        return dst.add_(patches)
    # Zeros around the patches so that every item's window of dst's size lies inside,
    # pixels of C values (channels-last) so that each copy moves a pixel's channels.
    before = [max(0, int(o.max())) for o in at]
    after = [max(0, int((ra - o - pa).max())) for o, ra, pa in zip(at, r, p)]
    dev = dst.device
    padded = patches.new_zeros(b, *(lo + pa + hi for lo, pa, hi in zip(before, p, after)), c)
    padded[(slice(None), *(slice(lo, lo + pa) for lo, pa in zip(before, p)))] = patches.movedim(1, -1)
    index = []
    for a in range(n):
        shape = [1] * n
        shape[a] = r[a]
        index.append(_index(((before[a] - at[a])[:, None] + np.arange(r[a])).reshape((b,) + tuple(shape)), dev))
    items = torch.arange(b, device=dev).reshape((b,) + (1,) * n)
    dst.movedim(1, -1).add_(padded[(items, *index)])          # [B, *R, C]
    return dst


def gather(padded: torch.Tensor, patches: torch.Tensor, patch_at: tuple, window_at: tuple,
           size: tuple, offset: tuple = None, scale: tuple = None) -> torch.Tensor:
    """Contexts ``[B, C, *size]``: windows of ``padded`` at ``window_at * scale`` with each
    item's patch pasted in at ``patch_at + offset`` (per axis; ``scale``, ``offset``: a
    layer's stride and padding, applied where the copy is made)."""
    n = len(size)
    offset, scale = offset or (0,) * n, scale or (1,) * n
    if _device_path(padded):
        from kql.cuda import gather as gpu

        return gpu.contexts(padded, patches.to(padded.dtype), *_on(padded.device, *patch_at, *window_at),
                            size, offset, scale)
    starts = tuple(_host(w) * s for w, s in zip(window_at, scale))
    ctx = windows(padded, starts, size)
    at = tuple(_host(c) + d - w for c, d, w in zip(patch_at, offset, starts))
    p = patches.shape[2:]
    if all((o >= 0).all() and (o + e <= r).all() for o, e, r in zip(at, p, size)):
        return paste(ctx, patches, at)
    return paste_clipped(ctx, patches, at)


def project(base: torch.Tensor, patches: torch.Tensor, at: tuple,
            channels_last: bool = False) -> torch.Tensor:
    """``[B, C, *S]`` copies of ``base`` with each item's patch written in at ``at``
    (Algorithm 2), made channels-last on CPU when asked (one copy, not a copy and a
    conversion)."""
    if _device_path(base):
        from kql.cuda import gather as gpu

        return gpu.project(base, patches.to(base.dtype), *_on(base.device, *at))
    b = patches.shape[0]
    form = _pixels(base) if channels_last else torch.contiguous_format
    full = base.expand(b, *base.shape[1:]).clone(memory_format=form)
    return paste(full, patches, tuple(_host(c) for c in at))
