"""KQL: declarative, fast and exact occlusion heat maps for image CNNs.

>>> import kql
>>> kql.parse("SHOW MODELS")
[ShowModels()]

The public names are imported on first use (PEP 562), so that ``import kql.errors`` or
the start of the ``kql`` command loads no torch: the command catches Ctrl-C before
anything heavy is imported (see :mod:`kql.cli`).
"""

import importlib

__version__ = "0.1.0"

# Each public name and the module it lives in.
_EXPORTS = {
    "Connection": "api", "connect": "api", "execute": "api", "parse": "language.parser",
    "Result": "results.result", "ResultSet": "results.resultset", "KqlError": "errors", "KqlSyntaxError": "errors",
    "KqlPlanError": "errors", "KqlNotSupportedError": "errors", "KqlModelError": "errors",
    "KqlImageError": "errors", "KqlExecutionError": "errors", "KqlWarning": "api",
}

__all__ = ["Connection", "connect", "execute", "parse", "Result", "ResultSet", "KqlError", "KqlSyntaxError",
           "KqlPlanError", "KqlNotSupportedError", "KqlModelError", "KqlImageError",
           "KqlExecutionError", "KqlWarning", "__version__"]


def __getattr__(name: str):
    """A public name, imported now; or a submodule (``kql.api``), as an eager import gave."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    from importlib.util import find_spec

    if not name.startswith("_") and find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
