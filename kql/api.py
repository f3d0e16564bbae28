"""The Python API, in the spirit of DuckDB's.

>>> import kql, torch
>>> con = kql.connect()
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
...                           torch.nn.Flatten(), torch.nn.Linear(4, 2))
>>> con.register_model("net", net)
>>> con.register_image("img", torch.rand(3, 12, 10))
>>> r = con.execute("OCCLUDE img USING net PATCH 4 STRIDE 3 COLOR (0, 0, 0)")
>>> r.heatmap.shape, r.heatmap.dtype.name
((3, 3), 'float32')
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from .catalog.models import ModelSpec, input_channels
from .catalog.registry import Catalog
from .errors import KqlError, KqlExecutionError, KqlPlanError
from .language.parser import parse_with_text, path_problem
from .planner.cache import PlanCache
from .progress import ProgressBar
from .results.result import Result
from .settings import Settings


class KqlWarning(UserWarning):
    """A statement that runs, but that its caller should hear about: e.g. one predicted to
    run longer than ``SET confirm_seconds``. ``warnings.simplefilter("error", KqlWarning)``
    turns it into a refusal."""


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def _first_caller_outside_kql() -> int:
    """The ``stacklevel`` of a warning issued by the caller of this function that names
    the first frame outside KQL's own files (the user's ``execute`` line)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level


def warn_long_run(message: str) -> None:
    """The API's answer to a long predicted run: a :class:`KqlWarning`, and it runs."""
    warnings.warn(KqlWarning(f"{message}; running it (SET confirm_seconds = none: no warning)"),
                  stacklevel=_first_caller_outside_kql())


def warn(message: str) -> None:
    """The API's way to tell its caller something while the statement runs on."""
    warnings.warn(KqlWarning(message), stacklevel=_first_caller_outside_kql())


class Connection:
    """A catalog of models and images plus session settings; runs KQL text.

    ``on_long_run(message)`` is called before a run predicted longer than ``SET
    confirm_seconds``: it returns to let it run (by default after a :class:`KqlWarning`)
    or raises a :class:`~kql.errors.KqlError` to stop it (the shell asks, see
    :class:`kql.shell.Runner`). ``on_warning(message)`` hears what a statement that runs
    on should still say (a :class:`KqlWarning` by default; the shell prints it).
    """

    def __init__(self, directory: Optional[str] = None):
        self.catalog = Catalog(directory)
        self.settings = Settings()
        self.plan_cache = PlanCache()        # model profiles of recent queries
        self.on_long_run: Callable[[str], None] = warn_long_run
        self.on_warning: Callable[[str], None] = warn     # a note; the statement runs on
        self._modules: dict = {}             # registered torch modules, by name

    # -- registration -----------------------------------------------------------------

    def register_model(self, name: str, module, mean=None, std=None, input_size=None,
                       labels=None) -> None:
        """Register a torch module taking ``[B, C, H, W]`` and returning logits ``[B, classes]``.

        ``mean``/``std``: one value per channel, as many as the model's first convolution
        takes (a grey model: one each); None: the image reaches the module as pixels in [0, 1].
        """
        import torch

        if not isinstance(module, torch.nn.Module):
            raise KqlPlanError(f"register_model: expected a torch.nn.Module, got {type(module).__name__}")
        mean, std = _per_channel("mean", mean, module), _per_channel("std", std, module)
        if mean is not None and std is not None and len(mean) != len(std):
            raise KqlPlanError(f"register_model: mean has {len(mean)} values but std has {len(std)}")
        if std is not None and any(s == 0 for s in std):
            raise KqlPlanError("register_model: std values must be non-zero")
        if isinstance(input_size, int) and input_size < 1:
            raise KqlPlanError("register_model: input_size must be positive")
        # The user's module as it is: statements run it in eval mode and then put every
        # submodule's training flag back (see _statement).
        spec = ModelSpec(name, module, mean, std, input_size,
                         list(labels) if labels is not None else None)
        self.catalog.register_model(spec)
        self.plan_cache.forget(name)
        self._modules[name] = module

    def load_model(self, name: str, path: str, arch: Optional[str] = None,
                   labels: Optional[str] = None, trusted: bool = False) -> ModelSpec:
        """``LOAD MODEL name FROM 'path' [ARCH arch] [LABELS 'labels'] [TRUSTED]`` from
        Python: an ONNX, TorchScript, safetensors or ``torch.save`` file. ``trusted=True``
        lets a TorchScript file's own code run (it runs as the model loads); without it such
        a file is refused before anything of it runs.
        """
        if not isinstance(trusted, bool):
            raise KqlPlanError(f"load_model: trusted must be True or False, got "
                               f"{type(trusted).__name__}")
        for what, value in (("name", name), ("path", path), ("arch", arch), ("labels", labels)):
            if not isinstance(value, str) and (value is not None or what in ("name", "path")):
                raise KqlPlanError(f"load_model: {what} must be a string, got {type(value).__name__}")
            problem = path_problem(value) if what in ("path", "labels") and value else None
            if problem is not None:
                raise KqlPlanError(f"load_model: {what} '{value}': {problem}")
        spec = self.catalog.load_model(name, path, arch, labels, trusted)
        self.plan_cache.forget(name)
        self._modules.pop(name, None)
        return spec

    def register_image(self, name: str, image) -> None:
        """Register a torch float ``[3, H, W]`` in [0, 1] or a numpy uint8 ``HxWx3`` image."""
        self.catalog.register_image(name, image)

    def register_volume(self, name: str, volume, affine=None) -> None:
        """Register a volume (a CT or MRI scan): a float torch tensor or numpy array
        ``[C, D, H, W]`` (or ``[D, H, W]``: one channel) in the model's own intensities, with
        its 4x4 voxel-to-world ``affine`` when it has one (kept for NIfTI maps)."""
        self.catalog.register_volume(name, volume, affine)

    # -- running ---------------------------------------------------------------------------

    def execute(self, query: str, progress=None) -> Optional[Result]:
        """Run every statement of ``query``; return the last statement's result.

        ``progress``: True for a progress bar on stderr, False or None for none, or a
        callable ``progress(done, total)`` called with the patch positions done.
        """
        result = None
        for result in self.run(query, progress=progress):
            pass
        return result

    def run(self, query: str, progress=None) -> Iterator[Result]:
        """Run the statements of ``query`` one by one, yielding each result (``progress``
        as for :meth:`execute`)."""
        if not isinstance(query, str):
            raise KqlPlanError(f"a query must be a string, not {type(query).__name__}")
        return self._run(query, progress_callback(progress))

    def _run(self, query: str, progress) -> Iterator[Result]:
        for stmt, text in parse_with_text(query):
            try:
                result = self._statement(stmt, text, progress)
            except KqlError as exc:
                raise exc.at(None, None, query)
            finally:
                if isinstance(progress, _OwnBar):
                    progress.close()         # this statement's bar; the next makes its own
            yield result

    def _statement(self, stmt, text: str, progress) -> Result:
        from .executor import HANDLERS

        handler = HANDLERS.get(type(stmt))
        if handler is None:
            raise KqlExecutionError(f"unsupported statement {type(stmt).__name__}")
        from .catalog.images import memory_limit        # files it reads are held to SET memory_limit

        with modes_kept(self._modules.values()), memory_limit(self.settings["memory_limit"]):
            return handler(self, stmt, text, progress)

    def models(self) -> list[dict]:
        return self.catalog.model_rows()

    def images(self) -> list[dict]:
        return self.catalog.image_rows()


