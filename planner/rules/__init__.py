"""Optimizer rules, one per file. A check, ``check(plan, ctx) -> None``, only validates
(it raises or returns None); a rewrite, ``rewrite(plan, ctx) -> plan``, returns the plan
to go on with.

The order matters and is fixed here (the front end runs its own check of INTO,
:func:`kql.results.output.check_into`, ahead of them):

1. ``check_quality``: range-check WITH SSIM / DRILLDOWN and their companions (SPEEDUP),
   so a bad target fails before a model is traced.
2. ``resolve_device``: ON GPU needs a GPU; ON AUTO without one becomes CPU, with one it
   stays for the physical planner to price both devices. Last, so that the checks above
   report the same errors on machines with and without a GPU.

>>> seen = []
>>> optimize("plan", None, rules=[lambda p, c: seen.append(p), lambda p, c: p + "'"])
"plan'"
>>> seen
['plan']
"""

from . import check_quality, resolve_device

RULES = (check_quality.check, resolve_device.rewrite)


def optimize(plan, ctx, rules=RULES):
    """Run ``rules`` in order: a check's None keeps the plan, a rewrite's result replaces it."""
    for rule in rules:
        rewritten = rule(plan, ctx)
        if rewritten is not None:
            plan = rewritten
    return plan
