"""Docstrings that run: every ``>>>`` example in the package is a test."""

import doctest
import importlib
import pkgutil

import pytest



PACKAGES = ("kql", "kql.language", "kql.catalog", "kql.results", "kql.grammar", "kql.planner", "kql.planner.rules", "kql.operators", "kql.cuda",
            "kql.integrations")


def modules():
    """Every module of the mapped packages (walked one by one: they live in separate folders)."""
    names = set(PACKAGES)
    for package in PACKAGES:
        path = importlib.import_module(package).__path__
        names.update(f"{package}.{info.name}" for info in pkgutil.iter_modules(path)
                     if not info.ispkg and info.name != "__main__")
    return sorted(names)


@pytest.mark.parametrize("name", modules())
def test_docstrings(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_every_layer_is_collected():
    names = modules()
    for module in ("kql.planner.physical", "kql.operators.incremental", "kql.results.output",
                   "kql.language.parser"):
        assert module in names
