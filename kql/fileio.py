"""Writing a file so that readers see the old one or the new one, never half of one.

The data lands in a temporary file in the target folder, is flushed to disk and renamed
over the target; on any failure (an interrupt included) the temporary file is removed.

>>> import json, os, tempfile
>>> folder = tempfile.mkdtemp()
>>> path = os.path.join(folder, "data.json")
>>> atomic_write(path, lambda fh: json.dump({"a": 1}, fh))
>>> open(path).read(), os.listdir(folder)
('{"a": 1}', ['data.json'])
>>> def broken(fh):
...     raise ValueError("kaput")
>>> atomic_write(path, broken)
Traceback (most recent call last):
...
ValueError: kaput
>>> open(path).read(), os.listdir(folder)
('{"a": 1}', ['data.json'])
>>> import shutil; shutil.rmtree(folder)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable, Optional


def atomic_write(path: str, write: Callable, *, mode: Optional[str] = "w", prefix: str = ".kql-",
                 suffix: Optional[str] = None, private: bool = True) -> None:
    """Write ``path`` through a hidden temporary file ``<prefix>XXXX<suffix>`` next to it.

    ``write`` gets the open temporary file (``mode`` 'w': text, UTF-8; 'wb': bytes), or,
    with ``mode=None``, its path, for writers that open files themselves. ``suffix``
    defaults to the extension of ``path``. ``private`` keeps the temporary file's
    owner-only mode (0600); False gives the mode a plain ``open`` would (0666 less the
    umask). Raises what ``write`` or the file system raised (``OSError``).
    """
    folder = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1] if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    try:
        if mode is None:
            os.close(fd)
            write(tmp)
            _fsync(tmp)
        else:
            with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
        if not private:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
