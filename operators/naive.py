"""The naive operator: one full CNN inference per patch position, in batches.

It stays in the product as the baseline every other operator is measured and checked
against (seed paper 000, section 3.1, equations 1-6).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import numpy as np
import torch

from .batches import occlude, scan
from .gather import project
from .layout import ADAPTIVE, CONTIGUOUS, Kept, LayoutTrial, in_layout, known_layout
from .protocol import Operator
from .task import OcclusionResult, OcclusionTask, Progress
from .user_model import check_logits, in_eval_mode, on_device


class NaiveOcclusion(Operator):
    name = "NaiveOcclusion"
    plain_loop = True
    learns_layout = True

    def __init__(self, batch_size: int = 16, base_logits: Optional[torch.Tensor] = None,
                 layout: str = CONTIGUOUS, kept: Optional[Kept] = None):
        self.batch_size = max(1, int(batch_size))
        self.base_logits = base_logits     # the unoccluded logits, when planning ran the model
        self.layout = layout               # memory layout of the occluded batches
        self.kept = kept                   # where an adaptive layout's trial is kept

    def exact(self) -> "NaiveOcclusion":
        return self

    def at(self, *corners) -> "NaiveOcclusion":
        return self                        # positions come with the task

    def rebind(self, profile) -> "NaiveOcclusion":
        """The same operator for another image (``profile``: its profile, or None)."""
        logits = profile.base_logits if profile is not None else None
        return NaiveOcclusion(self.batch_size, logits, self.layout, self.kept)

    def in_layout(self, layout: str) -> "NaiveOcclusion":
        """``layout``, or for 'auto' the faster one on the first batches (:class:`LayoutTrial`)."""
        return NaiveOcclusion(self.batch_size, self.base_logits, ADAPTIVE if layout == "auto" else layout)

    def remembering(self, kept: Kept) -> "NaiveOcclusion":
        """The same operator, its layout trial kept in (and read from) ``kept``."""
        return NaiveOcclusion(self.batch_size, self.base_logits, self.layout, kept)

    def describe(self) -> dict:
        """This operator's own EXPLAIN items: only a layout other than torch's default (an
        adaptive one's kept outcome, when an earlier scan's trial found it)."""
        layout = known_layout(self.layout, self.kept)
        return {"layout": layout} if layout != CONTIGUOUS else {}

    @torch.inference_mode()
    def run(self, task: OcclusionTask, progress: Progress = None, timings=None) -> OcclusionResult:
        device = torch.device(task.device)
        model = in_eval_mode(on_device(task.model, device))
        image = task.image.to(device)
        color = task.color.to(device, image.dtype)
        if self.base_logits is not None:
            base_logits = self.base_logits.to(device)
        else:
            base_logits = check_logits(model(image.unsqueeze(0)))[0].float()
        # The corners go to the device once; every batch is painted there (no host copy).
        corners = tuple(torch.as_tensor(np.asarray(v, np.int64), device=device) for v in task.corners)

        trial = (LayoutTrial(-(-task.count // self.batch_size), self.kept)
                 if self.layout == ADAPTIVE else None)

        def run_in(items, layout):
            at = tuple(c[items] for c in corners)
            if task.fill is None:
                batch = occlude(image, color, at, task.patch)
            else:                              # each patch its own content
                batch = project(image.unsqueeze(0), task.fill(*at).to(device, image.dtype), at)
            return check_logits(model(in_layout(batch, layout)))
        logits_of = (trial.batches(device, run_in) if trial is not None
                     else lambda items: run_in(items, self.layout))
        with autotuned(device):
            return scan(task, base_logits, self.batch_size, logits_of, progress)


@contextlib.contextmanager
def autotuned(device: torch.device):
    """On CUDA, cuDNN picks each convolution's fastest algorithm for the scan's batch shape
    (every batch but the last has the same one); the setting is restored afterwards."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
