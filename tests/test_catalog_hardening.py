"""A catalog directory shared by sessions at once, and every way its files come out wrong.

Several processes and threads load into one directory and nothing is lost; one session
sees what another loaded; a damaged file is one line naming it, a damaged entry is shown
as damaged while the rest works; a read-only folder or a full disk is a one-line error on
LOAD and no error on OCCLUDE (the calibration is not kept); the files get the mode a
plain ``open`` gives.

The directories are short ``/tmp`` folders: a message names its file in full.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
import torch

import kql
from helpers import smooth_noise_image
from kql.planner import calibrate


@pytest.fixture
def folder():
    path = tempfile.mkdtemp(prefix="kqlh-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def assets():
    """``net.pt`` (SqueezeNet 1.1 state dict, 3 classes), ``a.png`` (20x26), ``b.png`` (12x16)."""
    import torchvision
    from PIL import Image

    path = tempfile.mkdtemp(prefix="kqla-", dir="/tmp")
    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1(weights=None, num_classes=3).state_dict(),
               os.path.join(path, "net.pt"))
    for name, (h, w) in (("a.png", (20, 26)), ("b.png", (12, 16))):
        pixels = (smooth_noise_image(h, w).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(path, name))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def stored(directory: str) -> dict:
    with open(os.path.join(directory, "catalog.json")) as fh:
        return json.load(fh)


def hidden(directory: str) -> list:
    return sorted(n for n in os.listdir(directory) if n.startswith(".") and not n.endswith(".lock"))


def error_of(fn, *args):
    with pytest.raises(kql.KqlError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return info.value


# -- several writers at once -----------------------------------------------------------------------

WORKER = """
import os, sys, time, kql
directory, tag, png, net, go = sys.argv[1:6]
con = kql.connect(directory)
while not os.path.exists(go):          # start together: the imports take seconds
    time.sleep(0.01)
for i in range(15):
    con.execute(f"LOAD IMAGE {tag}{i} FROM '{png}'")
for i in range(2):
    con.execute(f"LOAD MODEL {tag}m{i} FROM '{net}' ARCH squeezenet1_1")
