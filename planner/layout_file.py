"""Layout trial outcomes kept across processes, in ``layouts.json`` of the user's cache.

A layout trial (:class:`~kql.operators.layout.LayoutTrial`) costs a scan one batch in
the slower layout; kept here, a new process (``kql -c``, a restarted notebook) skips it.
The outcome is a fact of the machine and the model's layers, not of its weights or the
image's content: it is keyed by :func:`calibrate.device_key`, torch version, the model's
layers (:meth:`ModelSpec.structure`), image size, batch, device and plan, in the folder
of the calibration table (:func:`calibrate.cache_dir`; ``$KQL_CACHE_DIR`` empty: nowhere),
never in a catalog folder.

Only a clear outcome (the faster layout at least :data:`MARGIN` faster per item) measured
on a quiet machine is written; anything else stays in the connection. ``CALIBRATE``
forgets the machine's entries; an unreadable file counts as empty, an unwritable one
keeps the outcome in the connection only.

>>> import tempfile
>>> store = LastingLayouts(tempfile.mkdtemp(), busy=lambda: False)
>>> store.keep(("k",), "contiguous", {"contiguous": 1.0, "channels_last": 1.5})
True
>>> LastingLayouts(store.folder).get(("k",))
'contiguous'
>>> store.keep(("close",), "contiguous", {"contiguous": 1.0, "channels_last": 1.05})
False
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Callable, Optional

from kql.fileio import read_entries, update_json
from kql.operators.contention import load_busy
from kql.operators.layout import LAYOUTS

FILE = "layouts.json"
VERSION = 1
MARGIN = 1.10          # the slower layout's time per item over the faster one's, at least
ENTRIES = 512          # the oldest beyond these are dropped
_read_cache: dict = {}  # path -> (mtime_ns, entries): a plan reads the file once a change


def machine_busy() -> bool:
    """Whether the 1-minute load average exceeds the cores (:func:`contention.load_busy`)."""
    return load_busy()


class LastingLayouts:
    """The trial outcomes of ``folder``/layouts.json: :meth:`get` and :meth:`keep` by a key
    (a tuple of str and numbers)."""

    def __init__(self, folder: Optional[str], busy: Optional[Callable[[], bool]] = None):
        self.folder = folder or None
        self.path = os.path.join(folder, FILE) if folder else None
        self.busy = busy                # None: machine_busy, looked up at each keep

    def get(self, key: tuple) -> Optional[str]:
        if self.path is None:
            return None
        entry = self._entries().get(_text(key))
        layout = entry.get("layout") if isinstance(entry, dict) else None
        return layout if layout in LAYOUTS else None

    def keep(self, key: tuple, layout: str, seconds: dict) -> bool:
        """Write ``layout``, the trial's pick from ``seconds`` (layout -> seconds per item),
        when the pick is clear and the machine quiet; whether it was written."""
        times = [s for s in seconds.values() if s and s > 0]
        if self.path is None or layout not in LAYOUTS or len(times) < 2:
            return False
        margin = max(times) / min(times)
        if margin < MARGIN or (self.busy or machine_busy)():
            return False
        entry = {"layout": layout, "margin": round(margin, 3), "kept": time.time()}
        with contextlib.suppress(OSError):
            self._update(lambda entries: entries.__setitem__(_text(key), entry))
            return True
        return False

    def at(self, key: tuple) -> "Bound":
        """This store bound to one shape's ``key``: what :class:`~kql.operators.layout.Kept`
        takes as its ``lasting``."""
        return Bound(self, key)

    def forget(self, prefix: str) -> None:
        """Drop every entry whose key starts with ``prefix`` (a machine's device key)."""
        if self.path is None or not os.path.exists(self.path):
            return
        with contextlib.suppress(OSError):
            self._update(lambda entries: [entries.pop(k) for k in list(entries)
                                          if k.startswith(json.dumps(prefix))])

    def _entries(self) -> dict:
        try:
            stamp = os.stat(self.path).st_mtime_ns
        except OSError:
            return {}
        hit = _read_cache.get(self.path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        entries = _read(self.path)
        _read_cache[self.path] = (stamp, entries)
        return entries

    def _update(self, change: Callable[[dict], object]) -> None:
        """``change`` the entries in place and write them back (:func:`~kql.fileio.update_json`),
        the oldest beyond :data:`ENTRIES` dropped."""
        def changed(entries: dict) -> dict:
            change(entries)
            oldest = sorted(entries, key=lambda k: entries[k].get("kept", 0))
            for k in oldest[:max(0, len(entries) - ENTRIES)]:
                del entries[k]
            return {"version": VERSION, "entries": entries}
        update_json(self.path, _read, changed, prefix=".layouts-")
        _read_cache.pop(self.path, None)


class Bound:
    """A :class:`LastingLayouts` and one key: ``get()`` and ``keep(layout, seconds)``."""

    def __init__(self, store: LastingLayouts, key: tuple):
        self.store, self.key = store, key

    def get(self) -> Optional[str]:
        return self.store.get(self.key)

    def keep(self, layout: str, seconds: dict) -> bool:
        return self.store.keep(self.key, layout, seconds)


def _read(path: str) -> dict:
    """The entries of ``path``; empty when it is missing, unreadable or of another version."""
    return read_entries(path, VERSION, lambda v: isinstance(v, dict))


def _text(key: tuple) -> str:
    """The key as the file holds it: JSON of its parts (the device key first)."""
    return json.dumps(list(key), default=str)[1:-1]
