"""Query results: heat maps with their metadata, tables for SHOW, messages."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..operators.batches import went_on_at


@dataclass
class Result:
    """What one statement returned.

    ``kind`` is ``occlude``, ``explain``, ``load``, ``show`` or ``set``. For ``occlude``,
    ``heatmap[i, j]`` is the score of ``target`` (its probability, unless OUTPUT logits)
    with the patch at map cell (i, j), and :attr:`drop` how far it fell there. With
    several targets, ``heatmaps[k]`` is the map of ``targets[k]`` (``heatmap`` the first).
    :meth:`box` gives a cell's patch in the original image's pixels.
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
    check: Optional[dict] = None                  # a verified drill-down's check: step, bound, windows, cells, exact
    heatmaps: Optional[np.ndarray] = None         # float32 [targets, rows, cols]
    targets: list = field(default_factory=list)   # class of each map
    labels: list = field(default_factory=list)
    base_scores: list = field(default_factory=list)     # each target's unoccluded score
    output: str = "softmax"                       # how outputs became scores (OUTPUT)
    output_note: str = ""                         # why it was detected, when it was
    frame: object = None                          # kql.planner.frame.Frame: original <-> model pixels
    original: object = None                       # torch [C, H, W] as the user gave it
    image_info: dict = field(default_factory=dict)  # an image file's header (DICOM: pixel_spacing, window, ...)
    halved: tuple = ()                            # batch sizes that ran out of memory (then halved)
    exactness: str = ""                           # EXPLAIN's words: 'exact' or 'approximate: ...'

    @property
    def drop(self) -> Optional[np.ndarray]:
        """``[rows, cols]``: the unoccluded score minus the occluded one (large: important)."""
        return None if self.heatmap is None else self.probability - self.heatmap

    @property
    def drops(self) -> Optional[np.ndarray]:
        """``[targets, rows, cols]``: :attr:`drop` of every target."""
        if self.heatmaps is None:
            return None
        base = np.asarray(self.base_scores, np.float32)
        return base.reshape(-1, *(1,) * (self.heatmaps.ndim - 1)) - self.heatmaps

    @property
    def attributions(self) -> Optional[np.ndarray]:
        """float32 ``[targets, H, W]`` at the model's input (:attr:`image`, the image's own
        size unless the model resizes it), in Captum's convention: each pixel the mean of
        :attr:`drops` over the cells whose patch covers it (``OUTPUT logits`` on a grid
        Captum's ``Occlusion`` also slides gives its map); NaN where no patch covers it
        (a stride larger than the patch, the border a stride leaves, outside REGION)."""
        if self.heatmaps is None or self.image is None or self.volume:
            return None                         # a volume's: voxel_drop of .volume_overlay
        from .attribution import window_mean

        drops = self.drops
        (rows, cols), (sy, sx), (r0, c0) = drops.shape[1:], self.stride, self.offset
        ys, xs = np.meshgrid((r0 + np.arange(rows)) * sy, (c0 + np.arange(cols)) * sx, indexing="ij")
        mean = window_mean(drops.reshape(len(drops), -1), ys.ravel(), xs.ravel(), self.patch,
                           tuple(self.image.shape[-2:]))
        return mean.numpy().astype(np.float32)

    @property
    def attribution(self) -> Optional[np.ndarray]:
        """``[H, W]``: :attr:`attributions` of the first target."""
        maps = self.attributions
        return None if maps is None else maps[0]

    @property
    def volume(self) -> bool:
        """Whether the map is a volume's ``[slices, rows, cols]``."""
        return self.heatmap is not None and self.heatmap.ndim == 3

    def box(self, row: int, col: int) -> tuple:
        """``(x, y, w, h)`` of map cell (row, col)'s patch in the original image's pixels
        (floats: the model's pixels scaled back)."""
        (ph, pw), (sy, sx), (r0, c0) = self.patch, self.stride, self.offset
        y, x = (r0 + row) * sy, (c0 + col) * sx
        if self.frame is None:
            return float(x), float(y), float(pw), float(ph)
        top, left = self.frame.to_original(y, x)
        bottom, right = self.frame.to_original(y + ph, x + pw)
        return left, top, right - left, bottom - top

    def to_arrow(self):
        """One table row per target: the query, model, target, map geometry (the first
        cell's patch in the original image's pixels too) and the map itself."""
        import pyarrow as pa

        if self.kind != "occlude":
            return pa.Table.from_pylist(self.rows) if self.rows else pa.table({"message": [self.message]})
        maps = self.heatmaps if self.heatmaps is not None else self.heatmap[None]
        targets = self.targets or [self.target]
        labels = self.labels or [self.label]
        scores = self.base_scores or [self.probability]
        if self.volume:
            return self._volume_arrow(maps, targets, labels, scores)
        count, (rows, cols) = len(maps), maps.shape[1:]
        x, y, w, h = self.box(0, 0)
        each = lambda value, kind=None: pa.array([value] * count, kind)
        return pa.table({
            "query": each(self.query), "model": each(self.model), "image": each(self.image_label),
            "target": pa.array(targets, pa.int32()), "label": pa.array(labels),
            "probability": pa.array(scores, pa.float32()), "output": each(self.output),
            "rows": each(rows, pa.int32()), "cols": each(cols, pa.int32()),
            "patch_h": each(self.patch[0], pa.int32()), "patch_w": each(self.patch[1], pa.int32()),
            "stride_y": each(self.stride[0], pa.int32()), "stride_x": each(self.stride[1], pa.int32()),
            "row_offset": each(self.offset[0], pa.int32()),
            "col_offset": each(self.offset[1], pa.int32()),
            "first_patch_x": each(x, pa.float32()), "first_patch_y": each(y, pa.float32()),
            "first_patch_w": each(w, pa.float32()), "first_patch_h": each(h, pa.float32()),
            "heatmap": pa.array([m.tolist() for m in maps], pa.list_(pa.list_(pa.float32()))),
        })

    def _volume_arrow(self, maps, targets, labels, scores):
        """A volume's row per target: the geometry per axis (slices, rows, cols) and the
        map as nested lists."""
        import pyarrow as pa

        count = len(maps)
        each = lambda value, kind=None: pa.array([value] * count, kind)
        axes = {f"{name}_{axis}": each(int(v), pa.int32()) for name, values in
                (("size", maps.shape[1:]), ("patch", self.patch), ("stride", self.stride),
                 ("offset", self.offset)) for axis, v in zip("dhw", values)}
        return pa.table({
            "query": each(self.query), "model": each(self.model), "image": each(self.image_label),
            "target": pa.array(targets, pa.int32()), "label": pa.array(labels),
            "probability": pa.array(scores, pa.float32()), "output": each(self.output), **axes,
            "heatmap": pa.array([m.tolist() for m in maps], pa.list_(pa.list_(pa.list_(pa.float32())))),
        })

    def save(self, path: str, **overlay_options) -> str:
        """Write the heat map to ``path`` (.png overlay, .npy array, .parquet row; a
        volume's also .nii or .nii.gz over the scan);
        ``overlay_options`` draw the PNG (:mod:`kql.results.overlay`: ``scale='absolute'``, ...)."""
        from ..errors import KqlExecutionError
        from .output import save

        if self.kind != "occlude":
            raise KqlExecutionError("only an OCCLUDE result has a heat map to save")
        return save(self, path, **overlay_options)

    def render(self) -> str:
        """Text for the shell and the CLI."""
        if self.kind in ("explain",):
            return self.plan
        if self.kind == "show":
            return _table(self.rows) if self.rows else "(none)"
        if self.kind == "occlude":
            shape = "x".join(str(v) for v in self.heatmap.shape)
            maps = self.heatmaps if self.heatmaps is not None else self.heatmap[None]
            targets = self.targets or [self.target]
            labels = self.labels or [self.label]
            scores = self.base_scores or [self.probability]
            what = "p" if self.output != "logits" else "logit"
            lines = [f"{'heat map' if len(maps) == 1 else f'{len(maps)} heat maps'} {shape} "
                     f"in {self.seconds:.2f}s"]
            for target, label, score, values in zip(targets, labels, scores, maps):
                lines.append(f"  class {target} '{label}': {what}={score:.4f} unoccluded; "
                             f"map {float(values.min()):.4f} .. {float(values.max()):.4f}")
            if len(maps) == 1:
                lines = [f"heat map {shape} for class {self.target} '{self.label}' "
                         f"({what}={self.probability:.4f} unoccluded; map "
                         f"{float(self.heatmap.min()):.4f} .. {float(self.heatmap.max()):.4f}) "
                         f"in {self.seconds:.2f}s"]
            quality = self.quality()
            text = "\n".join(lines + ([quality] if quality else []) + ([halved_note(self.halved)]
                                                                       if self.halved else []))
            return text + (f"\nwritten to {self.into}" if self.into else "")
        return self.message

    def quality(self) -> str:
        """One line on how exact an OCCLUDE map is; empty for an exact map nobody asked about."""
        c = self.check
        if c is not None:
            if c["exact"]:
                return (f"exact: interpolation could not be checked to SSIM >= {c['target']:g} "
                        f"(tried lattices {', '.join(c['tried'])}), so every cell was computed")
            return (f"approximate: SSIM >= {c['bound']:.3f} against the exact map, measured on "
                    f"{c['windows']} windows of this map (target {c['target']:g}); "
                    f"{c['cells']} of {c['of']} cells computed, lattice {c['lattice']}")
        if self.tau < 1.0:
            bound = "unknown" if self.predicted_ssim is None else f">= {self.predicted_ssim:.3f}"
            return f"approximate: tau {self.tau:.2f}, predicted SSIM {bound} ({self.tuning})"
        return self.exactness if self.exactness.startswith("approximate") else ""   # drill-down, gates

    def __repr__(self) -> str:
        return f"<kql.Result {self.kind}: {self.render().splitlines()[0] if self.render() else ''}>"

    # -- notebooks (Jupyter calls these to show a result) ------------------------------------

    def _repr_png_(self) -> Optional[bytes]:
        """The overlay of an OCCLUDE result as PNG bytes (default options); None otherwise."""
        if self.kind != "occlude":
            return None
        if self.volume:
            from .volume_overlay import result_png

            return result_png(self)
        from .overlay import png_bytes

        return png_bytes(self)

    def _repr_html_(self) -> str:
        """OCCLUDE: the overlay and a summary table; SHOW: a table; else the text in <pre>."""
        if self.kind == "occlude":
            import base64

            picture = base64.b64encode(self._repr_png_()).decode("ascii")
            return (f'<div><img src="data:image/png;base64,{picture}" style="max-width:100%" '
                    f'alt="heat map"/>{_html_fields(self._summary())}'
                    f'{_html_table(self._target_rows())}</div>')
        if self.kind == "show":
            return _html_table(self.rows) if self.rows else "<pre>(none)</pre>"
        return f"<pre>{html.escape(self.render())}</pre>"

    def _summary(self) -> dict:
        """The run of an OCCLUDE result, for :meth:`_repr_html_`."""
        rows, cols = self.heatmap.shape
        return {"model": self.model, "image": self.image_label,
                "map": f"{rows}x{cols} (patch {self.patch[0]}x{self.patch[1]}, "
                       f"stride {self.stride[0]}x{self.stride[1]})",
                "seconds": f"{self.seconds:.2f}",
                "plan": _plan_line(self.plan)}

    def _target_rows(self) -> list:
        """One row per target: its score, the map's range and the cell of the largest drop
        with that patch's box in the original image's pixels."""
        from .overlay import strongest

        maps = self.heatmaps if self.heatmaps is not None else self.heatmap[None]
        what = "logit" if self.output == "logits" else "p"
        rows = []
        for k, (target, label, score) in enumerate(zip(self.targets or [self.target],
                                                       self.labels or [self.label],
                                                       self.base_scores or [self.probability])):
            row, col, drop = strongest(self, k)
            x, y, w, h = self.box(row, col)
            rows.append({"target": target, "label": label, f"unoccluded {what}": f"{score:.4f}",
                         "min .. max": f"{float(maps[k].min()):.4f} .. {float(maps[k].max()):.4f}",
                         "largest drop": f"{drop:.4f} at cell ({row}, {col})",
                         "its patch (x, y, w, h) px": f"({x:.0f}, {y:.0f}, {w:.0f}, {h:.0f})"})
        return rows


