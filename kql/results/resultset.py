"""The result table of a many-image query: one row per image, one schema.

:data:`SCHEMA` is the table's stable Arrow schema (what ``INTO 'x.parquet'`` writes and
:meth:`ResultSet.to_arrow` returns); DuckDB, polars and pandas read it without KQL:

================  ==========================  ==============================================
column            type                        meaning
================  ==========================  ==============================================
path              string                      the image file (or catalog name)
height, width     int32                       the image's size as given (original pixels)
target            int32                       the class mapped (null: the image failed)
label             string                      its label
probability       float32                     its unoccluded score (a probability unless
                                              OUTPUT logits)
rows, cols        int32                       the heat map's shape
heatmap           list<list<float32>>         the map, row by row
drop              float32                     the largest drop: unoccluded minus the map
drop_x, drop_y,   float32                     that cell's patch in the original pixels
drop_w, drop_h
ssim              float32                     the SSIM against the exact map the map keeps:
                                              1 for an exact map, a verified drill-down's
                                              measured bound, tau's tuned bound (null:
                                              unknown, e.g. a plain DRILLDOWN)
plan              string                      the operator that ran (EXPLAIN's line)
seconds           float32                     time spent on this image
error             string                      why the image failed (null: it did not)
depth             int32                       a volume's slices as given (null: an image);
                                              height and width are then its rows and columns
slices            int32                       a volume map's slices (rows, cols: per slice)
drop_z, drop_d    float32                     a volume's strongest cube: its first slice and
                                              depth (drop_x.. in voxels; null: an image)
volume_heatmap    list<list<list<float32>>>   a volume's map, slice by slice (heatmap is
                                              then null)
================  ==========================  ==============================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

COLUMNS = ("path", "height", "width", "target", "label", "probability", "rows", "cols",
           "heatmap", "drop", "drop_x", "drop_y", "drop_w", "drop_h", "ssim", "plan", "seconds",
           "error", "depth", "slices", "drop_z", "drop_d", "volume_heatmap")
# What WHERE and ORDER BY may name.
RANKABLE = ("probability", "drop", "seconds", "target", "path", "label", "height", "width",
            "ssim")


def schema():
    import pyarrow as pa

    i32, f32 = pa.int32(), pa.float32()
    types = {"path": pa.string(), "height": i32, "width": i32, "target": i32,
             "label": pa.string(), "probability": f32, "rows": i32, "cols": i32,
             "heatmap": pa.list_(pa.list_(f32)), "drop": f32, "drop_x": f32, "drop_y": f32,
             "drop_w": f32, "drop_h": f32, "ssim": f32, "plan": pa.string(), "seconds": f32,
             "error": pa.string(), "depth": i32, "slices": i32, "drop_z": f32, "drop_d": f32,
             "volume_heatmap": pa.list_(pa.list_(pa.list_(f32)))}
    return pa.schema([(name, types[name]) for name in COLUMNS])


def row_of(path: str, result, seconds: float) -> dict:
    """The table row of one image's :class:`~kql.results.result.Result` (its first target)."""
    if result.volume:
        return _volume_row(path, result, seconds)
    drop = result.drop
    i, j = np.unravel_index(int(np.argmax(drop)), drop.shape)
    x, y, w, h = result.box(int(i), int(j))
    height, width = (tuple(result.original.shape[1:]) if result.original is not None
                     else tuple(result.image.shape[1:]))
    operator = result.plan.splitlines()[1].strip() if result.plan.count("\n") else result.plan
    ssim = result.predicted_ssim
    if ssim is None and not result.quality():          # exact, and nobody asked
        ssim = 1.0
    return {"path": path, "height": int(height), "width": int(width), "target": int(result.target),
            "label": result.label, "probability": float(result.probability),
            "rows": int(drop.shape[0]), "cols": int(drop.shape[1]),
            "heatmap": result.heatmap.tolist(), "drop": float(drop[i, j]),
            "drop_x": float(x), "drop_y": float(y), "drop_w": float(w), "drop_h": float(h),
            "ssim": None if ssim is None else float(ssim), "plan": operator, "seconds": float(seconds), "error": None}


