"""The files of a catalog directory, shared by every process that opens it.

``catalog.json`` holds what ``LOAD MODEL`` and ``LOAD IMAGE`` registered, ``tuning.json``
the records of ``CALIBRATE <model> ON ...``. A change re-reads its file under a lock
(``.catalog.lock`` / ``.tuning.lock``, POSIX ``flock``), applies this connection's one
change to what is on disk and writes the file atomically, so two sessions loading at once
both keep theirs. A read re-reads the file when it changed (inode, size, times), so one
session sees what another loaded.

A file that is not a JSON object of objects is one :class:`~kql.errors.KqlError` naming
it, and is never overwritten; a damaged entry stays on disk, is left out of
:meth:`CatalogFile.entries` and listed by :meth:`CatalogFile.damaged`.

>>> import tempfile
>>> store = CatalogFile(tempfile.mkdtemp())
>>> store.put("images", "cat", {"path": "/tmp/cat.png"})
>>> store.entries("images"), store.damaged("images")
({'cat': {'path': '/tmp/cat.png'}}, {})
>>> with open(store.path, "w") as fh:
...     _ = fh.write('{"models": null}')
>>> store.entries("models")
Traceback (most recent call last):
...
kql.errors.KqlError: catalog file '.../catalog.json' is damaged ("models" is null, not an object); ...
>>> import shutil; shutil.rmtree(store.directory)
"""

from __future__ import annotations

import copy
import json
import os
from typing import Callable, Optional

from ..errors import KqlError
from ..fileio import atomic_write, locked, read_json, sweep

CATALOG_FILE = "catalog.json"
TUNING_FILE = "tuning.json"
TUNING_VERSION = 1
SECTIONS = ("models", "images", "tables")


class CatalogFile:
    """``catalog.json`` and ``tuning.json`` of one catalog directory."""

    def __init__(self, directory: str):
        _usable_directory(directory)
        sweep(directory)                        # temporary files of killed writers
        self.directory = directory
        self.path = os.path.join(directory, CATALOG_FILE)
        self.tuning_path = os.path.join(directory, TUNING_FILE)
        self._document: dict = {}
        self._stamp = None
        self._refresh()

    # -- catalog.json --------------------------------------------------------------------

    def entries(self, section: str) -> dict:
        """``{name: entry}`` of the sound entries of ``section`` ('models', 'images' or
        'tables', the image tables of LOAD IMAGES)."""
        self._refresh()
        return {name: copy.deepcopy(entry) for name, entry in self._section(section).items()
                if _entry_problem(section, entry) is None}

    def damaged(self, section: str) -> dict:
        """``{name: what is wrong}`` of the entries of ``section`` that cannot be used."""
        self._refresh()
        problems = {name: _entry_problem(section, entry)
                    for name, entry in self._section(section).items()}
        return {name: problem for name, problem in problems.items() if problem is not None}

    def put(self, section: str, name: str, entry: dict) -> None:
        """Add or replace the entry ``name`` of ``section`` on disk."""
        self._change(section, name, entry)

    def remove(self, section: str, name: str) -> None:
        """Drop the entry ``name`` of ``section`` from disk (nothing if it has none)."""
        self._refresh()
        if name in self._section(section):
            self._change(section, name, None)

    def _section(self, section: str) -> dict:
        return self._document.get(section) or {}

    def _refresh(self) -> None:
        if _stamp(self.path) != self._stamp:
            self._document, self._stamp = self._load()

    def _load(self) -> tuple:
        """The document on disk (``{}`` if there is none) and its stamp."""
        try:
            with open(self.path, "rb") as fh:
                stamp = _stamp_of(os.fstat(fh.fileno()))
                data = fh.read()
        except FileNotFoundError:
            return {}, None
        except OSError as exc:
            raise KqlError(f"cannot read catalog file '{self.path}': {_reason(exc)}") from None
        return _document(data, self.path), stamp

    def _change(self, section: str, name: str, entry: Optional[dict]) -> None:
        try:
            with locked(os.path.join(self.directory, ".catalog.lock")):
                document, _ = self._load()      # what other sessions wrote meanwhile
                entries = document.setdefault(section, {})
                if entry is None:
                    entries.pop(name, None)
                else:
                    entries[name] = entry
                atomic_write(self.path, lambda fh: json.dump(document, fh, indent=2, sort_keys=True),
                             prefix=".catalog-")
                self._document, self._stamp = document, _stamp(self.path)
        except OSError as exc:
            raise KqlError(f"cannot write catalog file '{self.path}': {_reason(exc)}") from None

    # -- tuning.json ----------------------------------------------------------------------

    def tunings(self) -> dict:
        """``{model: {key: entry}}``, read again each time; an unreadable file is empty."""
        try:
            data = read_json(self.tuning_path)
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("version") != TUNING_VERSION:
            return {}
        models = data.get("models")
        return models if isinstance(models, dict) else {}

    def change_tunings(self, change: Callable[[dict], None]) -> None:
        """Apply ``change`` to the records on disk, under the lock, and write them."""
        try:
            with locked(os.path.join(self.directory, ".tuning.lock")):
                stored = self.tunings()
                change(stored)
                atomic_write(self.tuning_path, lambda fh: json.dump(
                    {"version": TUNING_VERSION, "models": stored}, fh, indent=1, sort_keys=True),
                    prefix=".tuning-")
        except OSError as exc:
            raise KqlError(f"cannot write tuning file '{self.tuning_path}': {_reason(exc)}") from None


