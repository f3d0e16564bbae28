"""Runs statements and turns them into Results: one handler per statement type.

:data:`HANDLERS` maps each AST statement class to ``handler(con, stmt, text, progress)``;
``Connection`` looks a statement's handler up there. OCCLUDE and EXPLAIN are bound,
optimized and physically planned first.
"""

from __future__ import annotations

import dataclasses
import time

from . import ast
from .errors import KqlError, KqlExecutionError, KqlModelError, KqlPlanError
from .planner.devices import require_cuda
from .planner.logical import bind, fail
from .planner.physical import PlanContext, plan_query
from .planner.rules import optimize
from .result import Result


def plan(con, stmt: ast.Occlude, text: str):
    start = time.perf_counter()
    ctx = PlanContext(settings=con.settings.copy(), directory=con.catalog.directory)
    logical = optimize(bind(stmt, text, con.catalog), ctx)
    physical = plan_query(logical, ctx)
    physical = dataclasses.replace(physical, planning_seconds=time.perf_counter() - start)
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


def calibrate(con, stmt: ast.Calibrate, text: str, progress) -> Result:
    from .planner.calibrate import throughput

    device = "cuda" if stmt.device == "gpu" else "cpu"
    if stmt.device == "gpu":
        require_cuda("CALIBRATE ON GPU", pos=stmt.pos)
    tp = throughput(device, con.catalog.directory, refresh=True)
    best = max(max(row) for row in tp.dense)
    return Result("set", text, message=f"calibrated {device}: convolutions up to "
                                        f"{2 * best / 1e9:.1f} GFLOP/s, copies "
                                        f"{tp.bandwidth / 1e9:.1f} GB/s")


def load_model(con, stmt: ast.LoadModel, text: str, progress) -> Result:
    spec = con.catalog.load_model(stmt.name, stmt.path, stmt.arch, stmt.labels)
    return Result("load", text, message=f"model '{stmt.name}' loaded ({spec.arch}, "
                                        f"{spec.num_classes} classes)")


def load_image(con, stmt: ast.LoadImage, text: str, progress) -> Result:
    t = con.catalog.load_image(stmt.name, stmt.path)
    return Result("load", text, message=f"image '{stmt.name}' loaded "
                                        f"({t.shape[1]}x{t.shape[2]})")


def show_models(con, stmt: ast.ShowModels, text: str, progress) -> Result:
    return Result("show", text, rows=con.catalog.model_rows())


def show_images(con, stmt: ast.ShowImages, text: str, progress) -> Result:
    return Result("show", text, rows=con.catalog.image_rows())


def set_option(con, stmt: ast.SetOption, text: str, progress) -> Result:
    name = stmt.name.lower()
    value = stmt.value.lower() if isinstance(stmt.value, str) else stmt.value
    try:
        con.settings.set(name, value)
    except KqlError as exc:
        raise exc.at(stmt.pos.line or None, stmt.pos.column or None)
    return Result("set", text, message=f"{name} = {value}")


HANDLERS = {
    ast.Occlude: occlude,
    ast.Explain: explain,
    ast.LoadModel: load_model,
    ast.LoadImage: load_image,
    ast.ShowModels: show_models,
    ast.ShowImages: show_images,
    ast.SetOption: set_option,
    ast.Calibrate: calibrate,
}


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
