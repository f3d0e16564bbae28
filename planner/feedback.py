"""Predictions corrected by what scans took: the learning optimizer (DB2's LEO).

The cost model is a prior; every scan already times its batches. After a scan, each
operator that ran records the ratio of its observed seconds per position to what the
cost model predicted for it (:meth:`Feedback.record`), under two keys: the query shape
(operator, model layers, image size, patch, batch, plan, threads) and the operator kind
alone. A later plan multiplies its prediction by the median of the last :data:`KEEP`
ratios of its shape (:meth:`Feedback.correction`), or, for a shape never run, by the
kind's median once :data:`KIND_SCANS` scans of that kind were seen (a calibration that
prices a whole kind wrong, say one measured under load, is then corrected everywhere),
for :data:`KIND_TTL` seconds after the kind's last scan (a busy spell passes; a shape's
own ratios stay, they also carry what the cost model misprices in that model).
A median of a few bounded ratios moves with the machine's state within three scans, and
one wild scan cannot swing it; each ratio is clipped to [1/:data:`CLIP`, :data:`CLIP`].

Ratios are kept with the calibration (the catalog folder, or the user's cache: see
:func:`kql.planner.calibrate.cache_dir`) in ``feedback.json``, per device key and table
(``device@measured_at``: ratios that corrected one table say nothing of another);
CALIBRATE forgets the device's ratios. Where scans timed only one of naive and
incremental inference (on the shape, or its kind), the other borrows its correction
(:meth:`Correction.for_peer`): a busy machine slows both, and correcting one alone
flipped the plan at every scan. A file that cannot be read
counts as empty; one that cannot be written keeps the ratios in this process.

>>> import tempfile
>>> fb = Feedback(tempfile.mkdtemp())
>>> fb.correction("cpu:2", "NaiveOcclusion", "s1")
Correction(factor=1.0, scans=0, scope='')
>>> for ratio in (2.0, 3.0, 2.5):
...     fb.record("cpu:2", "NaiveOcclusion", "s1", ratio)
>>> Feedback(fb.folder).correction("cpu:2", "NaiveOcclusion", "s1")
Correction(factor=2.5, scans=3, scope='shape')
>>> fb.correction("cpu:2", "NaiveOcclusion", "another shape")
Correction(factor=2.5, scans=3, scope='kind')
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Optional

from kql.fileio import read_entries, update_json

FILE = "feedback.json"
VERSION = 1
KEEP = 5            # ratios kept per key (the median of these corrects)
KIND_SCANS = 3      # scans of an operator kind before its median corrects unseen shapes
CLIP = 100.0        # one scan's ratio is clipped to this far either way
ENTRIES = 512       # keys kept per file; the least recently written go first
MIN_SECONDS = 0.25  # a shorter scan teaches nothing: fixed costs (first calls, allocation)
                    # swamp its per-position time, and its plan hardly matters anyway
KIND_TTL = 900.0    # seconds a kind's correction outlives its last scan: the machine's state
                    # passes (a burst of niced scans beside other work taught x58 here, and
                    # every unseen shape's prediction then read 58x its time long after)
_memory: dict = {}  # path (or None) -> entries written in this process


@dataclass(frozen=True)
class Correction:
    factor: float = 1.0     # observed / predicted seconds per position
    scans: int = 0          # observations behind it
    scope: str = ""         # 'shape', 'kind' or '' (none)
    low: float = 1.0        # the lowest and highest ratio behind it
    high: float = 1.0

    def __repr__(self) -> str:
        return f"Correction(factor={self.factor}, scans={self.scans}, scope={self.scope!r})"

    def describe(self) -> Optional[str]:
        """EXPLAIN's ``corrected=`` item, or None for no correction.

        >>> Correction(1.8, 3, "shape").describe(), Correction(2.0, 1, "peer").describe()
        ('x1.80 (3 scans)', 'x2.00 (1 scan of the other operator)')
        """
        if not self.scans:
            return None
        what = "scan" if self.scans == 1 else "scans"
        whose = {"kind": ", other shapes", "peer": " of the other operator"}.get(self.scope, "")
        return f"x{self.factor:.2f} ({self.scans} {what}{whose})"

    @property
    def settled(self) -> bool:
        """Whether enough scans of this very shape stand behind it to trust it."""
        return self.scope == "shape" and self.scans >= KIND_SCANS

    def for_peer(self) -> "Correction":
        """This correction lent to the other operator of the same query, which no scan
        timed yet: the machine's state slows both alike (a scan watched mid-scan probes
        the difference)."""
        return Correction(self.factor, self.scans, "peer", self.low, self.high)


def shape_key(*parts) -> str:
    """A short digest of what decides a plan's time (model layers, sizes, plan)."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=12).hexdigest()


