"""Model files as users have them: told apart by their content, never by their extension.

* ONNX (a protobuf ``ModelProto``): converted by onnx2torch into a torch.fx GraphModule,
  which KQL's incremental engine traces like any PyTorch model (:mod:`kql.catalog.graph_files`);
* TorchScript (``torch.jit.save``'s zip archive, with ``code/`` and ``constants.pkl``, or
  a mobile flatbuffer): code, which runs when it is loaded (KQL runs its forward to learn
  the class count), so only with ``TRUSTED`` (:func:`require_trust`); told from the zip's
  entries, never by loading it. Then ``torch.jit.load``; torch.fx cannot trace it, so it
  runs with the naive operator;
* safetensors, and ``torch.save`` state dicts (zip or legacy pickle, read with
  ``weights_only=True``): weights for the architecture ``ARCH`` names (by default the
  model's name), :func:`architecture`.

ONNX and TorchScript files carry their own architecture and get no normalisation: the
image reaches them as pixels in [0, 1] (the exported graph should normalise). Of the
``ARCH`` forms only ``'package.module:factory'`` imports and runs the user's own Python
code; TorchScript runs the file's own code, and only ``TRUSTED``; every other path reads
tensors or ONNX graphs only.

>>> header_kind(b"PK\\x03\\x04..."), header_kind(b"\\x80\\x02}q\\x00.")
('zip', 'pickle')
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import os
import zipfile
from dataclasses import dataclass
from typing import Callable, Optional, Union

from torch import nn

from . import models
from ..errors import KqlModelError, shorten
from .images import exception_text, open_regular_file
from .weights import class_count, read_safetensors, read_state_dict

ONNX, TORCHSCRIPT, SAFETENSORS, TORCH = "onnx", "torchscript", "safetensors", "torch"
GRAPH_KINDS = (ONNX, TORCHSCRIPT)               # files that say their own architecture
_KIND_TEXT = {ONNX: "an ONNX model", TORCHSCRIPT: "a TorchScript archive",
              SAFETENSORS: "a safetensors state dict", TORCH: "a torch.save state dict"}
_SAFETENSORS_HEADER_LIMIT = 100 << 20           # safetensors' own limit on its JSON header


def header_kind(head: bytes, size: Optional[int] = None) -> str:
    """What a model file's first bytes say it is: ``'zip'`` (torch.save or TorchScript),
    ``'safetensors'`` (an 8-byte little-endian header length, then a JSON object),
    ``'pickle'`` (a legacy torch.save), ``'onnx'`` (a ModelProto's first field, its
    ``ir_version``), ``'torchscript'`` (a mobile flatbuffer, ``PTMF``) or ``'unknown'``.
    ``size``: the file's size, when known.

    >>> header_kind((2).to_bytes(8, "little") + b"{}"), header_kind(b"\\x08\\x08\\x12\\x07pytorch")
    ('safetensors', 'onnx')
    >>> header_kind(b"hello")
    'unknown'
    """
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[4:8] == b"PTMF":                 # a TorchScript mobile flatbuffer (.ptl)
        return TORCHSCRIPT
    if len(head) >= 9 and head[8:9] == b"{":
        length = int.from_bytes(head[:8], "little")
        if 2 <= length <= _SAFETENSORS_HEADER_LIMIT and (size is None or length <= size - 8):
            return SAFETENSORS
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) >= 2 and head[0] == 0x08 and 0 < head[1] < 0x80:     # field 1, a small varint
        return ONNX
    return "unknown"


def file_kind(path: str) -> str:
    """:data:`ONNX`, :data:`TORCHSCRIPT`, :data:`SAFETENSORS`, :data:`TORCH` (a zip archive
    or pickle) or ``'unknown'``, from the bytes alone: nothing in the file runs."""
    with open_regular_file(path, "model file", KqlModelError) as fh:
        kind = header_kind(fh.read(16), os.fstat(fh.fileno()).st_size)
        if kind == "zip":
            return TORCHSCRIPT if _is_torchscript(fh) else TORCH
    return TORCH if kind == "pickle" else kind


def _is_torchscript(fh) -> bool:
    """A zip archive with TorchScript's ``code/`` folder or ``constants.pkl``."""
    try:
        names = zipfile.ZipFile(fh).namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False                    # torch.load says what is wrong with it
    return any("/code/" in n or n.endswith("constants.pkl") for n in names)


