"""ONNX and TorchScript files: models that carry their own architecture.

An ONNX model is converted by onnx2torch into a torch.fx GraphModule of ordinary
``nn.Conv2d``/``nn.ReLU``/... modules, so the planner traces it and may run it
incrementally; its input shape (``[N, C, H, W]``) gives the channels and, when H and W are
fixed, the size images are resized to. A TorchScript module is loaded with
``torch.jit.load`` (its own TorchScript code, not Python); torch.fx cannot trace it, so it
runs with the naive operator, on images of their own size.

Neither gets normalisation: the image reaches the model as pixels in [0, 1], so the
exported graph should normalise them itself. The class count is the graph's declared
output width, else one forward pass's (which also refuses a graph whose batch size is
fixed at 1: KQL runs occluded images in batches), else the last layer's.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import KqlModelError
from ..operators.shapes import OverMemoryLimit, check_fits
from ..operators.user_model import check_logits
from .images import check_bytes, exception_text, open_regular_file, reading_limit
from .models import InputSize, input_channels, num_classes
from .weights import check_finite, check_unpacked_size

# onnx2torch 1.5 converts most operators up to these opsets (not Constant 19, for one):
# a newer model is first converted down by onnx's version converter, newest first.
_OLDER_OPSETS = (18, 17)
_OPERATOR = re.compile(r"domain='([^']*)', operation_type='([^']*)', version=(\d+)")
PROBE_SIZE = (224, 224)     # a TorchScript model's probe image, when its layers do not tell


@dataclass
class Graph:
    module: nn.Module
    classes: int
    input_size: InputSize = None


def read_graph(path: str, kind: str, memory_limit: Optional[int] = None) -> Graph:
    """The model in an ONNX (``kind`` 'onnx') or TorchScript ('torchscript') file, within
    ``memory_limit`` bytes (default: the statement's ``SET memory_limit``)."""
    return read_onnx(path, memory_limit) if kind == "onnx" else read_torchscript(path, memory_limit)


def read_onnx(path: str, memory_limit: Optional[int] = None) -> Graph:
    try:
        import onnx
        from onnx.external_data_helper import load_external_data_for_model
        from onnx2torch import convert
    except ImportError:
        raise KqlModelError("LOAD MODEL of an ONNX file needs the package onnx2torch "
                            "(pip install onnx2torch)") from None
    limit = reading_limit(memory_limit)
    with open_regular_file(path, "model file", KqlModelError) as fh:
        try:
            proto = onnx.load(fh, load_external_data=False)
            _check_onnx_size(proto, fh, path, limit)
            load_external_data_for_model(proto, os.path.dirname(os.path.abspath(path)))
            onnx.checker.check_model(proto)
        except KqlModelError:
            raise
        except Exception as exc:        # DecodeError, ValidationError, ...
            raise KqlModelError(f"cannot read model file '{path}' as ONNX: {exception_text(exc)}") from None
    dims = _input_dims(onnx, proto, path)
    layout = None
    if channels_last(dims):         # Keras/TensorFlow: [N, H, W, C], transposed inside
        layout, dims = "NHWC", [dims[0], dims[3], dims[1], dims[2]]
        stripped = _without_leading_transpose(proto)
    channels, size = input_geometry(dims)
    if layout and stripped is not None:
        module = _converted(stripped, convert, path).eval()
    else:
        module = _converted(proto, convert, path).eval()
        module = ChannelsLast(module) if layout else module
    if layout:
        module.input_layout = layout            # EXPLAIN: input=NHWC
    check_finite(module.state_dict(), path)
    if size:
        check_bytes(path, "model file", _largest_value(onnx, proto, 2), limit,
                    f"the largest tensor of the ONNX graph on two {size[0]}x{size[1]} images",
                    error=KqlModelError)
    classes = _probe(module, channels, size, path, "ONNX", limit) if size else None
    return Graph(module, classes or _output_classes(proto) or num_classes(module), size)


def _largest_value(onnx, proto, batch: int) -> int:
    """The bytes of the largest tensor the graph makes on ``batch`` images of its fixed
    input size, from ONNX's shape inference with data propagation: a Tile, Expand or
    ConstantOfShape whose sizes are constants is sized without being run (fake tensors
    cannot size them: onnx2torch reads their sizes as values). 0 when inference fails."""
    probe = type(proto)()
    probe.CopyFrom(proto)
    for tensor in probe.graph.initializer:     # shapes need no weights: only small constants
        if math.prod(tensor.dims) > 64:
            for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                tensor.ClearField(name)
    fixed = {t.name for t in probe.graph.initializer}
    image = next(i for i in probe.graph.input if i.name not in fixed)
    image.type.tensor_type.shape.dim[0].dim_value = batch
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception:
        return 0
    largest = 0
    for value in list(inferred.graph.value_info) + list(inferred.graph.output):
        kind = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in kind.shape.dim]
        if kind.HasField("shape") and all(d >= 0 for d in dims) and kind.elem_type:
            size = onnx.helper.tensor_dtype_to_np_dtype(kind.elem_type).itemsize
            largest = max(largest, math.prod(dims) * size)
    return largest


