"""Runs statements and turns them into Results: one handler per statement type.

:data:`HANDLERS` maps each AST statement class to ``handler(con, stmt, text, progress)``;
``Connection`` looks a statement's handler up there. OCCLUDE and EXPLAIN are bound,
optimized and physically planned first; a run predicted longer than ``SET
confirm_seconds`` is put to the connection's ``on_long_run`` before it starts
(:func:`confirm_run`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

from .binder import bind
from .catalog.globs import glob_files
from .errors import KqlError, KqlExecutionError, KqlModelError, KqlPlanError
from .language import ast
from .operators.batches import out_of_memory
from .planner.context import PlanContext
from .planner.devices import require_cuda
from .planner.explain import exactness
from .planner.logical import at_node, fail
from .planner.memory import size_text
from .planner.physical import plan_query
from .planner.rules import RULES, optimize
from .results.output import check_into
from .results.result import Result


def plan(con, stmt: ast.Occlude, text: str):
    start = time.perf_counter()
    query = bind(stmt, text, con.catalog, con.settings["max_image_pixels"])
    try:
        physical, _ = plan_bound(con, query, start)
    except KqlError as exc:     # what no clause caused (no plan fits memory_limit): the statement
        raise at_node(exc, stmt)
    return physical


def plan_bound(con, query, start: float = None):
    """The physical plan of a bound query, and the planning context it was made in."""
    start = time.perf_counter() if start is None else start
    ctx = PlanContext(settings=con.settings.copy(), directory=con.catalog.directory,
                      tuning_lookup=con.catalog.tuning, cache=con.plan_cache)
    physical = plan_query(optimize(query, ctx, rules=(check_into, *RULES)), ctx)
    return dataclasses.replace(physical, planning_seconds=time.perf_counter() - start), ctx


def run(physical, stmt: ast.Occlude, progress, profile=None):
    try:
        return physical.run(progress, profile)
    except KqlError:
        raise
    except IndexError as exc:       # target out of range, found only once the model ran
        raise fail(stmt, "target", str(exc)) from None
    except (RuntimeError, ValueError, TypeError, MemoryError) as exc:
        if out_of_memory(exc):   # torch's allocators raise RuntimeErrors
            raise KqlExecutionError(_out_of_memory(physical)) from None
        detail = " ".join(str(exc).split())[:300]
        raise KqlModelError(f"model '{physical.query.model.name}' failed on the "
                            f"{tuple(physical.query.image.shape[1:])} image: {detail}") from None


def _out_of_memory(physical) -> str:
    """The scan halves a batch that runs out of memory down to one position (see
    :func:`kql.operators.batches.scan`): what reaches here did not fit even then."""
    predicted = size_text(physical.memory_bytes)
    tried = f"halved from {physical.batch}; " if physical.batch > 1 else ""
    return (f"out of memory running model '{physical.query.model.name}' even at batch 1 "
            f"({tried}predicted {predicted} at batch {physical.batch}); "
            f"free memory, or occlude a smaller image")


def duration(seconds: float) -> str:
    """A predicted run for a person.

    >>> duration(42), duration(1500), duration(5 * 3600), duration(475_000)
    ('42 s', '25 min', '5.0 hours', '5.5 days')
    """
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:.1f} days"


def confirm_run(con, physical, stmt) -> None:
    """Before a run predicted longer than ``SET confirm_seconds``: the connection's
    ``on_long_run(message)``, which returns to run it (the API warns) or raises a
    KqlError (the shell's answer no, or KQL text with no one to ask). A prediction from
    an untrusted calibration (measured under load) refuses nothing: the run goes on after
    ``on_warning(message)``."""
    limit = con.settings["confirm_seconds"]
    seconds = physical.run_seconds
    if limit == "none" or seconds is None or seconds <= limit:
        return
    low, high = physical.run_range
    span = f"{duration(low)} to {duration(high)}"
    if not physical.trusted:
        con.on_warning(f"OCCLUDE is predicted to run {duration(seconds)} ({span}) from a "
                       f"calibration measured under load, not trusted: running it "
                       f"(CALIBRATE on a quiet machine to trust it)")
        return
    message = (f"OCCLUDE is predicted to run {duration(seconds)} ({span}; "
               f"over confirm_seconds = {limit})")
    try:
        con.on_long_run(message)
    except KqlError as exc:
        raise exc.at(stmt.pos.line or None, stmt.pos.column or None)


def occlude(con, stmt: ast.Occlude, text: str, progress) -> Result:
    from . import many

    files = many.images_of(con, stmt)
    if files is not None:
        return many.occlude_many(con, stmt, text, progress, files)
    many.check_single(stmt)
    start = time.perf_counter()
    physical = plan(con, stmt, text)
    confirm_run(con, physical, stmt)
    out = run(physical, stmt, progress)
    result = _result(physical, out, text)
    result.seconds = time.perf_counter() - start
    if stmt.into:
        from .results.overlay import options_from

        try:
            result.save(stmt.into, **options_from(con.settings))
        except KqlError as exc:             # a folder not ours to write, a full disk
            into = stmt.pos_of("into")
            raise exc.at(into.line or None, into.column or None) from None
        result.into = stmt.into
    return result


def explain(con, stmt: ast.Explain, text: str, progress) -> Result:
    from . import many

    files = many.images_of(con, stmt.statement)
    if files is not None:
        if stmt.analyze:
            raise KqlPlanError("EXPLAIN ANALYZE runs one image: name one file, not a glob or "
                               "an image table", line=stmt.pos.line or None,
                               column=stmt.pos.column or None)
        return Result("explain", text, plan="\n".join(many.explain_lines(con, stmt.statement, files, text)))
    many.check_single(stmt.statement)
    start = time.perf_counter()
    physical = plan(con, stmt.statement, text)
    if not stmt.analyze:
        return Result("explain", text, plan="\n".join(physical.explain()))
    confirm_run(con, physical, stmt)
    profile: dict = {}
    out = run(physical, stmt.statement, progress, profile)
    profile["total"] = time.perf_counter() - start
    if out.check is not None:
        profile["check"] = out.check
    if out.halved:
        profile["halved"] = out.halved
    exact_plan = physical.exact()
    if exact_plan.operator is not physical.operator:   # approximate: verify against the exact map
        from .planner.quality import map_quality

        exact = run(exact_plan, stmt.statement, None)
        shape = physical.query.grid.shape
        profile.update(map_quality(exact.probabilities.reshape(shape),
                                   out.probabilities.reshape(shape)))
    return Result("explain", text, plan="\n".join(physical.explain(profile)))


def calibrate(con, stmt: ast.Calibrate, text: str, progress) -> Result:
    from .planner.calibrate import device_key, folder_of, throughput
    from .planner.feedback import Feedback

    device = "cuda" if stmt.device == "gpu" else "cpu"
    if stmt.device == "gpu":
        require_cuda("CALIBRATE ON GPU", pos=stmt.pos)
    tp = throughput(device, con.catalog.directory, refresh=True)
    # Layout trials and scan feedback measured on this machine go with its old
    # calibration: a new CPU or torch build (the usual reason to calibrate again) may
    # favour the other layout, and the ratios corrected the old table.
    con.plan_cache.forget_layouts(device_key(device))
    Feedback(folder_of(con.catalog.directory)).forget(device_key(device))
    best = max(max(row) for row in tp.dense)
    return Result("set", text, message=f"calibrated {device}: convolutions up to "
                                        f"{2 * best / 1e9:.1f} GFLOP/s, copies "
                                        f"{tp.bandwidth / 1e9:.1f} GB/s; {tp.verdict()}")


def calibrate_model(con, stmt: ast.CalibrateModel, text: str, progress) -> Result:
    """``CALIBRATE <model> ON ...``: tune the projective-field threshold on the images and
    keep the tuning record in the catalog, for the OCCLUDE queries of that geometry."""
    queries = bind_calibration(con, stmt, text)
    from .planner import tuning     # the tuner, only once the statement is bound

    count = f"{len(queries)} image{'' if len(queries) == 1 else 's'}"
    few = len(queries) < tuning.TIGHT           # it still tunes, and says the bound is loose
    if few:                                     # before the maps are computed, and after
        con.on_warning(tuning.what_it_can_promise(len(queries)))
    if progress is not None and hasattr(progress, "describe"):
        progress.describe(f"calibrate {count}")
    record = tuning.tune(queries, settings=con.settings, directory=con.catalog.directory,
                         progress=progress)
    con.catalog.save_tuning(queries[0].model.name, tuning.key(queries[0]), record.to_dict())
    message = record.summary()
    if few:
        warning = f"tuned on {count}: fewer than {tuning.TIGHT}, the bound is loose"
        message += f"; {warning}"
    return Result("set", text, message=message)


def bind_calibration(con, stmt: ast.CalibrateModel, text: str) -> list:
    """One logical OCCLUDE query per image of the statement (globs expanded), bound as
    OCCLUDE binds them: same resize, defaults, checks and error positions."""
    try:
        con.catalog.resolve_model(stmt.model.name)      # an unknown model before any image
    except KqlError as exc:
        raise at_node(exc, stmt.model)
    queries = []
    for image in _calibration_images(stmt.images):
        occlude = ast.Occlude(image=image, model=stmt.model, patch=stmt.patch, stride=stmt.stride,
                              color=stmt.color, pos=stmt.pos, clause_pos=stmt.clause_pos)
        queries.append(bind(occlude, text, con.catalog, con.settings["max_image_pixels"]))
    first = queries[0]
    for query in queries[1:]:
        if query.image.shape != first.image.shape:
            raise at_node(KqlPlanError(
                f"CALIBRATE: images must have the same size after the model's resize; got "
                f"{_size(first)} ({_label(first)}) and {_size(query)} ({_label(query)})"),
                query.statement.image)
    return queries


def _calibration_images(images):
    """The images as written, each glob replaced by the files it matches (sorted)."""
    for image in images:
        if not isinstance(image, ast.ImageGlob):
            yield image
            continue
        try:
            paths = glob_files(image.pattern)       # bounded: never the whole disk
        except KqlError as exc:
            raise at_node(exc, image)
        if not paths:
            raise at_node(KqlPlanError(f"no files match '{image.pattern}'"), image)
        yield from (ast.ImageFile(path, pos=image.pos) for path in paths)


def _size(query) -> str:
    return f"{query.image.shape[1]}x{query.image.shape[2]}"


def _label(query) -> str:
    """How the image was named: 'a' for a catalog name, 'a.png', sample('cat')."""
    ref = query.statement.image
    return f"'{ref.name}'" if isinstance(ref, ast.ImageName) else query.image_label


def load_model(con, stmt: ast.LoadModel, text: str, progress) -> Result:
    try:
        spec = con.catalog.load_model(stmt.name, stmt.path, stmt.arch, stmt.labels, stmt.trusted)
    except KqlError as exc:
        raise at_node(exc, stmt)
    con.plan_cache.forget(stmt.name)
    return Result("load", text, message=f"model '{stmt.name}' loaded ({spec.arch}, "
                                        f"{spec.num_classes} classes)")


def load_images(con, stmt: ast.LoadImages, text: str, progress) -> Result:
    try:
        files = con.catalog.load_image_table(stmt.name, stmt.pattern)
    except KqlError as exc:
        raise at_node(exc, stmt)
    return Result("load", text, message=f"image table '{stmt.name}' loaded ({len(files)} files)")


def load_image(con, stmt: ast.LoadImage, text: str, progress) -> Result:
    try:
        t = con.catalog.load_image(stmt.name, stmt.path, con.settings["max_image_pixels"])
    except KqlError as exc:
        raise at_node(exc, stmt)
    if t.dim() == 4:                           # a NIfTI file or a DICOM series
        sizes = "x".join(str(int(v)) for v in t.shape[1:])
        return Result("load", text, message=f"volume '{stmt.name}' loaded ({sizes}, "
                                            f"{t.shape[0]} channel{'s' if t.shape[0] > 1 else ''})")
    return Result("load", text, message=f"image '{stmt.name}' loaded "
                                        f"({t.shape[1]}x{t.shape[2]})")


def show_models(con, stmt: ast.ShowModels, text: str, progress) -> Result:
    return Result("show", text, rows=con.catalog.model_rows())


def show_settings(con, stmt: ast.ShowSettings, text: str, progress) -> Result:
    return Result("show", text, rows=con.settings.rows())


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
    ast.LoadImages: load_images,
    ast.ShowModels: show_models,
    ast.ShowImages: show_images,
    ast.ShowSettings: show_settings,
    ast.SetOption: set_option,
    ast.Calibrate: calibrate,
    ast.CalibrateModel: calibrate_model,
}


def _predicted_ssim(physical, out) -> Optional[float]:
    """The planner's bound on the map's SSIM, or what a verified drill-down measured."""
    if out.check is not None:
        return 1.0 if out.check["exact"] else out.check["bound"]
    return physical.approximation.predicted_ssim if physical.approximation else None


def _result(physical, out, text: str) -> Result:
    q = physical.query
    shape = q.grid.shape                  # (rows, cols); a volume's (slices, rows, cols)
    labels = q.model.labels
    if labels is not None and len(labels) != len(out.base_logits):
        raise at_node(KqlPlanError(f"model '{q.model.name}' has {len(labels)} labels but returns "
                                   f"{len(out.base_logits)} classes"), q.statement.model)
    names = [labels[t] if labels is not None else f"class {t}" for t in out.targets]
    maps = out.scores.reshape(len(out.targets), *shape)
    return Result(
        "occlude", text,
        heatmap=maps[0],
        logits=out.logits.reshape(shape),
        target=out.target,
        label=names[0],
        probability=out.base_probability,
        plan="\n".join(physical.explain()),
        model=q.model.name, image_label=q.image_label, image=q.image,
        patch=q.grid.patch, stride=q.grid.stride, offset=q.grid.offset,
        tau=physical.approximation.tau if physical.approximation else 1.0,
        predicted_ssim=_predicted_ssim(physical, out),
        tuning=physical.approximation.source if physical.approximation else "",
        check=out.check, halved=out.halved, exactness=exactness(physical),
        heatmaps=maps, targets=[int(t) for t in out.targets], labels=names,
        base_scores=[float(v) for v in out.base_scores], output=out.output,
        output_note=q.output_note, frame=q.frame, original=q.original, image_info=q.image_info)
