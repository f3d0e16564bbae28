"""The ``kql`` command end to end: ``python -m kql`` in a subprocess, as a user runs it.

A tiny SqueezeNet (3 classes, random weights) and a 40x50 PNG keep each OCCLUDE to a
few coarse positions. Every run is checked for a leaked traceback.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

from kql import cli


def run_kql(*args, cwd, stdin=None, env=None):
    """``python -m kql args`` in ``cwd``; never a traceback, whatever happened."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("KQL_PROGRESS", "KQL_DEBUG", "KQL_HISTORY")}
    environ.update({"KQL_HISTORY": str(cwd / "history")}, **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "kql", *args], cwd=cwd, input=stdin,
                          env=environ, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return proc


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """``net.pt`` (SqueezeNet 1.1 state dict, 3 classes) and ``img.png`` (40x50 RGB)."""
    import torch
    import torchvision
    from PIL import Image

    folder = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    net = torchvision.models.squeezenet1_1(weights=None, num_classes=3)
    torch.save(net.state_dict(), folder / "net.pt")
    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "img.png")
    return folder


def setup_sql(assets) -> str:
    """Load the test model and image; the naive strategy is quickest on 4 positions."""
    return (f"SET strategy = 'naive'; "
            f"LOAD MODEL net FROM '{assets / 'net.pt'}' ARCH squeezenet1_1; "
            f"LOAD IMAGE img FROM '{assets / 'img.png'}'; ")


# The model sees 224x280: PATCH 112 STRIDE 112 is a 2x2 map, BATCH 2 two progress calls.
SMALL_OCCLUDE = "OCCLUDE img USING net PATCH 112 STRIDE 112 BATCH 2"


