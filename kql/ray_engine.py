"""Many-image queries on Ray Data (``ON RAY``, ``SET engine = 'ray'``).

The image paths become a Ray dataset; ``map_batches`` runs them through a pool of
actors, one per worker CPU, each holding the model and its own plan (the first image's,
rebound per image, as in one process: :class:`kql.many.Scanner`); the rows stream back
to the driver, which journals and writes them exactly as the local engine does. Ray's
scheduler, actor pool and object store do the distributing; nothing here schedules.

On a cluster (``SET ray_address = 'ray://head:10001'``) every node must see the image
files at the same paths (a shared file system) and hold one copy of the model per worker;
the driver writes the Parquet table. Ray is an optional extra: ``pip install 'kql[ray]'``.
"""

from __future__ import annotations

from .errors import KqlExecutionError


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
        try:
            ray.init(address=None if address == "local" else address, include_dashboard=False,
                     log_to_driver=False, logging_level="ERROR")
        except Exception as exc:        # ConnectionError, RuntimeError, ValueError of Ray's
            raise KqlExecutionError(f"cannot start Ray at '{address}': "
                                    f"{' '.join(str(exc).split())[:200]}") from None
    return ray


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

        from kql.resultset import schema

        rows = [self.scanner.row(path) for path in batch.column("path").to_pylist()]
        return pa.Table.from_pylist(rows, schema=schema())


def run_on_ray(con, stmt, text: str, files: list, keep) -> dict:
    """``{path: row}`` of each file, computed by Ray actors; ``keep(row)`` as rows arrive."""
    if not files:
        return {}
    ray = start(con.settings["ray_address"])
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    workers = max(1, min(cpus, len(files)))
    spec = con.catalog.resolve_model(stmt.model.name)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    data = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    out = data.map_batches(
        _Worker, batch_size=1, batch_format="pyarrow", num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=workers),
        fn_constructor_kwargs={"spec": spec, "settings": dict(con.settings), "stmt": stmt,
                               "text": text, "threads": 1})
    rows = {}
    for batch in out.iter_batches(batch_format="pyarrow", batch_size=None):
        for row in batch.to_pylist():
            keep(row)
            rows[row["path"]] = row
    return rows