def _usable_directory(directory: str) -> None:
    """Create ``directory`` if need be; one line when it cannot be a catalog directory."""
    if os.path.lexists(directory) and not os.path.exists(directory):
        raise KqlError(f"catalog directory '{directory}' is a broken symbolic link")
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise KqlError(f"catalog directory '{directory}' is a file, not a directory")
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise KqlError(f"cannot create catalog directory '{directory}': {_reason(exc)}") from None
    if not os.access(directory, os.R_OK | os.X_OK):
        raise KqlError(f"cannot open catalog directory '{directory}': permission denied")


def _document(data: bytes, path: str) -> dict:
    """The parsed catalog file: an object whose sections are objects."""
    def damaged(what: str) -> KqlError:
        return KqlError(f"catalog file '{path}' is damaged ({what}); repair or remove it")

    try:
        value = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise damaged("nested too deeply") from None
    except UnicodeDecodeError:
        raise damaged("not UTF-8 text") from None
    except ValueError as exc:
        raise damaged(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise damaged(f"{_kind(value)}, not an object")
    for section in SECTIONS:
        if section in value and not isinstance(value[section], dict):
            raise damaged(f'"{section}" is {_kind(value[section])}, not an object')
    return value


def _entry_problem(section: str, entry) -> Optional[str]:
    """What makes an entry unusable, or None.

    >>> _entry_problem("models", {"path": "/m.pt", "arch": None}), _entry_problem("images", "x")
    (None, 'a string, not an object')
    >>> _entry_problem("models", {"arch": "resnet18"})
    'no "path"'
    """
    if not isinstance(entry, dict):
        return f"{_kind(entry)}, not an object"
    if not isinstance(entry.get("path"), str) or not entry["path"]:
        return 'no "path"' if "path" not in entry else '"path" is not a file name'
    if section == "tables" and not (isinstance(entry.get("files"), list)
                                    and all(isinstance(f, str) for f in entry["files"])):
        return '"files" is not a list of file names'
    for key in ("arch", "labels") if section == "models" else ():
        if entry.get(key) is not None and not isinstance(entry[key], str):
            return f'"{key}" is {_kind(entry[key])}, not a string'
    return None


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _stamp(path: str):
    try:
        return _stamp_of(os.stat(path))
    except OSError:
        return None


def _stamp_of(st) -> tuple:
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
