"""Runs bound, optimized, physically planned statements and turns them into Results."""

from __future__ import annotations

import time

import torch

from . import ast
from .errors import KqlError, KqlExecutionError, KqlModelError, KqlPlanError
from .planner.logical import bind, fail
from .planner.physical import PlanContext, plan_query
from .planner.rules import optimize
from .result import Result


def plan(con, stmt: ast.Occlude, text: str):
    start = time.perf_counter()
    ctx = PlanContext(settings=dict(con.settings), directory=con.catalog.directory)
    logical = optimize(bind(stmt, text, con.catalog), ctx)
    physical = plan_query(logical, ctx)
    physical.planning_seconds = time.perf_counter() - start
    return physical


def run(physical, stmt: ast.Occlude, progress, profile=None):
    try:
        return physical.run(progress, profile)
    except KqlError:
        raise
    except IndexError as exc:       # target out of range, found only once the model ran
        raise fail(stmt, "target", str(exc)) from None
    except (RuntimeError, ValueError, TypeError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise KqlModelError(f"model '{physical.query.model.name}' failed on the "
                            f"{tuple(physical.query.image.shape[1:])} image: {detail}") from None
    except MemoryError:
        raise KqlExecutionError("out of memory; lower BATCH") from None


def occlude(con, stmt: ast.Occlude, text: str, progress) -> Result:
    start = time.perf_counter()
    physical = plan(con, stmt, text)
    out = run(physical, stmt, progress)
    result = _result(physical, out, text)
    result.seconds = time.perf_counter() - start
    if stmt.into:
        result.save(stmt.into)
        result.into = stmt.into
    return result


def explain(con, stmt: ast.Explain, text: str, progress) -> Result:
    start = time.perf_counter()
    physical = plan(con, stmt.statement, text)
    if not stmt.analyze:
        return Result("explain", text, plan="\n".join(physical.explain()))
    profile: dict = {}
    run(physical, stmt.statement, progress, profile)
    profile["total"] = time.perf_counter() - start
    return Result("explain", text, plan="\n".join(physical.explain(profile)))


def calibrate(con, stmt: ast.Calibrate, text: str) -> Result:
    from .planner.calibrate import throughput

    device = "cuda" if stmt.device == "gpu" else "cpu"
    if stmt.device == "gpu" and not torch.cuda.is_available():
        raise KqlPlanError("CALIBRATE ON GPU: no CUDA GPU is available on this machine",
                           line=stmt.pos.line or None, column=stmt.pos.column or None)
    tp = throughput(device, con.catalog.directory, refresh=True)
    best = max(max(row) for row in tp.dense)
    return Result("set", text, message=f"calibrated {device}: convolutions up to "
                                        f"{2 * best / 1e9:.1f} GFLOP/s, copies "
                                        f"{tp.bandwidth / 1e9:.1f} GB/s")


def _result(physical, out, text: str) -> Result:
    q = physical.query
    rows, cols = q.grid.shape
    labels = q.model.labels
    if labels is not None and len(labels) != len(out.base_logits):
        raise KqlPlanError(f"model '{q.model.name}' has {len(labels)} labels but returns "
                           f"{len(out.base_logits)} classes")
    return Result(
        "occlude", text,
        heatmap=out.probabilities.reshape(rows, cols),
        logits=out.logits.reshape(rows, cols),
        target=out.target,
        label=labels[out.target] if labels is not None else f"class {out.target}",
        probability=out.base_probability,
        plan="\n".join(physical.explain()),
        model=q.model.name, image_label=q.image_label, image=q.image,
        patch=q.grid.patch, stride=q.grid.stride, offset=q.grid.offset)