def halved_note(halved: tuple) -> str:
    """The shell's line for a scan that ran out of memory and went on at smaller batches.

    >>> halved_note((32, 16))
    'out of memory at batch 32, then 16: went on at batch 8 (every position computed)'
    """
    sizes = ", then ".join(str(b) for b in halved)
    return f"out of memory at batch {sizes}: went on at batch {went_on_at(halved)} (every position computed)"


def _html_table(rows: list) -> str:
    """``rows`` (dicts with the same keys) as an HTML table, every cell escaped.

    >>> _html_table([{"a<": "x&y"}])
    '<table><tr><th>a&lt;</th></tr><tr><td>x&amp;y</td></tr></table>'
    """
    cell = lambda tag, value: f"<{tag}>{html.escape('' if value is None else str(value))}</{tag}>"
    head = "".join(cell("th", c) for c in rows[0])
    body = "".join("<tr>" + "".join(cell("td", r.get(c)) for c in rows[0]) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _plan_line(plan: str) -> str:
    """The plan in one line: its ``Summary:`` line where EXPLAIN has one, else its first.

    >>> _plan_line("HeatMap: shape=5x6\\n  Image: size=24x30"), _plan_line("")
    ('HeatMap: shape=5x6', '')
    """
    lines = [line.strip() for line in plan.splitlines()]
    return next((line for line in lines if line.startswith("Summary:")), lines[0] if lines else "")


def _html_fields(fields: dict) -> str:
    """``fields`` as a two-column HTML table (names, values), escaped.

    >>> _html_fields({"model": "<net>"})
    '<table><tr><th>model</th><td>&lt;net&gt;</td></tr></table>'
    """
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in fields.items())
    return f"<table>{body}</table>"


def _table(rows: list) -> str:
    cols = list(rows[0])
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])
