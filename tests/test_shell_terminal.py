"""The shell through a real pseudo-terminal (pexpect), and its completer and hints in process.

One ``python -m kql`` session types what a user would: a Tab inside ``sample('che``, a
coarse OCCLUDE of the built-in model (9 positions) whose picture and top regions follow
the result, a misspelt statement, ``SHOW SETTINGS`` and ``\\help``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

import kql
from kql.completion import KEYWORDS, KqlCompleter, context
from kql.errors import KqlSyntaxError
from kql.language.parser import parse

pexpect = pytest.importorskip("pexpect")
PROMPT = "kql>"
GRAMMAR = Path(__file__).parent.parent / "grammar" / "kql.lark"


def spawn(tmp_path, **env):
    environ = {k: v for k, v in os.environ.items() if k not in ("KQL_PROGRESS", "KQL_DEBUG", "NO_COLOR")}
    environ.update(KQL_HISTORY=str(tmp_path / "history"), TERM="xterm-256color",
                   PROMPT_TOOLKIT_NO_CPR="1", KQL_PROGRESS="0", **env)
    child = pexpect.spawn(sys.executable, ["-m", "kql"], cwd=str(tmp_path), env=environ,
                          encoding="utf-8", timeout=60, dimensions=(40, 100))
    child.expect(PROMPT)
    return child


def test_a_session_in_a_terminal(tmp_path):
    child = spawn(tmp_path)
    try:
        child.send("OCCLUDE sample('che\t")
        child.expect(r"lsea'\)")                  # Tab completed the sample and closed it
        child.send(" USING efficientnet_lite0 PATCH 64 STRIDE 64;\r")
        child.expect(r"heat map 3x3 for class 285 'Egyptian cat'")
        child.expect("▀")                         # the picture, in colour on a terminal
        child.expect(r"top regions by drop:\s+1\. \(x=\d+, y=\d+, \d+x\d+\) drop \d\.\d\d")
        child.expect(PROMPT)
        child.send("OCLUDE x USING y;\r")
        child.expect(r"unknown statement 'OCLUDE'; did you mean OCCLUDE\?")
        child.expect(PROMPT)
        child.send("SHOW SETTINGS;\r")
        child.expect(r"setting\s+value\s+default\s+description")
        child.expect("overlay_base")
        settings = child.before
        child.expect(PROMPT)
        child.send("\\help\r")
        child.expect(r"LOAD IMAGES <name> FROM '<glob>'")
        child.expect(PROMPT)
        child.send("\\q\r")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    lines = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", line) for line in settings.splitlines()]
    assert max(len(line.rstrip("\r")) for line in lines if "  " in line) <= 100   # wrapped to fit
    assert "Traceback" not in settings


# -- in process ------------------------------------------------------------------------------

def completions(text: str, con=None) -> list[str]:
    completer = KqlCompleter.for_connection(con or kql.connect())
    return [c.text for c in completer.get_completions(Document(text), CompleteEvent(completion_requested=True))]


def test_completion_follows_the_statement():
    con = kql.connect()
    con.register_image("kitten", __import__("torch").rand(3, 8, 8))
    assert completions("OCCLUDE sample('che", con) == ["chelsea')"]
    assert completions("OCCLUDE ki", con) == ["kitten"]
    assert "sample('" in completions("occlude ", con)
    assert completions("OCCLUDE kitten USING eff", con) == ["efficientnet_lite0"]
    assert completions("OCCLUDE kitten USING net pa", con) == ["patch"]       # the case typed
    assert completions("SET str", con) == ["strategy"]
    assert completions("SHOW S", con) == ["SETTINGS"]
    assert completions("EX", con) == ["EXPLAIN"]
    assert completions("\\ti", con) == ["\\timing"]


def test_completion_of_paths_inside_quotes(tmp_path, monkeypatch):
    (tmp_path / "picture.png").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert context("LOAD IMAGE a FROM 'pic")[:2] == ("path", "pic")
    assert completions("LOAD IMAGE a FROM 'pic") == ["ture.png"]


def test_completion_knows_every_keyword_of_the_grammar():
    words = set(re.findall(r"^_?[A-Z_]+\.2: /\(?([a-z|\[\]]+)\)?\\b/i", GRAMMAR.read_text(), re.M))
    keywords = {w.upper() for group in words for w in group.split("|") if "[" not in w}
    assert keywords and keywords - {"X"} <= set(KEYWORDS) | {"CPU", "GPU", "AUTO"}


@pytest.mark.parametrize("query, message", [
    ("OCLUDE img USING m", "unknown statement 'OCLUDE'; did you mean OCCLUDE?"),
    ("EXPLIAN OCCLUDE img USING m", "unknown statement 'EXPLIAN'; did you mean EXPLAIN?"),
    ("OCCLUDE img USING m PACH 8", "unknown clause 'PACH'; did you mean PATCH?"),
    ("SHOW MODLES", "expected IMAGES, MODELS or SETTINGS after SHOW, found 'MODLES'; did you mean MODELS?"),
    ("OCCLUDE img USING m ON cpuu", "did you mean CPU?"),
    ("SELECT * FROM t", "unknown statement 'SELECT'; expected a statement"),   # no close keyword
])
def test_did_you_mean(query, message):
    with pytest.raises(KqlSyntaxError) as caught:
        parse(query)
    assert message in str(caught.value)
