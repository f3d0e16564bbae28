"""The import layering, as a whitelist of the edges between layers.

Every .py file of the packages in pyproject's ``packages`` is parsed with ``ast``; every
import counts (top level, inside functions, relative ones resolved against the package
mapping, and ``importlib.import_module("...")`` with a literal name). Each module belongs
to one layer (:func:`layer_of`), and a layer imports only the layers :data:`ALLOWED` names:

    front ends (kql/*.py) -> results, catalog, language -> planner -> operators -> cuda

with ``kql.errors`` and ``kql.fileio`` the common base under the language, the catalog,
the results and the planner. Within one floor only results -> language is an edge (the
INTO check reuses the parser's path check). The planner, the operators and cuda import
no plotting library. ``cuda/`` is never a top-level package: it would shadow NVIDIA's.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS = ("kql.cuda", "kql.operators", "kql.planner", "kql.language", "kql.catalog",
          "kql.results")
BASE = ("kql.errors", "kql.fileio")
BELOW_FLOOR = {"planner", "operators", "cuda", "base"}
ALLOWED = {
    "cuda": {"cuda"},
    "operators": {"operators", "cuda"},
    "planner": {"planner", "operators", "cuda", "base"},
    "language": {"language", "base"},
    "catalog": {"catalog"} | BELOW_FLOOR,
    "results": {"results", "language"} | BELOW_FLOOR,
    "base": {"base"},
    "front end": {"front end", "results", "catalog", "language"} | BELOW_FLOOR,
}
NO_PLOTTING = ("planner", "operators", "cuda")


def within(name: str, package: str) -> bool:
    """``name`` is ``package`` or one of its submodules."""
    return name == package or name.startswith(package + ".")


def layer_of(module: str) -> str:
    """The layer of a ``kql`` module: its sub-package's, the base's, or a front end's
    (``kql`` itself: its ``__init__`` imports the API)."""
    for package in LAYERS:
        if within(module, package):
            return package.split(".")[1]
    return "base" if module in BASE else "front end"


def rule_broken(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported``; None where it may."""
    if within(imported, "matplotlib") and layer_of(importer) in NO_PLOTTING:
        return "planner/, operators/ and cuda/ import no plotting library"
    if not within(imported, "kql"):
        return None                                    # torch, numpy, NVIDIA's cuda, ...
    source, target = layer_of(importer), layer_of(imported)
    if target not in ALLOWED[source]:
        return f"the {source} imports {', '.join(sorted(ALLOWED[source]))} only, not the {target}"
    return None


# -- reading the project ------------------------------------------------------------------------

