"""Tab completion in the shell: keywords, model, image, sample and setting names, file paths.

:func:`context` reads the statement typed so far (from the last ``;``) and says what may
come next, roughly as the grammar (grammar/kql.lark) would: models after USING, images
(or ``sample('``) after OCCLUDE, settings after SET, sample names inside ``sample('``,
file paths inside any other quote, clauses after an OCCLUDE's model. Keywords come in
the case being typed. :class:`KqlCompleter` turns that into prompt_toolkit completions,
asking the connection's catalog for names on each Tab (so newly loaded ones appear).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Optional

from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document

STATEMENTS = ("OCCLUDE", "EXPLAIN", "LOAD", "SHOW", "SET", "CALIBRATE")
CLAUSES = ("TARGET", "PATCH", "STRIDE", "COLOR", "REGION", "WITH", "DRILLDOWN", "SPEEDUP",
           "ON", "BATCH", "INTO", "RESIZE", "OUTPUT", "WHERE", "ORDER", "LIMIT", "ASC", "DESC")
# What follows a keyword, where it is a fixed set of words.
FOLLOWERS = {
    "EXPLAIN": ("ANALYZE", "OCCLUDE"), "ANALYZE": ("OCCLUDE",),
    "LOAD": ("MODEL", "IMAGE", "IMAGES"), "SHOW": ("MODELS", "IMAGES", "SETTINGS"),
    "COLOR": ("BLACK", "GRAY", "WHITE", "MEAN", "MEAN_PATCH", "GAUSSIAN"), "RESIZE": ("SQUASH", "CROP", "PAD"),
    "OUTPUT": ("SOFTMAX", "SIGMOID", "LOGITS", "PROBABILITY"), "TARGET": ("PREDICTED", "TOP"),
    "ORDER": ("BY",), "WITH": ("SSIM",), "ON": ("CPU", "GPU", "AUTO", "RAY"),
}
LOAD_CLAUSES = ("FROM", "ARCH", "LABELS", "TRUSTED")
COMMANDS = ("\\help", "\\models", "\\images", "\\timing", "\\quit", "\\q")
KEYWORDS = tuple(sorted(set(STATEMENTS + CLAUSES + LOAD_CLAUSES + ("USING", "SAMPLE", "X"))
                        | {w for words in FOLLOWERS.values() for w in words}))

_TOKEN = re.compile(r"--[^\n]*|(?P<string>'(?:[^'\n]|'')*(?P<closed>')?|\"(?:[^\"\n]|\"\")*"
                    r"(?P<dclosed>\")?)|(?P<word>[A-Za-z_][A-Za-z0-9_]*)|(?P<other>\S)")


def tokens(text: str) -> tuple[list, Optional[str]]:
    """The words and punctuation of the last statement in ``text`` (strings as ``'``), and
    the text of a string left open at the end (None when there is none).

    >>> tokens("SHOW MODELS; OCCLUDE sample('che")
    (['OCCLUDE', 'sample', '(', "'"], 'che')
    >>> tokens("LOAD IMAGE a FROM 'x;y.png' -- done")
    (['LOAD', 'IMAGE', 'a', 'FROM', "'"], None)
    """
    found, open_string = [], None
    for m in _TOKEN.finditer(text):
        if m.group().startswith("--"):
            continue
        if m.group("string") is not None:
            found.append("'")
            closed = m.group("closed") or m.group("dclosed")
            open_string = None if closed else m.group()[1:]
        elif m.group() == ";":
            found, open_string = [], None
        else:
            found.append(m.group())
            open_string = None
    return found, open_string


def context(text: str) -> tuple[str, str, tuple]:
    """``(kind, partial, words)`` for the cursor at the end of ``text``: ``kind`` is one of
    keyword, model, image, setting, sample, path, command; ``partial`` is what the
    completion replaces; ``words`` the keywords that fit (for keyword and image).

    >>> context("OCCLUDE img USING eff")[:2]
    ('model', 'eff')
    >>> context("occlude img using net pa")
    ('keyword', 'pa', ('TARGET', 'PATCH', 'STRIDE', 'COLOR', 'REGION', 'WITH', 'DRILLDOWN', 'SPEEDUP', 'ON', 'BATCH', 'INTO', 'RESIZE', 'OUTPUT', 'WHERE', 'ORDER', 'LIMIT', 'ASC', 'DESC'))
    >>> context("SHOW "), context("SET st")[:2], context("OCCLUDE sample('ch")[:2]
    (('keyword', '', ('MODELS', 'IMAGES', 'SETTINGS')), ('setting', 'st'), ('sample', 'ch'))
    >>> context("LOAD MODEL m FROM 'm.pt' tr")
    ('keyword', 'tr', ('FROM', 'ARCH', 'LABELS', 'TRUSTED'))
    >>> context("LOAD IMAGE a FROM '~/pi")[:2], context("\\\\ti")[:2]
    (('path', '~/pi'), ('command', '\\\\ti'))
    """
    if text.lstrip().startswith("\\") and "\n" not in text.strip():
        return "command", text.strip(), ()
    found, open_string = tokens(text)
    if open_string is not None:
        before = [t.upper() for t in found[-3:-1]]
        return ("sample" if before == ["SAMPLE", "("] else "path"), open_string, ()
    partial = re.search(r"[A-Za-z0-9_]*$", text).group()
    if partial and found and found[-1] == partial:
        found = found[:-1]
    kind, words = _after(found)
    return kind, partial, words


def _after(found: list) -> tuple[str, tuple]:
    """What fits after the tokens ``found`` of a statement: (kind, keywords)."""
    if not found:
        return "keyword", STATEMENTS
    words = [t.upper() for t in found]
    last, first = words[-1], words[0]
    if last == "USING" or (last == "CALIBRATE" and len(words) == 1):
        return "model", ("ON",) if last == "CALIBRATE" else ()
    if last == "OCCLUDE" or (first == "CALIBRATE" and last in ("(", ",")):
        return "image", ("SAMPLE",)
    if last == "SET" and len(words) == 1:
        return "setting", ()
    if last in FOLLOWERS:
        return "keyword", FOLLOWERS[last]
    if "USING" in words and words.index("USING") < len(words) - 1:
        return "keyword", CLAUSES
    if first == "CALIBRATE" and "ON" in words:
        return "keyword", ("PATCH", "STRIDE", "COLOR")
    if first == "LOAD":                 # only a model file may be TRUSTED, or have an ARCH
        return "keyword", LOAD_CLAUSES if words[1:2] == ["MODEL"] else ("FROM",)
    if first == "OCCLUDE" or first == "EXPLAIN":
        return "keyword", ("USING",)
    return "keyword", KEYWORDS


def in_case(word: str, partial: str) -> str:
    """A keyword in the case of what is typed (lower when it starts lower-case).

    >>> in_case("PATCH", "pa"), in_case("PATCH", "Pa"), in_case("PATCH", "")
    ('patch', 'PATCH', 'PATCH')
    """
    return word.lower() if partial[:1].islower() else word


def matching(names: Iterable[str], partial: str) -> list[str]:
    """``names`` that start with ``partial``: exactly, else ignoring case.

    >>> matching(["Cat", "cattle", "dog"], "cat"), matching(["Cat", "dog"], "ca")
    (['cattle'], ['Cat'])
    """
    names = list(dict.fromkeys(names))
    exact = [n for n in names if n.startswith(partial)]
    return exact or [n for n in names if n.lower().startswith(partial.lower())]


class KqlCompleter(Completer):
    """Completions from :func:`context`; ``models``/``images``/``settings``/``samples``
    are callables returning names (asked on each Tab)."""

    def __init__(self, models: Callable[[], Iterable[str]] = tuple,
                 images: Callable[[], Iterable[str]] = tuple,
                 settings: Callable[[], Iterable[str]] = tuple,
                 samples: Callable[[], Iterable[str]] = tuple):
        self.sources = {"model": models, "image": images, "setting": settings, "sample": samples}
        self.paths = PathCompleter(expanduser=True)

    @classmethod
    def for_connection(cls, con) -> "KqlCompleter":
        """Names from ``con``'s catalog, the built-in model, the samples and settings."""
        from .catalog.images import SAMPLES
        from .catalog.models import BUILTIN
        from .settings import SETTINGS

        def rows(kind: str):
            return lambda: [r["name"] for r in _quietly(getattr(con.catalog, f"{kind}_rows"))]

        models = rows("model")
        return cls(lambda: [BUILTIN, *models()], rows("image"), lambda: list(SETTINGS),
                   lambda: list(SAMPLES))

    def get_completions(self, document: Document, complete_event: CompleteEvent):
        kind, partial, words = context(document.text_before_cursor)
        if kind == "path":
            yield from self.paths.get_completions(Document(partial, len(partial)), complete_event)
            return
        if kind == "command":
            names = [(c, "command") for c in matching(COMMANDS, partial)]
        else:
            source = self.sources.get(kind)
            names = [(n, kind) for n in matching(_quietly(source), partial)] if source else []
        if kind == "sample":
            closing = "" if document.text_after_cursor.startswith("'") else "')"
            names = [(n + closing, kind) for n, _ in names]
        names += [(in_case(w, partial), "keyword") for w in words
                  if w.startswith(partial.upper()) and w != "SAMPLE"]
        if "SAMPLE" in words and "SAMPLE".startswith(partial.upper()):
            names.append(("SAMPLE('" if partial[:1].isupper() else "sample('", "sample image"))
        for text, meta in names:
            yield Completion(text, start_position=-len(partial), display_meta=meta)


def _quietly(source) -> list:
    """A name source's names; none when it fails (a damaged catalog): Tab never raises."""
    try:
        return list(source())
    except Exception:                   # noqa: BLE001 - completion must not break the prompt
        return []
