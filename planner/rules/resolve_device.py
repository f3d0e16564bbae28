"""ON CPU | ON GPU | ON AUTO: pick the device the plan runs on."""

from kql.planner.logical import fail


def rewrite(plan, ctx):
    cuda = ctx.cuda_available()
    if plan.device == "gpu" and not cuda:
        raise fail(plan.statement, "device", "ON GPU: no CUDA GPU is available on this machine; "
                                             "use ON CPU or ON AUTO")
    if plan.device == "auto":
        return plan.replace(device="gpu" if cuda else "cpu")
    return plan
