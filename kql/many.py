"""Many images per query: ``OCCLUDE '<glob>' ...`` and ``OCCLUDE <image table> ...``.

One plan for every image: the first image is planned as a single-image query would be
(trace, views, costing); every later image of the same size reuses that plan, rebound
to its own views (:mod:`kql.planner.rebind`). Each image's map is the single-image
query's. A bad image becomes a row with its error, never the end of the query.

With ``INTO 'x.parquet'`` the query is resumable: every finished row is written at once,
atomically, to a journal folder beside the target (``x.parquet.partial/``, with the
query's fingerprint); an interrupted query (Ctrl-C, a kill) keeps them, and running the
same query again skips the images already done. The final table is written atomically
and the journal removed. ``WHERE``, ``ORDER BY`` and ``LIMIT`` rank the final rows.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import shutil
import time
from types import SimpleNamespace
from typing import Optional

from .binder import bind
from .catalog.globs import iter_files
from .errors import KqlError, KqlExecutionError, KqlPlanError
from .fileio import atomic_write
from .language import ast
from .planner.logical import at_node, fail
from .results.output import check_into
from .results.resultset import RANKABLE, ResultSet, error_row, ranked, row_of

JOURNAL_SUFFIX = ".partial"


def images_of(con, stmt: ast.Occlude) -> Optional[list]:
    """The image files of a many-image query (sorted), or None for one image. ``LIMIT n``
    without WHERE or ORDER BY keeps the first n files: a glob's walk stops at the n-th."""
    ref = stmt.image
    only_first = stmt.where is None and stmt.order is None and (stmt.limit or 0) >= 1
    first = stmt.limit if only_first else None
    if isinstance(ref, ast.ImageName):
        files = con.catalog.resolve_table(ref.name)
        return files if files is None else files[:first]
    if isinstance(ref, ast.ImageFile) and glob.has_magic(ref.path) and not os.path.exists(ref.path):
        try:
            files = list(itertools.islice(iter_files(ref.path), first))
        except KqlError as exc:
            raise at_node(exc, ref)
        if not files:
            raise at_node(KqlPlanError(f"no files match '{ref.path}'"), ref)
        return files
    return None


def check_single(stmt: ast.Occlude) -> None:
    """WHERE, ORDER BY, LIMIT and ON RAY rank or spread many images: refused for one."""
    for clause, keyword in (("where", "WHERE"), ("order", "ORDER BY"), ("limit", "LIMIT"),
                            ("ray", "ON RAY")):
        if getattr(stmt, clause):
            raise fail(stmt, clause, f"{keyword} needs many images: a glob ('scans/*.png') or "
                                     f"an image table (LOAD IMAGES)")


def _check(stmt: ast.Occlude) -> None:
    for clause, column in (("where", stmt.where and stmt.where[0]),
                           ("order", stmt.order and stmt.order[0])):
        if column and column not in RANKABLE:
            raise fail(stmt, clause, f"unknown column '{column}'; use one of {', '.join(RANKABLE)}")
    if stmt.where:
        _check_where(stmt, *stmt.where)
    if stmt.limit is not None and stmt.limit < 1:
        raise fail(stmt, "limit", f"LIMIT must be at least 1, got {stmt.limit}")
    if stmt.into and not stmt.into.lower().endswith(".parquet"):
        raise fail(stmt, "into", "a many-image query writes a table: INTO '<file>.parquet'")
    if stmt.into:       # the folder exists, the name is one a file can have: as for one image
        check_into(SimpleNamespace(statement=stmt, into=stmt.into))


# The columns of text (compared as text, with a quoted value); every other one is a number.
TEXT_COLUMNS = ("path", "label")


def _check_where(stmt: ast.Occlude, column: str, sign: str, value) -> None:
    """A text column takes a quoted value (compared as text), a number column a number."""
    if column in TEXT_COLUMNS and not isinstance(value, str):
        raise fail(stmt, "where", f"WHERE {column} compares text: quote the value "
                                  f"(WHERE {column} {sign} '{value:g}'), or rank a number column")
    if column not in TEXT_COLUMNS and isinstance(value, str):
        raise fail(stmt, "where", f"WHERE {column} compares numbers, not the text "
                                  f"'{value}'; text goes with {' or '.join(TEXT_COLUMNS)}")


def one_image(stmt: ast.Occlude, path: str) -> ast.Occlude:
    """The single-image query of ``path``: the statement without what ranks many."""
    return stmt.replace(image=ast.ImageFile(path, pos=stmt.image.pos), into=None, where=None,
                        order=None, limit=None, ray=False)


def fingerprint(con, stmt: ast.Occlude) -> str:
    """What decides the rows: the per-image query, the model's fingerprint, the settings
    that change maps. A journal of another fingerprint is not resumed."""
    spec = con.catalog.resolve_model(stmt.model.name)
    what = repr(one_image(stmt, "")) + spec.fingerprint()
    what += repr({k: con.settings[k] for k in ("tau", "gates", "strategy", "crossover")})
    return hashlib.sha256(what.encode()).hexdigest()


