"""The KQL front end: golden fixtures for valid and invalid text, positions, source slices.

The fixtures live in tests/fixtures/parser/ (format described at the top of each file);
one loader reads both.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import pytest

from kql.language import parser
from kql.language.ast import (ColorRGB, Explain, ImageName, ModelName, Node, Occlude, Pos, Region,
                     SampleImage, ShowModels, TargetIndex)
from kql.errors import KqlError, KqlSyntaxError
from kql.language.parser import parse, parse_with_text

FIXTURES = Path(__file__).parent / "fixtures" / "parser"


# -- the fixture loader ---------------------------------------------------------------------

@dataclass
class Case:
    title: str
    line: int                # where the case starts in its fixture file
    query: str
    expected: list[str]      # `-> ` or `!! ` lines, without the marker


def load_cases(name: str, marker: str) -> list[Case]:
    """Cases of one fixture file: `== title`, query lines, then `marker` lines."""
    cases: list[Case] = []
    query: list[str] = []
    for number, line in enumerate((FIXTURES / name).read_text().splitlines(), 1):
        if line.startswith("== "):
            cases.append(Case(line[3:].strip(), number, "", []))
            query = []
        elif not cases:
            continue  # the file's own header
        elif line.startswith(marker):
            cases[-1].expected.append(line[len(marker):])
        elif cases[-1].expected:
            if line.strip():
                raise ValueError(f"{name}:{number}: text after the expected lines")
        else:
            query.append(line)
            cases[-1].query = "\n".join(query).rstrip("\n")
    for case in cases:
        if not case.expected:
            raise ValueError(f"{name}:{case.line}: case {case.title!r} has no {marker!r} line")
    return cases


def render(value) -> str:
    """A node without its positions and without fields that hold their default."""
    if not isinstance(value, Node):
        return repr(value)
    parts = [f"{f.name}={render(getattr(value, f.name))}" for f in dataclasses.fields(value)
             if f.compare and getattr(value, f.name) != f.default]
    return f"{type(value).__name__}({', '.join(parts)})"


VALID = load_cases("statements.kqlt", "-> ")
INVALID = load_cases("errors.kqlt", "!! ")


def test_the_fixtures_are_found():
    assert len(VALID) >= 25 and len(INVALID) >= 40
    assert all(len(case.expected) == 1 for case in INVALID)


@pytest.mark.parametrize("case", VALID, ids=[case.title for case in VALID])
def test_valid_query(case: Case):
    rendered = [render(statement) for statement in parse(case.query)]
    assert (rendered or ["(no statements)"]) == case.expected


@pytest.mark.parametrize("case", INVALID, ids=[case.title for case in INVALID])
def test_invalid_query(case: Case):
    with pytest.raises(KqlSyntaxError) as caught:
        parse(case.query)
    assert str(caught.value) == case.expected[0]
    assert caught.value.source == case.query


def test_the_valid_fixtures_use_every_clause():
    used = {name for case in VALID for statement in parse(case.query)
            for node in statement.walk() if isinstance(node, Occlude)
            for name, _ in node.clause_pos}
    assert used == {"target", "patch", "stride", "color", "region", "ssim", "drilldown",
                    "device", "batch", "into", "where"}


# -- positions ------------------------------------------------------------------------------

def test_positions_of_image_and_model():
    [query] = parse("OCCLUDE img USING net")
    assert query.pos == Pos(1, 1)
    assert query.image == ImageName("img") and query.image.pos == Pos(1, 9)
    assert query.model == ModelName("net") and query.model.pos == Pos(1, 19)


def test_clause_positions_point_at_their_keywords():
    text = "OCCLUDE img USING net\n  PATCH 8 x 4\n    TARGET 3 WITH SSIM >= 0.9"
    [query] = parse(text)
    assert query.clause_pos == (("patch", Pos(2, 3)), ("target", Pos(3, 5)),
                                ("ssim", Pos(3, 14)))
    assert query.pos_of("patch") == Pos(2, 3)
    assert query.pos_of("color") == query.pos == Pos(1, 1)  # no COLOR: the statement


def test_value_nodes_start_at_their_first_token():
    [query] = parse("OCCLUDE sample('cat') USING net TARGET 7 COLOR (1, 2, 3)\n"
                    "REGION ( 1, 2, 3, 4 )")
    assert query.image == SampleImage("cat") and query.image.pos == Pos(1, 9)
    assert query.target == TargetIndex(7) and query.target.pos == Pos(1, 40)
    assert isinstance(query.color, ColorRGB) and query.color.pos == Pos(1, 48)
    assert query.region == Region(1, 2, 3, 4) and query.region.pos == Pos(2, 8)


def test_positions_of_explain_and_a_later_statement():
    first, second = parse("SHOW MODELS;\n\n  EXPLAIN ANALYZE\n  OCCLUDE img USING net")
    assert first == ShowModels() and first.pos == Pos(1, 1)
    assert isinstance(second, Explain) and second.analyze and second.pos == Pos(3, 3)
    assert second.statement.pos == Pos(4, 3)
    assert second.statement.model.pos == Pos(4, 21)


# -- parse_with_text -------------------------------------------------------------------------

def test_parse_with_text_gives_each_statements_exact_source():
    text = ("SHOW MODELS ;\n"
            "OCCLUDE img -- the image\n"
            "  USING net INTO 'a;b.png' -- done\n"
            ";; set batch=32")
    pairs = parse_with_text(text)
    assert [source for _, source in pairs] == [
        "SHOW MODELS",
        "OCCLUDE img -- the image\n  USING net INTO 'a;b.png'",
        "set batch=32",
    ]
    assert [statement for statement, _ in pairs] == parse(text)


def test_parse_with_text_of_nothing():
    assert parse_with_text(" -- nothing\n;") == []


# -- errors ----------------------------------------------------------------------------------

def test_error_caret_points_at_the_offending_token():
    with pytest.raises(KqlSyntaxError) as caught:
        parse("SHOW MODELS;\nOCCLUDE img USING net PATCHES 8")
    assert caught.value.context() == ("  OCCLUDE img USING net PATCHES 8\n"
                                      "                        ^")


def test_error_caret_at_end_of_input_sits_just_past_the_last_token():
    with pytest.raises(KqlSyntaxError) as caught:
        parse("LOAD MODEL m\n")
    assert (caught.value.line, caught.value.column) == (1, 13)
    assert caught.value.context() == "  LOAD MODEL m\n              ^"


def test_syntax_errors_are_kql_errors_without_a_lark_cause():
    with pytest.raises(KqlError) as caught:
        parse("OCCLUDE @")
    assert isinstance(caught.value, KqlSyntaxError)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_grammar_loads_from_a_source_checkout(monkeypatch):
    def not_installed(package):
        raise ModuleNotFoundError(package)

    monkeypatch.setattr(importlib.resources, "files", not_installed)
    text = parser._grammar_text()
    assert text == (Path(__file__).parents[1] / "grammar" / "kql.lark").read_text()
