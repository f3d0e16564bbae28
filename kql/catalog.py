"""The catalog: named models and images, in memory or persisted in a directory.

``kql.connect("dir")`` keeps ``dir/catalog.json``: what ``LOAD MODEL`` and ``LOAD IMAGE``
registered (file paths, architecture, labels), so a later session finds them again.
Modules and arrays registered from Python live only as long as the connection.

>>> cat = Catalog()
>>> cat.resolve_model("nope")
Traceback (most recent call last):
...
kql.errors.KqlModelError: unknown model 'nope'; SHOW MODELS lists the registered ones
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from . import images as img
from .errors import KqlError, KqlImageError, KqlModelError
from .fileio import atomic_write
from .models import BUILTIN, ModelSpec, builtin_efficientnet_lite0, load_model_file, torchvision_builders

CATALOG_FILE = "catalog.json"


class Catalog:
    def __init__(self, directory: Optional[str] = None):
        self.directory = directory
        self._models: dict[str, ModelSpec] = {}
        self._images: dict[str, torch.Tensor] = {}
        self._image_source: dict[str, str] = {}
        self._persisted: dict = {"models": {}, "images": {}}
        if directory is not None:
            self._open(directory)

    # -- persistence ---------------------------------------------------------------------

    def _open(self, directory: str) -> None:
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise KqlError(f"cannot use catalog directory '{directory}': {exc}") from None
        path = os.path.join(directory, CATALOG_FILE)
        if os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as fh:
                    data = json.load(fh)
                self._persisted = {"models": dict(data.get("models", {})),
                                   "images": dict(data.get("images", {}))}
            except (OSError, ValueError, AttributeError) as exc:
                raise KqlError(f"catalog file '{path}' is unreadable: {exc}") from None

    def _save(self) -> None:
        if self.directory is None:
            return
        atomic_write(os.path.join(self.directory, CATALOG_FILE),
                     lambda fh: json.dump(self._persisted, fh, indent=2, sort_keys=True),
                     prefix=".catalog-")

    # -- models ---------------------------------------------------------------------------

    def register_model(self, spec: ModelSpec) -> None:
        self._models[spec.name] = spec
        if self._persisted["models"].pop(spec.name, None) is not None:
            self._save()

    def load_model(self, name: str, path: str, arch: Optional[str], labels: Optional[str]) -> ModelSpec:
        spec = load_model_file(name, path, arch, labels)
        self._models[name] = spec
        self._persisted["models"][name] = {
            "path": os.path.abspath(path), "arch": spec.arch,
            "labels": os.path.abspath(labels) if labels else None}
        self._save()
        return spec

    def resolve_model(self, name: str) -> ModelSpec:
        if name in self._models:
            return self._models[name]
        if name in self._persisted["models"]:
            entry = self._persisted["models"][name]
            spec = load_model_file(name, entry["path"], entry.get("arch"), entry.get("labels"))
            self._models[name] = spec
            return spec
        if name == BUILTIN:
            spec = builtin_efficientnet_lite0()
            self._models[name] = spec
            return spec
        if name in torchvision_builders():
            raise KqlModelError(
                f"model '{name}' has no weights here (pretrained weights cannot be downloaded); "
                f"load a state dict first: LOAD MODEL {name} FROM '<file.pt>'")
        raise KqlModelError(f"unknown model '{name}'; SHOW MODELS lists the registered ones")

    def model_rows(self) -> list[dict]:
        rows = []
        names = sorted(set(self._models) | set(self._persisted["models"]) | {BUILTIN})
        for name in names:
            spec = self._models.get(name)
            entry = self._persisted["models"].get(name)
            if spec is not None:
                rows.append({"name": name, "arch": spec.arch, "classes": spec.num_classes,
                             "input": _size_text(spec.input_size), "source": spec.source})
            elif entry is not None:
                rows.append({"name": name, "arch": entry.get("arch"), "classes": None,
                             "input": None, "source": entry["path"]})
            else:
                rows.append({"name": name, "arch": BUILTIN, "classes": 1000, "input": "224x224",
                             "source": "built-in"})
        return rows

    # -- images ---------------------------------------------------------------------------

    def register_image(self, name: str, image) -> torch.Tensor:
        tensor = img.to_tensor(image)
        self._images[name] = tensor
        self._image_source[name] = "session"
        if self._persisted["images"].pop(name, None) is not None:
            self._save()
        return tensor

    def load_image(self, name: str, path: str) -> torch.Tensor:
        tensor = img.load_file(path)
        self._images[name] = tensor
        self._image_source[name] = os.path.abspath(path)
        self._persisted["images"][name] = {"path": os.path.abspath(path)}
        self._save()
        return tensor

    def resolve_image(self, name: str) -> torch.Tensor:
        if name in self._images:
            return self._images[name]
        if name in self._persisted["images"]:
            path = self._persisted["images"][name]["path"]
            tensor = img.load_file(path)
            self._images[name] = tensor
            self._image_source[name] = path
            return tensor
        raise KqlImageError(f"unknown image '{name}'; LOAD IMAGE {name} FROM '<file>' registers one")

    def image_rows(self) -> list[dict]:
        rows = []
        for name in sorted(set(self._images) | set(self._persisted["images"])):
            t = self._images.get(name)
            source = self._image_source.get(name) or self._persisted["images"][name]["path"]
            rows.append({"name": name, "height": int(t.shape[1]) if t is not None else None,
                         "width": int(t.shape[2]) if t is not None else None, "source": source})
        return rows


def _size_text(size) -> Optional[str]:
    if size is None:
        return None
    if isinstance(size, int):
        return str(size)
    return f"{size[0]}x{size[1]}"
