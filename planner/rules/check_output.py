"""INTO must name a .png, .npy or .parquet file in a directory that exists."""

import os

from kql.planner.logical import fail

FORMATS = (".png", ".npy", ".parquet")


def rewrite(plan, ctx):
    into = plan.into
    if into is None:
        return plan
    ext = os.path.splitext(into)[1].lower()
    if ext not in FORMATS:
        raise fail(plan.statement, "into", f"INTO '{into}': unsupported file type "
                                           f"'{ext or '(none)'}'; use .png, .npy or .parquet")
    folder = os.path.dirname(os.path.abspath(into))
    if not os.path.isdir(folder):
        raise fail(plan.statement, "into", f"INTO '{into}': directory '{folder}' does not exist")
    if os.path.isdir(into):
        raise fail(plan.statement, "into", f"INTO '{into}' is a directory")
    return plan
