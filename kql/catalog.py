"""The catalog: named models and images, in memory or persisted in a directory.

``kql.connect("dir")`` keeps ``dir/catalog.json``: what ``LOAD MODEL`` and ``LOAD IMAGE``
registered (file paths, architecture, labels), so a later session finds them again.
Modules and arrays registered from Python live only as long as the connection.

It also keeps the tuning records of ``CALIBRATE <model> ON ...`` (``dir/tuning.json``, or
in memory for an in-memory catalog), each with the fingerprint of the model it was tuned
on: a record of other weights is not returned.

>>> cat = Catalog()
>>> cat.resolve_model("nope")
Traceback (most recent call last):
...
kql.errors.KqlModelError: unknown model 'nope'; SHOW MODELS lists the registered ones
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import Optional

import torch

from . import images as img
from .errors import KqlError, KqlImageError, KqlModelError
from .fileio import atomic_write
from .models import BUILTIN, ModelSpec, builtin_efficientnet_lite0, load_model_file, torchvision_builders

CATALOG_FILE = "catalog.json"
TUNING_FILE = "tuning.json"
TUNING_VERSION = 1


class Catalog:
    def __init__(self, directory: Optional[str] = None):
        self.directory = directory
        self._models: dict[str, ModelSpec] = {}
        self._images: dict[str, torch.Tensor] = {}
        self._image_source: dict[str, str] = {}
        self._persisted: dict = {"models": {}, "images": {}}
        self._tunings: dict = {}        # an in-memory catalog's: {model: {key: entry}}
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

    # -- tuning records ---------------------------------------------------------------------

    def tuning(self, model_name: str, key: str) -> Optional[dict]:
        """The record saved for ``model_name`` under ``key``, or None: none saved, or saved
        for other weights than those of the model now registered under that name.

        >>> import torch
        >>> from kql.models import ModelSpec
        >>> cat = Catalog()
        >>> cat.register_model(ModelSpec("net", torch.nn.Linear(2, 2)))
        >>> cat.save_tuning("net", "16x16/4x4", {"tau": 0.5})
        >>> cat.tuning("net", "16x16/4x4"), cat.tuning("net", "8x8/4x4")
        ({'tau': 0.5}, None)
        >>> cat.register_model(ModelSpec("net", torch.nn.Linear(2, 2)))   # other weights
        >>> cat.tuning("net", "16x16/4x4") is None
        True
        """
        records = self._read_tunings().get(model_name)
        entry = records.get(key) if isinstance(records, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("record"), dict):
            return None
        if entry.get("fingerprint") != self.resolve_model(model_name).fingerprint():
            return None
        return copy.deepcopy(entry["record"])

    def save_tuning(self, model_name: str, key: str, record: dict) -> None:
        """Keep ``record`` (JSON-able) for the model now registered as ``model_name``.

        Records of that model for other weights are dropped. A persistent catalog re-reads
        its file under a lock and merges this key in, so two sessions saving at once both
        keep theirs.
        """
        entry = {"fingerprint": self.resolve_model(model_name).fingerprint(),
                 "record": json.loads(json.dumps(record))}      # a copy, and JSON-able
        if self.directory is None:
            _merge_tuning(self._tunings, model_name, key, entry)
            return
        path = os.path.join(self.directory, TUNING_FILE)
        with _locked(os.path.join(self.directory, ".tuning.lock")):
            stored = self._read_tunings()
            _merge_tuning(stored, model_name, key, entry)
            atomic_write(path, lambda fh: json.dump(
                {"version": TUNING_VERSION, "models": stored}, fh, indent=1, sort_keys=True),
                prefix=".tuning-")

    def _read_tunings(self) -> dict:
        """``{model: {key: entry}}``; a persistent catalog's file is read again each time
        (another session may have written it); an unreadable one counts as empty."""
        if self.directory is None:
            return self._tunings
        try:
            with open(os.path.join(self.directory, TUNING_FILE), encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != TUNING_VERSION:
            return {}
        models = data.get("models")
        return models if isinstance(models, dict) else {}

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


def _merge_tuning(store: dict, model_name: str, key: str, entry: dict) -> None:
    records = store.get(model_name)
    records = {k: e for k, e in records.items() if isinstance(e, dict)
               and e.get("fingerprint") == entry["fingerprint"]} if isinstance(records, dict) else {}
    records[key] = entry
    store[model_name] = records


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive advisory lock on ``path`` (POSIX ``flock``; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _size_text(size) -> Optional[str]:
    if size is None:
        return None
    if isinstance(size, int):
        return str(size)
    return f"{size[0]}x{size[1]}"