def test_command_prints_heat_map_and_writes_npy_of_that_shape(assets, tmp_path):
    proc = run_kql("--no-progress", "-c", setup_sql(assets) + SMALL_OCCLUDE + " INTO 'map.npy'",
                   cwd=tmp_path, env={"KQL_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].startswith("model 'net' loaded") and lines[2].startswith("image 'img' loaded")
    shape = re.search(r"heat map (\d+)x(\d+)", proc.stdout)
    assert shape, proc.stdout
    assert "written to map.npy" in proc.stdout
    heatmap = np.load(tmp_path / "map.npy")
    assert heatmap.shape == (int(shape[1]), int(shape[2]))
    assert np.isfinite(heatmap).all()
    assert proc.stderr == ""                    # --no-progress beats KQL_PROGRESS=1


def test_file_with_comments_runs_every_statement(assets, tmp_path):
    script = tmp_path / "two.kql"
    script.write_text("-- register the test image\n"
                      f"LOAD IMAGE pic FROM '{assets / 'img.png'}';  -- first\n"
                      "\n-- then list it\nSHOW\n  IMAGES;\n")
    proc = run_kql(str(script), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "image 'pic' loaded (40x50)" in proc.stdout
    table = proc.stdout.split("\n", 1)[1]
    assert re.search(r"^pic\s+40\s+50\s", table, re.M), proc.stdout


def test_syntax_error_is_one_line_with_a_caret(tmp_path):
    proc = run_kql("-c", "OCCLUDE img img", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout == ""
    first, source, caret = proc.stderr.splitlines()
    assert first.startswith("error: line 1, column 13: ")
    assert source == "  OCCLUDE img img"
    assert caret == "  " + " " * 12 + "^"


def test_unknown_model_is_a_one_line_error(assets, tmp_path):
    query = f"OCCLUDE '{assets / 'img.png'}' USING no_such_net"
    proc = run_kql("-c", query, cwd=tmp_path)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("error: ") and "unknown model 'no_such_net'" in lines[0]
    assert len(lines) in (1, 3)                 # the message, maybe source + caret lines


def test_error_in_a_file_names_the_file_and_stops_there(assets, tmp_path):
    script = tmp_path / "bad.kql"
    script.write_text("SET strategy = 'naive';\nSHOW TABLES;\n")
    later = tmp_path / "later.kql"
    later.write_text("SET strategy = 'auto';\n")
    proc = run_kql(str(script), str(later), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout == ""                    # a syntax error anywhere: nothing ran
    assert proc.stderr.startswith(f"error: {script}: line 2, column 6: ")


def test_missing_file_is_a_usage_error_before_anything_runs(assets, tmp_path):
    good = tmp_path / "good.kql"
    good.write_text("SHOW MODELS;\n")
    proc = run_kql(str(good), "missing.kql", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == "error: cannot read 'missing.kql': No such file or directory\n"


def test_catalog_directory_persists_loaded_images(assets, tmp_path):
    catalog = tmp_path / "catalog"
    first = run_kql("--catalog", str(catalog), "-c",
                    f"LOAD IMAGE kitten FROM '{assets / 'img.png'}'", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_kql("--catalog", str(catalog), "-c", "SHOW IMAGES", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert re.search(r"^kitten\s.*img\.png$", second.stdout, re.M), second.stdout


def test_progress_bar_forced_on_by_environment(assets, tmp_path):
    proc = run_kql("-c", setup_sql(assets) + SMALL_OCCLUDE, cwd=tmp_path,
                   env={"KQL_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "positions" in proc.stderr
    assert "heat map" in proc.stdout


# -- in-process: argument handling and the last line of defence ----------------------------

@pytest.mark.parametrize("argv", [["--bogus"], ["-c", "SHOW MODELS", "some.kql"]])
def test_usage_errors_exit_2(argv, capsys):
    assert cli.main(argv) == 2
    assert "usage: kql" in capsys.readouterr().err


@pytest.mark.parametrize("flag, env, wanted", [
    (None, None, False),                        # stderr is captured: not a terminal
    (None, "1", True), (None, "0", False), (True, "0", True), (False, "1", False)])
def test_progress_choice(flag, env, wanted, monkeypatch, capsys):
    if env is None:
        monkeypatch.delenv("KQL_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("KQL_PROGRESS", env)
    assert cli._progress_wanted(flag) is wanted


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert re.fullmatch(r"kql \d+\.\d+\.\d+\n", capsys.readouterr().out)


def test_directory_given_as_file_is_a_usage_error(tmp_path, capsys):
    assert cli.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read '{tmp_path}': ") and err.count("\n") == 1


def _boom(self, query, progress=None):
    raise ValueError("boom\nsecond line")
    yield


def test_internal_error_is_one_line_and_exits_70(monkeypatch, capsys):
    monkeypatch.delenv("KQL_DEBUG", raising=False)
    monkeypatch.setattr("kql.api.Connection.run", _boom)
    assert cli.main(["--no-progress", "-c", "SHOW MODELS"]) == 70
    err = capsys.readouterr().err
    assert err.startswith("internal error: ValueError: boom second line")
    assert "KQL_DEBUG=1" in err and err.count("\n") == 1 and "Traceback" not in err


def test_kql_debug_shows_the_traceback_of_an_internal_error(monkeypatch, capsys):
    monkeypatch.setenv("KQL_DEBUG", "1")
    monkeypatch.setattr("kql.api.Connection.run", _boom)
    assert cli.main(["--no-progress", "-c", "SHOW MODELS"]) == 70
    err = capsys.readouterr().err
    assert "Traceback" in err
    assert err.rstrip().endswith("internal error: ValueError: boom second line")


def test_bench_dispatches_to_kql_bench(monkeypatch):
    seen = []
    fake = types.SimpleNamespace(main=lambda argv: seen.append(argv) or 3)
    monkeypatch.setitem(sys.modules, "kql.bench", fake)
    assert cli.main(["bench", "--quick", "x"]) == 3
    assert seen == [["--quick", "x"]]


def test_bench_missing_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "kql.bench", None)   # import of kql.bench fails
    assert cli.main(["bench"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "kql.bench" in err and err.count("\n") == 1
