"""Golden EXPLAIN and EXPLAIN ANALYZE text (timings masked: they depend on the machine).

Regenerate the fixtures after a deliberate change with ``KQL_UPDATE_GOLDEN=1 pytest
tests/test_explain.py`` and review the diff.
"""

import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import kql
from helpers import smooth_noise_image
from models_zoo import sensitive_small_cnn

FIXTURES = Path(__file__).parent / "fixtures" / "explain"
TIMED = re.compile(r"\b(threads|planning_s|predicted_s|naive_predicted_s|predicted_ms|actual_s|actual_ms|"
                   r"predicted/actual)=[0-9.]+")


class Branchy(nn.Module):
    """Residual add and an Inception-like concatenation, then a classifier."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b2 = nn.Conv2d(8, 4, 5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + torch.relu(self.a(x))
        x = torch.cat([self.b1(x), self.b2(x)], 1)
        x = self.down(self.pool(x))
        return self.head(x.mean((2, 3)))


SUMMARY_TIMED = re.compile(r"\b(predicted|naive|actual) [0-9.]+ s\b")


def masked(text: str) -> str:
    text = SUMMARY_TIMED.sub(lambda m: f"{m.group(1)} * s", text)
    return TIMED.sub(lambda m: f"{m.group(1)}=*", text)


@pytest.fixture
def con():
    """A fresh connection per case: a case's plan never comes from another's cache."""
    c = kql.connect()
    c.register_model("small", sensitive_small_cnn())
    c.register_model("branchy", Branchy().eval())
    c.register_image("img", smooth_noise_image(24, 30))
    c.register_image("big", smooth_noise_image(48, 64))
    return c


CASES = {
    "small_incremental": ["SET strategy = 'incremental'", "SET crossover = 'none'",
                          "EXPLAIN OCCLUDE img USING small PATCH 8 STRIDE 4 BATCH 8"],
    "small_naive": ["SET strategy = 'naive'",
                    "EXPLAIN OCCLUDE img USING small PATCH 8 x 6 STRIDE 4 x 3 COLOR black BATCH 4"],
    "branchy_crossover": ["SET strategy = 'incremental'", "SET crossover = 0.5",
                          "EXPLAIN OCCLUDE big USING branchy PATCH 6 STRIDE 5 TARGET 2 BATCH 16 "
                          "REGION (4, 4, 40, 30)"],
    "branchy_analyze": ["SET strategy = 'incremental'", "SET crossover = 'none'",
                        "EXPLAIN ANALYZE OCCLUDE big USING branchy PATCH 8 STRIDE 8 BATCH 8"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(con, name):
    for statement in CASES[name][:-1]:
        con.execute(statement)
    text = masked(con.execute(CASES[name][-1]).plan) + "\n"
    path = FIXTURES / f"{name}.txt"
    if os.environ.get("KQL_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text()


def test_analyze_reports_every_line_and_ratios(con):
    con.execute("SET strategy = 'incremental'")
    con.execute("SET crossover = 'none'")
    lines = con.execute("EXPLAIN ANALYZE OCCLUDE big USING branchy PATCH 8 STRIDE 8 BATCH 8").plan.splitlines()
    assert "actual_s=" in lines[1] and "predicted/actual=" in lines[1]
    for line in lines[2:-2]:                            # the Image and Summary lines have none
        assert "actual_ms=" in line, line
    assert lines[-1].startswith("Summary: IncrementalOcclusion on cpu, ") and ", actual " in lines[-1]


def test_untraceable_model_explains_why():
    class Moody(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x.mean((2, 3))
            return -x.mean((2, 3))

    c = kql.connect()
    c.register_model("moody", Moody())
    c.register_image("img", smooth_noise_image(170, 170))     # not small: it is traced
    line = c.execute("EXPLAIN OCCLUDE img USING moody PATCH 40 STRIDE 40").plan.splitlines()[1]
    assert line.lstrip().startswith("NaiveOcclusion:")
    assert 'reason="torch.fx cannot trace the model' in line