class _OwnBar(ProgressBar):
    """The bar of ``progress=True``: the API closes it after each statement."""


def progress_callback(progress) -> Optional[Callable[[int, int], None]]:
    """The ``progress(done, total)`` callback of ``execute(..., progress=...)``.

    >>> progress_callback(None), progress_callback(False), progress_callback(print) is print
    (None, None, True)
    >>> progress_callback("yes")
    Traceback (most recent call last):
    ...
    kql.errors.KqlPlanError: progress must be True, False, None or a callable progress(done, total), got 'yes'
    """
    if progress is None or progress is False:
        return None
    if progress is True:
        return _OwnBar()
    if callable(progress):
        return progress
    shown = repr(progress) if len(repr(progress)) <= 40 else type(progress).__name__
    raise KqlPlanError(f"progress must be True, False, None or a callable progress(done, total), "
                       f"got {shown}")


@contextmanager
def modes_kept(modules):
    """Put every submodule's ``training`` flag back as it was, whatever ran inside
    (the operators run a model in eval mode).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Dropout()).train()
    >>> with modes_kept([net]):
    ...     _ = net.eval()
    >>> net.training, net[0].training
    (True, True)
    """
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _per_channel(what: str, values, module) -> Optional[tuple]:
    """``values`` as floats, one per channel of ``module``'s first convolution (any number
    when it has none); None stays None."""
    if values is None:
        return None
    try:
        values = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise KqlPlanError(f"register_model: {what} must be numbers, one per channel") from None
    channels = input_channels(module, default=None)
    if not values:
        raise KqlPlanError(f"register_model: {what} must have one value per channel")
    if channels is not None and len(values) != channels:
        raise KqlPlanError(f"register_model: {what} has {len(values)} values but the model's first "
                           f"convolution takes {channels} channel{'s' if channels != 1 else ''}")
    return values


def connect(directory: Optional[str] = None) -> Connection:
    """An in-memory catalog, or one persisted in ``directory``."""
    return Connection(directory)


_default: Optional[Connection] = None


def default_connection() -> Connection:
    global _default
    if _default is None:
        _default = Connection()
    return _default


def execute(query: str, progress=None) -> Optional[Result]:
    """Run ``query`` on the default in-memory connection (like ``duckdb.sql``)."""
    return default_connection().execute(query, progress=progress)

