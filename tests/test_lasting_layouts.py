"""Layout trials kept across processes (planner.layout_file): a clear outcome measured on a
quiet machine spares the first query of the next connection its trial batch; a busy
machine, a close call, a CALIBRATE, another model structure or an unreadable file do not
carry one over."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import kql
from helpers import sensitive, smooth_noise_image
from kql.operators import layout
from kql.planner import calibrate
from kql.planner.cache import PlanCache
from kql.planner.layout_file import FILE, LastingLayouts
from kql.planner.layout_file import machine_busy as load_check   # conftest makes it always busy
from models_zoo import custom_model

QUERY = "OCCLUDE img USING net PATCH 8 STRIDE 4 COLOR black BATCH 2"


def connection(folder, busy=False, model="max_pools", strategy="naive"):
    image = smooth_noise_image(24, 28)
    con = kql.connect()
    con.plan_cache.lasting = LastingLayouts(str(folder), busy=lambda: busy)
    con.register_model("net", sensitive(custom_model(model), image, (8, 8)))
    con.register_image("img", image)
    con.execute(f"SET strategy = '{strategy}'")
    if strategy == "incremental":
        con.execute("SET crossover = 0.5")                  # a full part to try layouts on
    return con


class Units(list):
    seconds: dict


@pytest.fixture
def units(monkeypatch):
    """The trial units recorded, each batch timed as given by ``units.seconds`` (layout ->
    seconds per batch) instead of the clock: the trial's outcome and margin are the test's."""
    seen = Units()
    seen.seconds = {layout.CONTIGUOUS: 1.0, layout.CHANNELS_LAST: 2.0}
    record = layout.LayoutTrial.record

    def timed(self, unit, seconds, count):
        if unit is not None:
            seen.append(unit)
            seconds = seen.seconds[self.TRIED[unit]]
        record(self, unit, seconds, count)
    monkeypatch.setattr(layout.LayoutTrial, "record", timed)
    return seen


def entries(folder) -> dict:
    with open(os.path.join(folder, FILE)) as fh:
        return json.load(fh)["entries"]


@pytest.mark.parametrize("strategy", ["naive", "incremental"])
def test_a_clear_outcome_spares_the_next_connection_its_trial(tmp_path, units, strategy):
    first = connection(tmp_path, strategy=strategy).execute(QUERY)
    assert units == [0, 1]
    kept = entries(tmp_path)
    assert [e["layout"] for e in kept.values()] == ["contiguous"] and list(kept.values())[0]["margin"] == 2.0
    assert "layouts.json" not in first.plan

    units.seconds = {layout.CONTIGUOUS: 2.0, layout.CHANNELS_LAST: 1.0}    # a trial would flip it
    again = connection(tmp_path, strategy=strategy).execute(QUERY)     # a new model object
    assert units == [0, 1]                                   # no trial in the new connection
    line = again.plan.splitlines()[1]
    assert "cache=" in line and "layouts.json" in line.split("cache=")[1].split(",")[0], line
    if strategy == "incremental":
        assert "layout=contiguous" in line, line
    np.testing.assert_allclose(again.heatmap, first.heatmap, atol=1e-6)
    assert np.ptp(first.heatmap) > 0.02


def test_another_model_structure_runs_its_own_trial(tmp_path, units):
    connection(tmp_path).execute(QUERY)
    other = connection(tmp_path, model="avg_pools").execute(QUERY)
    assert units == [0, 1, 0, 1] and "layouts.json" not in other.plan
    assert len(entries(tmp_path)) == 2


def test_a_busy_machine_keeps_the_outcome_in_the_connection_only(tmp_path, units):
    con = connection(tmp_path, busy=True)
    con.execute(QUERY)
    assert units == [0, 1] and not (tmp_path / FILE).exists()
    assert list(con.plan_cache.layouts.values()) == ["contiguous"]
    assert "layout" in con.execute(QUERY + " TARGET 1").plan.split("cache=")[1]


def test_a_close_call_is_not_written(tmp_path, units):
    units.seconds = {layout.CONTIGUOUS: 1.0, layout.CHANNELS_LAST: 1.05}
    connection(tmp_path).execute(QUERY)
    assert units == [0, 1] and not (tmp_path / FILE).exists()


def test_calibrate_forgets_this_machines_layouts(tmp_path, units, monkeypatch):
    con = connection(tmp_path)
    con.execute(QUERY)
    con.plan_cache.lasting.keep(("cpu:64cores:64threads", "x"), "channels_last", {"a": 1.0, "b": 2.0})
    assert len(entries(tmp_path)) == 2
    table = calibrate.throughput("cpu")
    monkeypatch.setattr(calibrate, "measure", lambda device: table)      # no re-measuring here
    con.execute("CALIBRATE ON CPU")
    assert list(entries(tmp_path)) == ['"cpu:64cores:64threads", "x"']   # another machine's stays
    assert con.plan_cache.layouts == {}
    con.execute(QUERY)
    assert units == [0, 1, 0, 1]                             # measured again


@pytest.mark.parametrize("text", ["{not json", '{"version": 99, "entries": {}}', '[1, 2]',
                                  '{"version": 1, "entries": {"\\"k\\"": {"layout": "nhwc"}}}'])
def test_an_unsound_file_counts_as_empty_and_is_replaced(tmp_path, text):
    (tmp_path / FILE).write_text(text)
    store = LastingLayouts(str(tmp_path), busy=lambda: False)
    assert store.get(("k",)) is None
    assert store.keep(("k",), "channels_last", {"contiguous": 2.0, "channels_last": 1.0})
    assert LastingLayouts(str(tmp_path)).get(("k",)) == "channels_last"
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []     # no temporary left


def test_an_unwritable_folder_keeps_the_outcome_in_the_connection(tmp_path, units):
    blocker = tmp_path / "file"
    blocker.write_text("")
    con = connection(blocker / "cache")                     # a folder below a file: cannot exist
    con.execute(QUERY)
    assert units == [0, 1] and list(con.plan_cache.layouts.values()) == ["contiguous"]


def test_an_empty_cache_dir_keeps_layouts_nowhere(monkeypatch):
    monkeypatch.setenv("KQL_CACHE_DIR", "")
    store = PlanCache().lasting
    assert store.get(("k",)) is None
    assert not store.keep(("k",), "contiguous", {"contiguous": 1.0, "channels_last": 2.0})


def test_the_user_cache_holds_layouts_whatever_the_catalog(tmp_path, monkeypatch):
    monkeypatch.setenv("KQL_CACHE_DIR", str(tmp_path / "cache"))
    con = kql.connect(str(tmp_path / "catalog"))
    assert con.plan_cache.lasting.folder == str(tmp_path / "cache")


def test_the_oldest_entries_go_beyond_the_cap(tmp_path, monkeypatch):
    from kql.planner import layout_file

    monkeypatch.setattr(layout_file, "ENTRIES", 3)
    store = LastingLayouts(str(tmp_path), busy=lambda: False)
    for i in range(5):
        store.keep(("k", i), "contiguous", {"contiguous": 1.0, "channels_last": 2.0})
    assert [store.get(("k", i)) for i in range(5)] == [None, None] + ["contiguous"] * 3


def test_the_load_average_against_the_cores_decides_busy(monkeypatch):
    cores = os.cpu_count() or 1
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 0.5, 0.0, 0.0))
    assert load_check()
    monkeypatch.setattr(os, "getloadavg", lambda: (cores - 0.5, 9.0, 9.0))
    assert not load_check()

    def unknown():
        raise OSError("no load average")
    monkeypatch.setattr(os, "getloadavg", unknown)
    assert load_check()


def test_a_store_asks_the_load_check_at_each_keep(tmp_path, monkeypatch):
    from kql.planner import layout_file

    store = LastingLayouts(str(tmp_path))
    clear = {"contiguous": 1.0, "channels_last": 2.0}
    assert not store.keep(("k",), "contiguous", clear)          # this run: always busy
    monkeypatch.setattr(layout_file, "machine_busy", lambda: False)
    assert store.keep(("k",), "contiguous", clear) and store.get(("k",)) == "contiguous"