def _check_onnx_size(proto, fh, path: str, limit: int) -> None:
    """Refuse an ONNX model that would take more than ``limit`` bytes to load: its file
    and its external data (their declared lengths, else their files' sizes), held three
    times (the protobuf, its checked copy, the converted tensors)."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    size, folder = os.fstat(fh.fileno()).st_size, os.path.dirname(os.path.abspath(path))
    for tensor in _get_all_tensors(proto):
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            if info.length:
                size += int(info.length)
            else:
                try:
                    size += max(os.stat(os.path.join(folder, info.location)).st_size - int(info.offset or 0), 0)
                except (OSError, ValueError):
                    pass                # loading it says what is wrong
    check_bytes(path, "model file", 3 * size, limit, "an ONNX model, with its external data, "
                "parsed, checked and converted", error=KqlModelError)


def channels_last(dims: list) -> bool:
    """Whether an input shape is ``[N, H, W, C]``: its last dimension a channel count (1,
    3 or 4), its second not.

    >>> channels_last([None, 240, 240, 3]), channels_last([1, None, None, 1])
    (True, True)
    >>> channels_last([None, 3, 240, 240]), channels_last([None, 3, 4, 3]), channels_last([])
    (False, False, False)
    """
    return len(dims) == 4 and dims[3] in (1, 3, 4) and dims[1] not in (1, 3, 4)


class ChannelsLast(nn.Module):
    """A graph that takes ``[N, H, W, C]``, given KQL's ``[N, C, H, W]`` images."""

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.nhwc = graph          # not 'graph': a traced GraphModule's own attribute

    def forward(self, x):
        return self.nhwc(x.permute(0, 2, 3, 1))


def _without_leading_transpose(proto):
    """A copy of the graph taking ``[N, C, H, W]``, when its image input goes only into a
    Transpose with perm ``[0, 3, 1, 2]`` (what Keras exports): that Transpose removed, its
    readers reading the input. None when the graph does anything else with its input."""
    fixed = {t.name for t in proto.graph.initializer}
    name = next(i.name for i in proto.graph.input if i.name not in fixed)
    readers = [n for n in proto.graph.node if name in n.input]
    if len(readers) != 1 or readers[0].op_type != "Transpose":
        return None
    perm = next((list(a.ints) for a in readers[0].attribute if a.name == "perm"), None)
    if perm != [0, 3, 1, 2] or any(o.name == name for o in proto.graph.output):
        return None
    out = type(proto)()
    out.CopyFrom(proto)
    graph, transposed = out.graph, readers[0].output[0]
    graph.node.remove(next(n for n in graph.node if n.output and n.output[0] == transposed))
    for node in graph.node:
        node.input[:] = [name if i == transposed else i for i in node.input]
    for output in graph.output:
        if output.name == transposed:
            output.name = name
    image = next(i for i in graph.input if i.name == name)
    shape = image.type.tensor_type.shape.dim
    dims = [type(shape[0])() for _ in range(4)]
    for d, src in zip(dims, (shape[0], shape[3], shape[1], shape[2])):
        d.CopyFrom(src)
    del shape[:]
    shape.extend(dims)
    return out


def input_geometry(dims: list) -> tuple:
    """``(channels, input size)`` of an input shape ``[N, C, H, W]`` (None: a dynamic
    dimension): an unknown channel count is 3, an unknown height or width keeps the
    image's size (None).

    >>> input_geometry([None, 3, 224, 224]), input_geometry([1, 1, None, None])
    ((3, (224, 224)), (1, None))
    """
    _, c, h, w = dims if len(dims) == 4 else (None,) * 4
    return c or 3, (h, w) if h and w else None