def load(name: str, path: str, arch: Optional[str] = None,
         labels_path: Optional[str] = None, trusted: Union[bool, str] = False) -> models.ModelSpec:
    """``LOAD MODEL name FROM path [ARCH arch] [LABELS labels_path] [TRUSTED]``.

    An ONNX or TorchScript file needs no ARCH (``ARCH onnx`` / ``ARCH torchscript`` say
    so, as the catalog records them); a state dict is built as ``arch``, by default the
    model's name (:func:`architecture`). ``trusted``: True lets a TorchScript file's code
    run; a :func:`file_digest` lets it run only while the file is still the one trusted
    (:func:`require_trust`).
    """
    kind = file_kind(path)
    if kind == "unknown":           # read as ARCH says, else torch.load says what is wrong
        kind = arch if arch in GRAPH_KINDS else TORCH
    if kind in GRAPH_KINDS or arch in GRAPH_KINDS:
        if arch not in (None, kind):
            raise KqlModelError(_wrong_arch(path, kind, arch, name))
        if kind == TORCHSCRIPT:
            require_trust(name, path, trusted)
        from .graph_files import read_graph

        graph = read_graph(path, kind)
        return _spec(name, path, kind, labels_path, graph.module, graph.classes,
                     input_size=graph.input_size)
    build = architecture(arch or name)
    state_dict = read_safetensors(path) if kind == SAFETENSORS else read_state_dict(path)
    out = build(state_dict, path)
    return _spec(name, path, arch or name, labels_path, out.module, models.num_classes(out.module),
                 out.mean, out.std, out.input_size)


def require_trust(name: str, path: str, trusted: Union[bool, str]) -> None:
    """Refuse to load the TorchScript file ``path`` unless the user trusts it: ``trusted``
    True, or the :func:`file_digest` it had when it was loaded TRUSTED (a catalog's entry).

    >>> require_trust("m", "m.pt", False)
    Traceback (most recent call last):
    ...
    kql.errors.KqlModelError: model file 'm.pt' is TorchScript, code that runs when loaded, and needs TRUSTED (nothing of it ran): LOAD MODEL m FROM 'm.pt' TRUSTED
    """
    if trusted is True:
        return
    again = f"LOAD MODEL {shorten(name)} FROM '{path}' TRUSTED"
    if isinstance(trusted, str) and trusted:
        if file_digest(path) == trusted:
            return
        raise KqlModelError(f"model file '{path}' changed since it was loaded TRUSTED, and "
                            f"TorchScript runs when loaded (nothing of it ran): to trust it as "
                            f"it is now, {again}")
    raise KqlModelError(f"model file '{path}' is TorchScript, code that runs when loaded, and "
                        f"needs TRUSTED (nothing of it ran): {again}")


def file_digest(path: str) -> str:
    """The SHA-256 of a model file's bytes (what a catalog keeps of a TRUSTED file)."""
    digest = hashlib.sha256()
    with open_regular_file(path, "model file", KqlModelError) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _wrong_arch(path: str, kind: str, arch: str, name: str) -> str:
    if arch in GRAPH_KINDS:
        return f"model file '{path}' is {_KIND_TEXT[kind]}, not {_KIND_TEXT[arch]}"
    return (f"model file '{path}' is {_KIND_TEXT[kind]}, which says its own architecture: "
            f"LOAD MODEL {name} FROM '<file>' without ARCH")


def _spec(name, path, arch, labels_path, module, classes, mean=None, std=None,
          input_size=None) -> models.ModelSpec:
    labels = models.read_labels(labels_path, classes) if labels_path else models.class_labels(classes)
    return models.ModelSpec(name, module, mean, std, input_size, labels,
                            source=os.path.abspath(path), arch=arch)


# -- architectures for state dicts --------------------------------------------------------------

@dataclass
class Built:
    """A module holding a state dict, and the normalisation and input size it expects."""

    module: nn.Module
    mean: Optional[tuple] = None
    std: Optional[tuple] = None
    input_size: models.InputSize = None


Builder = Callable[[dict, str], Built]      # (state dict, its path) -> Built


def architecture(arch: str) -> Builder:
    """What builds a state dict's module for ``ARCH arch``: a torchvision builder
    (``resnet18``) or the built-in ``efficientnet_lite0`` (ImageNet normalisation, their
    training size), ``timm:<name>`` (timm's normalisation and size for it), or
    ``package.module:factory``, the user's code: imported here, called with no arguments
    for the module. Checked before the file is read: a wrong name costs no weights.

    >>> architecture("resnet19")
    Traceback (most recent call last):
    ...
    kql.errors.KqlModelError: unknown architecture 'resnet19'; did you mean 'resnet18'?
    """
    if arch.startswith("timm:"):
        return _timm(arch)
    if ":" in arch:
        return _factory(arch)
    if arch in GRAPH_KINDS:
        raise KqlModelError(f"ARCH {arch} names {_KIND_TEXT[arch]}, but the file is a state dict")
    if arch == models.BUILTIN:
        return lambda sd, path: _imagenet(models.efficientnet_lite0_module(sd, path), arch)
    builders = models.torchvision_builders()
    if arch not in builders:
        hint = difflib.get_close_matches(arch, builders + [models.BUILTIN], n=1)
        raise KqlModelError(f"unknown architecture '{shorten(arch)}'" + (
            f"; did you mean '{hint[0]}'?" if hint else
            "; name a torchvision classifier with ARCH, e.g. ARCH resnet18, or timm:<name>"))
    return lambda sd, path: _imagenet(models.build_torchvision(arch, sd, path), arch)