class Journal:
    """The finished rows of a resumable query: one Parquet file per image."""

    def __init__(self, into: str, print_: str, pos: ast.Pos = ast.NOWHERE):
        self.folder = into + JOURNAL_SUFFIX
        self.print = print_
        self.pos = pos                  # of the INTO clause, for a write that fails

    def resume(self) -> dict:
        """``{path: row}`` kept by an interrupted run of this query (another query's
        journal is discarded)."""
        stamp = os.path.join(self.folder, "query.json")
        try:
            with open(stamp) as fh:
                same = json.load(fh).get("fingerprint") == self.print
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(self.folder, ignore_errors=True)
            return {}
        import pyarrow.parquet as pq

        rows = {}
        for name in sorted(os.listdir(self.folder)):
            if name.startswith("row-") and name.endswith(".parquet"):
                try:
                    row = pq.read_table(os.path.join(self.folder, name)).to_pylist()[0]
                except Exception:              # a damaged part: that image runs again
                    continue
                rows[row["path"]] = row
        return rows

    def start(self) -> None:
        try:
            os.makedirs(self.folder, exist_ok=True)
            atomic_write(os.path.join(self.folder, "query.json"),
                         lambda fh: json.dump({"fingerprint": self.print}, fh))
        except OSError as exc:
            raise self.failed(exc) from None

    def keep(self, row: dict) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from .results.resultset import schema

        name = "row-" + hashlib.sha1(row["path"].encode()).hexdigest()[:20] + ".parquet"
        table = pa.Table.from_pylist([row], schema=schema())
        try:
            atomic_write(os.path.join(self.folder, name), lambda tmp: pq.write_table(table, tmp),
                         mode=None)
        except OSError as exc:          # a full disk mid-query: the rows kept so far stay
            raise self.failed(exc) from None

    def failed(self, exc: OSError) -> KqlError:
        return self.located(KqlExecutionError(f"cannot write '{self.folder}': {exc.strerror or exc}"))

    def located(self, exc: KqlError) -> KqlError:
        return exc.at(self.pos.line or None, self.pos.column or None)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def occlude_many(con, stmt: ast.Occlude, text: str, progress, files: list) -> ResultSet:
    """Run ``stmt`` over ``files``; the ranked :class:`ResultSet` (written INTO, if asked)."""
    _check(stmt)
    start = time.perf_counter()
    journal = Journal(stmt.into, fingerprint(con, stmt), stmt.pos_of("into")) if stmt.into else None
    done = journal.resume() if journal else {}
    if journal:
        journal.start()
    todo = [f for f in files if f not in done]
    keep = journal.keep if journal else (lambda row: None)
    if stmt.ray or con.settings["engine"] == "ray":
        from .ray_engine import run_on_ray

        fresh = run_on_ray(con, stmt, text, todo, keep)
    else:
        fresh = run_local(con, stmt, text, todo, keep, progress, len(files), len(done))
    rows = [done[f] if f in done else fresh[f] for f in files]
    result = ResultSet(text, ranked(rows, stmt.where, stmt.order, stmt.limit),
                       skipped=len(done), into=stmt.into)
    if stmt.into:
        try:
            result.save(stmt.into)
        except KqlError as exc:
            raise journal.located(exc)
        journal.remove()
    result.seconds = time.perf_counter() - start
    return result


class Scanner:
    """Rows of one many-image query, one image at a time, with one plan: the first
    image's, rebound to every later image of the same size."""

    def __init__(self, con, stmt: ast.Occlude, text: str):
        self.con, self.stmt, self.text = con, stmt, text
        self.plan, self.ctx = None, None

    def row(self, path: str) -> dict:
        from .executor import _result, plan_bound, run
        from .planner.rebind import rebound, same_plan_fits

        started = time.perf_counter()
        single = one_image(self.stmt, path)
        try:
            query = bind(single, self.text, self.con.catalog, self.con.settings["max_image_pixels"])
            if self.plan is not None and same_plan_fits(self.plan, query):
                physical = rebound(self.plan, query, self.ctx)
            else:
                physical, ctx = plan_bound(self.con, query)
                if self.plan is None:
                    self.plan, self.ctx = physical, ctx
            out = run(physical, single, None)
            return row_of(path, _result(physical, out, self.text), time.perf_counter() - started)
        except KqlError as exc:
            return error_row(path, exc.message,
                             time.perf_counter() - started)


def run_local(con, stmt, text, files, keep, progress, total: int, already: int) -> dict:
    """``{path: row}`` of each file, computed in this process with one plan. ``progress``
    hears positions done of all (``total`` images, ``already`` done before), after each
    image's row is kept; a :class:`~kql.progress.ProgressBar` also shows images done."""
    scanner, rows = Scanner(con, stmt, text), {}
    per_image = None
    for k, path in enumerate(files):
        rows[path] = row = scanner.row(path)
        keep(row)
        if per_image is None and row["rows"]:
            per_image = row["rows"] * row["cols"]
        if progress is not None and per_image:
            describe = getattr(progress, "describe", None)
            if describe is not None:
                describe(f"occlude {already + k + 1}/{total} images")
            progress((already + k + 1) * per_image, total * per_image)
    return rows


def explain_lines(con, stmt: ast.Occlude, files: list, text: str) -> list:
    """EXPLAIN of a many-image query: the image scan, then the first image's plan."""
    from .executor import plan_bound

    _check(stmt)
    query = bind(one_image(stmt, files[0]), text, con.catalog, con.settings["max_image_pixels"])
    try:
        physical, _ = plan_bound(con, query)
    except KqlError as exc:             # no plan fits memory_limit, ...: this statement's
        raise at_node(exc, stmt)
    items = {"images": len(files),
             "engine": "ray" if stmt.ray or con.settings["engine"] == "ray" else "local",
             "where": _where_text(*stmt.where) if stmt.where else None,
             "order": f"{stmt.order[0]} {'desc' if stmt.order[1] else 'asc'}" if stmt.order else None,
             "limit": stmt.limit, "into": stmt.into, "plan": "first image's, rebound per image"}
    head = "ImageScan: " + ", ".join(f"{k}={v}" for k, v in items.items() if v is not None)
    return [head] + ["  " + line for line in physical.explain()]


def _where_text(column: str, sign: str, value) -> str:
    """``drop >= 0.2``, ``label < 'n'``: a WHERE as EXPLAIN shows it."""
    return f"{column} {sign} {value!r}" if isinstance(value, str) else f"{column} {sign} {value}"