"""


def test_processes_loading_at_once_keep_every_entry(assets, folder):
    """Two Python sessions and one ``kql`` command, 15 LOAD IMAGE and 2 LOAD MODEL each."""
    directory, go = os.path.join(folder, "cat"), os.path.join(folder, "go")
    png, net = os.path.join(assets, "a.png"), os.path.join(assets, "net.pt")
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, directory, tag, png, net, go],
                                stderr=subprocess.PIPE, text=True) for tag in ("p", "q")]
    script = "; ".join([f"LOAD IMAGE c{i} FROM '{png}'" for i in range(15)]
                       + [f"LOAD MODEL cm{i} FROM '{net}' ARCH squeezenet1_1" for i in range(2)])
    cli = subprocess.Popen([sys.executable, "-m", "kql", "--no-progress", "--catalog", directory,
                            "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    open(go, "w").close()
    for proc in workers + [cli]:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    data = stored(directory)
    assert sorted(data["images"]) == sorted(f"{t}{i}" for t in "pqc" for i in range(15))
    assert sorted(data["models"]) == sorted(f"{t}m{i}" for t in "pqc" for i in range(2))
    assert hidden(directory) == []


def test_threads_loading_at_once_keep_every_entry(assets, folder):
    """Four threads: two with a connection each, two sharing one."""
    png = os.path.join(assets, "b.png")
    shared = kql.connect(folder)
    cons = [kql.connect(folder), kql.connect(folder), shared, shared]
    failures = []

    def load(con, tag):
        try:
            for i in range(10):
                con.execute(f"LOAD IMAGE {tag}{i} FROM '{png}'")
        except Exception as exc:       # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=load, args=(con, f"t{n}_")) for n, con in enumerate(cons)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(stored(folder)["images"]) == 40
    assert len(kql.connect(folder).images()) == 40


def test_threads_saving_tunings_at_once_keep_every_record(folder):
    from kql.catalog.registry import Catalog
    from kql.catalog.models import ModelSpec

    net = torch.nn.Linear(2, 2)
    catalogs = [Catalog(folder) for _ in range(4)]
    for cat in catalogs:
        cat.register_model(ModelSpec("net", net))
    threads = [threading.Thread(target=lambda c=cat, n=n: [c.save_tuning("net", f"k{n}.{i}", {"i": i})
                                                            for i in range(10)])
               for n, cat in enumerate(catalogs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(catalogs[0]._read_tunings()["net"]) == 40


def test_a_session_sees_what_another_loaded_or_replaced(assets, folder):
    first, second = kql.connect(folder), kql.connect(folder)
    assert first.images() == [] and [r["name"] for r in first.models()] == ["efficientnet_lite0"]
    second.execute(f"LOAD IMAGE pic FROM '{assets}/a.png'; "
                   f"LOAD MODEL net FROM '{assets}/net.pt' ARCH squeezenet1_1")
    assert [r["name"] for r in first.execute("SHOW IMAGES").rows] == ["pic"]
    assert "net" in [r["name"] for r in first.execute("SHOW MODELS").rows]
    assert tuple(first.catalog.resolve_image("pic").shape) == (3, 20, 26)
    assert first.catalog.resolve_model("net").num_classes == 3
    second.execute(f"LOAD IMAGE pic FROM '{assets}/b.png'")          # replaced meanwhile
    assert tuple(first.catalog.resolve_image("pic").shape) == (3, 12, 16)
    first.execute(f"LOAD IMAGE own FROM '{assets}/a.png'")
    assert sorted(stored(folder)["images"]) == ["own", "pic"]


# -- damaged files and entries ----------------------------------------------------------------------

@pytest.mark.parametrize("content, what", [
    ('{"models": null}', '"models" is null, not an object'),
    ('{"images": [1, 2]}', '"images" is a list, not an object'),
    ("[" * 100000, "nested too deeply"),
    ("[1]", "a list, not an object"),
    ('"catalog"', "a string, not an object"),
    ("{ not json", "not JSON"),
    (b"\xff\xfe{}", "not UTF-8 text"),
])
def test_a_damaged_catalog_file_is_one_line_naming_it(folder, content, what):
    path = os.path.join(folder, "catalog.json")
    with open(path, "wb") as fh:
        fh.write(content if isinstance(content, bytes) else content.encode())
    message = str(error_of(kql.connect, folder))
    assert message.startswith(f"catalog file '{path}' is damaged ({what}")
    assert message.endswith("); repair or remove it")


def test_a_damaged_file_is_never_overwritten(assets, folder):
    con = kql.connect(folder)
    con.execute(f"LOAD IMAGE pic FROM '{assets}/a.png'")
    path = os.path.join(folder, "catalog.json")
    with open(path, "w") as fh:
        fh.write('{"images": {"pic": ')                     # cut short by hand
    err = error_of(con.execute, f"LOAD IMAGE other FROM '{assets}/a.png'")
    assert "is damaged (not JSON" in str(err)
    assert open(path).read() == '{"images": {"pic": '
    assert "is damaged" in str(error_of(con.execute, "SHOW IMAGES"))


def test_a_catalog_file_that_is_a_folder(folder):
    os.mkdir(os.path.join(folder, "catalog.json"))
    err = error_of(kql.connect, folder)
    assert str(err) == f"cannot read catalog file '{folder}/catalog.json': Is a directory"


def test_damaged_entries_are_shown_and_refused_while_the_rest_works(assets, folder):
    good_model = {"path": f"{assets}/net.pt", "arch": "squeezenet1_1", "labels": None}
    document = {"models": {"nopath": {"arch": "resnet18"}, "text": "x.pt", "good": good_model,
                           "badarch": {"path": f"{assets}/net.pt", "arch": 18}},
                "images": {"num": 3, "good": {"path": f"{assets}/a.png"}, "empty": {"path": ""}},
                "future": {"kept": True}}
    with open(os.path.join(folder, "catalog.json"), "w") as fh:
        json.dump(document, fh)
    con = kql.connect(folder)
    models = {r["name"]: r["source"] for r in con.execute("SHOW MODELS").rows}
    assert models["nopath"] == 'damaged catalog entry (no "path")'
    assert models["text"] == "damaged catalog entry (a string, not an object)"
    assert models["badarch"] == 'damaged catalog entry ("arch" is a number, not a string)'
    assert models["good"] == f"{assets}/net.pt"
    images = {r["name"]: r["source"] for r in con.execute("SHOW IMAGES").rows}
    assert images == {"num": "damaged catalog entry (a number, not an object)",
                      "good": f"{assets}/a.png",
                      "empty": 'damaged catalog entry ("path" is not a file name)'}
    err = error_of(con.catalog.resolve_model, "nopath")
    assert isinstance(err, kql.KqlModelError)
    assert str(err) == (f"model 'nopath' in catalog file '{folder}/catalog.json' is damaged "
                        "(no \"path\"); LOAD MODEL nopath FROM '<file>' replaces it")
    assert isinstance(error_of(con.catalog.resolve_image, "num"), kql.KqlImageError)
    assert con.catalog.resolve_model("good").num_classes == 3
    assert tuple(con.catalog.resolve_image("good").shape) == (3, 20, 26)
    con.execute(f"LOAD IMAGE num FROM '{assets}/b.png'")       # a LOAD replaces a damaged entry
    assert tuple(kql.connect(folder).catalog.resolve_image("num").shape) == (3, 12, 16)
    data = stored(folder)
    assert data["models"]["text"] == "x.pt" and data["future"] == {"kept": True}   # left alone


# -- directories that cannot be used ------------------------------------------------------------------

def test_a_catalog_directory_that_is_a_file(folder):
    path = os.path.join(folder, "file")
    open(path, "w").close()
    assert str(error_of(kql.connect, path)) == f"catalog directory '{path}' is a file, not a directory"
    err = error_of(kql.connect, os.path.join(path, "cat"))
    assert str(err) == f"cannot create catalog directory '{path}/cat': Not a directory"


def test_a_catalog_directory_that_is_a_broken_link(folder):
    link = os.path.join(folder, "link")
    os.symlink(os.path.join(folder, "gone"), link)
    assert str(error_of(kql.connect, link)) == f"catalog directory '{link}' is a broken symbolic link"


def test_a_catalog_directory_without_permission(folder, monkeypatch):
    directory = os.path.join(folder, "cat")
    os.mkdir(directory)
    if os.geteuid() == 0:               # root passes every permission check: make it fail
        monkeypatch.setattr(os, "access", lambda path, mode, **kw: path != directory)
    else:
        os.chmod(directory, 0)
    try:
        err = error_of(kql.connect, directory)
    finally:
        os.chmod(directory, 0o755)
    assert str(err) == f"cannot open catalog directory '{directory}': permission denied"


def refuse_new_files(monkeypatch, directory: str, code: int = errno.EACCES):
    """The file system refuses to create files in ``directory``, as a read-only folder does."""
    real = os.open

    def refusing(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and os.path.dirname(os.path.abspath(path)) == directory:
            raise OSError(code, os.strerror(code), path)
        return real(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", refusing)


def fast_calibration(monkeypatch):
    """A made-up device table, so that OCCLUDE asks to write one without measuring."""
    table = calibrate.Throughput("cpu", [[1e9] * 5] * 5, [1e9] * 5, 1e9, 1e9, 1e-5, cout=[1.0] * 6)
    calls = []
    monkeypatch.setattr(calibrate, "measure", lambda device: calls.append(device) or table)
    calibrate._cache.clear()
    return calls


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS])
def test_read_only_directory_refuses_load_but_runs_occlude(assets, folder, monkeypatch,
                                                           small_model, code):
    con = kql.connect(folder)
    con.execute(f"LOAD IMAGE pic FROM '{assets}/a.png'")
    before = open(os.path.join(folder, "catalog.json")).read()
    refuse_new_files(monkeypatch, folder, code)
    calls = fast_calibration(monkeypatch)
    err = error_of(con.execute, f"LOAD IMAGE other FROM '{assets}/b.png'")
    assert str(err).endswith(f"cannot write catalog file '{folder}/catalog.json': {os.strerror(code)}")
    assert [r["name"] for r in con.images()] == ["pic"]               # reading still works
    assert open(os.path.join(folder, "catalog.json")).read() == before
    con.register_model("net", small_model)
    con.register_image("img", smooth_noise_image(24, 30))
    r = con.execute("OCCLUDE img USING net PATCH 8 STRIDE 8")          # the calibration is not kept
    assert r.heatmap.shape == (3, 3) and calls == ["cpu"]
    assert not os.path.exists(os.path.join(folder, calibrate.FILE)) and hidden(folder) == []


def test_a_full_disk(assets, folder, monkeypatch, small_model):
    con = kql.connect(folder)
    con.execute(f"LOAD IMAGE pic FROM '{assets}/a.png'")
    before = open(os.path.join(folder, "catalog.json")).read()
    calls = fast_calibration(monkeypatch)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)
    err = error_of(con.execute, f"LOAD IMAGE other FROM '{assets}/b.png'")
    assert str(err).endswith(f"cannot write catalog file '{folder}/catalog.json': No space left on device")
    assert open(os.path.join(folder, "catalog.json")).read() == before
    con.register_model("net", small_model)
    con.register_image("img", smooth_noise_image(24, 30))
    err = error_of(con.execute, f"OCCLUDE img USING net PATCH 8 STRIDE 8 INTO '{folder}/map.npy'")
    assert str(err).endswith(f"cannot write '{folder}/map.npy': No space left on device")
    assert calls == ["cpu"] and sorted(os.listdir(folder)) == [".catalog.lock", "catalog.json"]


def test_a_damaged_calibration_file_is_measured_again(folder, monkeypatch):
    key = calibrate.device_key("cpu")
    fast_calibration(monkeypatch)
    path = os.path.join(folder, calibrate.FILE)
    sound = dataclasses.asdict(calibrate.measure("cpu"))
    for content in ("[" * 100000, json.dumps({key: {**sound, "dense": "fast"}}),
                    json.dumps({key: {**sound, "matmul": -1.0}}), json.dumps([1])):
        with open(path, "w") as fh:
            fh.write(content)
        calibrate._cache.clear()
        assert calibrate.throughput("cpu", folder).dense == sound["dense"]
        assert json.load(open(path))[key]["dense"] == sound["dense"]      # written anew


# -- modes ----------------------------------------------------------------------------------

def test_files_get_the_mode_open_gives(assets, folder, monkeypatch, small_model):
    from kql.catalog.registry import Catalog
    from kql.catalog.models import ModelSpec

    old = os.umask(0o027)
    try:
        fast_calibration(monkeypatch)
        con = kql.connect(folder)
        con.execute(f"LOAD IMAGE pic FROM '{assets}/a.png'")
        con.register_model("net", small_model)
        con.register_image("img", smooth_noise_image(24, 30))
        con.execute(f"OCCLUDE img USING net PATCH 8 STRIDE 8 INTO '{folder}/map.npy'")
        cat = Catalog(folder)
        cat.register_model(ModelSpec("lin", torch.nn.Linear(2, 2)))
        cat.save_tuning("lin", "k", {"a": 1})
        modes = {name: os.stat(os.path.join(folder, name)).st_mode & 0o777
                 for name in ("catalog.json", "tuning.json", calibrate.FILE, "map.npy")}
        assert modes == dict.fromkeys(modes, 0o640)
        for mode in (0o600, 0o664):                                    # modes the user chose
            os.chmod(os.path.join(folder, "catalog.json"), mode)
            con.execute(f"LOAD IMAGE again FROM '{assets}/a.png'")
            assert os.stat(os.path.join(folder, "catalog.json")).st_mode & 0o777 == mode
    finally:
        os.umask(old)