def _imagenet(module: nn.Module, arch: str) -> Built:
    return Built(module, models.IMAGENET_MEAN, models.IMAGENET_STD, models.default_input_size(arch))


def _timm(arch: str) -> Builder:
    """``timm.create_model(name, pretrained=False, num_classes=<the state dict's>)``."""
    try:
        import timm
    except ImportError:
        raise KqlModelError(f"ARCH {shorten(arch)} needs the package timm (pip install timm)") from None
    name = arch[len("timm:"):]
    if not timm.is_model(name.split(".")[0]):          # a pretrained tag (name.tag) is allowed
        hint = difflib.get_close_matches(name, timm.list_models(), n=1)
        raise KqlModelError(f"unknown timm model '{shorten(name)}'" + (
            f"; did you mean 'timm:{hint[0]}'?" if hint else "; timm.list_models() lists them"))

    def build(state_dict: dict, path: str) -> Built:
        create = lambda **kw: timm.create_model(name, pretrained=False, **kw)   # noqa: E731
        skeleton = models.on_meta(create) or models.made(create, arch)
        head = (getattr(skeleton, "pretrained_cfg", None) or {}).get("classifier")
        head = f"{head}.weight" if isinstance(head, str) else models.classifier_key(skeleton)
        count = class_count(state_dict, head, path)
        module = models.built(lambda: create(**({"num_classes": count} if count else {})),
                              state_dict, path, arch)
        return _configured(module)
    return build


def _configured(module: nn.Module) -> Built:
    """``module`` with the normalisation and input size of its timm-style ``pretrained_cfg``
    (none: pixels in [0, 1], the image's own size)."""
    cfg = getattr(module, "pretrained_cfg", None)
    cfg = cfg if isinstance(cfg, dict) else {}
    mean, std, size = cfg.get("mean"), cfg.get("std"), cfg.get("input_size")
    if not (isinstance(mean, (tuple, list)) and isinstance(std, (tuple, list))
            and len(mean) == len(std) == models.input_channels(module)):
        mean = std = None
    size = tuple(int(s) for s in size[-2:]) if isinstance(size, (tuple, list)) and len(size) == 3 else None
    return Built(module, tuple(map(float, mean)) if mean else None,
                 tuple(map(float, std)) if std else None, size)


def _factory(arch: str) -> Builder:
    """``package.module:factory``: the user's own code, the one path that runs it."""
    module_name, _, attr = arch.partition(":")
    if not all(p.isidentifier() for p in module_name.split(".") + attr.split(".")):
        raise KqlModelError(f"ARCH '{shorten(arch)}' is not a factory: write 'package.module:factory'")
    factory = _imported(module_name, attr, arch)

    def build(state_dict: dict, path: str) -> Built:
        module = _called(factory, arch)
        models.load_into(module, models.in_dtypes(module, state_dict), path, arch)
        return _configured(module.eval())
    return build


def _imported(module_name: str, attr: str, arch: str):
    """The factory ``attr`` of ``module_name`` (importing it runs the user's code)."""
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise KqlModelError(f"ARCH '{arch}': no module named '{exc.name}' (is its folder on "
                                "PYTHONPATH?)") from None
        raise KqlModelError(f"ARCH '{arch}': importing '{module_name}' failed: {_error(exc)}") from None
    except (Exception, SystemExit) as exc:
        raise KqlModelError(f"ARCH '{arch}': importing '{module_name}' failed: {_error(exc)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise KqlModelError(f"ARCH '{arch}': module '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise KqlModelError(f"ARCH '{arch}': '{attr}' is {_a(type(obj).__name__)}, not a factory "
                            "function or class")
    return obj


def _called(factory, arch: str) -> nn.Module:
    try:
        module = factory()
    except (Exception, SystemExit) as exc:
        raise KqlModelError(f"ARCH '{arch}': the factory failed: {_error(exc)}") from None
    if not isinstance(module, nn.Module):
        raise KqlModelError(f"ARCH '{arch}': the factory returned {_a(type(module).__name__)}, "
                            "not a torch.nn.Module")
    return module


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exception_text(exc)}"
