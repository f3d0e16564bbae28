"""Reduced precision: an operator's scan in bfloat16, float16 or int8 arithmetic.

A heat map is a difference of probabilities compared to the exact one by SSIM, so reduced
precision is an approximation like tau: chosen by the planner, shown by EXPLAIN, checked
by EXPLAIN ANALYZE against the float32 map (:meth:`ReducedPrecision.exact`).

- **bfloat16, float16**: the scan runs under :func:`torch.autocast`; convolutions and
  matrix products take the reduced type (oneDNN's AMX/AVX512-BF16 kernels on CPU, tensor
  cores on GPU). An incremental scan reads a reduced copy of the materialized views
  (:meth:`~.profile.ModelProfile.in_dtype`; the float32 views stay as they are) and
  :func:`~.gather.paste` casts the changed regions to it.
- **int8**: the plain loop runs a quantized copy of the model (torch.ao's FX graph mode,
  per-channel weight scales, activation ranges from the unoccluded image's own forward
  pass: no calibration data set). Incremental inference has no int8 kernels over windows:
  an incremental scan asked for int8 runs in bfloat16, and EXPLAIN says so.

What a device supports is read from torch (oneDNN's own check of the CPU, CUDA's
capability), never assumed from a CPU's name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
import weakref
from typing import Optional

import torch

from .protocol import Approximation, Operator
from .task import OcclusionResult, OcclusionTask, Progress

FLOAT32, BFLOAT16, FLOAT16, INT8 = "float32", "bfloat16", "float16", "int8"
PRECISIONS = (FLOAT32, BFLOAT16, FLOAT16, INT8)
DTYPES = {BFLOAT16: torch.bfloat16, FLOAT16: torch.float16}
QUANTIZED_ENGINES = ("x86", "fbgemm", "onednn")


def unsupported(precision: str, device: str) -> Optional[str]:
    """Why ``device`` ('cpu' | 'cuda') cannot run ``precision`` fast; None where it can.

    >>> unsupported("float32", "cpu") is None
    True
    """
    if precision == FLOAT32:
        return None
    if device == "cuda":
        if precision == INT8:
            return "int8 scans run on CPU only"
        if not torch.cuda.is_available():
            return "no CUDA device"
        if precision == BFLOAT16 and not torch.cuda.is_bf16_supported():
            return "this GPU has no bfloat16 arithmetic"
        return None
    if precision == INT8:
        engines = torch.backends.quantized.supported_engines
        if not any(e in engines for e in QUANTIZED_ENGINES):
            return "this torch build has no x86 int8 kernels"
        return None
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    check = {BFLOAT16: "_is_mkldnn_bf16_supported", FLOAT16: "_is_mkldnn_fp16_supported"}[precision]
    found = getattr(torch.ops.mkldnn, check, None)
    if found is None or not found():
        return f"this CPU has no {precision} instructions oneDNN uses"
    return None


def runs_as(precision: str, plain_loop: bool) -> str:
    """The arithmetic an operator asked for ``precision`` runs in: int8 only in the plain
    loop (a quantized model); an incremental scan asked for int8 runs bfloat16.

    >>> runs_as("int8", True), runs_as("int8", False), runs_as("float16", False)
    ('int8', 'bfloat16', 'float16')
    """
    return BFLOAT16 if precision == INT8 and not plain_loop else precision


class ReducedPrecision(Operator):
    """``inner`` (any operator) scanned in ``precision``; its exact form is ``inner``'s in
    float32. Everything else (its name, layout, positions, batch) is ``inner``'s. A
    ``note`` says why it is not what the session asked for (float32 with a note: a
    stated fallback, run as ``inner``)."""

    def __init__(self, inner, precision: str, note: str = ""):
        self.inner = inner
        self.precision = precision            # what it runs in
        self.note = note                      # why that is not what was asked ('' when it is)

    def __getattr__(self, name):              # steps, profile, batch_size, kept, ...
        if name == "inner":                   # while unpickling: no inner yet
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def plain_loop(self) -> bool:
        return self.inner.plain_loop

    @property
    def learns_layout(self) -> bool:
        return self.inner.learns_layout

    def describe(self) -> dict:
        items = dict(self.inner.describe())
        items["precision"] = f"{self.precision} ({self.note})" if self.note else self.precision
        return items

    def approximation(self) -> Optional[Approximation]:
        if self.precision == FLOAT32:
            return self.inner.approximation()
        return self.inner.approximation() or Approximation("precision", self.precision)

    def exact(self):
        return self.inner.exact()

    def _wrap(self, inner) -> "ReducedPrecision":
        return ReducedPrecision(inner, self.precision, self.note)

    def at(self, *corners):
        return self._wrap(self.inner.at(*corners))

    def rebind(self, profile):
        return self._wrap(self.inner.rebind(profile))

    def in_layout(self, layout: str):
        return self._wrap(self.inner.in_layout(layout))

    def remembering(self, kept):
        return self._wrap(self.inner.remembering(kept))

    def position_order(self, *corners):
        return self.inner.position_order(*corners)

    def run(self, task: OcclusionTask, progress: Progress = None,
            timings: Optional[dict] = None) -> OcclusionResult:
        if self.precision == INT8:
            task = dataclasses.replace(task, model=quantized(task.model, task.image))
            return self.inner.run(task, progress, timings)
        with computing(self.precision, _device_of(task)):
            return self.inner.run(task, progress, timings)


def _device_of(task: OcclusionTask) -> str:
    return torch.device(task.device).type


@contextlib.contextmanager
def computing(precision: str, device: str):
    """Convolutions and matrix products in ``precision`` (bfloat16, float16) on
    ``device``'s type; float32 as written otherwise."""
    dtype = DTYPES.get(precision)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device, dtype=dtype):
        yield


