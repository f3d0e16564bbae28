"""EXPLAIN text: one operator per line, ``Name: key=value, ...``, in a fixed order.

Predicted GFLOPs (2 x multiply-adds), gathered megabytes and milliseconds are totals over
the whole query. Point-wise nodes are folded into the line of the node that feeds them,
and runs of nodes computed at full size after the crossover share one ``Full`` line.
A BATCH lowered to fit ``memory_limit`` shows the one asked for:
``batch=12 (BATCH 100000 lowered to fit memory_limit 5.8 GB)``.
With ``actual`` (EXPLAIN ANALYZE), each line also shows the measured time and the
predicted/actual ratio. A prediction that earlier scans corrected says by how much and
from how many scans (``corrected=x1.80 (3 scans)``; per-node lines stay the cost model's),
one from a calibration measured under load says ``calibration=untrusted``.

The last line sums the plan up in words (:func:`summary`): ``Summary: IncrementalOcclusion
on cpu, 169 positions in 11 batches, predicted 1.23 s (naive 2.5 s), exact``. It comes
last so that the lines above keep their places (line 0 the HeatMap, line 1 the operator).
"""

from __future__ import annotations

from typing import Optional

from kql.operators.batches import went_on_at


def _line(name: str, **items) -> str:
    return f"{name}: " + ", ".join(f"{k}={v}" for k, v in items.items() if v is not None)


