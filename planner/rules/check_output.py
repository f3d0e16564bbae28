"""Check: INTO must name a .png, .npy or .parquet file in a directory that exists, that the
operating system can take (no NUL, encodable, not longer than the file system allows).

The parser already refuses the names no file could have, at the string's own position;
the check repeats it for statements built in Python, pointing at the INTO clause.

>>> from types import SimpleNamespace
>>> from kql.parser import parse
>>> stmt = parse("OCCLUDE img USING net INTO 'map.jpg'")[0]
>>> check(SimpleNamespace(statement=stmt, into=stmt.into), None)
Traceback (most recent call last):
...
kql.errors.KqlPlanError: line 1, column 23: INTO 'map.jpg': unsupported file type '.jpg'; use .png, .npy or .parquet
>>> check(SimpleNamespace(statement=stmt, into="m" * 300 + ".png"), None)
Traceback (most recent call last):
...
kql.errors.KqlPlanError: line 1, column 23: INTO 'mmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmmm…': the file name is longer than 255 bytes
>>> check(SimpleNamespace(statement=stmt, into=None), None) is None     # no INTO: nothing to check
True
"""

import os
from typing import Optional

from kql.errors import shorten
from kql.output import FORMATS, formats_text
from kql.parser import path_problem
from kql.planner.logical import fail


def check(plan, ctx) -> None:
    into = plan.into
    if into is None:
        return
    problem = path_problem(into) or _too_long(into)
    if problem is not None:
        raise fail(plan.statement, "into", f"INTO '{shorten(into)}': {problem}")
    ext = os.path.splitext(into)[1].lower()
    if ext not in FORMATS:
        raise fail(plan.statement, "into", f"INTO '{into}': unsupported file type "
                                           f"'{ext or '(none)'}'; use {formats_text()}")
    folder = os.path.dirname(os.path.abspath(into))
    if not os.path.isdir(folder):
        raise fail(plan.statement, "into", f"INTO '{into}': directory '{folder}' does not exist")
    if os.path.isdir(into):
        raise fail(plan.statement, "into", f"INTO '{into}' is a directory")


def _too_long(path: str) -> Optional[str]:
    """Why the file system would refuse ``path`` for its length, or None."""
    limit_name, limit_path = _limits(os.path.dirname(os.path.abspath(path)))
    if len(os.fsencode(os.path.abspath(path))) > limit_path:
        return f"the path is longer than {limit_path} bytes"
    if len(os.fsencode(os.path.basename(path))) > limit_name:
        return f"the file name is longer than {limit_name} bytes"
    return None


def _limits(folder: str) -> tuple[int, int]:
    """The longest file name and path, in bytes, where ``folder`` lies (POSIX defaults)."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX"), os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):   # no such folder yet, or not POSIX
        return 255, 4096
