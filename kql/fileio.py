"""Writing a file so that readers see the old one or the new one, never half of one.

The data lands in a hidden temporary file ``<prefix><pid>-XXXXXXXX<ext>`` in the target
folder, is flushed to disk and renamed over the target; on any failure (an interrupt
included) the temporary file is removed. A process killed in that window (SIGKILL, a power
cut) leaves its temporary file behind: the next write into the folder removes the ones of
writers that are gone (:func:`sweep`). The new file gets the mode a plain ``open`` gives:
an existing target's, else 0666 less the umask.

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
import json
import os
import re
import secrets
import signal
import time
from typing import Callable, Optional

# Every prefix a temporary file of KQL starts with (the sweep knows no other).
PREFIXES = (".kql-", ".catalog-", ".tuning-", ".calibration-", ".layouts-", ".feedback-",
            ".precision-")
# A temporary file without a pid (written by KQL before pids were in the name) counts as
# left over once it is this old (seconds).
LEGACY_AGE = 3600
_TOKEN = "abcdefghijklmnopqrstuvwxyz0123456789_"
_TEMP = re.compile(r"(?:%s)(?:(\d+)-)?[a-z0-9_]{8}(?:\.[A-Za-z0-9]+)*\Z"
                   % "|".join(re.escape(p) for p in PREFIXES))


def atomic_write(path: str, write: Callable, *, mode: Optional[str] = "w", prefix: str = ".kql-",
                 suffix: Optional[str] = None, private: bool = False) -> None:
    """Write ``path`` through a hidden temporary file ``<prefix><pid>-XXXXXXXX<suffix>``.

    ``write`` gets the open temporary file (``mode`` 'w': text, UTF-8; 'wb': bytes), or,
    with ``mode=None``, its path, for writers that open files themselves. ``suffix``
    defaults to the extension of ``path``; ``prefix`` is one of :data:`PREFIXES`.
    ``private`` makes the file owner-only (0600). Raises what ``write`` or the file system
    raised (``OSError``).
    """
    if prefix not in PREFIXES:
        raise ValueError(f"atomic_write: prefix {prefix!r} is not one of {PREFIXES}")
    folder = os.path.dirname(os.path.abspath(path))
    sweep(folder)
    suffix = os.path.splitext(path)[1] if suffix is None else suffix
    fd = tmp = None
    try:
        with _signals_held():       # a Ctrl-C or SIGTERM now is raised below, with tmp known
            fd, tmp = _create_temp(folder, prefix, suffix, 0o600 if private else 0o666)
        _hold(fd)                   # a live writer's file: locked until it is renamed
        if not private:
            _keep_mode(fd, path)
        if mode is None:
            write(tmp)
        else:
            with open(os.dup(fd), mode, encoding=None if "b" in mode else "utf-8") as fh:
                write(fh)
        os.fsync(fd)
        if os.name == "nt":         # Windows renames no open file
            fd = _close(fd)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    finally:
        _close(fd)
    _fsync_folder(folder)


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM back (POSIX, this thread) until the block ends: their
    Python handlers then run, and raise, after it."""
    block = getattr(signal, "pthread_sigmask", None)
    if block is None:
        yield
        return
    before = block(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        block(signal.SIG_SETMASK, before)


def _close(fd: Optional[int]) -> None:
    if fd is not None:
        os.close(fd)


def _create_temp(folder: str, prefix: str, suffix: str, bits: int) -> tuple:
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    while True:
        token = "".join(secrets.choice(_TOKEN) for _ in range(8))
        tmp = os.path.join(folder, f"{prefix}{os.getpid()}-{token}{suffix}")
        try:
            return os.open(tmp, flags, bits), tmp
        except FileExistsError:
            continue


def _keep_mode(fd: int, path: str) -> None:
    """Give the new file the mode of the one it replaces, as ``open`` keeps it (a new
    name keeps 0666 less the umask, which ``os.open`` applied)."""
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        return
    with contextlib.suppress(OSError, AttributeError):
        os.fchmod(fd, mode)


def _hold(fd: int) -> None:
    """Lock the temporary file (``flock``, shared) so that a sweep of another process,
    in another pid namespace too, leaves it alone while this writer lives."""
    with contextlib.suppress(ImportError, OSError):
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (POSIX; a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- left-over temporary files ------------------------------------------------------------------

def sweep(folder: str) -> list:
    """Remove the temporary files of KQL writers in ``folder`` that are gone (their pid is
    not alive and nothing holds their lock); return the names removed. Never raises.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> dead = os.path.join(folder, ".kql-999999999-abcd1234.png")   # no such pid
    >>> mine = os.path.join(folder, f".kql-{os.getpid()}-abcd1234.png")
    >>> for name in (dead, mine, os.path.join(folder, "keep.png")):
    ...     open(name, "w").close()
    >>> sweep(folder), sorted(os.listdir(folder))
    (['.kql-999999999-abcd1234.png'], ['.kql-...-abcd1234.png', 'keep.png'])
    >>> import shutil; shutil.rmtree(folder)
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match and _left_over(entry, match.group(1)) and _remove(entry.path):
            removed.append(entry.name)
    return removed


def _left_over(entry, pid: Optional[str]) -> bool:
    try:
        if not entry.is_file(follow_symlinks=False):
            return False
        if pid is None:
            return time.time() - entry.stat(follow_symlinks=False).st_mtime > LEGACY_AGE
    except OSError:
        return False
    return not _alive(int(pid)) and not _locked_by_writer(entry.path)


def _alive(pid: int) -> bool:
    if os.name == "nt":             # os.kill would terminate it: count every pid as alive
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True                 # exists (another user's), or cannot tell
    return True


def _locked_by_writer(path: str) -> bool:
    try:
        import fcntl
    except ImportError:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _remove(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except OSError:
        return False


# -- locks, JSON, signals --------------------------------------------------------------------

@contextlib.contextmanager
def locked(path: str):
    """An exclusive advisory lock (POSIX ``flock``; elsewhere none) on the file ``path``,
    created if need be (raises ``OSError`` when it cannot be), or on the folder ``path``
    (no lock file left behind; where folders cannot be locked, NFS, it holds no lock)."""
    folder = os.path.isdir(path)
    fd = _lock_fd(path, folder)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except ImportError:
            pass
        except OSError:
            if not folder:
                raise
        yield
    finally:
        os.close(fd)                # releases the lock


def _lock_fd(path: str, folder: bool) -> int:
    cloexec = getattr(os, "O_CLOEXEC", 0)
    if folder:
        return os.open(path, os.O_RDONLY | cloexec)
    try:            # NFS locks exclusively only what is open for writing
        return os.open(path, os.O_RDWR | os.O_CREAT | cloexec, 0o666)
    except PermissionError as denied:   # an existing lock file of another user
        try:
            return os.open(path, os.O_RDONLY | cloexec)
        except OSError:
            raise denied from None


def read_json(path: str):
    """The JSON value in ``path``. Raises ``OSError`` (cannot read) or ``ValueError`` (not
    UTF-8 JSON, or nested too deeply to parse).

    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
    ...     _ = fh.write("[" * 100000)
    >>> read_json(fh.name)
    Traceback (most recent call last):
    ...
    ValueError: nested too deeply
    >>> os.unlink(fh.name)
    """
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_entries(path: str, version: int, sound: Callable[[object], bool]) -> dict:
    """The ``sound`` entries of a ``{"version": ..., "entries": {...}}`` JSON file; empty
    when it is missing, unreadable or of another version."""
    try:
        stored = read_json(path)
    except (OSError, ValueError):
        return {}
    if not isinstance(stored, dict) or stored.get("version") != version:
        return {}
    entries = stored.get("entries")
    return {k: v for k, v in entries.items() if sound(v)} if isinstance(entries, dict) else {}


def update_json(path: str, read: Callable[[str], object], change: Callable[[object], object], *,
                prefix: str, indent: Optional[int] = None) -> None:
    """Rewrite the JSON file ``path`` as ``change(read(path))``, under a lock on its folder
    and through a temporary file renamed into place (:func:`atomic_write`): readers, another
    process included, see the old file or the new one, and what another writer added
    meanwhile stays. ``read`` returns the current value (its own defaults for a missing or
    unsound file). Raises ``OSError``.

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "t.json")
    >>> for n in (1, 2):
    ...     update_json(path, lambda p: read_json(p) if os.path.exists(p) else [],
    ...                 lambda old: old + [n], prefix=".kql-")
    >>> read_json(path)
    [1, 2]
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with locked(folder):
        value = change(read(path))
        atomic_write(path, lambda fh: json.dump(value, fh, indent=indent), prefix=prefix,
                     suffix=".tmp")


def raise_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit(143)`` in this process, so that ``finally`` blocks
    run (a write in progress removes its temporary file). For the CLI and the shell; call
    from the main thread. A handler someone else set (or SIG_IGN) is left alone."""
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum, frame):
    raise SystemExit(128 + signum)
