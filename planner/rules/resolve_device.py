"""Rewrite ON CPU | ON GPU | ON AUTO into the devices the physical planner may cost.

ON AUTO stays 'auto' only where a GPU exists; the physical planner then prices the plan
on both devices and keeps the cheaper. ON GPU without a GPU is an error.

>>> import torch
>>> from types import SimpleNamespace
>>> from kql.language.parser import parse
>>> from kql.planner.grid import OcclusionGrid
>>> from kql.planner.logical import OcclusionQuery
>>> stmt = parse("OCCLUDE img USING net ON AUTO")[0]
>>> plan = OcclusionQuery(stmt, "", "img", torch.zeros(3, 8, 8), None, None,
...                       OcclusionGrid(8, 8, (4, 4), (4, 4)), (0.5, 0.5, 0.5), "gray", device="auto")
>>> no_gpu, gpu = SimpleNamespace(cuda_available=lambda: False), SimpleNamespace(cuda_available=lambda: True)
>>> rewrite(plan, no_gpu).device, rewrite(plan, gpu).device
('cpu', 'auto')
>>> rewrite(plan.replace(device="gpu"), no_gpu)
Traceback (most recent call last):
...
kql.errors.KqlPlanError: line 1, column 23: ON GPU: no CUDA GPU is available on this machine; use ON CPU or ON AUTO
"""

from kql.planner.devices import require_cuda


def rewrite(plan, ctx):
    if plan.device == "gpu":
        require_cuda("ON GPU", "use ON CPU or ON AUTO", pos=plan.statement.pos_of("device"),
                     available=ctx.cuda_available)
    if plan.device == "auto" and not ctx.cuda_available():
        return plan.replace(device="cpu")
    return plan