def _input_dims(onnx, proto, path: str) -> list:
    """The ONNX graph's one image input's dimensions (None where dynamic)."""
    fixed = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in fixed]
    if len(inputs) != 1:
        raise KqlModelError(f"the ONNX model in '{path}' has {len(inputs)} inputs; KQL gives it "
                            "one image")
    kind = inputs[0].type.tensor_type
    if kind.elem_type != onnx.TensorProto.FLOAT:
        name = onnx.TensorProto.DataType.Name(kind.elem_type) if kind.elem_type else "untyped"
        raise KqlModelError(f"the ONNX model in '{path}' takes {name} input; KQL gives it float "
                            "images")
    if not kind.HasField("shape"):
        return []
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in kind.shape.dim]
    if len(dims) != 4:
        raise KqlModelError(f"the ONNX model in '{path}' takes a {len(dims)}-dimensional input; "
                            "KQL gives it images [batch, channels, height, width]")
    return dims


def _output_classes(proto) -> Optional[int]:
    """The declared width of the first output ``[N, classes]``, when fixed."""
    outputs = proto.graph.output
    dims = outputs[0].type.tensor_type.shape.dim if outputs else []
    return int(dims[1].dim_value) if len(dims) == 2 and dims[1].dim_value > 0 else None


def _converted(proto, convert, path: str) -> nn.Module:
    """onnx2torch's GraphModule; an operator it lacks is tried at the older opsets."""
    try:
        return convert(proto)
    except NotImplementedError as exc:
        missing = exc
    except Exception as exc:
        raise KqlModelError(f"cannot convert the ONNX model in '{path}' to PyTorch: "
                            f"{exception_text(exc)}") from None
    from onnx import version_converter

    for opset in _OLDER_OPSETS:
        if _opset(proto) > opset:
            try:
                return convert(version_converter.convert_version(proto, opset))
            except Exception:
                continue
    found = _OPERATOR.search(str(missing))
    if found is None:
        raise KqlModelError(f"cannot convert the ONNX model in '{path}' to PyTorch: "
                            f"{exception_text(missing)}")
    domain, op, version = found.groups()
    op = f"{domain}.{op}" if domain not in ("", "ai.onnx") else op
    raise KqlModelError(f"the ONNX model in '{path}' uses operator {op} (version {version}), "
                        "which onnx2torch cannot convert to PyTorch")


def _opset(proto) -> int:
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)


def read_torchscript(path: str, memory_limit: Optional[int] = None) -> Graph:
    limit = reading_limit(memory_limit)
    with open_regular_file(path, "model file", KqlModelError) as fh:
        check_unpacked_size(fh, path, limit)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = torch.jit.load(fh, map_location="cpu")
        except Exception as exc:
            raise KqlModelError(f"cannot read model file '{path}' as TorchScript: "
                                f"{exception_text(exc)}") from None
    module.eval()
    check_finite(dict(module.state_dict()), path)
    classes = num_classes(module) or _probe(module, input_channels(module), PROBE_SIZE, path,
                                            "TorchScript", limit)
    return Graph(module, classes)


@torch.inference_mode()
def _probe(module: nn.Module, channels: int, size: tuple, path: str, what: str,
           limit: Optional[int] = None) -> int:
    """The class count of one forward pass on two black images of ``size``; a pass that
    would take more than ``limit`` bytes (a graph that makes a huge tensor from a small
    file) is refused before it runs, where fake tensors can size it."""
    try:
        check_fits(module, torch.zeros(2, channels, *size), limit, "one forward pass")
    except OverMemoryLimit as exc:
        check_bytes(path, "model file", exc.needed, limit, f"the {what} model's forward pass on "
                    f"two {size[0]}x{size[1]} images", error=KqlModelError)
    try:
        return _width(module, 2, channels, size)
    except Exception:           # the model's own errors, of any kind
        pass
    try:
        _width(module, 1, channels, size)
    except Exception as exc:
        raise KqlModelError(f"the {what} model in '{path}' fails on a {channels}x{size[0]}x"
                            f"{size[1]} image: {exception_text(exc)}") from None
    raise KqlModelError(f"the {what} model in '{path}' runs on one image at a time only (its "
                        "graph fixes the batch size at 1); export it with a dynamic batch "
                        "dimension, e.g. torch.onnx.export(..., dynamic_axes={'x': {0: 'batch'}})")


def _width(module: nn.Module, batch: int, channels: int, size: tuple) -> int:
    out = check_logits(module(torch.zeros(batch, channels, *size)))
    if out.shape[0] != batch:
        raise ValueError(f"the model returned {out.shape[0]} rows for {batch} images")
    return int(out.shape[1])
