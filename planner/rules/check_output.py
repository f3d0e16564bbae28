"""Check: INTO must name a .png, .npy or .parquet file in a directory that exists.

>>> from types import SimpleNamespace
>>> from kql.parser import parse
>>> stmt = parse("OCCLUDE img USING net INTO 'map.jpg'")[0]
>>> check(SimpleNamespace(statement=stmt, into=stmt.into), None)
Traceback (most recent call last):
...
kql.errors.KqlPlanError: line 1, column 23: INTO 'map.jpg': unsupported file type '.jpg'; use .png, .npy or .parquet
>>> check(SimpleNamespace(statement=stmt, into=None), None) is None     # no INTO: nothing to check
True
"""

import os

from kql.output import FORMATS, formats_text
from kql.planner.logical import fail


def check(plan, ctx) -> None:
    into = plan.into
    if into is None:
        return
    ext = os.path.splitext(into)[1].lower()
    if ext not in FORMATS:
        raise fail(plan.statement, "into", f"INTO '{into}': unsupported file type "
                                           f"'{ext or '(none)'}'; use {formats_text()}")
    folder = os.path.dirname(os.path.abspath(into))
    if not os.path.isdir(folder):
        raise fail(plan.statement, "into", f"INTO '{into}': directory '{folder}' does not exist")
    if os.path.isdir(into):
        raise fail(plan.statement, "into", f"INTO '{into}' is a directory")