def _volume_row(path: str, result, seconds: float) -> dict:
    """A volume's row: its map slice by slice, the strongest cube in voxels."""
    drop = result.drop
    cell = np.unravel_index(int(np.argmax(drop)), drop.shape)
    z, y, x = ((o + int(c)) * s for o, c, s in zip(result.offset, cell, result.stride))
    d, h, w = result.patch
    depth, height, width = (tuple(result.original.shape[1:]) if result.original is not None
                            else tuple(result.image.shape[1:]))
    operator = result.plan.splitlines()[1].strip() if result.plan.count("\n") else result.plan
    row = dict.fromkeys(COLUMNS)
    row.update(path=path, height=int(height), width=int(width), depth=int(depth),
               target=int(result.target), label=result.label,
               probability=float(result.probability), slices=int(drop.shape[0]),
               rows=int(drop.shape[1]), cols=int(drop.shape[2]),
               volume_heatmap=result.heatmap.tolist(), drop=float(drop[cell]),
               drop_x=float(x), drop_y=float(y), drop_z=float(z), drop_w=float(w),
               drop_h=float(h), drop_d=float(d), ssim=1.0, plan=operator, seconds=float(seconds))
    return row


def error_row(path: str, message: str, seconds: float = 0.0) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(path=path, seconds=float(seconds), error=message)
    return row


def ranked(rows: list, where=None, order=None, limit: Optional[int] = None) -> list:
    """``rows`` filtered by ``where`` (column, op, value), sorted by ``order`` (column,
    descending) and cut to ``limit``; rows whose column is null (failed images) fail
    every WHERE and sort last.

    >>> rows = [{"path": "a", "drop": 0.1}, {"path": "b", "drop": 0.5}, {"path": "c", "drop": None}]
    >>> [r["path"] for r in ranked(rows, order=("drop", True))]
    ['b', 'a', 'c']
    >>> [r["path"] for r in ranked(rows, where=("drop", ">=", 0.2))]
    ['b']
    """
    import operator as op

    compare = {">=": op.ge, "<=": op.le, ">": op.gt, "<": op.lt}
    if where is not None:
        column, sign, value = where
        rows = [r for r in rows if r.get(column) is not None and compare[sign](r[column], value)]
    if order is not None:
        column, descending = order
        known = [r for r in rows if r.get(column) is not None]
        rows = sorted(known, key=lambda r: r[column], reverse=descending) + [
            r for r in rows if r.get(column) is None]
    return rows if limit is None else rows[:limit]


@dataclass
class ResultSet:
    """The rows of a many-image query, ranked as it asked; :meth:`to_arrow` gives them as
    a table of :func:`schema`."""

    query: str
    rows: list = field(default_factory=list)
    seconds: float = 0.0
    into: Optional[str] = None
    plan: str = ""
    skipped: int = 0                       # images whose rows came from an interrupted run
    kind: str = "occlude_many"

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def to_arrow(self):
        import pyarrow as pa

        return pa.Table.from_pylist(self.rows, schema=schema())

    def save(self, path: str) -> str:
        """Write the table to a .parquet file (atomically: a failure leaves nothing)."""
        from ..errors import KqlExecutionError
        from ..fileio import atomic_write

        if not path.lower().endswith(".parquet"):
            raise KqlExecutionError(f"cannot save a many-image result to '{path}': use a .parquet file")
        import pyarrow.parquet as pq

        table = self.to_arrow()
        try:
            atomic_write(path, lambda tmp: pq.write_table(table, tmp), mode=None, private=False)
        except OSError as exc:
            raise KqlExecutionError(f"cannot write '{path}': {exc.strerror or exc}") from None
        return path

    def render(self, width: int = 100) -> str:
        """A short table for the shell: path, label, probability, drop and where, status."""
        failed = sum(1 for r in self.rows if r["error"])
        head = (f"{len(self.rows)} images in {self.seconds:.2f}s"
                + (f" ({self.skipped} kept from an interrupted run)" if self.skipped else "")
                + (f", {failed} failed" if failed else ""))
        lines = [head]
        for r in self.rows[:20]:
            name = r["path"] if len(r["path"]) <= 40 else "..." + r["path"][-37:]
            if r["error"]:
                lines.append(f"  {name:<40}  error: {r['error']}"[:width])
                continue
            where = (f"({r['drop_x']:.0f}, {r['drop_y']:.0f}, {r['drop_w']:.0f}x{r['drop_h']:.0f})"
                     if r.get("depth") is None else
                     f"({r['drop_x']:.0f}, {r['drop_y']:.0f}, {r['drop_z']:.0f}, "
                     f"{r['drop_w']:.0f}x{r['drop_h']:.0f}x{r['drop_d']:.0f})")
            lines.append(f"  {name:<40}  {r['label'][:20]:<20}  p={r['probability']:.4f}  "
                         f"drop={r['drop']:.4f} at {where}"[:width])
        if len(self.rows) > 20:
            lines.append(f"  ... {len(self.rows) - 20} more")
        if self.into:
            lines.append(f"written to {self.into}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<kql.ResultSet: {self.render().splitlines()[0]}>"
