"""The plan cache of one connection: traced graphs per (model, device), model profiles
per (model, image, device).

A profile (trace, materialized views, node kinds) is most of what planning costs, and it
depends only on the model, the image the model sees and the device: another target,
colour, stride, patch or region on the same image reuses it. Its trace depends only on
the model and the device: another image (a loop over a folder) reuses the graph and pays
only its own views. Entries are keyed by the registered model object (a re-registered or re-loaded model is another object, and
:meth:`PlanCache.forget` drops its entries at once) and by a digest of the resized image
(an image re-registered with other pixels is another key). The least recently used
entries go first: profiles hold every layer's output.

>>> import torch
>>> cache = PlanCache(size=1)
>>> made = []
>>> build = lambda: made.append(1) or object()
>>> spec, image = object(), torch.zeros(3, 4, 4)
>>> a, hit_a = cache.profile(spec, "net", image, "cpu", build)
>>> b, hit_b = cache.profile(spec, "net", image.clone(), "cpu", build)
>>> a is b, hit_a, hit_b, len(made)
(True, False, True, 1)
>>> cache.forget("net"); cache.profile(spec, "net", image, "cpu", build)[1]
False
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch

from kql.operators.layout import Kept

from . import calibrate
from .layout_file import LastingLayouts

PROFILES = 4          # profiles kept per connection
GRAPHS = 8            # traced graphs kept per connection (they share the models' weights)


def image_digest(image) -> str:
    data = np.ascontiguousarray(image.detach().cpu().numpy())
    return hashlib.blake2b(data.tobytes() + str(data.shape).encode(), digest_size=16).hexdigest()


class PlanCache:
    def __init__(self, size: int = PROFILES):
        self.size = size
        self._profiles: OrderedDict = OrderedDict()    # key -> (spec, name, profile)
        self._graphs: OrderedDict = OrderedDict()      # (id(spec), device) -> (spec, name, graph)
        self.layouts: dict = {}     # (name, id(spec), ...) -> the layout a trial chose
        # Trial outcomes beyond the connection (planner.layout_file): the user's cache folder,
        # whatever the catalog; None keeps them in the connection only.
        self.lasting = LastingLayouts(calibrate.cache_dir())
        # Plans corrected by, and scans recorded into, planner.feedback; off: every plan
        # is the cost model's alone (kql bench times first queries).
        self.learning = True

    def profile(self, spec, name: str, image, device: str, build, kind: str = "profile") -> tuple:
        """``(profile, hit)``: the cached profile, or ``build()`` kept for next time.
        ``kind`` tells apart what is kept per (model, image, device): the profile, or the
        shape summary of a forward pass (:mod:`kql.operators.shapes`)."""
        key = (id(spec), image_digest(image), device, kind)
        return _lru(self._profiles, self.size, key, spec, name, build)

    def graph(self, spec, name: str, device: str, build) -> tuple:
        """``(graph, hit)``: the traced graph of the model ``spec`` on ``device``, or
        ``build()`` kept for next time, whatever image the model sees."""
        return _lru(self._graphs, GRAPHS, (id(spec), device), spec, name, build)

    def has_graph(self, spec, device: str) -> bool:
        """Whether the traced graph of ``spec`` on ``device`` is kept; builds nothing."""
        entry = self._graphs.get((id(spec), device))
        return entry is not None and entry[0] is spec

    def peek(self, spec, image, device: str, kind: str):
        """What is kept for (model, image, device, kind), or None; builds nothing."""
        entry = self._profiles.get((id(spec), image_digest(image), device, kind))
        return entry[2] if entry is not None and entry[0] is spec else None

    def drop(self, spec, image, device: str, kind: str) -> None:
        """Forget what is kept for (model, image, device, kind)."""
        self._profiles.pop((id(spec), image_digest(image), device, kind), None)

    def forget(self, name: str) -> None:
        """Drop every graph and profile of the model registered as ``name``."""
        for kept in (self._profiles, self._graphs):
            for key in [k for k, (_, n, _) in kept.items() if n == name]:
                del kept[key]
        for key in [k for k in self.layouts if k[0] == name]:
            del self.layouts[key]

    def forget_layouts(self, device_key: str) -> None:
        """Drop the layout trials measured on the device ``device_key`` (its calibration
        was measured again), in the connection and in the lasting store."""
        self.layouts.clear()
        if self.lasting is not None:
            self.lasting.forget(device_key)

    def kept_layout(self, spec, device: str, *shape) -> Kept:
        """Where a layout trial's outcome is kept (:class:`~kql.operators.layout.Kept`) for
        the model ``spec`` on ``device`` and what else decides it (``shape``: operator, image
        size, batch, threads, device, plan): in this connection, by the model object, and,
        with a lasting store, for this machine, torch build and model structure."""
        lasting = None
        if self.lasting is not None:
            lasting = self.lasting.at((calibrate.device_key(device), torch.__version__,
                                       spec.structure()) + shape)
        return Kept(self.layouts, (spec.name, id(spec)) + shape, lasting)

    def kept_operator(self, spec, device: str, *shape) -> Kept:
        """Where a close call's operator trial (:class:`~kql.operators.trial.OperatorTrial`)
        keeps its outcome for the next scan of that shape, in this connection."""
        return Kept(self.layouts, (spec.name, id(spec), "operator", device) + shape)

    def clear(self) -> None:
        self._profiles.clear()
        self._graphs.clear()
        self.layouts.clear()


def _lru(kept: OrderedDict, size: int, key, spec, name: str, build) -> tuple:
    """``(value, hit)`` of ``key`` in the least-recently-used ``kept`` (``size`` entries),
    ``build()`` on a miss. An entry counts only for the very model object ``spec`` (an id
    can be reused once a model is gone)."""
    entry = kept.get(key)
    if entry is not None and entry[0] is spec:
        kept.move_to_end(key)
        return entry[2], True
    value = build()
    kept[key] = (spec, name, value)
    while len(kept) > size:
        kept.popitem(last=False)
    return value, False
