"""ON CPU | ON GPU | ON AUTO: which devices the physical planner may cost.

ON AUTO stays 'auto' only where a GPU exists; the physical planner then prices the plan
on both devices and keeps the cheaper.
"""

from kql.planner.logical import fail


def rewrite(plan, ctx):
    cuda = ctx.cuda_available()
    if plan.device == "gpu" and not cuda:
        raise fail(plan.statement, "device", "ON GPU: no CUDA GPU is available on this machine; "
                                             "use ON CPU or ON AUTO")
    if plan.device == "auto" and not cuda:
        return plan.replace(device="cpu")
    return plan
