"""The memory layout the engines run full-size batches in.

On CPU, oneDNN's convolutions run channels-last (NHWC) batches 1.03-2.3x faster than
torch's default contiguous (NCHW) ones (measured on 13 torchvision CNNs, batch 16, 2
threads: ResNet18 1.22x, InceptionV3 1.68x, VGG16 1.38x): an NHWC input makes every
convolution after it, and the element-wise ops between them, stay NHWC. The numbers are
the same up to float rounding. The gain comes from large maps (and max pooling, 5-6x
faster channels-last), and on small inputs the faster layout depends on the model: the
naive operator measures it on its own first batch (:class:`LayoutTrial`); the
incremental one runs only its pooling windows channels-last, as its convolutions on
patch contexts and on the small maps past the crossover measured no faster, or slower. The planner picks the
layout; the engines only apply it.

>>> import torch
>>> x = in_layout(torch.zeros(2, 3, 4, 5), CHANNELS_LAST)
>>> x.is_contiguous(memory_format=torch.channels_last), x.shape
(True, torch.Size([2, 3, 4, 5]))
>>> in_layout(torch.zeros(2, 3), CHANNELS_LAST).shape    # not a batch of maps: unchanged
torch.Size([2, 3])
"""

from __future__ import annotations

import time
from typing import Callable, Hashable, MutableMapping, Optional

import torch

from . import contention

CONTIGUOUS = "contiguous"
CHANNELS_LAST = "channels_last"
ADAPTIVE = "adaptive"       # the faster of the two on the task's own first batch
LAYOUTS = (CONTIGUOUS, CHANNELS_LAST)


def known_layout(layout: str, kept: Optional["Kept"]) -> str:
    """``layout``, or for an adaptive one the outcome ``kept`` held from an earlier trial
    when the plan was made."""
    found = kept.found if kept is not None and layout == ADAPTIVE else None
    return found or layout


def in_layout(t, layout: str):
    """``t`` in ``layout`` when it is a batch of feature maps ``[B, C, H, W]``."""
    if layout != CHANNELS_LAST or not isinstance(t, torch.Tensor) or t.dim() != 4:
        return t
    return t.contiguous(memory_format=torch.channels_last)


class LayoutTrial:
    """Picks the faster layout on a scan's own batches, measured in this process.

    Which layout wins depends on the model, the map sizes and the batch size (README,
    *Layout* and *Fewer moving parts*), so the first batch runs channels-last and the
    second contiguous, each timed per item, and every later batch runs in the faster.
    Nothing is computed twice: the price is at most one batch in the slower layout.
    A scan shorter than :data:`MIN_BATCHES` batches runs contiguous, as a plain loop
    does; a unit that never reports its time (retried smaller after running out of
    memory) ends the trial in contiguous. An outcome measured while other work competed
    for the CPU (:mod:`.contention`) serves this scan only.

    >>> trial = LayoutTrial(batches=10)
    >>> trial.next()
    ('channels_last', 0)
    >>> trial.record(0, 1.0, 16)
    >>> trial.next()
    ('contiguous', 1)
    >>> trial.record(1, 2.0, 16)
    >>> trial.chosen, trial.next()
    ('channels_last', ('channels_last', None))
    """

    MIN_BATCHES = 3
    TRIED = (CHANNELS_LAST, CONTIGUOUS)

    def __init__(self, batches: int, kept: Optional["Kept"] = None):
        self.seconds = {}                          # layout -> seconds per item
        self.kept = kept
        known = kept.layout if kept is not None else None
        self.chosen = known or (None if batches >= self.MIN_BATCHES else CONTIGUOUS)
        self.unit = 0                              # the next of TRIED to run
        self.meter = None                          # CPU share over the trial (on CPU)

    def next(self) -> tuple:
        """``(layout, unit)`` to run the next batch in: a trial unit, or the chosen layout
        (unit None)."""
        if self.chosen is None and len(self.seconds) < self.unit:   # a unit was retried
            self.chosen = CONTIGUOUS
        if self.chosen is not None:
            return self.chosen, None
        unit, self.unit = self.unit, self.unit + 1
        return self.TRIED[unit], unit

    def record(self, unit: Optional[int], seconds: float, count: int) -> None:
        """The batch of trial unit ``unit`` took ``seconds`` for ``count`` items; the last
        unit decides."""
        if unit is None or self.chosen is not None:
            return
        self.seconds[self.TRIED[unit]] = seconds / max(count, 1)
        if len(self.seconds) == len(self.TRIED):
            self.chosen = min(self.TRIED, key=self.seconds.get)
            if self.kept is not None and not contention.ran_contended(self.meter):
                self.kept.keep(self.chosen, dict(self.seconds))

    def batches(self, device: torch.device, run: Callable) -> Callable:
        """``logits_of(items)`` for :func:`~kql.operators.batches.scan`: each batch run as
        ``run(items, layout)`` in the layout the trial gives it, its trial batches timed
        (synchronised on CUDA, which returns at once)."""
        def logits_of(items: slice):
            layout, unit = self.next()
            if unit == 0 and device.type == "cpu":
                self.meter = contention.CpuMeter(torch.get_num_threads()).start()
            start = time.perf_counter()
            logits = run(items, layout)
            if unit is not None:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                self.record(unit, time.perf_counter() - start, items.stop - items.start)
            return logits
        return logits_of


class Kept:
    """Where a trial's outcome is kept for the later scans of the same shape (same model,
    image size, batch, threads, device and plan): ``store[key]``, a store the connection's
    plan cache owns. Looked up when a scan starts, so the images of a many-image query
    after the first, or a query run again, skip the trial (and give the same bits).

    ``lasting``, when given, keeps outcomes beyond the connection (the planner's
    :class:`~kql.planner.layout_file.LastingLayouts` bound to this shape's key: ``get()`` and
    ``keep(layout, seconds)``, which writes only clear outcomes): read when the connection
    has none, so the first query of a new process skips a trial an earlier one ran.

    >>> kept = Kept({}, ("net", 16))
    >>> trial = LayoutTrial(batches=10, kept=kept)
    >>> trial.record(trial.next()[1], 2.0, 16); trial.record(trial.next()[1], 1.0, 16)
    >>> kept.layout, LayoutTrial(batches=10, kept=kept).next()
    ('contiguous', ('contiguous', None))
    """

    def __init__(self, store: MutableMapping, key: Hashable, lasting=None):
        self.store, self.key, self.lasting = store, key, lasting
        self.from_lasting = False       # found in the lasting store, not the connection's
        if key not in store and lasting is not None:
            found = lasting.get()
            if found in LAYOUTS:
                store[key], self.from_lasting = found, True
        self.found = store.get(key)        # when the plan was made (what EXPLAIN shows)

    @property
    def layout(self) -> Optional[str]:
        return self.store.get(self.key)

    def keep(self, layout: str, seconds: Optional[dict] = None) -> None:
        """Keep the trial's pick ``layout``, measured as ``seconds`` (layout -> seconds per
        item), in the connection and, where the lasting store takes it, beyond."""
        self.store[self.key] = layout
        if self.lasting is not None and seconds:
            self.lasting.keep(layout, seconds)
