"""Query text to AST: a Lark LALR parser over grammar/kql.lark and a thin Transformer.

The grammar shapes the tree; this module only turns each rule into its dataclass from
:mod:`kql.ast` (with the 1-based position of the rule's first token) and turns every Lark
error into a one-line :class:`~kql.errors.KqlSyntaxError`. Defaults are not filled in
here: an omitted clause stays ``None`` and values are not range-checked.
"""

from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError

from kql import ast
from kql.ast import Pos, Statement
from kql.errors import KqlSyntaxError

__all__ = ["parse", "parse_with_text"]


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
    kql.errors.KqlSyntaxError: line 1, column 6: expected IMAGES or MODELS after SHOW, found 'TABLES'
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
        raise _syntax_error(err, text) from None
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
        return (Path(__file__).resolve().parent.parent / "grammar" / "kql.lark").read_text()


# -- tree to AST ---------------------------------------------------------------------------

def _pos(meta_or_token) -> Pos:
    return Pos(meta_or_token.line, meta_or_token.column)


def _unquote(token: Token) -> str:
    quote = token[0]
    return token[1:-1].replace(quote * 2, quote)


def _number(token: Token) -> Union[int, float]:
    return int(token) if token.isdigit() else float(token)


def _whole(token: Token, keyword: str) -> int:
    if not token.isdigit():
        raise KqlSyntaxError(f"{keyword} takes whole numbers, found '{token}'",
                             line=token.line, column=token.column)
    return int(token)


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
_CLAUSE_KEYWORDS = {"ssim": "WITH SSIM", "device": "ON"}


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
        name, path, arch, labels = children
        return ast.LoadModel(name=str(name), path=_unquote(path),
                             arch=None if arch is None else str(arch),
                             labels=None if labels is None else _unquote(labels), pos=_pos(meta))

    def load_image(self, meta, children):
        name, path = children
        return ast.LoadImage(name=str(name), path=_unquote(path), pos=_pos(meta))

    def show_models(self, meta, children):
        return ast.ShowModels(pos=_pos(meta))

    def show_images(self, meta, children):
        return ast.ShowImages(pos=_pos(meta))

    def set_option(self, meta, children):
        name, token = children
        value = (_unquote(token) if token.type == "STRING" else
                 _number(token) if token.type == "NUMBER" else str(token))
        return ast.SetOption(name=str(name), value=value, pos=_pos(meta))

    def calibrate(self, meta, children):
        device = str(children[0]).lower() if children and children[0] is not None else None
        return ast.Calibrate(device=device, pos=_pos(meta))

    def calibrate_model(self, meta, children):
        model, images, *clauses = children
        fields, where = _gather(clauses)
        return ast.CalibrateModel(model=model, images=images, pos=_pos(meta), clause_pos=where,
                                  **fields)

    def image_list(self, meta, children):
        return tuple(children)

    def image_glob(self, meta, children):
        return (ast.ImageGlob(_unquote(children[0]), pos=_pos(meta)),)

    # -- image and model
    def image_name(self, meta, children):
        return ast.ImageName(str(children[0]), pos=_pos(meta))

    def image_file(self, meta, children):
        return ast.ImageFile(_unquote(children[0]), pos=_pos(meta))

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

    def size(self, meta, children):
        return children  # [height, width or None], checked by the clause that owns it

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
        _count(meta, children, 3, "COLOR", "three numbers (r, g, b)")
        r, g, b = (float(n) for n in children)
        return ast.ColorRGB(r, g, b, pos=_pos(meta))

    def region_clause(self, meta, children):
        return _Clause("region", _pos(meta), {"region": children[0]})

    def region(self, meta, children):
        _count(meta, children, 4, "REGION", "four whole numbers (x, y, w, h)")
        x, y, w, h = (_whole(n, "REGION") for n in children)
        return ast.Region(x, y, w, h, pos=_pos(meta))

    def ssim_clause(self, meta, children):
        return _Clause("ssim", _pos(meta), {"ssim": float(children[0])})

    def drilldown_clause(self, meta, children):
        fraction, speedup = children
        return _Clause("drilldown", _pos(meta), {
            "drilldown": float(fraction), "speedup": None if speedup is None else float(speedup)})

    def device_clause(self, meta, children):
        return _Clause("device", _pos(meta), {"device": children[0].lower()})

    def batch_clause(self, meta, children):
        return _Clause("batch", _pos(meta), {"batch": _whole(children[0], "BATCH")})

    def into_clause(self, meta, children):
        return _Clause("into", _pos(meta), {"into": _unquote(children[0])})


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


def _size(numbers: list, keyword: str) -> tuple[int, int]:
    height, width = numbers
    height = _whole(height, keyword)
    return height, height if width is None else _whole(width, keyword)


