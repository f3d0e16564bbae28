"""Query text to AST: a Lark LALR parser over grammar/kql.lark and a thin Transformer.

The grammar shapes the tree; this module only turns each rule into its dataclass from
:mod:`kql.language.ast` (with the 1-based position of the rule's first token); every Lark error
becomes a one-line :class:`~kql.errors.KqlSyntaxError` (:mod:`kql.language.parse_errors`). Defaults are not filled in
here: an omitted clause stays ``None`` and values are not range-checked, except what no
later stage could hold: a whole number above :data:`MAX_WHOLE`, a number that is not finite
as a float or is not 0 but below the smallest normal float (1e-320), and a file name the
operating system cannot take (a NUL, a lone surrogate) are refused here, at their own line
and column.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedInput, VisitError

from kql.language import ast
from kql.language.ast import Pos, Statement
from kql.errors import KqlSyntaxError, shorten
from kql.language.parse_errors import syntax_error

__all__ = ["parse", "parse_with_text", "path_problem", "MAX_WHOLE"]

# The largest whole number a query may write (2**31 - 1): anything larger is a typo for
# every clause, and what is below it fits every C int that torch and numpy hand it to.
MAX_WHOLE = 2**31 - 1


def parse(text: str) -> list[Statement]:
    """Parse KQL text into its statements; empty statements (``;;``) are dropped.

    >>> occlude, show = parse("OCCLUDE img USING resnet18 PATCH 16 x 8; SHOW MODELS")
    >>> occlude.model, occlude.patch, occlude.stride
    (ModelName(name='resnet18'), (16, 8), None)
    >>> show == ast.ShowModels()  # positions take no part in equality
    True
    >>> parse("SHOW TABLES")
    Traceback (most recent call last):
    ...
    kql.errors.KqlSyntaxError: line 1, column 6: expected IMAGES, MODELS or SETTINGS after SHOW, found 'TABLES'
    """
    return [statement for statement, _ in parse_with_text(text)]


def parse_with_text(text: str) -> list[tuple[Statement, str]]:
    """Like :func:`parse`, each statement paired with the exact source text it came from.

    >>> [(type(s).__name__, t) for s, t in parse_with_text("show models ; SET batch = 32;")]
    [('ShowModels', 'show models'), ('SetOption', 'SET batch = 32')]
    """
    try:
        tree = _lark().parse(text)
        return [(_ToAst().transform(child), text[child.meta.start_pos:child.meta.end_pos])
                for child in tree.children if child is not None]
    except UnexpectedInput as err:
        raise syntax_error(err, text) from None
    except VisitError as err:
        if isinstance(err.orig_exc, KqlSyntaxError):
            raise err.orig_exc.at(None, None, text) from None
        raise


@functools.lru_cache(maxsize=None)
def _lark() -> Lark:
    return Lark(_grammar_text(), parser="lalr", lexer="contextual", propagate_positions=True,
                maybe_placeholders=True)


def _grammar_text() -> str:
    try:
        return (importlib.resources.files("kql.grammar") / "kql.lark").read_text()
    except ModuleNotFoundError:  # a source checkout that is not installed
        return (Path(__file__).resolve().parents[2] / "grammar" / "kql.lark").read_text()


# -- tree to AST ---------------------------------------------------------------------------

def _pos(meta_or_token) -> Pos:
    return Pos(meta_or_token.line, meta_or_token.column)


def _unquote(token: Token) -> str:
    quote = token[0]
    return token[1:-1].replace(quote * 2, quote)


def _number(token: Token, keyword: str) -> Union[int, float]:
    return _bounded(token, keyword) if token.isdigit() else _real(token, keyword)


def _whole(token: Token, keyword: str) -> int:
    if not token.isdigit():
        raise KqlSyntaxError(f"{keyword} takes whole numbers, found '{shorten(token, 20)}'",
                             line=token.line, column=token.column)
    return _bounded(token, keyword)


def _bounded(token: Token, keyword: str) -> int:
    """A string of digits as an int, refused above :data:`MAX_WHOLE` (before ``int()``,
    which refuses 4,300 digits with an error of its own)."""
    digits = token.lstrip("0") or "0"
    if len(digits) > len(str(MAX_WHOLE)) or int(digits) > MAX_WHOLE:
        raise KqlSyntaxError(f"{keyword} takes numbers up to {MAX_WHOLE}, found "
                             f"{shorten(token, 20)}", line=token.line, column=token.column)
    return int(digits)


def _real(token: Token, keyword: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise KqlSyntaxError(f"{keyword}: the number {shorten(token, 20)} is too large",
                             line=token.line, column=token.column)
    if abs(value) < sys.float_info.min and token.lower().partition("e")[0].strip("0."):
        # Below the smallest normal float: rounded to 0 or to a few bits, never what was meant.
        raise KqlSyntaxError(f"{keyword}: the number {shorten(token, 20)} is too small (write 0, "
                             f"or a number of at least {sys.float_info.min:.1e})",
                             line=token.line, column=token.column)
    return value


def path_problem(path: str) -> Optional[str]:
    """Why the operating system cannot take ``path`` as a file name, or None.

    >>> path_problem("maps/cat.png") is None
    True
    >>> path_problem("cat\\x00.png"), path_problem("\\udd45.npy")[:33]
    ('a file name cannot contain a NUL character', 'the file name cannot be encoded i')
    """
    if "\x00" in path:
        return "a file name cannot contain a NUL character"
    try:
        os.fsencode(path)
    except UnicodeError:
        encoding = sys.getfilesystemencoding()
        return f"the file name cannot be encoded in the file system's encoding ({encoding})"
    return None


def _path(token: Token, keyword: str) -> str:
    """A quoted file name, refused where no file could have it."""
    path = _unquote(token)
    problem = path_problem(path)
    if problem is not None:
        raise KqlSyntaxError(f"{keyword} '{shorten(path)}': {problem}",
                             line=token.line, column=token.column)
    return path


def _count(meta, numbers: list, expected: int, keyword: str, what: str) -> None:
    if len(numbers) != expected:
        raise KqlSyntaxError(f"{keyword} takes {what}, found {len(numbers)} number"
                             f"{'' if len(numbers) == 1 else 's'}",
                             line=meta.line, column=meta.column)


@dataclass(frozen=True)
class _Clause:
    """One clause after USING: its name in ``Occlude.clause_pos`` and the fields it sets."""
    name: str
    pos: Pos
    fields: dict = field(default_factory=dict)


# The keyword a user wrote for each clause, for "duplicate ... clause".
_CLAUSE_KEYWORDS = {"ssim": "WITH SSIM", "device": "ON", "ray": "ON RAY", "order": "ORDER BY"}


@v_args(meta=True)
class _ToAst(Transformer):
    """One method per grammar rule (or ``-> alias``); terminals arrive as Lark tokens."""

    # -- statements
    def occlude(self, meta, children):
        image, model, *clauses = children
        fields, where = _gather(clauses)
        return ast.Occlude(image=image, model=model, pos=_pos(meta), clause_pos=where, **fields)

    def explain(self, meta, children):
        analyze, statement = children
        return ast.Explain(statement=statement, analyze=analyze is not None, pos=_pos(meta))

    def load_model(self, meta, children):
        name, path, arch, labels, trusted = children
        return ast.LoadModel(name=str(name), path=_path(path, "LOAD MODEL FROM"), arch=arch,
                             labels=None if labels is None else _path(labels, "LABELS"),
                             trusted=trusted is not None, pos=_pos(meta))

    def load_image(self, meta, children):
        name, path = children
        return ast.LoadImage(name=str(name), path=_path(path, "LOAD IMAGE FROM"), pos=_pos(meta))

    def load_images(self, meta, children):
        name, pattern = children
        return ast.LoadImages(name=str(name), pattern=_path(pattern, "LOAD IMAGES FROM"),
                              pos=_pos(meta))

    def show_settings(self, meta, children):
        return ast.ShowSettings(pos=_pos(meta))

    def show_models(self, meta, children):
        return ast.ShowModels(pos=_pos(meta))

    def show_images(self, meta, children):
        return ast.ShowImages(pos=_pos(meta))

    def set_option(self, meta, children):
        name, token = children
        value = (_unquote(token) if token.type == "STRING" else
                 _number(token, f"SET {name}") if token.type == "NUMBER" else str(token))
        return ast.SetOption(name=str(name), value=value, pos=_pos(meta))

    def calibrate(self, meta, children):
        device = str(children[0]).lower() if children and children[0] is not None else None
        return ast.Calibrate(device=device, pos=_pos(meta))

    def calibrate_model(self, meta, children):
        model, images, *clauses = children
        fields, where = _gather(clauses)
        return ast.CalibrateModel(model=model, images=images, pos=_pos(meta), clause_pos=where,
                                  **fields)

    def arch_name(self, meta, children):
        return str(children[0])

    def arch_qualified(self, meta, children):
        return f"{children[0]}:{children[1]}"

    def arch_string(self, meta, children):
        text = _unquote(children[0])
        if not text.strip() or len(text) > 500 or not text.isprintable():
            raise KqlSyntaxError("ARCH needs an architecture such as resnet18, timm:resnet18 "
                                 "or 'package.module:factory'",
                                 line=children[0].line, column=children[0].column)
        return text

    def image_list(self, meta, children):
        return tuple(children)

    def image_glob(self, meta, children):
        return (ast.ImageGlob(_path(children[0], "image files"), pos=_pos(meta)),)

    # -- image and model
    def image_name(self, meta, children):
        return ast.ImageName(str(children[0]), pos=_pos(meta))

    def image_file(self, meta, children):
        return ast.ImageFile(_path(children[0], "image file"), pos=_pos(meta))

    def sample_image(self, meta, children):
        return ast.SampleImage(_unquote(children[0]), pos=_pos(meta))

    def model(self, meta, children):
        return ast.ModelName(str(children[0]), pos=_pos(meta))

    # -- clauses
    def target_clause(self, meta, children):
        return _Clause("target", _pos(meta), {"target": children[0]})

    def target_index(self, meta, children):
        return ast.TargetIndex(_whole(children[0], "TARGET"), pos=_pos(meta))

    def target_label(self, meta, children):
        return ast.TargetLabel(_unquote(children[0]), pos=_pos(meta))

    def target_predicted(self, meta, children):
        return ast.TargetPredicted(pos=_pos(meta))

    def target_list(self, meta, children):
        return ast.TargetList(tuple(children), pos=_pos(meta))

    def target_top(self, meta, children):
        k = _whole(children[0], "TARGET TOP")
        if k < 1:
            raise KqlSyntaxError("TARGET TOP needs at least 1 class", line=children[0].line,
                                 column=children[0].column)
        return ast.TargetTop(k, pos=_pos(meta))

    def resize_clause(self, meta, children):
        return _Clause("resize", _pos(meta), {"resize": children[0].lower()})

    def ray_clause(self, meta, children):
        return _Clause("ray", _pos(meta), {"ray": True})

    def where_clause(self, meta, children):
        column, op, value = children     # a number, or a quoted text for path and label
        value = _unquote(value) if value.type == "STRING" else _real(value, "WHERE")
        return _Clause("where", _pos(meta), {"where": (str(column).lower(), str(op), value)})

    def order_clause(self, meta, children):
        column, direction = children
        descending = direction is not None and direction.lower() == "desc"
        return _Clause("order", _pos(meta), {"order": (str(column).lower(), descending)})

    def limit_clause(self, meta, children):
        return _Clause("limit", _pos(meta), {"limit": _whole(children[0], "LIMIT")})

    def output_clause(self, meta, children):
        return _Clause("output", _pos(meta), {"output": children[0].lower()})

    def size(self, meta, children):
        return children  # [first, second or None, third or None], checked by the clause that owns it

    def patch_clause(self, meta, children):
        return _Clause("patch", _pos(meta), {"patch": _size(children[0], "PATCH")})

    def stride_clause(self, meta, children):
        return _Clause("stride", _pos(meta), {"stride": _size(children[0], "STRIDE")})

    def color_clause(self, meta, children):
        return _Clause("color", _pos(meta), {"color": children[0]})

    def color_named(self, meta, children):
        name = children[0].lower()
        return ast.ColorNamed("gray" if name == "grey" else name, pos=_pos(meta))

    def color_rgb(self, meta, children):
        if len(children) == 1:
            return ast.ColorValue(_real(children[0], "COLOR"), pos=_pos(meta))
        _count(meta, children, 3, "COLOR", "three numbers (r, g, b) or one value")
        r, g, b = (_real(n, "COLOR") for n in children)
        return ast.ColorRGB(r, g, b, pos=_pos(meta))

    def color_negative(self, meta, children):
        return ast.ColorValue(-_real(children[0], "COLOR"), pos=_pos(meta))

    def region_clause(self, meta, children):
        return _Clause("region", _pos(meta), {"region": children[0]})

    def region(self, meta, children):
        if len(children) == 6:                          # a volume's (x, y, z, w, h, d)
            x, y, z, w, h, d = (_whole(n, "REGION") for n in children)
            return ast.Region(x, y, w, h, z, d, pos=_pos(meta))
        _count(meta, children, 4, "REGION", "four whole numbers (x, y, w, h), or a volume's six")
        x, y, w, h = (_whole(n, "REGION") for n in children)
        return ast.Region(x, y, w, h, pos=_pos(meta))

    def ssim_clause(self, meta, children):
        return _Clause("ssim", _pos(meta), {"ssim": _real(children[0], "WITH SSIM")})

    def drilldown_clause(self, meta, children):
        fraction, speedup = children
        return _Clause("drilldown", _pos(meta), {
            "drilldown": _real(fraction, "DRILLDOWN"),
            "speedup": None if speedup is None else _real(speedup, "SPEEDUP")})

    def device_clause(self, meta, children):
        return _Clause("device", _pos(meta), {"device": children[0].lower()})

    def batch_clause(self, meta, children):
        return _Clause("batch", _pos(meta), {"batch": _whole(children[0], "BATCH")})

    def into_clause(self, meta, children):
        return _Clause("into", _pos(meta), {"into": _path(children[0], "INTO")})


def _gather(clauses: list) -> tuple[dict, tuple]:
    """The fields the clauses set and where each was written; a repeated clause is an error."""
    fields, where = {}, []
    for clause in clauses:
        if clause.name in dict(where):
            keyword = _CLAUSE_KEYWORDS.get(clause.name, clause.name.upper())
            raise KqlSyntaxError(f"duplicate {keyword} clause",
                                 line=clause.pos.line, column=clause.pos.column)
        fields.update(clause.fields)
        where.append((clause.name, clause.pos))
    return fields, tuple(where)


def _size(numbers: list, keyword: str) -> tuple:
    """(height, width), (depth, height, width), or one number as :class:`ast.Same`."""
    given = [_whole(n, keyword) for n in numbers if n is not None]
    return ast.Same((given[0],) * 2) if len(given) == 1 else tuple(given)
