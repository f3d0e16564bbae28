"""Lark's parse errors as one-line :class:`~kql.errors.KqlSyntaxError` errors: line, column
and what was expected there, in the user's words (a keyword, a name, a number, ...)."""

from __future__ import annotations

import difflib
from typing import Optional

from lark import Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from kql.errors import KqlSyntaxError

_CLAUSES = ("_TARGET", "_PATCH", "_STRIDE", "_COLOR", "_REGION", "_WITH", "_DRILLDOWN", "_ON",
            "_BATCH", "_INTO", "_RESIZE", "_OUTPUT", "_WHERE", "_ORDER", "_LIMIT")
_STATEMENTS = ("_OCCLUDE", "_EXPLAIN", "_LOAD", "_SHOW", "_SET", "_CALIBRATE")
_CALIBRATE_CLAUSES = ("_PATCH", "_STRIDE", "_COLOR")    # what CALIBRATE <model> shares
_IMAGE_FORMS = frozenset({"NAME", "STRING", "_SAMPLE"})
_VALUES = frozenset({"NAME", "STRING", "NUMBER", "COLOR_NAME", "DEVICE"})

# What each terminal is, in the user's words; a keyword not listed here is its own name.
_WORDS = {
    "NAME": "a name", "STRING": "a quoted string", "NUMBER": "a number",
    "COLOR_NAME": "a colour (black, gray, white, mean, mean_patch, gaussian or (r, g, b))",
    "DEVICE": "CPU, GPU or AUTO", "RESIZE_MODE": "SQUASH, CROP or PAD",
    "OUTPUT_MODE": "SOFTMAX, SIGMOID, LOGITS or PROBABILITY", "_COLON": "':'",
    "COMPARISON": "a comparison (>=, <=, > or <)", "DIRECTION": "ASC or DESC",
    "_ORDER": "ORDER BY", "_X": "'x'", "_SEMI": "';'", "_LPAR": "'('",
    "_RPAR": "')'", "_COMMA": "','", "_EQ": "'='", "_GE": "'>='", "$END": "end of input",
    "_WITH": "WITH SSIM",
}
# The words of the terminals that are a choice of keywords, for "did you mean".
_CHOICES = {"DEVICE": ("CPU", "GPU", "AUTO"), "RESIZE_MODE": ("SQUASH", "CROP", "PAD"),
            "OUTPUT_MODE": ("SOFTMAX", "SIGMOID", "LOGITS", "PROBABILITY"),
            "DIRECTION": ("ASC", "DESC"), "COLOR_NAME": ("BLACK", "GRAY", "WHITE", "MEAN", "MEAN_PATCH", "GAUSSIAN")}
# A name right after these keywords is a particular kind of name.
_NAME_AFTER = {"_USING": "a model name", "_MODEL": "a model name", "_IMAGE": "an image name",
               "_ARCH": "an architecture (resnet18, timm:resnet18 or 'module:factory')", "_SET": "a setting name",
               "_CALIBRATE": "a model name"}


def syntax_error(err: UnexpectedInput, text: str) -> KqlSyntaxError:
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
    if token.type == "_MINUS":                      # only COLOR (-v) takes a sign
        return "unexpected '-': negative numbers are not allowed", token
    stack = _value_stack(err)
    previous = _last_token(stack[-1]) if stack else None
    misread = _keyword_read_as_name(stack) or _calibrate_mistake(token, expected, stack)
    if misread is not None:
        return misread
    found = "end of input" if token.type == "$END" else _quoted(token)
    hint = _did_you_mean(token, expected)
    if token.type == "NAME" and (set(_CLAUSES) <= expected or set(_CALIBRATE_CLAUSES) <= expected):
        return f"unknown clause {found}; {hint or 'expected ' + _describe(expected)}", token
    if token.type == "NAME" and set(_STATEMENTS) <= expected:
        return f"unknown statement {found}; {hint or 'expected ' + _describe(expected)}", token
    if expected == {"_USING"}:
        after = " after the image"
    elif previous is not None:
        after = f" after {_show(previous)}"
    else:
        after = ""
    what = _describe(expected, previous)
    if token.type == "$END":
        return f"unexpected end of input: expected {what}{after}", token
    return f"expected {what}{after}, found {found}" + (f"; {hint}" if hint else ""), token


def _did_you_mean(token: Token, expected: set) -> str:
    """``did you mean PATCH?`` for a name that is close to a keyword allowed here; ''.

    A misspelt keyword is read as a NAME, so only a NAME gets a hint.

    >>> _did_you_mean(Token("NAME", "OCLUDE"), {"_OCCLUDE", "_SHOW", "_SEMI"})
    'did you mean OCCLUDE?'
    >>> _did_you_mean(Token("NAME", "ordr"), {"_ORDER", "_LIMIT"}), _did_you_mean(Token("NAME", "cpuu"), {"DEVICE"})
    ('did you mean ORDER BY?', 'did you mean CPU?')
    >>> _did_you_mean(Token("NAME", "SELECT"), {"_SET", "_SHOW"})
    ''
    """
    if token.type != "NAME":
        return ""
    words = {}                                  # the word as typed -> how to say it
    for terminal in expected:
        for choice in _CHOICES.get(terminal, ()):
            words[choice] = choice
        said = _word(terminal)
        if said.replace(" ", "").isalpha() and said.isupper():
            words[terminal.lstrip("_")] = said
    close = difflib.get_close_matches(str(token).upper(), words, n=1, cutoff=0.8)
    return f"did you mean {words[close[0]]}?" if close else ""


def _acceptable(err: UnexpectedInput, fallback) -> set:
    """The terminals the parser really accepts where it failed.

    LALR merges states with the same items, and with them their lookaheads: the state
    after an image name is one state in ``OCCLUDE img`` and ``CALIBRATE m ON (img``, so
    Lark's own expected set would offer ')' after an OCCLUDE image. Feeding each candidate
    to a copy of the parser keeps only what can follow here.
    """
    parser = getattr(err, "interactive_parser", None)
    accepted = set(fallback or ()) if parser is None else set(parser.accepts())
    return accepted - {"_MINUS"} if "NUMBER" in accepted else accepted    # a sign is part of a number


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