def qconfig_mapping(engine: str):
    """torch.ao's defaults for ``engine`` (per-channel weights), the linear layers left in
    float: a classifier's logits at 256 levels over all its classes' range moved the
    target's probability in steps of ~0.02 and flattened maps of small drops, and the
    convolutions hold nearly all of the arithmetic."""
    from torch.ao.quantization import get_default_qconfig_mapping

    return (get_default_qconfig_mapping(engine)
            .set_object_type(torch.nn.Linear, None)
            .set_object_type(torch.nn.functional.linear, None))


# One quantized copy per model, for the last image it was calibrated on: a scan's batches
# and the next target of the same image reuse it.
_QUANTIZED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def quantized(model: torch.nn.Module, image: torch.Tensor) -> torch.nn.Module:
    """``model`` quantized to int8 (torch.ao FX graph mode, the x86 engine's defaults:
    per-channel weight scales), its activation ranges observed on ``image`` alone."""
    # The image, and the weights as they are now (an in-place update bumps _version).
    key = (tuple(image.shape), float(image.sum()), float(image.square().sum()),
           tuple(p._version for p in model.parameters()))
    with _LOCK:
        found = _QUANTIZED.get(model)
        if found is not None and found[0] == key:
            return found[1]
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    engine = next(e for e in QUANTIZED_ENGINES if e in torch.backends.quantized.supported_engines)
    torch.backends.quantized.engine = engine
    example = image.detach().float().cpu().unsqueeze(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # torch.ao's deprecation notices
        # torch.ao traces its own graph of the model and builds new modules from its
        # layers: the user's model is left as it was (no deep copy, which refuses
        # tensors made by computation, such as a calibrated offset).
        prepared = prepare_fx(model.eval(), qconfig_mapping(engine), (example,))
        with torch.inference_mode():
            prepared(example)
        result = convert_fx(prepared).eval()
    with _LOCK:
        _QUANTIZED[model] = (key, result)
    return result
