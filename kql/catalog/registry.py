"""The catalog: named models and images, in memory or persisted in a directory.

``kql.connect("dir")`` keeps ``dir/catalog.json``: what ``LOAD MODEL`` and ``LOAD IMAGE``
registered (file paths, architecture, labels), so a later session finds them again, and
a session running at the same time sees them too (:mod:`kql.catalog.store`: every change
is merged into the file under a lock). Modules and arrays registered from Python live
only as long as the connection, and come first when a name is resolved.

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
from .store import CATALOG_FILE, TUNING_FILE, CatalogFile
from ..errors import KqlError, KqlImageError, KqlModelError
from .model_files import TORCHSCRIPT, file_digest
from .models import BUILTIN, ModelSpec, builtin_efficientnet_lite0, load_model_file, torchvision_builders

__all__ = ["Catalog", "CATALOG_FILE", "TUNING_FILE"]


class Catalog:
    def __init__(self, directory: Optional[str] = None):
        self.directory = directory
        self._models: dict[str, ModelSpec] = {}       # registered from Python: this connection's
        self._images: dict[str, torch.Tensor] = {}
        self._tables: dict[str, dict] = {}            # image tables of an in-memory catalog
        self._loaded_models: dict[str, tuple] = {}    # {name: (entry, spec)} read from files
        self._loaded_images: dict[str, tuple] = {}    # {name: (entry, tensor)}
        self._info: dict[str, dict] = {}              # {name: what its file or registration says}
        self._tunings: dict = {}        # an in-memory catalog's: {model: {key: entry}}
        self._store = CatalogFile(directory) if directory is not None else None

    # -- models ---------------------------------------------------------------------------

    def register_model(self, spec: ModelSpec) -> None:
        self._models[spec.name] = spec
        self._loaded_models.pop(spec.name, None)
        self._forget("models", spec.name)

    def load_model(self, name: str, path: str, arch: Optional[str], labels: Optional[str],
                   trusted: bool = False) -> ModelSpec:
        spec = load_model_file(name, path, arch, labels, trusted)
        entry = {"path": os.path.abspath(path), "arch": spec.arch,
                 "labels": os.path.abspath(labels) if labels else None}
        if trusted and spec.arch == TORCHSCRIPT:    # later sessions trust these bytes only
            entry["trusted"] = file_digest(path)
        self._keep("models", name, entry)
        self._models.pop(name, None)
        self._loaded_models[name] = (entry, spec)
        return spec

    def resolve_model(self, name: str) -> ModelSpec:
        if name in self._models:
            return self._models[name]
        spec = self._from_file("models", name, self._loaded_models, lambda entry: load_model_file(
            name, entry["path"], entry.get("arch"), entry.get("labels"), _trusted_digest(entry)))
        if spec is not None:
            return spec
        if name == BUILTIN:
            spec = builtin_efficientnet_lite0()
            self._models[name] = spec
            return spec
        if name in torchvision_builders():
            raise KqlModelError(
                f"model '{name}' has no weights here (pretrained weights cannot be downloaded); "
                f"load a state dict first: LOAD MODEL {name} FROM '<file.pt>'")
        hint = _close(name, [r["name"] for r in self.model_rows()])
        raise KqlModelError(f"unknown model '{name}'" + (f"; did you mean '{hint}'?" if hint else
                                                         "; SHOW MODELS lists the registered ones"))

    def model_rows(self) -> list[dict]:
        entries, damaged = self._entries("models"), self._damaged("models")
        rows = []
        for name in sorted(set(self._models) | set(entries) | set(damaged)
                           | set(self._loaded_models) | {BUILTIN}):
            spec = self._models.get(name) or _current(self._loaded_models, name, entries, damaged)
            if spec is not None:
                rows.append({"name": name, "arch": spec.arch, "classes": spec.num_classes,
                             "input": _size_text(spec.input_size), "source": spec.source})
            elif name in entries or name in damaged:
                rows.append({"name": name, "arch": entries.get(name, {}).get("arch"), "classes": None,
                             "input": None, "source": _source(entries, damaged, name)})
            else:
                rows.append({"name": name, "arch": BUILTIN, "classes": 1000, "input": "224x224",
                             "source": "built-in"})
        return rows

    # -- tuning records ---------------------------------------------------------------------

    def tuning(self, model_name: str, key: str) -> Optional[dict]:
        """The record saved for ``model_name`` under ``key``, or None: none saved, or saved
        for other weights than those of the model now registered under that name.

        >>> import torch
        >>> from kql.catalog.models import ModelSpec
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
        if self._store is None:
            _merge_tuning(self._tunings, model_name, key, entry)
        else:
            self._store.change_tunings(lambda stored: _merge_tuning(stored, model_name, key, entry))

    def _read_tunings(self) -> dict:
        """``{model: {key: entry}}``; a persistent catalog's file is read again each time
        (another session may have written it); an unreadable one counts as empty."""
        return self._tunings if self._store is None else self._store.tunings()

    # -- images ---------------------------------------------------------------------------

    def register_image(self, name: str, image) -> torch.Tensor:
        tensor = img.to_tensor(image)
        self._images[name] = tensor
        self._info.pop(name, None)
        self._loaded_images.pop(name, None)
        self._forget("images", name)
        return tensor

    def register_volume(self, name: str, volume, affine=None) -> torch.Tensor:
        """A volume ``[C, D, H, W]`` (or ``[D, H, W]``) from Python, with its voxel-to-world
        ``affine`` (4x4) when it has one."""
        from .volumes import from_user

        tensor, info = from_user(volume, affine)
        self._images[name] = tensor
        self._info[name] = info
        self._loaded_images.pop(name, None)
        self._forget("images", name)
        return tensor

    def image_info(self, name: str) -> dict:
        """What the image's file (or registration) says beyond its pixels: a volume's
        affine and voxel spacing, a DICOM header's fields; empty when nothing."""
        return dict(self._info.get(name, {}))

    def forget_image(self, name: str) -> None:
        """Drop the session image ``name`` (registered from Python); file entries stay."""
        self._images.pop(name, None)

    def load_image(self, name: str, path: str, max_pixels: int = img.MAX_PIXELS) -> torch.Tensor:
        loaded = img.read_image(path, max_pixels=max_pixels)
        tensor = loaded.tensor
        self._info[name] = dict(loaded.info)
        entry = {"path": os.path.abspath(path)}
        self._keep("images", name, entry)
        self._images.pop(name, None)
        self._loaded_images[name] = (entry, tensor)
        return tensor

    def resolve_image(self, name: str, max_pixels: int = img.MAX_PIXELS) -> torch.Tensor:
        if name in self._images:
            return self._images[name]
        def read(entry):
            loaded = img.read_image(entry["path"], max_pixels=max_pixels)
            self._info[name] = dict(loaded.info)
            return loaded.tensor

        tensor = self._from_file("images", name, self._loaded_images, read)
        if tensor is None:
            hint = _close(name, [r["name"] for r in self.image_rows()])
            raise KqlImageError(f"unknown image '{name}'" + (
                f"; did you mean '{hint}'?" if hint else f"; LOAD IMAGE {name} FROM '<file>' registers one"))
        return tensor

    # -- image tables (LOAD IMAGES) ----------------------------------------------------------

    def load_image_table(self, name: str, pattern: str) -> list[str]:
        """``LOAD IMAGES name FROM 'glob'``: the matching files (sorted, absolute), kept as
        the table ``name``; each is read when a query reaches it."""
        files = glob_files(pattern)
        if not files:
            raise KqlImageError(f"no files match '{pattern}'")
        entry = {"path": os.path.abspath(pattern), "files": files}
        self._tables[name] = entry
        self._keep("tables", name, entry)
        return files

    def resolve_table(self, name: str) -> Optional[list[str]]:
        """The files of the image table ``name``, or None when there is no such table."""
        entries = self._entries("tables")
        if name in entries:
            return list(entries[name]["files"])
        return list(self._tables[name]["files"]) if name in self._tables else None

    def table_rows(self) -> list[dict]:
        tables = {**self._tables, **self._entries("tables")}
        return [{"name": name, "height": None, "width": None,
                 "source": f"table of {len(entry['files'])} files ({entry['path']})"}
                for name, entry in sorted(tables.items())]

    def image_rows(self) -> list[dict]:
        entries, damaged = self._entries("images"), self._damaged("images")
        rows = []
        for name in sorted(set(self._images) | set(entries) | set(damaged) | set(self._loaded_images)):
            t = self._images.get(name)
            t = t if t is not None else _current(self._loaded_images, name, entries, damaged)
            if name in self._images:
                source = "session"
            elif name in entries or name in damaged:
                source = _source(entries, damaged, name)
            else:
                source = self._loaded_images[name][0]["path"]
            rows.append({"name": name, "height": int(t.shape[-2]) if t is not None else None,
                         "width": int(t.shape[-1]) if t is not None else None, "source": source,
                         "depth": int(t.shape[1]) if t is not None and t.dim() == 4 else None})
        if not any(r["depth"] for r in rows):       # images only: no depth column
            for r in rows:
                del r["depth"]
        return rows + self.table_rows()

    # -- the catalog file ---------------------------------------------------------------------

    def _entries(self, section: str) -> dict:
        return {} if self._store is None else self._store.entries(section)

    def _damaged(self, section: str) -> dict:
        return {} if self._store is None else self._store.damaged(section)

    def _keep(self, section: str, name: str, entry: dict) -> None:
        if self._store is not None:
            self._store.put(section, name, entry)

    def _forget(self, section: str, name: str) -> None:
        """Drop a file entry a Python registration now shadows, so that a later session does
        not find the old one; a catalog that cannot be written keeps it (this session's
        registration comes first anyway)."""
        if self._store is not None:
            with contextlib.suppress(KqlError):
                self._store.remove(section, name)

    def _from_file(self, section: str, name: str, cache: dict, load):
        """What the file entry ``name`` names, read once per entry (another session may
        replace it); this connection's own LOAD if the file has none; else None."""
        entries = self._entries(section)
        if name in entries:
            entry = entries[name]
            if name not in cache or cache[name][0] != entry:
                cache[name] = (entry, load(entry))
            return cache[name][1]
        problem = self._damaged(section).get(name)
        if problem is not None:
            kind, error = (("MODEL", KqlModelError) if section == "models" else ("IMAGE", KqlImageError))
            raise error(f"{kind.lower()} '{name}' in catalog file '{self._store.path}' is damaged "
                        f"({problem}); LOAD {kind} {name} FROM '<file>' replaces it")
        return cache[name][1] if name in cache else None