# -- Lark errors to KqlSyntaxError -----------------------------------------------------------

_CLAUSES = ("_TARGET", "_PATCH", "_STRIDE", "_COLOR", "_REGION", "_WITH", "_DRILLDOWN", "_ON",
            "_BATCH", "_INTO")
_STATEMENTS = ("_OCCLUDE", "_EXPLAIN", "_LOAD", "_SHOW", "_SET", "_CALIBRATE")
_CALIBRATE_CLAUSES = ("_PATCH", "_STRIDE", "_COLOR")    # what CALIBRATE <model> shares
_IMAGE_FORMS = frozenset({"NAME", "STRING", "_SAMPLE"})
_VALUES = frozenset({"NAME", "STRING", "NUMBER", "COLOR_NAME", "DEVICE"})

# What each terminal is, in the user's words; a keyword not listed here is its own name.
_WORDS = {
    "NAME": "a name", "STRING": "a quoted string", "NUMBER": "a number",
    "COLOR_NAME": "a colour (black, gray, white, mean or (r, g, b))",
    "DEVICE": "CPU, GPU or AUTO", "_X": "'x'", "_SEMI": "';'", "_LPAR": "'('",
    "_RPAR": "')'", "_COMMA": "','", "_EQ": "'='", "_GE": "'>='", "$END": "end of input",
    "_WITH": "WITH SSIM",
}
# A name right after these keywords is a particular kind of name.
_NAME_AFTER = {"_USING": "a model name", "_MODEL": "a model name", "_IMAGE": "an image name",
               "_ARCH": "an architecture name (a torchvision builder)", "_SET": "a setting name",
               "_CALIBRATE": "a model name"}


def _syntax_error(err: UnexpectedInput, text: str) -> KqlSyntaxError:
    if isinstance(err, UnexpectedCharacters):
        message, line, column = _bad_character(err, text), err.line, err.column
    elif isinstance(err, UnexpectedToken):
        message, token = _unexpected_token(err)
        line, column = _token_pos(token, text)
    else:  # UnexpectedEOF: only other parser kinds raise it, but never let it escape
        message, (line, column) = "unexpected end of input", _end_of(text)
    return KqlSyntaxError(message, line=line, column=column, source=text)


def _bad_character(err: UnexpectedCharacters, text: str) -> str:
    char = text[err.pos_in_stream]
    if char in "'\"":
        return "unterminated string: the closing quote is missing on this line"
    if char == "-" and text[err.pos_in_stream + 1:err.pos_in_stream + 2] in tuple("0123456789."):
        return "unexpected '-': negative numbers are not allowed"
    expected = _acceptable(err, err.allowed) - {"<END-OF-FILE>", "$END"}
    return f"unexpected character {char!r}" + (f"; expected {_describe(expected)}"
                                              if expected else "")


def _unexpected_token(err: UnexpectedToken) -> tuple[str, Token]:
    """The message for a token the grammar does not allow here, and the token to point at."""
    token, expected = err.token, _acceptable(err, err.expected)
    stack = _value_stack(err)
    previous = _last_token(stack[-1]) if stack else None
    misread = _keyword_read_as_name(stack) or _calibrate_mistake(token, expected, stack)
    if misread is not None:
        return misread
    found = "end of input" if token.type == "$END" else _quoted(token)
    if token.type == "NAME" and (set(_CLAUSES) <= expected or set(_CALIBRATE_CLAUSES) <= expected):
        return f"unknown clause {found}; expected {_describe(expected)}", token
    if token.type == "NAME" and set(_STATEMENTS) <= expected:
        return f"unknown statement {found}; expected {_describe(expected)}", token
    if expected == {"_USING"}:
        after = " after the image"
    elif previous is not None:
        after = f" after {_show(previous)}"
    else:
        after = ""
    what = _describe(expected, previous)
    if token.type == "$END":
        return f"unexpected end of input: expected {what}{after}", token
    return f"expected {what}{after}, found {found}", token


def _acceptable(err: UnexpectedInput, fallback) -> set:
    """The terminals the parser really accepts where it failed.

    LALR merges states with the same items, and with them their lookaheads: the state
    after an image name is one state in ``OCCLUDE img`` and ``CALIBRATE m ON (img``, so
    Lark's own expected set would offer ')' after an OCCLUDE image. Feeding each candidate
    to a copy of the parser keeps only what can follow here.
    """
    parser = getattr(err, "interactive_parser", None)
    if parser is None:
        return set(fallback or ())
    return set(parser.accepts())


