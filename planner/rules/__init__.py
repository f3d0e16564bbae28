"""Optimizer rules, one per file; each is ``rewrite(plan, ctx) -> plan``.

The order matters and is fixed here:

1. ``check_output``: a bad INTO path fails before anything expensive runs.
2. ``check_quality``: range-check WITH SSIM / DRILLDOWN, then refuse them until the
   approximate operators exist (never silently ignored).
3. ``resolve_device``: ON GPU needs a GPU; ON AUTO without one becomes CPU, with one it
   stays for the physical planner to price both devices.
"""

from . import check_output, check_quality, resolve_device

RULES = (check_output.rewrite, check_quality.rewrite, resolve_device.rewrite)


def optimize(plan, ctx):
    for rule in RULES:
        plan = rule(plan, ctx)
    return plan
