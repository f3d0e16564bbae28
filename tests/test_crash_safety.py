"""Writers killed in the middle of a write: every file is an old or a new whole version,
and the temporary files they leave are removed by the next KQL write or catalog open.

One helper process imports KQL once and forks the writers: each loops LOAD IMAGE into a
catalog and writes a JSON and a .npy output through ``atomic_write``; the helper kills it
(SIGKILL, or SIGTERM with :func:`kql.fileio.raise_on_sigterm` installed, as the CLI does),
checks every file and reports what it found as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

HELPER = r'''
import json, os, random, signal, sys, time
import numpy as np
import kql
from kql.fileio import atomic_write, raise_on_sigterm

folder, png, rounds, how, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
cat, out = os.path.join(folder, "cat"), os.path.join(folder, "out")
os.makedirs(out, exist_ok=True)


def write_json(fh, seq, tell, n):
    """2 MB for the first write of a writer (killed in it), then small ones: the later
    kills fall anywhere in the loop, catalog writes included."""
    fh.write('{"seq": %d, "sum": %d, "data": [' % (seq, n * (n - 1) // 2 + seq))
    tell()                              # the temporary file exists, half written
    fh.write(", ".join(map(str, range(n))) + "]}")


def writer(signal_fd):
    if how == "TERM":
        raise_on_sigterm()
    con = kql.connect(cat)
    told = []

    def tell():
        if not told:
            told.append(os.write(signal_fd, b"w"))
    seq = 0
    while True:
        seq += 1
        con.execute(f"LOAD IMAGE p{os.getpid()}_{seq} FROM '{png}'")
        n = 2000 if told else 300000
        atomic_write(os.path.join(out, "out.json"), lambda fh: write_json(fh, seq, tell, n))
        atomic_write(os.path.join(out, "out.npy"),
                     lambda tmp: np.save(tmp, np.full(50000, seq, dtype=np.int64)), mode=None)


def check(images_before):
    """Each file whole (old or new); the catalog never loses an entry."""
    with open(os.path.join(cat, "catalog.json")) as fh:
        images = json.load(fh)["images"]
    assert all(isinstance(e, dict) and e["path"] == png for e in images.values())
    assert len(images) >= images_before, (len(images), images_before)
    with open(os.path.join(out, "out.json")) as fh:
        data = json.load(fh)
    n = len(data["data"])
    assert data["data"] == list(range(n)) and data["sum"] == n * (n - 1) // 2 + data["seq"]
    arr = np.load(os.path.join(out, "out.npy"))
    assert arr.shape == (50000,) and (arr == arr[0]).all()
    return len(images)


def litter():
    return sorted(n for d in (cat, out) for n in os.listdir(d)
                  if n.startswith(".") and n != ".catalog.lock")


kql.connect().execute(f"LOAD IMAGE warm FROM '{png}'")   # the imports, once, before the forks
rng = random.Random(seed)
images, left, statuses = 0, [], []
for i in range(rounds):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            writer(w)
        except SystemExit as exc:           # SIGTERM, made an exception
            os._exit(exc.code)
        finally:
            os._exit(3)
    os.close(w)
    assert os.read(r, 1) == b"w"
    os.close(r)
    if i % 2:                           # odd rounds: a random moment of a later write
        time.sleep(rng.uniform(0.0, 0.4))
    os.kill(pid, signal.SIGKILL if how == "KILL" else signal.SIGTERM)
    statuses.append(os.waitpid(pid, 0)[1])
    if i == 0 and not os.path.exists(os.path.join(out, "out.npy")):
        left.append(litter())           # killed in its first write: nothing to check yet
        with open(os.path.join(out, "out.json"), "w") as fh:
            write_json(fh, 0, lambda: None, 10)
        np.save(os.path.join(out, "out.npy"), np.zeros(50000, dtype=np.int64))
        continue
    images = check(images)
    left.append(litter())
kql.connect(cat)                        # opening the catalog sweeps its folder
atomic_write(os.path.join(out, "out.json"), lambda fh: write_json(fh, -1, lambda: None, 10))
print(json.dumps({"left": left, "statuses": statuses, "images": images,
                  "cat": sorted(os.listdir(cat)), "out": sorted(os.listdir(out))}))
'''


@pytest.fixture(scope="module")
def png():
    from PIL import Image

    folder = tempfile.mkdtemp(prefix="kqlc-", dir="/tmp")
    path = os.path.join(folder, "p.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(path)
    yield path
    shutil.rmtree(folder, ignore_errors=True)


def run_helper(tmp_path, png, rounds: int, how: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", HELPER, str(tmp_path), png, str(rounds), how, "7"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the writers are forked")
def test_sigkill_in_the_write_window_leaves_whole_files_and_removable_litter(tmp_path, png):
    report = run_helper(tmp_path, png, 20, "KILL")
    assert report["statuses"] == [9] * 20                           # killed, every one
    assert sum(bool(names) for names in report["left"][::2]) == 10   # each left its temp file
    assert report["images"] >= 20                                   # one LOAD per writer at least
    assert report["cat"] == [".catalog.lock", "catalog.json"]         # swept on open
    assert report["out"] == ["out.json", "out.npy"]                   # swept on the next write


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the writers are forked")
def test_sigterm_in_the_write_window_removes_the_temporary_file(tmp_path, png):
    report = run_helper(tmp_path, png, 6, "TERM")
    assert all(os.WIFEXITED(s) and os.WEXITSTATUS(s) == 143 for s in report["statuses"])
    assert report["left"] == [[]] * 6                                 # nothing left, no sweep
    assert report["cat"] == [".catalog.lock", "catalog.json"]


def test_the_sweep_removes_only_what_writers_that_are_gone_left(tmp_path):
    from kql.fileio import LEGACY_AGE, atomic_write, sweep

    dead, mine = 2 ** 22 + 12345, os.getpid()          # above the kernel's pid limit: not alive
    names = {f".kql-{dead}-abcd1234.png": False, f".catalog-{dead}-x_y0z9ab.json": False,
             f".calibration-{dead}-abcd1234.tmp": False, f".kql-{mine}-abcd1234.npy": True,
             ".kql-abcd1234.parquet": False, ".tuning-abcd1234.json": True,    # old / fresh
             ".kql-notes.txt": True, "kql-1-abcd1234.png": True, f".kql-{dead}-abcd1234.png.bak~": True,
             f".kql-{dead}-lockedby.png": True}
    for name in names:
        (tmp_path / name).write_bytes(b"")
    old = os.stat(tmp_path / ".kql-abcd1234.parquet").st_mtime - LEGACY_AGE - 60
    os.utime(tmp_path / ".kql-abcd1234.parquet", (old, old))
    held = open(tmp_path / f".kql-{dead}-lockedby.png", "rb")   # a writer in another pid namespace
    import fcntl
    fcntl.flock(held.fileno(), fcntl.LOCK_SH)
    try:
        removed = sweep(str(tmp_path))
        atomic_write(str(tmp_path / "out.json"), lambda fh: fh.write("{}"))    # sweeps too
    finally:
        held.close()
    assert sorted(removed) == sorted(name for name, kept in names.items() if not kept)
    assert sorted(os.listdir(tmp_path)) == sorted([n for n, kept in names.items() if kept] + ["out.json"])
