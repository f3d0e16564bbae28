"""Query results: heat maps with their metadata, tables for SHOW, messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class Result:
    """What one statement returned.

    ``kind`` is ``occlude``, ``explain``, ``load``, ``show`` or ``set``. For ``occlude``,
    ``heatmap[i, j]`` is the probability of ``target`` with the patch at map cell (i, j).
    """

    kind: str
    query: str
    message: str = ""
    rows: list = field(default_factory=list)
    heatmap: Optional[np.ndarray] = None          # float32 [rows, cols]
    logits: Optional[np.ndarray] = None           # float32 [rows, cols]: the target's logit
    target: Optional[int] = None
    label: Optional[str] = None
    probability: Optional[float] = None           # of the target, on the unoccluded image
    plan: str = ""                                # EXPLAIN text of the plan that ran
    model: str = ""
    image_label: str = ""
    image: object = None                          # torch [3, H, W] the model saw (resized)
    patch: tuple = (0, 0)
    stride: tuple = (0, 0)
    offset: tuple = (0, 0)                        # grid index of heatmap[0, 0]
    seconds: float = 0.0
    into: Optional[str] = None
    tau: float = 1.0                              # projective-field threshold (1: exact)
    predicted_ssim: Optional[float] = None        # the planner's bound on SSIM vs the exact map
    tuning: str = ""                              # where tau came from ('tuned on N images', 'user', ...)

    def to_arrow(self):
        """One table row: the query, model, target, map shape and the map itself."""
        import pyarrow as pa

        if self.kind != "occlude":
            return pa.Table.from_pylist(self.rows) if self.rows else pa.table({"message": [self.message]})
        rows, cols = self.heatmap.shape
        return pa.table({
            "query": [self.query], "model": [self.model], "image": [self.image_label],
            "target": pa.array([self.target], pa.int32()), "label": [self.label],
            "probability": pa.array([self.probability], pa.float32()),
            "rows": pa.array([rows], pa.int32()), "cols": pa.array([cols], pa.int32()),
            "patch_h": pa.array([self.patch[0]], pa.int32()), "patch_w": pa.array([self.patch[1]], pa.int32()),
            "stride_y": pa.array([self.stride[0]], pa.int32()), "stride_x": pa.array([self.stride[1]], pa.int32()),
            "row_offset": pa.array([self.offset[0]], pa.int32()),
            "col_offset": pa.array([self.offset[1]], pa.int32()),
            "heatmap": pa.array([self.heatmap.tolist()], pa.list_(pa.list_(pa.float32()))),
        })

    def save(self, path: str) -> str:
        """Write the heat map to ``path`` (.png overlay, .npy array or .parquet row)."""
        from .errors import KqlExecutionError
        from .output import save

        if self.kind != "occlude":
            raise KqlExecutionError("only an OCCLUDE result has a heat map to save")
        return save(self, path)

    def render(self) -> str:
        """Text for the shell and the CLI."""
        if self.kind in ("explain",):
            return self.plan
        if self.kind == "show":
            return _table(self.rows) if self.rows else "(none)"
        if self.kind == "occlude":
            rows, cols = self.heatmap.shape
            lo, hi = float(self.heatmap.min()), float(self.heatmap.max())
            text = (f"heat map {rows}x{cols} for class {self.target} '{self.label}' "
                    f"(p={self.probability:.4f} unoccluded; map {lo:.4f} .. {hi:.4f}) "
                    f"in {self.seconds:.2f}s")
            return text + (f"\nwritten to {self.into}" if self.into else "")
        return self.message

    def __repr__(self) -> str:
        return f"<kql.Result {self.kind}: {self.render().splitlines()[0] if self.render() else ''}>"


def _table(rows: list) -> str:
    cols = list(rows[0])
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])
