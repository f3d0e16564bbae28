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

import re
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .errors import KqlModelError
from .images import exception_text, open_regular_file
from .models import InputSize, input_channels, num_classes
from .operators.task import check_logits
from .weights import check_finite

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


def read_graph(path: str, kind: str) -> Graph:
    """The model in an ONNX (``kind`` 'onnx') or TorchScript ('torchscript') file."""
    return read_onnx(path) if kind == "onnx" else read_torchscript(path)


def read_onnx(path: str) -> Graph:
    try:
        import onnx
        from onnx2torch import convert
    except ImportError:
        raise KqlModelError("LOAD MODEL of an ONNX file needs the package onnx2torch "
                            "(pip install onnx2torch)") from None
    with open_regular_file(path, "model file", KqlModelError) as fh:
        try:
            proto = onnx.load(fh)
            onnx.checker.check_model(proto)
        except Exception as exc:        # DecodeError, ValidationError, ...
            raise KqlModelError(f"cannot read model file '{path}' as ONNX: {exception_text(exc)}") from None
    channels, size = input_geometry(_input_dims(onnx, proto, path))
    module = _converted(proto, convert, path).eval()
    check_finite(module.state_dict(), path)
    classes = _probe(module, channels, size, path, "ONNX") if size else None
    return Graph(module, classes or _output_classes(proto) or num_classes(module), size)


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


def read_torchscript(path: str) -> Graph:
    with open_regular_file(path, "model file", KqlModelError) as fh:
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
                                            "TorchScript")
    return Graph(module, classes)


@torch.inference_mode()
def _probe(module: nn.Module, channels: int, size: tuple, path: str, what: str) -> int:
    """The class count of one forward pass on two black images of ``size``."""
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
