"""Glob patterns of image files, expanded lazily and within bounds.

A many-image query (``OCCLUDE '<glob>'``), ``LOAD IMAGES`` and ``CALIBRATE <model> ON
'<glob>'`` name their files with a glob, as Python's :mod:`glob` reads it: ``*``, ``?`` and
``[...]`` within one folder, a ``**`` component for any number of folders, and names that
start with a dot matched only by a pattern that does. :func:`iter_files` walks the folders
itself, each folder's entries in name order, so the files come out sorted, one at a time:
a query that needs only the first n stops there. The walk is bounded: a ``**`` that starts
at the file system's root is refused at once, a walk that lists more than
:data:`MAX_FOLDERS` folders stops with an error saying where to start instead, and a
symbolic link back into a folder the walk is inside is not followed again.

>>> import os, tempfile
>>> top = tempfile.mkdtemp()
>>> for name in ("b.png", "a/x.png", "a.b/y.png", ".hidden/z.png", "a/deep/w.png"):
...     os.makedirs(os.path.dirname(os.path.join(top, name)), exist_ok=True)
...     open(os.path.join(top, name), "w").close()
>>> [os.path.relpath(p, top) for p in iter_files(os.path.join(top, "**", "*.png"))]
['a.b/y.png', 'a/deep/w.png', 'a/x.png', 'b.png']
>>> import shutil; shutil.rmtree(top)
>>> glob_files("/**/*.png")
Traceback (most recent call last):
...
kql.errors.KqlPlanError: '/**/*.png' would walk the whole file system: start the pattern at the folder that holds the images, e.g. '/data/scans/**/*.png'
"""

from __future__ import annotations

import fnmatch
import glob
import heapq
import os
from typing import Iterator, Optional

from ..errors import KqlPlanError, shorten

# A walk stops past this many folders: the disk of a whole workstation holds 50,000-300,000,
# a dataset a few thousand (ImageNet's training set: 1,000).
MAX_FOLDERS = 100_000


def glob_files(pattern: str) -> list[str]:
    """The regular files ``pattern`` matches (``**`` recursive), sorted, absolute, each once."""
    return list(iter_files(pattern))


def iter_files(pattern: str, max_folders: Optional[int] = None) -> Iterator[str]:
    """The regular files ``pattern`` matches, one by one in sorted order (absolute paths,
    normalised as :func:`os.path.abspath` does); :class:`KqlPlanError` for a walk of the
    whole file system or of more than ``max_folders`` (:data:`MAX_FOLDERS`) folders."""
    root, parts = _split(pattern)
    _refuse_root(pattern, root, parts)
    walk = _Walk(pattern, MAX_FOLDERS if max_folders is None else max_folders)
    previous = None
    for path in walk.matches(root, parts, frozenset()):
        if path != previous:            # '**' twice can reach a file twice, one after the other
            previous = path
            yield path


def _split(pattern: str) -> tuple[str, list]:
    """The folder the walk starts in (taken literally) and the pattern's components."""
    norm = os.path.normpath(pattern)
    if os.path.isabs(norm):
        rest = norm.lstrip(os.sep)
        root = norm[:len(norm) - len(rest)]
    else:
        root, rest = os.getcwd(), norm
    parts = []
    for part in rest.split(os.sep):
        if part and not (part == "**" and parts[-1:] == ["**"]):     # '**/**' is '**'
            parts.append(part)
    return root, parts


def _refuse_root(pattern: str, root: str, parts: list) -> None:
    """A recursive pattern whose fixed folders lead to '/' walks every disk: refused."""
    if "**" not in parts:
        return
    fixed = []
    for part in parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    if os.path.realpath(os.path.join(root, *fixed)) == os.path.realpath(os.sep):
        raise KqlPlanError(f"'{shorten(pattern)}' would walk the whole file system: start the "
                           f"pattern at the folder that holds the images, e.g. "
                           f"'/data/scans/**/*.png'")


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _fits(name: str, part: str) -> bool:
    """Does one folder entry's name match one pattern component?"""
    if not glob.has_magic(part):
        return name == part
    return (not _hidden(name) or _hidden(part)) and fnmatch.fnmatch(name, part)


def _identity(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class _Walk:
    """One pattern's walk: counts the folders it lists against its bound."""

    def __init__(self, pattern: str, max_folders: int):
        self.pattern, self.left, self.max = pattern, max_folders, max_folders

    def entries(self, folder: str) -> list:
        """``(name, is_dir, is_link)`` of a folder's entries, in the order their paths sort
        in (a folder as 'name/': 'a.b' < 'a/x')."""
        self.left -= 1
        if self.left < 0:
            raise KqlPlanError(f"'{shorten(self.pattern)}' walked more than {self.max:,} folders "
                               f"without finishing: start the pattern at the folder that holds "
                               f"the images")
        try:
            with os.scandir(folder) as scan:
                found = [(e.name, _is_dir(e), e.is_symlink()) for e in scan]
        except OSError:                 # not a folder, gone, or not ours to read: no matches
            return []
        return sorted(found, key=lambda e: e[0] + "/" if e[1] else e[0])

    def matches(self, folder: str, parts: list, inside: frozenset) -> Iterator[str]:
        """Sorted paths under ``folder`` matching ``parts`` (``inside``: the identities of
        the folders a '**' is walking through)."""
        if not parts:
            if os.path.isfile(folder):
                yield folder
            return
        part, rest = parts[0], parts[1:]
        if not glob.has_magic(part):
            yield from self.matches(os.path.join(folder, part), rest, inside)
            return
        if part != "**":
            for name, is_dir, _ in self.entries(folder):
                if _fits(name, part) and (is_dir or not rest):
                    yield from self.matches(os.path.join(folder, name), rest, inside)
            return
        inside = inside | {_identity(folder)}
        for name, is_dir, is_link in self.entries(folder):
            path = os.path.join(folder, name)
            # '**' as no folder: the rest matched from here (at the end: any file); as
            # folders: one more, unless it is a link back into the walk.
            if rest:
                here = (self.matches(path, rest[1:], inside)
                        if _fits(name, rest[0]) and (is_dir or not rest[1:]) else ())
            else:
                here = () if is_dir or _hidden(name) else self.matches(path, [], inside)
            deeper = (self.matches(path, parts, inside)
                      if is_dir and not _hidden(name) and not (is_link and _identity(path) in inside)
                      else ())
            yield from heapq.merge(here, deeper)


def _is_dir(entry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False
