"""Weight files: the name -> tensor dict in a ``torch.save`` or safetensors file, read
without running code.

``torch.load(..., weights_only=True)`` refuses anything but tensors and plain containers, so a
pickle that would run code never does (a whole pickled ``nn.Module`` included: the message
says how to save its state dict instead); safetensors files hold only tensors. A refusal,
and every other failure, is one :class:`~kql.errors.KqlModelError` line. The tensors are
checked before any module is built: finite, and a last layer with at least one output.

What a file takes in memory is checked against ``memory_limit`` before it is read: a
zip archive (``torch.save``'s format, whose members may be deflated) by the sizes its
central directory declares, which torch allocates before inflating; a member that
declares more than deflate can inflate to is refused as damaged. Other files take their
own size.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from collections import OrderedDict
from typing import Optional

import torch

from ..errors import KqlModelError, strip_ansi
from .images import check_bytes, exception_text, open_regular_file, reading_limit

# Deflate's largest ratio is 1032:1; a zip member declaring more is damaged or lies.
DEFLATE_RATIO = 1032
# Trained weights barely compress (~1.1:1; torch.save stores them): an archive over
# BOMB_BYTES whose members declare more than BOMB_RATIO times the file is a zip bomb.
BOMB_RATIO, BOMB_BYTES = 50, 64 << 20


def read_state_dict(path: str, memory_limit: Optional[int] = None) -> dict:
    """The name -> tensor dict in a weight file (unwrapped from a training checkpoint);
    ``memory_limit``: the bytes it may take (default: the statement's ``SET memory_limit``)."""
    with open_regular_file(path, "model file", KqlModelError) as fh:
        check_unpacked_size(fh, path, reading_limit(memory_limit))
        obj = _torch_load(fh, path)
    return checked_state_dict(obj, path)


def check_unpacked_size(fh, path: str, limit: int) -> None:
    """Refuse a model file that would take more than ``limit`` bytes once read: a zip
    archive by the uncompressed sizes of its members (its central directory, read
    without inflating anything), any other file by its size."""
    try:
        members = zipfile.ZipFile(fh).infolist() if zipfile.is_zipfile(fh) else None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        members = None                  # torch.load says what is wrong with it
    finally:
        fh.seek(0)
    if members is None:
        check_bytes(path, "model file", os.fstat(fh.fileno()).st_size, limit, error=KqlModelError)
        return
    for m in members:
        if m.compress_type != zipfile.ZIP_STORED and m.file_size > DEFLATE_RATIO * m.compress_size + 1024:
            raise KqlModelError(f"cannot read model file '{path}': damaged zip archive (member "
                                f"'{m.filename[:80]}' declares {m.file_size:,} bytes from "
                                f"{m.compress_size:,}, more than deflate inflates to)")
    declared, size = sum(m.file_size for m in members), os.fstat(fh.fileno()).st_size
    if declared > BOMB_BYTES and declared > BOMB_RATIO * size:
        from ..planner.memory import size_text

        raise KqlModelError(f"model file '{path}' is a zip bomb: its members declare "
                            f"{size_text(declared)} from a {size_text(size)} file "
                            f"({declared // size:,}:1; weights barely compress): refused unread")
    check_bytes(path, "model file", declared, limit, "its zip archive's members uncompressed",
                error=KqlModelError)


def read_safetensors(path: str, memory_limit: Optional[int] = None) -> dict:
    """The name -> tensor dict in a safetensors file (``safetensors.torch.load_file``)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise KqlModelError("LOAD MODEL of a safetensors file needs the package safetensors "
                            "(pip install safetensors)") from None
    with open_regular_file(path, "model file", KqlModelError) as fh:    # no FIFO, device, folder
        check_bytes(path, "model file", os.fstat(fh.fileno()).st_size,
                    reading_limit(memory_limit), error=KqlModelError)
    try:
        obj = load_file(path, device="cpu")
    except Exception as exc:        # SafetensorError for a damaged header, OSError, ...
        raise KqlModelError(f"cannot read model file '{path}' as safetensors: "
                            f"{exception_text(exc)}") from None
    return checked_state_dict(obj, path)


def checked_state_dict(obj, path: str) -> dict:
    """``obj`` as a state dict: unwrapped from a training checkpoint (``state_dict``,
    ``model_state_dict``, ``model``) and from DataParallel's ``module.`` prefix, every value
    a finite tensor.

    >>> import torch
    >>> list(checked_state_dict({"state_dict": {"module.fc.weight": torch.ones(2, 2)}}, "x.pt"))
    ['fc.weight']
    """
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise KqlModelError(f"model file '{path}' does not hold a state dict (name -> tensor)")
    state_dict = with_metadata(obj, {_unwrapped(k): v for k, v in obj.items()})
    check_finite(state_dict, path)
    return state_dict


def _unwrapped(key: str) -> str:
    """A key without DataParallel's ``module.`` prefix."""
    return key[len("module."):] if key.startswith("module.") else key


def with_metadata(source: dict, state_dict: dict) -> dict:
    """``state_dict`` carrying the per-module versions torch.save keeps in ``_metadata``:
    some modules read them when loading (MNASNet refuses a state dict without them)."""
    out = OrderedDict(state_dict)
    metadata = getattr(source, "_metadata", None)
    if isinstance(metadata, dict):
        out._metadata = OrderedDict((_unwrapped(k) if k != "module" else "", v)
                                    for k, v in metadata.items())
    return out


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_UNPICKLER = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")


def _torch_load(fh, path: str):
    """``torch.load`` that never runs code; its refusals and failures as one line each."""
    try:
        with warnings.catch_warnings():     # e.g. "Detected pickle protocol 4"
            warnings.simplefilter("ignore")
            return torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:   # the weights-only unpickler refused something
        text = strip_ansi(str(exc))
        code, found = _GLOBAL.search(text), _UNPICKLER.search(text)
        if code:
            raise KqlModelError(f"cannot read model file '{path}': it holds Python code or objects "
                                f"({code.group(1)}), which are never run; save a state dict "
                                "instead: torch.save(model.state_dict(), path)") from None
        detail = found.group(1).strip() if found else "it holds objects other than tensors"
    except Exception as exc:
        detail = exception_text(exc)
    raise KqlModelError(f"cannot read model file '{path}': not a state dict saved with "
                        f"torch.save, or it holds code, which is never run ({detail[:160]})")


def check_finite(state_dict: dict, path: str) -> None:
    """Refuse NaN or infinite weights, naming the first tensor holding one.

    A sum is the fast test (VGG16's largest tensor: 0.05 s; ``isfinite(t).all()``: 1.7 s);
    NaN or inf makes it non-finite, and only then, as a large sum may also overflow, are
    the elements looked at.
    """
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not _finite(tensor):
            raise KqlModelError(f"model file '{path}' has NaN or infinite weights in '{name}'")


def _finite(tensor: torch.Tensor) -> bool:
    try:
        if bool(torch.isfinite(tensor.sum())):
            return True
    except RuntimeError:        # dtypes without a sum (float8)
        pass
    return bool(torch.isfinite(tensor.float()).all())


def class_count(state_dict: dict, head: Optional[str], path: str) -> Optional[int]:
    """Outputs of the last layer ``head`` in the state dict (None: no such tensor); 0 is refused."""
    weight = state_dict.get(head) if head else None
    if weight is None or weight.dim() == 0:
        return None
    if weight.shape[0] == 0:
        raise KqlModelError(f"the state dict in '{path}' has 0 classes: its last layer '{head}' "
                            "has no outputs")
    return int(weight.shape[0])
