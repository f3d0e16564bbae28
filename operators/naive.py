"""The naive operator: one full CNN inference per patch position, in batches.

It stays in the product as the baseline every other operator is measured and checked
against (seed paper 000, section 3.1, equations 1-6).
"""

from __future__ import annotations

import numpy as np
import torch

from .task import OcclusionResult, OcclusionTask, Progress, check_logits, occlude, target_scores


class NaiveOcclusion:
    name = "NaiveOcclusion"

    def __init__(self, batch_size: int = 16):
        self.batch_size = max(1, int(batch_size))

    @torch.inference_mode()
    def run(self, task: OcclusionTask, progress: Progress = None) -> OcclusionResult:
        device = torch.device(task.device)
        model = task.model.to(device).eval()
        image = task.image.to(device)
        color = task.color.to(device, image.dtype)
        base_logits = check_logits(model(image.unsqueeze(0)))[0].float()
        target = int(base_logits.argmax()) if task.target is None else int(task.target)
        if not 0 <= target < base_logits.numel():
            raise IndexError(f"target class {target} is out of range: the model has "
                             f"{base_logits.numel()} classes (0..{base_logits.numel() - 1})")
        probs, logits = [], []
        for start in range(0, task.count, self.batch_size):
            stop = min(start + self.batch_size, task.count)
            batch = occlude(image, color, task.ys[start:stop], task.xs[start:stop], task.patch)
            p, lg = target_scores(check_logits(model(batch)), target)
            probs.append(p)          # stays on the device: no synchronisation per batch
            logits.append(lg)
            if progress is not None:
                progress(stop, task.count)
        base_p = float(torch.softmax(base_logits, 0)[target])
        return OcclusionResult(torch.cat(probs).cpu().numpy(), torch.cat(logits).cpu().numpy(),
                               target, base_p, base_logits.cpu().numpy())