def _keyword_read_as_name(stack: list) -> Optional[tuple[str, Token]]:
    """``OCCLUDE USING m`` or ``... USING PATCH 8``: a keyword the lexer took for the name."""
    if len(stack) < 2 or not all(isinstance(t, Token) for t in stack[-2:]):
        return None
    before, name = stack[-2:]
    if name.type != "NAME":
        return None
    if before.type == "_OCCLUDE" and name.upper() == "USING":
        return f"expected an image after OCCLUDE, found {_quoted(name)}", name
    if before.type == "_USING" and f"_{name.upper()}" in _CLAUSES:
        return f"expected a model name after USING, found {_quoted(name)}", name
    return None


def _calibrate_mistake(token: Token, expected: set, stack: list) -> Optional[tuple[str, Token]]:
    """CALIBRATE's own slips: no images in ``()``, an OCCLUDE-only clause, no model."""
    tokens = [t for t in stack if isinstance(t, Token)]
    if not tokens or tokens[0].type != "_CALIBRATE":
        return None
    found = "end of input" if token.type == "$END" else _quoted(token)
    if _IMAGE_FORMS <= expected and token.type == "_RPAR" and tokens[-1].type == "_LPAR":
        return "CALIBRATE needs at least one image in the parentheses, found ')'", token
    if expected == {"_LPAR", "STRING"}:
        return (f"expected the images after ON: in parentheses, like (a, 'b.png', "
                f"sample('cat')), or a quoted glob like 'cats/*.png'; found {found}"), token
    if expected == {"DEVICE"} and token.type in ("_LPAR", "STRING"):
        return (f"expected CPU, GPU or AUTO after ON, found {found}; to tune a model on "
                f"images, name it first: CALIBRATE <model> ON (...)"), token
    clause = "_" + str(token).upper()
    if set(_CALIBRATE_CLAUSES) <= expected and clause in _CLAUSES and clause not in expected:
        return (f"{_word(clause)} is not a CALIBRATE clause; expected "
                f"{_describe(expected)}"), token
    return None


def _last_token(value) -> Optional[Token]:
    """The last token of a value on the parser's stack (a token, or a rule it reduced)."""
    if isinstance(value, Token):
        return value
    tokens = list(value.scan_values(lambda v: isinstance(v, Token))) if isinstance(value, Tree) else []
    return tokens[-1] if tokens else None


def _value_stack(err: UnexpectedToken) -> list:
    parser = getattr(err, "interactive_parser", None)
    return list(parser.parser_state.value_stack) if parser is not None else []


def _describe(expected: set, previous: Optional[Token] = None) -> str:
    """``{'_PATCH', '_SEMI', ...}`` in words: "a clause (TARGET, PATCH, ...) or ';'"."""
    expected = set(expected)
    if "_SEMI" in expected:
        expected.discard("$END")  # "';' or end of input" says no more than "';'"
    if set(_STATEMENTS) <= expected:
        expected -= {"_SEMI", "$END"}  # an empty statement is allowed, but not worth saying
    words = []  # (rank, text): see _order
    if _IMAGE_FORMS <= expected:
        expected -= _IMAGE_FORMS
        words.append((1, "an image (a name, a quoted file name or sample('<name>'))"))
    for group, label in ((_STATEMENTS, "a statement"), (_CLAUSES, "a clause"),
                         (_CALIBRATE_CLAUSES, "a clause")):
        if set(group) <= expected:
            expected -= set(group)
            words.append((1, f"{label} ({', '.join(_word(t) for t in group)})"))
    for name in expected:
        word = _word(name)
        if name == "NAME" and previous is not None:
            word = _NAME_AFTER.get(previous.type, word)
        words.append((_order(name), word))
    words = [word for _, word in sorted(words)]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _word(terminal: str) -> str:
    return _WORDS.get(terminal, terminal.lstrip("_"))


def _order(terminal: str) -> int:
    """Keywords (and the size separator 'x') first, then values, punctuation, end of input."""
    if terminal == "$END":
        return 3
    if terminal == "_X":
        return 0
    return 2 if _word(terminal).startswith("'") else 1 if terminal in _VALUES else 0


def _show(token: Token) -> str:
    """A token for "after ...": keywords in capitals, anything else quoted."""
    if token.type.lstrip("_") == token.upper() and token.type != "_X":
        return token.upper()
    return _quoted(token)


def _quoted(token: Token) -> str:
    """A token as the user wrote it, in quotes (a string keeps its own)."""
    text = str(token) if len(token) <= 40 else token[:37] + "..."
    return text if token.type == "STRING" else repr(text)


def _token_pos(token: Token, text: str) -> tuple[int, int]:
    if token.type != "$END":
        return token.line, token.column
    if token.end_line is None:  # no token at all before the end
        return _end_of(text)
    return token.end_line, token.end_column  # just past the last token


def _end_of(text: str) -> tuple[int, int]:
    lines = text.split("\n")
    return len(lines), len(lines[-1]) + 1
