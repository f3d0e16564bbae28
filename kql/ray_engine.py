"""Many-image queries on Ray Data (``ON RAY``, ``SET engine = 'ray'``).

The image paths become a Ray dataset; ``map_batches`` runs them through a pool of
actors, one per worker CPU, each holding the model and its own plan (the first image's,
rebound per image, as in one process: :class:`kql.many.Scanner`); the rows stream back
to the driver, which journals and writes them exactly as the local engine does. Ray's
scheduler, actor pool and object store do the distributing; nothing here schedules.

On a cluster (``SET ray_address = 'ray://head:10001'``) every node must see the image
files at the same paths (a shared file system) and hold one copy of the model per worker;
the driver writes the Parquet table. Ray is an optional extra: ``pip install 'kql[ray]'``.

A model whose classes live in the user's own files (no installed package provides them)
travels to the workers by value (:func:`own_modules`); any failure of Ray's is one
:class:`KqlExecutionError` line. Ray's logs stay out of the terminal unless
``KQL_RAY_LOGS=1`` asks for them (when KQL starts Ray).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings

from .errors import KqlError, KqlExecutionError

LOGS = "KQL_RAY_LOGS"           # =1: Ray's own logs (workers' output, INFO) on the terminal


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise KqlExecutionError("ON RAY needs the ray extra: pip install 'kql[ray]'") from None
    return ray


def start(address: str):
    """Ray, connected: a local cluster (``'local'``) or the one at ``address``."""
    ray = _ray()
    if not ray.is_initialized():
        loud = _loud()
        try:
            ray.init(address=None if address == "local" else address, include_dashboard=False,
                     log_to_driver=loud, logging_level="INFO" if loud else "ERROR")
        except Exception as exc:        # ConnectionError, RuntimeError, ValueError of Ray's
            raise KqlExecutionError(f"cannot start Ray at '{address}': "
                                    f"{' '.join(str(exc).split())[:200]}") from None
    return ray


def _loud() -> bool:
    return os.environ.get(LOGS, "") not in ("", "0")


@contextlib.contextmanager
def _quiet_loggers():
    """Ray Data's console messages (INFO, 'progress bars disabled', the tracebacks of a
    failure that becomes a :class:`KqlExecutionError`) off while inside."""
    loggers = [] if _loud() else [logging.getLogger(n) for n in ("ray", "ray.data")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class _Worker:
    """A Ray actor: one connection with the query's model, one plan for its images."""

    def __init__(self, spec, settings: dict, stmt, text: str, threads: int):
        import torch

        import kql
        from kql.many import Scanner

        torch.set_num_threads(threads)
        con = kql.connect()
        con.catalog.register_model(spec)
        con.settings.update({**settings, "engine": "local"})
        self.scanner = Scanner(con, stmt, text)

    def __call__(self, batch):
        import pyarrow as pa

        from kql.results.resultset import schema

        rows = [self.scanner.row(path) for path in batch.column("path").to_pylist()]
        return pa.Table.from_pylist(rows, schema=schema())


def own_modules(model) -> list:
    """The modules of ``model``'s code that no installed package provides (the user's own
    .py files, and the ones their code refers to): Ray's workers could not import them.

    >>> import torch
    >>> own_modules(torch.nn.Linear(2, 2))
    []
    """
    import importlib.metadata
    import inspect

    installed = importlib.metadata.packages_distributions()
    prefixes = tuple(os.path.join(os.path.realpath(p), "")
                     for p in {sys.prefix, sys.base_prefix, sys.exec_prefix})

    def own(name: str) -> bool:
        module = sys.modules.get(name)
        top = name.partition(".")[0]
        path = os.path.realpath(getattr(module, "__file__", None) or "")
        return (module is not None and name != "__main__" and path.endswith(".py")
                and top not in installed and top not in sys.stdlib_module_names
                and not path.startswith(prefixes))

    todo = [type(part).__module__ for part in model.modules()]
    found: dict = {}
    while todo:
        name = todo.pop()
        if name in found or not isinstance(name, str) or not own(name):
            continue
        found[name] = sys.modules[name]
        for value in list(vars(found[name]).values()):
            try:
                todo.append(value.__name__ if inspect.ismodule(value)
                            else getattr(value, "__module__", None))
            except Exception:           # a lazy object that fails on attribute access
                continue
    return list(found.values())


def _ship(ray, model) -> list:
    """Pickle the model's own modules by value (registered here, undone by the caller)."""
    pickler = ray.cloudpickle
    known = set(pickler.list_registry_pickle_by_value())
    shipped = [m for m in own_modules(model) if m.__name__ not in known]
    for module in shipped:
        pickler.register_pickle_by_value(module)
    return shipped


_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Interrupt)): (.+)$", re.M)


def failure(exc: BaseException) -> KqlExecutionError:
    """A Ray failure as one line: the innermost ``SomeError: message`` of its text.

    >>> str(failure(RuntimeError("The actor died\\n  ModuleNotFoundError: No module named 'x'")))
    "ON RAY failed: ModuleNotFoundError: No module named 'x' (KQL_RAY_LOGS=1 shows Ray's logs)"
    """
    text = str(exc)
    found = _ERROR_LINE.findall(text)
    reason = ": ".join(found[-1]) if found else (text.strip().splitlines() or [type(exc).__name__])[0]
    reason = re.sub(r"\x1b\[[0-9;]*m", "", reason).strip()[:200]
    return KqlExecutionError(f"ON RAY failed: {reason} ({LOGS}=1 shows Ray's logs)")


def run_on_ray(con, stmt, text: str, files: list, keep) -> dict:
    """``{path: row}`` of each file, computed by Ray actors; ``keep(row)`` as rows arrive."""
    if not files:
        return {}
    ray = start(con.settings["ray_address"])
    spec = con.catalog.resolve_model(stmt.model.name)
    shipped = _ship(ray, spec.module)
    try:
        with _quiet_loggers():
            return _run(ray, con, stmt, text, files, keep, spec)
    except KqlError:
        raise
    except Exception as exc:           # Ray's RayError, ActorDiedError, RaySystemError, ...
        raise failure(exc) from None
    finally:
        for module in shipped:
            ray.cloudpickle.unregister_pickle_by_value(module)


def _run(ray, con, stmt, text: str, files: list, keep, spec) -> dict:
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    workers = max(1, min(cpus, len(files)))
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    data = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    # No restarts: for a restartable actor whose arguments (the model) sit in the object
    # store Ray's core prints a warning on stderr; a worker that dies fails the query (its
    # finished rows are journaled). Ray 2.60 calls such keywords deprecated.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        out = data.map_batches(
            _Worker, batch_size=1, batch_format="pyarrow", num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=workers), max_restarts=0,
            fn_constructor_kwargs={"spec": spec, "settings": dict(con.settings), "stmt": stmt,
                                   "text": text, "threads": 1})
    rows = {}
    for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            keep(row)
            rows[row["path"]] = row
    return rows
