"""The KQL error hierarchy.

Every bad input a user can give (query text, image file, model file, parameters) ends in
one of these, with a one-line message that names what was wrong and where. The shell and
the CLI print ``str(error)`` and, for query text, the caret lines of :meth:`KqlError.context`;
they never show a traceback.

>>> err = KqlSyntaxError("unexpected 'x'", line=1, column=9, source="OCCLUDE x x")
>>> str(err)
"line 1, column 9: unexpected 'x'"
>>> print(err.context())
  OCCLUDE x x
          ^

Whatever a message is built from (a 1M-character name, torch's coloured text, a NUL), it
stays one short line: see :func:`one_line`.

>>> len(str(KqlPlanError(f"unknown model '{'n' * 10**6}'")))
176
"""

from __future__ import annotations

import re

# The longest message (without its "line L, column C: " prefix) and the longest word in it.
MESSAGE_LIMIT = 300
WORD_LIMIT = 160     # a long path stays readable; a 1M-character name does not fill the screen

# ANSI escapes: CSI (colours, cursor moves), OSC (titles, links) and the two-byte ones.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
# Everything a terminal or str.splitlines() breaks a line at, and tabs.
_BREAKS = re.compile(r"[\t\n\v\f\r\x1c-\x1e\x85\u2028\u2029]+")
_LONG_WORD = re.compile(r"\S{%d,}" % (WORD_LIMIT + 3))
_CLOSERS = "'\")]}>:;,.?!"


NAME_LIMIT = 60      # a name or value quoted by a message that also says what is wrong with it


def shorten(text: str, limit: int = NAME_LIMIT) -> str:
    """``text`` cut to its first ``limit`` characters and '…' when it is longer.

    >>> shorten("resnet18"), shorten("x" * 100, 5)
    ('resnet18', 'xxxxx…')
    """
    return text if len(text) <= limit else text[:limit] + "…"


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences (colours, cursor moves, titles).

    >>> strip_ansi("\\x1b[1mbad\\x1b[0m")
    'bad'
    """
    return _ANSI.sub("", text)


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """A message fit for one terminal line: no ANSI escapes, line breaks made spaces, other
    control characters and lone surrogates written as escapes, each word of more than
    :data:`WORD_LIMIT` characters shortened in its middle (its quotes kept), the whole at most
    ``limit`` characters.

    >>> one_line("\\x1b[31mboom\\x1b[0m\\nat 'a\\x00b'")
    "boom at 'a\\\\x00b'"
    >>> short = one_line(f"cannot read '/data/{'d' * 300}/scan.png'.")
    >>> short[:22], short[-14:], len(short)
    ("cannot read '/data/ddd", "ddd/scan.png'.", 175)
    >>> len(one_line("unknown image " + "i" * 10**6))
    175
    """
    text = _BREAKS.sub(" ", strip_ansi(str(text)))
    text = _LONG_WORD.sub(_shorten_word, text)[:2 * limit]     # bounded before the slow part
    text = "".join(ch if ch.isprintable() or ch == " " else _escape(ch) for ch in text)
    text = _LONG_WORD.sub(_shorten_word, text)                  # escapes lengthen words
    return shorten(text, limit - 1)


def _escape(ch: str) -> str:
    return " " if ch.isspace() else ch.encode("unicode_escape", "backslashreplace").decode("ascii")


def _shorten_word(match: re.Match) -> str:
    word = match.group()
    body = word.rstrip(_CLOSERS)
    tail = word[len(body):][-3:]
    # An opening quote and the mark of an already shortened word do not count.
    if len(body) <= WORD_LIMIT + 2:
        return word
    half = WORD_LIMIT // 2           # the middle goes: a path keeps its folder and its name
    return body[:half] + "…" + body[-half:] + tail


class KqlError(Exception):
    """Base of every error KQL reports to a user.

    ``line`` and ``column`` (1-based) point into the query text when the error is about it.
    The message is made one bounded line here (:func:`one_line`), whoever raised it.
    """

    kind = "error"

    def __init__(self, message: str, *, line: int | None = None, column: int | None = None,
                 source: str | None = None):
        message = one_line(message)
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column
        self.source = source

    def at(self, line: int | None, column: int | None, source: str | None = None) -> "KqlError":
        """Attach a query position (keeps one already attached)."""
        if self.line is None and line is not None:
            self.line, self.column = line, column
        if self.source is None and source is not None:
            self.source = source
        return self

    def __str__(self) -> str:
        if self.line is not None:
            return f"line {self.line}, column {self.column}: {self.message}"
        return self.message

    def context(self, width: int = 76) -> str:
        """The offending source line and a caret under the column, or '' if unknown.

        A long line is shown as the ``width`` characters around the column; characters a
        terminal would not print one-for-one are shown as '?', so the caret stays aligned.

        >>> err = KqlSyntaxError("here", line=1, column=1001, source="a" * 1000 + "!" + "b" * 1000)
        >>> print(err.context(width=9))
          …aaaa!bbbb…
               ^
        """
        if self.line is None or self.source is None:
            return ""
        lines = self.source.split("\n")     # Lark counts lines at '\n' only
        if not 1 <= self.line <= len(lines):
            return ""
        text = _printable(lines[self.line - 1].rstrip("\r").expandtabs(1))
        caret = max(0, (self.column or 1) - 1)
        if len(text) > width:
            start = max(0, min(caret - width // 2, len(text) - width))
            end = start + width
            text = ("…" if start else "") + text[start:end] + ("…" if end < len(text) else "")
            caret += (1 if start else 0) - start
        return f"  {text}\n  {' ' * caret}^"


def _printable(text: str) -> str:
    """Each character a terminal prints as one character, others as '?' (spaces as ' ')."""
    return "".join(ch if ch.isprintable() else " " if ch.isspace() else "?" for ch in text)


class KqlSyntaxError(KqlError):
    """The query text does not follow the grammar."""

    kind = "syntax error"


class KqlPlanError(KqlError):
    """A well-formed query that asks for something impossible or unknown."""

    kind = "plan error"


class KqlNotSupportedError(KqlPlanError):
    """A clause the language accepts but this build does not execute yet."""

    kind = "not supported"


class KqlModelError(KqlError):
    """A model that cannot be found, loaded or run."""

    kind = "model error"


class KqlImageError(KqlError):
    """An image that cannot be found, read or converted."""

    kind = "image error"


class KqlExecutionError(KqlError):
    """Something failed while the heat map was computed or written."""

    kind = "execution error"