def _trusted_digest(entry: dict):
    """The digest a TRUSTED model file had (only bytes are trusted, never a flag), or False."""
    digest = entry.get("trusted")
    return digest if isinstance(digest, str) else False


def _close(name: str, names: list) -> Optional[str]:
    """The registered name ``name`` is most likely a typo of, if any."""
    import difflib

    hint = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    return hint[0] if hint else None


def glob_files(pattern: str) -> list[str]:
    """The regular files ``pattern`` matches (``**`` recursive), sorted, absolute; a walk
    of the whole disk is refused (:mod:`kql.catalog.globs`)."""
    from .globs import glob_files as files

    return files(pattern)


def _current(cache: dict, name: str, entries: dict, damaged: dict):
    """The value read for ``name`` if it is still what the file names (or the file has no
    entry for it), else None."""
    if name not in cache or name in damaged:
        return None
    entry, value = cache[name]
    return value if name not in entries or entries[name] == entry else None


def _source(entries: dict, damaged: dict, name: str) -> str:
    if name in entries:
        return entries[name]["path"]
    return f"damaged catalog entry ({damaged[name]})"


def _merge_tuning(store: dict, model_name: str, key: str, entry: dict) -> None:
    records = store.get(model_name)
    records = {k: e for k, e in records.items() if isinstance(e, dict)
               and e.get("fingerprint") == entry["fingerprint"]} if isinstance(records, dict) else {}
    records[key] = entry
    store[model_name] = records


def _size_text(size) -> Optional[str]:
    if size is None:
        return None
    if isinstance(size, int):
        return str(size)
    return f"{size[0]}x{size[1]}"
