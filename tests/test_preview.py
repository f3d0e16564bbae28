"""The terminal preview of a heat map (kql/results/preview.py) and the shell's use of it."""

from __future__ import annotations

import io
import re

import numpy as np
import kql
from kql.results import preview
from kql.shell import Runner

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def occlude_result(rows=6, cols=8, hot=(2, 5), targets=None):
    """A heat map whose score falls most at ``hot`` (patch 8, stride 4, no resize)."""
    heatmap = np.full((rows, cols), 0.9, np.float32)
    heatmap[hot] = 0.4
    extra = {}
    if targets:
        maps = np.stack([heatmap, np.roll(heatmap, 1, axis=1)])
        extra = dict(heatmaps=maps, targets=targets, labels=["cat", "dog"], base_scores=[0.9, 0.9])
    return kql.Result("occlude", "q", heatmap=heatmap, probability=0.9, target=3, label="cat",
                      patch=(8, 8), stride=(4, 4), **extra)


def test_plain_preview_fits_the_width_and_names_the_top_region():
    text = preview.preview(occlude_result(), width=80, color=False)
    lines = text.splitlines()
    assert not ANSI.search(text)
    assert all(len(line) <= 80 for line in lines)
    assert "█" in text and set("".join(lines[:-3])) <= set(preview.SHADES)
    assert "top regions by drop:" in lines
    assert lines[lines.index("top regions by drop:") + 1] == "  1. (x=20, y=8, 8x8) drop 0.50"


def test_colour_preview_uses_half_blocks_and_resets_each_line():
    text = preview.preview(occlude_result(), color=True, truecolor=True)
    picture = [line for line in text.splitlines() if "▀" in line]
    assert picture and all(line.endswith(preview.RESET) for line in picture)
    assert "\x1b[38;2;" in text and "\x1b[48;2;" in text
    assert max(len(ANSI.sub("", line)) for line in picture) <= 80
    assert "\x1b[38;5;" in preview.preview(occlude_result(), truecolor=False)


def test_wide_map_is_averaged_down_to_the_width_with_its_aspect():
    wide = np.zeros((50, 300))
    wide[:, 150:] = 1.0
    lines = preview.render_map(wide, aspect=50 / 300, width=60, color=False)
    assert {len(line) for line in lines} == {60}
    assert len(lines) == 5                       # 60 columns x 10 pixel rows: 1:6 as the map
    assert lines[0] == " " * 30 + "█" * 30


def test_several_targets_list_one_region_each():
    text = preview.preview(occlude_result(targets=[3, 7]), color=False)
    assert "class 3 'cat': (x=20, y=8, 8x8) drop 0.50" in text
    assert "class 7 'dog': (x=24, y=8, 8x8) drop 0.50" in text   # its map is shifted one cell


def test_a_map_without_drop_says_so():
    flat = kql.Result("occlude", "q", heatmap=np.ones((3, 3), np.float32), probability=0.5,
                      target=0, label="x", patch=(4, 4), stride=(4, 4))
    assert "top regions by drop: none" in preview.preview(flat, color=False)
    assert preview.preview(kql.Result("set", "q", message="ok")) == ""


def test_colour_follows_the_terminal_and_no_color(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("COLORTERM", "truecolor")
    assert preview.color_wanted(Tty()) == "truecolor"
    assert preview.color_wanted(io.StringIO()) is None          # a pipe: plain
    monkeypatch.setenv("NO_COLOR", "1")
    assert preview.color_wanted(Tty()) is None


def test_runner_adds_the_preview_only_in_the_shell(monkeypatch):
    out = io.StringIO()
    runner = Runner(kql.connect(), out=out, err=io.StringIO())
    result = occlude_result()
    assert "top regions" not in runner.render(result)         # kql -c, files: as before
    runner.preview = True
    text = runner.render(result)
    assert text.startswith(result.render() + "\n") and "top regions by drop:" in text


def test_fit_table_wraps_the_last_column_only_when_too_wide():
    rows = [{"setting": "tau", "value": "auto", "description": "word " * 30}]
    assert preview.fit_table(rows, 1000) == kql.Result("show", "", rows=rows).render()
    lines = preview.fit_table(rows, 60).splitlines()
    assert max(map(len, lines)) <= 60 and len(lines) > 3
    assert lines[3].startswith(" " * len("setting  value  ")) and lines[3].strip().startswith("word")


def test_shade_runs_from_blank_to_full_block():
    assert preview.shade(np.linspace(0, 1, 5)) == preview.SHADES
    assert preview.shade([0.0, 0.5, 1.0]) == " ▒█"
