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
"""

from __future__ import annotations


class KqlError(Exception):
    """Base of every error KQL reports to a user.

    ``line`` and ``column`` (1-based) point into the query text when the error is about it.
    """

    kind = "error"

    def __init__(self, message: str, *, line: int | None = None, column: int | None = None,
                 source: str | None = None):
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

    def context(self) -> str:
        """The offending source line and a caret under the column, or '' if unknown."""
        if self.line is None or self.source is None:
            return ""
        lines = self.source.splitlines() or [""]
        if not 1 <= self.line <= len(lines):
            return ""
        text = lines[self.line - 1].expandtabs(1)
        return f"  {text}\n  {' ' * max(0, (self.column or 1) - 1)}^"


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
