"""Weight files: the name -> tensor dict in a ``torch.save`` or safetensors file, read
without running code.

``torch.load(..., weights_only=True)`` refuses anything but tensors and plain containers, so a
pickle that would run code never does (a whole pickled ``nn.Module`` included: the message
says how to save its state dict instead); safetensors files hold only tensors. A refusal,
and every other failure, is one :class:`~kql.errors.KqlModelError` line. The tensors are
checked before any module is built: finite, and a last layer with at least one output.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections import OrderedDict
from typing import Optional

import torch

from .errors import KqlModelError, strip_ansi
from .images import exception_text, open_regular_file


def read_state_dict(path: str) -> dict:
    """The name -> tensor dict in a weight file (unwrapped from a training checkpoint)."""
    with open_regular_file(path, "model file", KqlModelError) as fh:
        obj = _torch_load(fh, path)
    return checked_state_dict(obj, path)


def read_safetensors(path: str) -> dict:
    """The name -> tensor dict in a safetensors file (``safetensors.torch.load_file``)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise KqlModelError("LOAD MODEL of a safetensors file needs the package safetensors "
                            "(pip install safetensors)") from None
    open_regular_file(path, "model file", KqlModelError).close()    # no FIFO, device, folder
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