class Feedback:
    """The ratios of ``folder``/feedback.json (``folder`` None: this process only)."""

    def __init__(self, folder: Optional[str], enabled: bool = True):
        self.folder = folder
        self.path = os.path.join(folder, FILE) if folder else None
        self.enabled = enabled      # off: no correction, nothing recorded (kql bench)

    def correction(self, device: str, kind: str, shape: str) -> Correction:
        if not self.enabled:
            return Correction()
        entries = self._entries()
        own = _ratios(entries.get(_key(device, kind, shape)))
        if own:
            return _median(own, "shape")
        entry = entries.get(_key(device, kind, "*"))
        every = _ratios(entry)
        fresh = isinstance(entry, dict) and time.time() - _number(entry.get("at")) <= KIND_TTL
        if len(every) >= KIND_SCANS and fresh:
            return _median(every, "kind")
        return Correction()

    def record(self, device: str, kind: str, shape: str, ratio: float) -> None:
        """Keep one scan's observed/predicted ratio under its shape and its kind."""
        if not self.enabled:
            return
        if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
            return
        ratio = min(CLIP, max(1 / CLIP, float(ratio)))
        keys = (_key(device, kind, shape), _key(device, kind, "*"))

        def change(entries: dict) -> dict:
            for key in keys:
                kept = _ratios(entries.get(key))[-(KEEP - 1):] + [ratio]
                entries[key] = {"ratios": kept, "at": time.time()}
            if len(entries) > ENTRIES:
                newest = sorted(entries, key=lambda k: entries[k].get("at", 0))[-ENTRIES:]
                entries = {k: entries[k] for k in newest}
            return entries
        self._update(change)

    def forget(self, device: str) -> None:
        """Drop the device's ratios, whatever table they corrected (``device@stamp``)."""
        self._update(lambda entries: {k: v for k, v in entries.items()
                                      if k.split("|")[0].split("@")[0] != device})

    def _entries(self) -> dict:
        if self.path in _memory:
            return _memory[self.path]
        found = _read(self.path) if self.path else {}
        _memory[self.path] = found
        return found

    def _update(self, change) -> None:
        """Apply ``change`` to the stored entries (the file's, under its lock, when there
        is one and it can be written; else this process's)."""
        done = {}

        def apply(stored: dict) -> dict:
            done["entries"] = change(stored["entries"])
            return {"version": VERSION, "entries": done["entries"]}
        if self.path is not None:
            with contextlib.suppress(OSError):
                update_json(self.path, lambda p: {"version": VERSION, "entries": _read(p)},
                            apply, prefix=".feedback-")
        if "entries" not in done:
            done["entries"] = change(dict(self._entries()))
        _memory[self.path] = done["entries"]


def _key(device: str, kind: str, shape: str) -> str:
    return f"{device}|{kind}|{shape}"


def _read(path: str) -> dict:
    return read_entries(path, VERSION, _ratios)


def _ratios(entry) -> list:
    """The sound ratios of one entry (anything else in a hand-edited file is ignored)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("ratios"), list):
        return []
    return [float(r) for r in entry["ratios"]
            if isinstance(r, (int, float)) and math.isfinite(r) and 1 / CLIP <= r <= CLIP]


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else 0.0


def _median(ratios: list, scope: str) -> Correction:
    return Correction(statistics.median(ratios), len(ratios), scope, min(ratios), max(ratios))


@dataclass(frozen=True)
class Learner:
    """What a plan's scan teaches: ``expected`` maps each operator that may run (by name)
    to ``(shape key, predicted seconds per position, batch)``, the cost model's prediction
    before any correction."""

    store: Feedback
    device: str
    expected: tuple         # ((operator name, shape key, seconds per position, batch), ...)

    def learn(self, parts, seconds: float, count: int) -> list:
        """Record the scan's parts (``OcclusionResult.ran``: ``(operator name, positions,
        seconds)``; empty: the first operator ran all ``count`` positions in ``seconds``),
        one ratio per operator over all its parts. An operator that ran only one batch of
        a scan (a probe, a trial: timed cold) teaches nothing, and neither does a scan
        shorter than :data:`MIN_SECONDS`. Returns the ratios recorded."""
        if seconds < MIN_SECONDS:
            return []
        parts = parts or ((self.expected[0][0], count, seconds),)
        totals: dict = {}
        for name, items, took in parts:
            done, spent = totals.get(name, (0, 0.0))
            totals[name] = (done + items, spent + took)
        recorded = []
        for name, shape, per_item, batch in self.expected:
            items, took = totals.pop(name, (0, 0.0))
            if items <= 0 or per_item <= 0 or (items <= batch and items < count):
                continue
            ratio = (took / items) / per_item
            self.store.record(self.device, name, shape, ratio)
            recorded.append(ratio)
        return recorded