def setuptools_config(root: Path) -> dict:
    with open(root / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def project_modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every .py file of every package in ``packages`` (a package
    not in ``package-dir`` lies under its parent's folder)."""
    conf = setuptools_config(root)
    folders = conf["package-dir"]
    out = {}
    for package in conf["packages"]:
        parent, _, leaf = package.rpartition(".")
        folder = root / (folders[package] if package in folders else Path(folders[parent]) / leaf)
        for path in sorted(folder.glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return out


def resolve(package: str, level: int, module: str | None) -> str:
    """The absolute name of ``from <level dots><module> import ...`` inside ``package``."""
    parts = package.split(".")
    if level - 1 >= len(parts):
        raise ImportError(f"relative import beyond the top-level package in {package}")
    base = ".".join(parts[:len(parts) - (level - 1)])
    return f"{base}.{module}" if module else base


def _literal_import_module(node: ast.AST) -> str | None:
    """``"x"`` of ``importlib.import_module("x")``, ``import_module("x")``, ``__import__("x")``."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)):
        return None
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return node.args[0].value if name in ("import_module", "__import__") else None


def imports(source: str, module: str, is_package: bool, known=frozenset()):
    """``(line, imported module)`` for every import in ``source``, the text of ``module``.

    ``from a import b`` imports ``a.b`` where that is a module in ``known``, else ``a``.
    """
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = resolve(package, node.level, node.module) if node.level else node.module
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield node.lineno, submodule if submodule in known else base
        elif (name := _literal_import_module(node)) and not name.startswith("."):
            yield node.lineno, name


def violations(root: Path) -> list[str]:
    """``file:line imports X (rule)`` for every import that breaks the layering."""
    modules = project_modules(root)
    known = frozenset(modules)
    out = []
    for module, path in modules.items():
        where = path.relative_to(root).as_posix()
        for line, imported in imports(path.read_text(), module, path.stem == "__init__", known):
            if why := rule_broken(module, imported):
                out.append((where, line, f"{where}:{line} imports {imported} ({why})"))
    return [text for *_, text in sorted(out)]


def top_level_cuda(conf: dict) -> list[str]:
    """Entries of the setuptools config that would make ``cuda`` a top-level package."""
    names = list(conf.get("package-dir", {})) + list(conf.get("packages", []))
    bad = [n for n in names if within(n, "cuda")]
    if not isinstance(conf.get("packages", []), list):
        bad.append(f"packages = {conf['packages']!r} (a find directive could discover cuda/)")
    return bad


# -- the project's own code -------------------------------------------------------------------

def test_layering_holds():
    found = violations(ROOT)
    assert not found, "imports against the layering:\n" + "\n".join(found)


def test_every_layer_is_scanned():
    packages = {m for m, path in project_modules(ROOT).items() if path.stem == "__init__"}
    assert {"kql", "kql.language", "kql.catalog", "kql.results", "kql.planner",
            "kql.planner.rules", "kql.operators", "kql.cuda", "kql.integrations"} <= packages
    assert {layer_of(m) for m in project_modules(ROOT)} == set(ALLOWED)


def test_pyproject_never_maps_a_top_level_cuda():
    conf = setuptools_config(ROOT)
    assert not top_level_cuda(conf), top_level_cuda(conf)
    assert conf["package-dir"].get("kql.cuda") == "cuda"


def test_cuda_folder_is_not_importable_as_cuda(tmp_path):
    """Outside the repository root, ``cuda`` is not our folder (NVIDIA's, or nothing)."""
    probe = ("import importlib.util as u; s = u.find_spec('cuda'); "
             "print(repr([s.origin, *(s.submodule_search_locations or [])] if s else []))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, text=True,
                         capture_output=True, check=True).stdout
    ours = (ROOT / "cuda").resolve()
    found = [Path(p).resolve() for p in ast.literal_eval(out) if p]
    assert not [p for p in found if p == ours or ours in p.parents], found


# -- the checker can fail -------------------------------------------------------------------------

PYPROJECT = """\
[tool.setuptools]
package-dir = { "kql" = "kql", "kql.planner" = "planner", "kql.planner.rules" = "planner/rules", "kql.operators" = "operators", "kql.cuda" = "cuda" }
packages = ["kql", "kql.language", "kql.catalog", "kql.results", "kql.planner", "kql.planner.rules", "kql.operators", "kql.cuda"]
"""

SYNTHETIC = {
    "kql/__init__.py": "from .api import connect\n",
    "kql/api.py": "from .planner import cost\nfrom .shell import run\n",   # front end: anything
    "kql/errors.py": "from .planner import cost\n",                       # line 1: base, up
    "kql/language/__init__.py": "",
    "kql/language/parser.py": "from ..catalog import images\nfrom ..errors import KqlError\n",
    "kql/catalog/__init__.py": "",
    "kql/catalog/images.py": "from ..results import overlay\nfrom ..planner import cost\n",
    "kql/results/__init__.py": "",
    "kql/results/overlay.py": "from ..language import parser\nfrom .. import api\n",   # line 2
    "kql/shell.py": "",
    "planner/__init__.py": "",
    "planner/cost.py": """\
        from ..operators import naive                 # down: fine
        from kql import errors  # the errors module: fine
        from kql.errors import KqlError               # fine
        def price():
            from kql import api  # line 5: up, inside a function
            import kql                                # line 6: the package runs the API
            from kql.catalog.images import read_image         # line 7: the catalog, above
        """,
    "planner/rules/__init__.py": "from .. import cost\nfrom ... import shell\n",   # line 2
    "operators/__init__.py": "",
    "operators/gather.py": "",
    "operators/naive.py": """\
        from kql.planner import cost
        from ..planner import cost as c2
        from . import gather
        from ..cuda import gather as g                # down: fine
        import torch
        def run():
            from ..errors import KqlError             # line 7: the front end
            importlib.import_module("kql.planner.cost")
        """,
    "cuda/__init__.py": "",
    "cuda/gather.py": "import cuda.bindings\nfrom ..operators.gather import x\n",
}


def make_tree(root: Path, files: dict, pyproject: str = PYPROJECT) -> Path:
    (root / "pyproject.toml").write_text(pyproject)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


def test_checker_finds_every_kind_of_violation(tmp_path):
    found = [v.split(" (")[0] for v in violations(make_tree(tmp_path, SYNTHETIC))]
    assert found == [
        "cuda/gather.py:2 imports kql.operators.gather",
        "kql/catalog/images.py:1 imports kql.results.overlay",
        "kql/errors.py:1 imports kql.planner.cost",
        "kql/language/parser.py:1 imports kql.catalog.images",
        "kql/results/overlay.py:2 imports kql.api",
        "operators/naive.py:1 imports kql.planner.cost",
        "operators/naive.py:2 imports kql.planner.cost",
        "operators/naive.py:7 imports kql.errors",
        "operators/naive.py:8 imports kql.planner.cost",
        "planner/cost.py:5 imports kql.api",
        "planner/cost.py:6 imports kql",
        "planner/cost.py:7 imports kql.catalog.images",
        "planner/rules/__init__.py:2 imports kql.shell",
    ]


def test_checker_on_one_source_string():
    """An operators module with ``from kql.planner import cost`` or ``from ..planner ...``."""
    for source in ("from kql.planner import cost\n", "x = 1\nfrom ..planner import cost\n"):
        found = [(line, name) for line, name in imports(source, "kql.operators.naive", False)
                 if rule_broken("kql.operators.naive", name)]
        assert found == [(source.count("\n"), "kql.planner")]


def test_relative_imports_resolve_against_the_package_mapping():
    assert resolve("kql.operators", 2, "planner") == "kql.planner"           # operators/naive.py
    assert resolve("kql.operators", 1, None) == "kql.operators"              # operators/__init__.py
    assert resolve("kql.planner.rules", 2, "cost") == "kql.planner.cost"
    assert resolve("kql.planner.rules", 3, "shell") == "kql.shell"
    with pytest.raises(ImportError):
        resolve("kql.cuda", 3, "x")
    assert list(imports("from . import naive\n", "kql.operators", True,
                        {"kql.operators.naive"})) == [(1, "kql.operators.naive")]


def test_pyproject_check_finds_a_top_level_cuda(tmp_path):
    bad = PYPROJECT.replace('"kql.cuda" =', '"cuda" =').replace('"kql.cuda"]', '"cuda"]')
    assert top_level_cuda(tomllib.loads(bad)["tool"]["setuptools"]) == ["cuda", "cuda"]
    found = {"packages": {"find": {"where": ["."]}}}
    assert top_level_cuda(found)


def test_the_lower_layers_import_no_plotting_library():
    """Display settings live with the overlay (kql.results.overlay), not in the planner."""
    assert rule_broken("kql.planner.settings", "matplotlib") is not None
    assert rule_broken("kql.operators.naive", "matplotlib.pyplot") is not None
    assert rule_broken("kql.results.overlay", "matplotlib") is None
