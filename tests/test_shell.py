"""The shell: piped stdin in a subprocess (no prompts), prompt_toolkit in process."""

from __future__ import annotations

import doctest
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import kql
from kql import cli, progress, shell
from kql.shell import Runner, Shell, is_complete


def pipe_kql(stdin: str, cwd, *args):
    """``python -m kql`` reading ``stdin`` from a pipe; never a traceback."""
    environ = {k: v for k, v in os.environ.items() if k not in ("KQL_PROGRESS", "KQL_DEBUG")}
    environ["KQL_HISTORY"] = str(cwd / "history")
    proc = subprocess.run([sys.executable, "-m", "kql", *args], cwd=cwd, input=stdin,
                          env=environ, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc


@pytest.fixture
def png(tmp_path):
    from PIL import Image

    path = tmp_path / "img.png"
    Image.fromarray(np.zeros((40, 50, 3), dtype=np.uint8)).save(path)
    return path


def test_statement_spread_over_lines_runs_at_its_semicolon(png, tmp_path):
    proc = pipe_kql(f"LOAD IMAGE\n  pic -- the name; not the end\n  FROM '{png}'\n;\n"
                    "SHOW IMAGES", tmp_path)      # the last one lacks ';': run at EOF
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("image 'pic' loaded (40x50)\n")
    assert re.search(r"^pic\s+40\s+50\s", proc.stdout, re.M), proc.stdout
    assert proc.stderr == ""
    assert "kql>" not in proc.stdout          # no prompts on a pipe


def test_timing_prints_the_time_after_each_statement(tmp_path):
    proc = pipe_kql("SET strategy = 'naive';\n\\timing\nSET strategy = 'auto';\n", tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:3] == ["strategy = naive", "Timing is on.", "strategy = auto"]
    assert re.fullmatch(r"Time: \d+\.\d{3} s", lines[3]), lines
    assert len(lines) == 4


def test_backslash_commands(tmp_path):
    proc = pipe_kql("\\models\n\\images\n\\nope\n\\help\n", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^efficientnet_lite0\s", proc.stdout, re.M), proc.stdout
    assert "(none)" in proc.stdout             # \images: nothing loaded yet
    assert "OCCLUDE <image> USING <model>" in proc.stdout
    assert proc.stderr == "error: unknown command '\\nope'; \\help lists the commands\n"


def test_error_keeps_the_shell_going_and_quit_exits_0(tmp_path):
    proc = pipe_kql("OCCLUDE img\n  img;\nSET strategy = 'naive';\n\\q\nSET strategy = 'auto';\n",
                    tmp_path)
    assert proc.returncode == 0
    assert proc.stdout == "strategy = naive\n"  # ran after the error, and nothing after \q
    first, source, caret = proc.stderr.splitlines()
    assert first.startswith("error: line 2, column 3: ")
    assert source == "    img;" and caret == "    ^"


# -- in process ----------------------------------------------------------------------------

@pytest.mark.parametrize("text, complete", [
    ("SHOW MODELS;", True),
    ("SHOW MODELS", False),
    ("SHOW MODELS; SHOW", False),
    ("OCCLUDE img USING net\n  PATCH 8;   -- done", True),
    ("LOAD IMAGE a FROM 'x;y.png'", False),
    ("LOAD IMAGE a FROM \"x;y.png\"", False),
    ("LOAD IMAGE a FROM 'it''s;.png'", False),
    ("SHOW MODELS -- ;", False),
    ("LOAD IMAGE a FROM 'no end;\n;", True),  # strings end on their line
    ("SHOW\n\\timing", True),
    ("", True),
    ("-- only a comment", True),
])
def test_is_complete(text, complete):
    assert is_complete(text) is complete


@pytest.mark.parametrize("module", [shell, progress, cli])
def test_doctests(module):
    failed, attempted = doctest.testmod(module)
    assert attempted > 0 and failed == 0


def _runner():
    return Runner(kql.connect(), out=io.StringIO(), err=io.StringIO())


def test_prompt_toolkit_session_edits_statements_and_saves_history(tmp_path, monkeypatch):
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    history = tmp_path / "hist"
    monkeypatch.setenv("KQL_HISTORY", str(history))
    runner = _runner()
    with create_pipe_input() as keys:
        keys.send_text("SET strategy\r= 'naive';\r\\timing\rSHOW\r\\images\rMODELS;\r\\q\r")
        status = shell.interactive(Shell(runner), input=keys, output=DummyOutput())
    assert status == 0
    out = runner.out.getvalue()
    assert out.startswith("strategy = naive\nTiming is on.\n(none)\nTime: ")
    assert re.search(r"^efficientnet_lite0\s", out, re.M)   # SHOW kept across \images
    assert "SET strategy\n= 'naive';" in history.read_text().replace("\n+", "\n")


def test_history_falls_back_to_memory_when_unwritable(tmp_path, monkeypatch):
    from prompt_toolkit.history import InMemoryHistory

    monkeypatch.setenv("KQL_HISTORY", str(tmp_path / "no" / "such" / "dir" / "hist"))
    err = io.StringIO()
    assert isinstance(shell.make_history(err), InMemoryHistory)
    assert err.getvalue().startswith("note: history is not saved")


def test_internal_error_in_the_shell_is_one_line_and_the_shell_goes_on(monkeypatch):
    runner = _runner()
    calls = []

    def flaky(self, query, progress=None):
        calls.append(query)
        if len(calls) == 1:
            raise RuntimeError("kaputt")
        yield kql.Result("set", query, message="fine")

    monkeypatch.delenv("KQL_DEBUG", raising=False)
    monkeypatch.setattr("kql.api.Connection.run", flaky)
    session = Shell(runner)
    assert session.feed("SHOW MODELS;") and session.feed("SHOW MODELS;")
    assert runner.err.getvalue().startswith("internal error: RuntimeError: kaputt (rerun")
    assert runner.err.getvalue().count("\n") == 1
    assert runner.out.getvalue() == "fine\n"
