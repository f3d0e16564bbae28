"""``kql bench`` end to end on a small model, and its one-line errors."""

import re

import pytest

from kql import bench

# ms/position, planning s, vs plain, full map, vs naive, peak MB
COLUMNS = r"\s+[0-9.]+\s+[0-9.]+\s+[0-9.]+x\s+[0-9.]+x\s+[0-9.]+x\s+\d+"


def test_bench_runs_every_engine(capsys):
    code = bench.main(["--model", "squeezenet1_1", "--patch", "64", "--stride", "40",
                       "--positions", "4", "--batch", "4", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0
    rows = {m.group(1): m for m in re.finditer(
        r"^(plain loop|naive|pure incremental|chosen plan|captum)\s+([0-9.]+)\s+([0-9.]+)"
        r"\s+([0-9.]+)x\s+([0-9.]+)x\s+([0-9.]+)x\s+(\d+)\s+(\S+)\s+(\S+)$", out, re.M)}
    assert set(rows) == {"plain loop", "naive", "pure incremental", "chosen plan", "captum"}
    assert float(rows["naive"].group(6)) == 1.0 and float(rows["plain loop"].group(4)) == 1.0
    assert float(rows["plain loop"].group(3)) == 0.0 and float(rows["chosen plan"].group(3)) > 0.0
    for name in ("plain loop", "pure incremental", "chosen plan"):
        assert float(rows[name].group(8)) <= 1e-5          # same map as naive
    assert re.search(r"^chosen plan: (Naive|Incremental)Occlusion.*predicted/actual [0-9.]+\)$", out, re.M)
    assert re.search(r"theoretical R = Q/Q_inc .*: [0-9.]+$", out, re.M)
    assert "5 positions (grid rows 2..2 of 5x5)" in out      # the middle row of the grid


def test_bench_chosen_plan_at_its_own_batch(capsys):
    code = bench.main(["--model", "squeezenet1_1", "--patch", "64", "--stride", "40",
                       "--positions", "4", "--batch", "2", "--plan-batch", "auto", "--threads", "1",
                       "--no-captum"])
    out = capsys.readouterr().out
    assert code == 0
    # The other engines at BATCH 2, the chosen plan at KQL's own batch (all 5 positions).
    assert "batch 2, 1 thread(s)" in out
    assert re.search(r"^chosen plan: (Naive|Incremental)Occlusion.*, batch 5; predicted", out, re.M), out


@pytest.mark.parametrize("args,message", [
    (["--model", "squeezenet1_1", "--plan-batch", "0"], "--plan-batch must be a batch size of at least 1 or 'auto'"),
    (["--model", "nope"], "unknown model 'nope'"),
    (["--model", "squeezenet1_1", "--patch", "300"], "patch 300x300 is larger than the image"),
    (["--model", "squeezenet1_1", "--batch", "0"], "--batch must be at least 1"),
    (["--model", "squeezenet1_1", "--captum"], "--captum compares KQL with Captum: leave out --no-captum"),
    (["--model", "squeezenet1_1", "--monai", "--patch", "16", "--stride", "20"],
     "--monai needs --stride <= --patch"),
])
def test_bench_errors(capsys, args, message):
    assert bench.main(args + ["--no-captum"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_bench_crossover_sweep(capsys):
    code = bench.main(["--model", "resnet18", "--patch", "48", "--stride", "40", "--positions", "4",
                       "--batch", "4", "--threads", "1", "--no-captum", "--crossovers"])
    out = capsys.readouterr().out
    assert code == 0
    sweep = re.findall(r"^(none \(pure\)|[01]\.\d\d)( \(chosen\))?\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+"
                       r"([0-9.]+)x$", out, re.M)
    labels = [label for label, *_ in sweep]
    nodes = [int(count) for _, _, count, *_ in sweep]
    assert labels[:2] == ["none (pure)", "1.00"] and nodes[:2] == [0, 0]
    assert float(sweep[0][5]) == 1.0                        # pure against itself
    assert len(sweep) >= 3                                  # resnet18 has earlier crossovers
    assert nodes[1:] == sorted(set(nodes[1:]))              # each a distinct, larger set
    assert sum(1 for _, chosen, *_ in sweep if chosen) <= 1
    rows = re.findall(r"^(?:crossover ([01]\.\d\d)|pure incremental)%s\s+(\S+)"
                      r"\s+\S+$" % COLUMNS, out, re.M)
    assert [f for f, _ in rows] == [""] + labels[1:]
    assert all(float(diff) <= 1e-5 for _, diff in rows)      # every engine matches naive


def test_bench_approximate_mode_reports_tau_and_ssim(capsys):
    code = bench.main(["--model", "resnet18", "--patch", "48", "--stride", "16", "--positions", "40",
                       "--batch", "8", "--threads", "1", "--no-captum", "--tau", "0.3"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"^chosen plan: IncrementalOcclusion, crossover [0-9.]+, tau 0\.30[,;]", out, re.M)
    assert "approximation: tau 0.30 (user)" in out
    ssim = re.search(r"^chosen plan%s\s+\S+\s+([0-9.]+)$" % COLUMNS, out, re.M)
    assert ssim and 0.0 <= float(ssim.group(1)) <= 1.0


def test_bench_against_captum_and_monai(capsys):
    code = bench.main(["--model", "squeezenet1_1", "--patch", "64", "--stride", "40",
                       "--positions", "4", "--batch", "4", "--threads", "1", "--captum", "--monai"])
    out = capsys.readouterr().out
    assert code == 0
    names = re.findall(r"^(captum|kql captum|monai|kql monai)%s" % COLUMNS, out, re.M)
    assert names == ["captum", "kql captum", "monai", "kql monai"]
    diffs = dict(re.findall(r"^  kql (captum|monai) vs \1: max \|[a-z ]+ diff\| (\S+) \(ok\)$", out, re.M))
    assert set(diffs) == {"captum", "monai"}, out
    assert all(float(d) <= 1e-4 for d in diffs.values())


def test_bench_monai_alone_keeps_captum_out(capsys):
    code = bench.main(["--model", "squeezenet1_1", "--patch", "64", "--stride", "64",
                       "--positions", "3", "--batch", "4", "--threads", "1", "--no-captum", "--monai"])
    out = capsys.readouterr().out
    assert code == 0
    assert not re.search(r"^(kql )?captum ", out, re.M)
    assert re.search(r"^  kql monai vs monai: max \|occlusion map diff\| \S+ \(ok\)$", out, re.M), out


def test_bench_volume_compares_a_3d_plan_with_the_loop_and_monai(capsys):
    code = bench.main(["--volume", "--size", "16", "--channels", "4,8", "--patch", "4",
                       "--stride", "4", "--rounds", "1", "--plain-positions", "16"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"FLOP ratio \d+\.\d\d", out) or "NaiveOcclusion" in out, out
    assert re.search(r"plain loop / kql [0-9.]+x, monai / kql [0-9.]+x", out), out
    diff = float(re.search(r"max \|kql - plain loop\| ([0-9.e+-]+)", out).group(1))
    assert diff < 1e-5, out
