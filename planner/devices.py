"""Which devices this machine has: the one place that asks torch about a CUDA GPU.

>>> isinstance(cuda_available(), bool)
True
>>> require_cuda("ON GPU", "use ON CPU or ON AUTO", available=lambda: False)
Traceback (most recent call last):
...
kql.errors.KqlPlanError: ON GPU: no CUDA GPU is available on this machine; use ON CPU or ON AUTO
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from kql.errors import KqlPlanError


def cuda_available() -> bool:
    """Whether torch can run on a CUDA GPU here."""
    return torch.cuda.is_available()


def require_cuda(what: str, hint: str = "", *, cls: type = KqlPlanError, pos=None,
                 available: Optional[Callable[[], bool]] = None) -> None:
    """Raise ``cls('<what>: no CUDA GPU is available on this machine[; <hint>]')`` unless
    ``available()`` (default :func:`cuda_available`) says there is a GPU; ``pos`` (an
    ``ast.Pos``) points the error at the query text."""
    if (available or cuda_available)():
        return
    message = f"{what}: no CUDA GPU is available on this machine" + (f"; {hint}" if hint else "")
    line, column = (None, None) if pos is None else (pos.line or None, pos.column or None)
    raise cls(message, line=line, column=column)