def _num(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def render(plan, actual: Optional[dict] = None) -> list[str]:
    q = plan.query
    lines = [_line("HeatMap", target=_targets(q), shape=_sizes(q.grid.shape), positions=q.grid.count,
                   into=q.into or "none", output=_output(q))]
    lines.append("  " + _operator_line(plan, actual))
    labels = ("StageOne", "StageTwo") if len(plan.stages) == 2 else ("Cells",)
    for label, stage in zip(labels, plan.stages):     # drill-down; a verified one's cells
        lines.append(f"    {label} " + _operator_line(stage, None))
    if plan.cost is not None:
        lines += ["    " + text for text in _node_lines(plan, actual)]
    lines.append("    " + _line("Volume" if q.grid.depth is not None else "Image",
                                 source=q.image_label, size=_sizes(q.image.shape[1:]),
                                 patch=_sizes(q.grid.patch), stride=_sizes(q.grid.stride),
                                 region=(str(tuple(q.grid.region)) if q.grid.region else "none"),
                                 spacing=_spacing(q.image_info) if q.grid.depth is not None else None,
                                 color=q.color_label, resize=_resize(q),
                                 channels="; ".join(q.notes) or None))
    lines.append(summary(plan, actual))
    return lines


def _sizes(values) -> str:
    """``16x16``, a volume's ``8x16x16``."""
    return "x".join(str(int(v)) for v in values)


def _spacing(info: dict) -> Optional[str]:
    """A volume's voxel size (mm, its file's or affine's), when known."""
    spacing = info.get("spacing")
    return "x".join(f"{float(v):g}" for v in spacing) + " mm" if spacing else None


def summary(plan, actual: Optional[dict] = None) -> str:
    """One line in words: operator, device, work, predicted (and actual) time, exactness."""
    q = plan.query
    n = plan.batches
    parts = [f"{plan.operator.name} on {plan.device}",
             f"{q.grid.count} positions in {n} batch{'es' if n != 1 else ''}"]
    count = q.top or len(q.targets)
    if count > 1:
        parts.append(f"{count} targets")
    if plan.predicted_seconds is None:
        parts.append("no time predicted")
    else:
        naive = (f" (naive {_seconds(plan.naive_predicted_seconds)} s)"
                 if plan.naive_seconds and not plan.operator.plain_loop else "")
        parts.append(f"predicted {_seconds(plan.predicted_seconds)} s{naive}")
    if actual is not None:
        parts.append(f"actual {_seconds(actual['total'])} s")
    parts.append(exactness(plan, actual))
    return "Summary: " + ", ".join(parts)


def _seconds(value: float) -> str:
    """Two decimals, three below 1 s, none from 100 s.

    >>> _seconds(1.0), _seconds(0.012345), _seconds(1234.5)
    ('1.00', '0.012', '1234')
    """
    return f"{value:.0f}" if value >= 100 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def exactness(plan, actual: Optional[dict] = None) -> str:
    """``exact``, or how the map is approximated and how close it is predicted to be."""
    how = plan.operator.approximation()
    if how is None:
        return "exact"
    text = f"approximate: {how.text}"
    check = (actual or {}).get("check")
    if how.kind == "verified" and check is not None:
        text += (", check failed at every lattice: exact map" if check["exact"] else
                 f", measured SSIM >= {check['bound']:.3f} on lattice {check['lattice']}")
    elif how.kind == "tau":
        ssim = plan.approximation.predicted_ssim if plan.approximation is not None else None
        text += ", predicted SSIM " + (_num(ssim, 3) if ssim is not None else "unknown")
    if actual is not None and "ssim" in actual:
        text += (f", achieved SSIM {actual['ssim']:.3f}, Spearman {actual['spearman']:.3f}, "
                 f"top-10% IoU {actual['top10_iou']:.2f}")
    return text


def _targets(q) -> str:
    """As written, with the classes it came to when the planner settled them:
    ``predicted``, ``3``, ``(3, predicted=285)``, ``top 3 (285, 281, 282)``."""
    if q.top is not None:
        chosen = " ({})".format(", ".join(map(str, q.resolved))) if q.resolved else ""
        return f"top {q.top}{chosen}"
    if len(q.targets) <= 1:
        return "predicted" if q.target is None else str(q.target)
    written = [str(t) if t is not None else "predicted" for t in q.targets]
    if q.resolved:
        written = [w if w != "predicted" else f"predicted={r}" for w, r in zip(written, q.resolved)]
    return "(" + ", ".join(written) + ")"


def _output(q) -> Optional[str]:
    """The output scoring when it is not the plain softmax of a classifier's logits."""
    if q.output in (None, "softmax") and not q.output_note:
        return None
    return f"{q.output} ({q.output_note})" if q.output_note else q.output


def _resize(q) -> Optional[str]:
    return q.frame.describe() if q.frame is not None else None


def _operator_line(plan, actual) -> str:
    q = plan.query
    batch = f"{plan.batch} ({plan.batch_note})" if plan.batch_note else plan.batch
    items = {"model": q.model.name, "input": getattr(q.model.module, "input_layout", None),
             "device": plan.device, "threads": plan.threads, "batch": batch}
    items.update(plan.operator.describe())
    cost = plan.cost
    if cost is not None:
        n = plan.batches
        items["R"] = _num(plan.ratio) if plan.ratio else None
        items["gflops"] = _num(2 * cost.macs * n / 1e9, 3)
        if cost.gather_bytes is not None:
            items["gather_mb"] = _num(cost.gather_bytes * n / 2**20, 1)
        items["memory_mb"] = _num(plan.memory_bytes / 2**20, 0)
    if plan.cached:
        items["cache"] = "+".join(plan.cached)
    if plan.predicted_seconds is not None:
        items["planning_s"] = _num(plan.planning_seconds, 3)
        items["predicted_s"] = _num(plan.predicted_seconds, 3)
        if plan.naive_seconds:
            items["naive_predicted_s"] = _num(plan.naive_predicted_seconds, 3)
        items["corrected"] = plan.correction.describe()       # by earlier scans (feedback)
    if not plan.trusted:
        items["calibration"] = "untrusted"
    items.update(_approximation_items(plan, actual))
    if plan.reason:
        items["reason"] = plan.reason
    if actual is not None:
        items["actual_s"] = _num(actual["total"], 3)
        if plan.predicted_seconds is not None and actual["total"] > 0:
            items["predicted/actual"] = _num(plan.predicted_seconds / actual["total"])
        if actual.get("halved"):            # out of memory: the scan went on at smaller batches
            sizes = actual["halved"]
            items["batch_halved"] = "->".join(str(b) for b in sizes + (went_on_at(sizes),))
    return _line(plan.operator.name, **items)


def _approximation_items(plan, actual) -> dict:
    """The quality target, the threshold's predicted SSIM and speedup, where it came from."""
    choice, items = plan.approximation, {}
    if choice is not None:
        items["ssim_target"] = _num(plan.query.ssim) if plan.query.ssim is not None else None
        how = plan.operator.approximation()
        if how is None or how.kind != "tau":                 # the operator shows its own
            items["tau"] = _num(choice.tau)
        items["predicted_ssim"] = _num(choice.predicted_ssim, 3) if choice.predicted_ssim is not None else "unknown"
        if plan.exact_seconds and plan.predicted_seconds is not None:
            exact = plan.planning_seconds + plan.exact_seconds
            items["predicted_speedup"] = _num(exact / plan.predicted_seconds)
    check = (actual or {}).get("check")
    if check is not None:
        items["measured_ssim"] = "exact" if check["exact"] else _num(check["bound"], 3)
        items["cells"] = f"{check['cells']}/{plan.query.grid.count}"
    if actual is not None and "ssim" in actual:
        items["achieved_ssim"] = _num(actual["ssim"], 3)
        items["achieved_spearman"] = _num(actual["spearman"], 3)
        items["achieved_top10_iou"] = _num(actual["top10_iou"], 2)
    if choice is not None:
        items["tuning"] = '"' + choice.source + '"'
    return items


def _groups(plan) -> list:
    """[(name, merge, [NodeCost, ...]), ...] in graph order, as each step asks
    (:attr:`~kql.operators.steps.Step.explain_merge`)."""
    groups: list = []
    for cost in plan.cost.nodes:
        step = cost.step
        name = step.explain_name
        if name is None:
            continue                                       # x.size(): no work to show
        merge = step.explain_merge
        last = groups[-1] if groups else None
        if last is not None and ((merge == "fold" and last[1] != "run")
                                 or (merge == "run" and last[1] == "run")):
            last[2].append(cost)
        else:
            groups.append((name, merge, [cost]))
    return groups


def _node_lines(plan, actual) -> list[str]:
    n = plan.batches
    out = []
    for name, merge, members in _groups(plan):
        first = members[0]
        items = {"node": first.node.name if len(members) == 1 or merge != "run"
                 else f"{first.node.name}..{members[-1].node.name}"}
        if merge == "run":
            items["nodes"] = len(members)
        elif first.step.size is not None:
            items["patch"] = _sizes(first.step.size)
        items["gflops"] = _num(2 * sum(c.macs for c in members) * n / 1e9, 3)
        gathered = sum(c.gather_bytes for c in members)
        if gathered:
            items["gather_mb"] = _num(gathered * n / 2**20, 1)
        predicted = sum(c.seconds for c in members) * n
        items["predicted_ms"] = _num(1000 * predicted, 1)
        if actual is not None:
            spent = sum(actual.get(c.node.name, 0.0) for c in members)
            items["actual_ms"] = _num(1000 * spent, 1)
            items["predicted/actual"] = _num(predicted / spent) if spent > 0 else None
        out.append(_line(name, **items))
    return out
