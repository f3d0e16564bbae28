"""Check the quality clauses: WITH SSIM >= s (0 < s <= 1) and DRILLDOWN r [SPEEDUP k].

WITH SSIM is planned by projective-field thresholding (the physical planner picks tau),
DRILLDOWN by adaptive drill-down (``planner/drilldown.py``).

>>> from types import SimpleNamespace
>>> from kql.language.parser import parse
>>> def plan(text):
...     s = parse(text)[0]
...     return SimpleNamespace(statement=s, ssim=s.ssim, drilldown=s.drilldown, speedup=s.speedup)
>>> check(plan("OCCLUDE img USING net"), None) is None        # exact: nothing to refuse
True
>>> check(plan("OCCLUDE img USING net WITH SSIM >= 0.9"), None) is None
True
>>> check(plan("OCCLUDE img USING net WITH SSIM >= 1.5"), None)
Traceback (most recent call last):
...
kql.errors.KqlPlanError: line 1, column 23: SSIM target must lie in (0, 1], got 1.5
>>> check(plan("OCCLUDE img USING net DRILLDOWN 0.25 SPEEDUP 5"), None)
Traceback (most recent call last):
...
kql.errors.KqlPlanError: line 1, column 23: SPEEDUP must lie in (1, 4) for DRILLDOWN 0.25, got 5
"""

from kql.planner.logical import fail


def check(plan, ctx) -> None:
    stmt = plan.statement
    if plan.ssim is not None and not 0.0 < plan.ssim <= 1.0:
        raise fail(stmt, "ssim", f"SSIM target must lie in (0, 1], got {plan.ssim:g}")
    if plan.drilldown is not None and not 0.0 < plan.drilldown < 1.0:
        raise fail(stmt, "drilldown", f"DRILLDOWN fraction must lie in (0, 1), got {plan.drilldown:g}")
    if plan.speedup is not None:
        # Seed paper 000, equation 48: the speedup of drill-down is below 1 / fraction.
        if plan.speedup <= 1.0 or plan.speedup >= 1.0 / plan.drilldown:
            raise fail(stmt, "drilldown", f"SPEEDUP must lie in (1, {1.0 / plan.drilldown:g}) for "
                                          f"DRILLDOWN {plan.drilldown:g}, got {plan.speedup:g}")
