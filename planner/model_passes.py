"""The model's runs on the unoccluded image that planning needs, and their failures.

The profile (trace and materialized views), the plain output, one forward pass's shapes:
each is one run of the user's model on the query's image, so each reports the model's
errors the same way (:func:`model_failure`: out of memory, or the model's own message,
one line). :func:`scored` settles the query's scoring and classes from that output.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from kql.errors import KqlError, KqlExecutionError, KqlModelError
from kql.operators.batches import out_of_memory
from kql.operators.graph import TraceError, trace
from kql.operators.profile import ModelProfile
from kql.operators.shapes import OverMemoryLimit, ShapeSummary, check_fits, summarize
from kql.operators.task import detect_output, resolve_targets, top_classes
from kql.operators.user_model import check_logits, on_device

from . import memory
from .logical import OcclusionQuery, at_node, fail


def profile_model(query: OcclusionQuery, device: str, keep_graph=None,
                  limit: Optional[int] = None) -> ModelProfile:
    """The model's profile on the query's image; TraceError when torch.fx cannot trace it
    (or the model says it cannot be: a TorchScript module's ``naive_reason``). With
    ``keep_graph`` (the plan cache's: ``keep_graph(build)`` gives the graph kept for the
    model, ``build()`` traces it), the model is traced once for every image. ``limit``:
    the memory limit, in bytes, its views and its forward pass are held to."""
    untraceable = getattr(query.model, "naive_reason", None)
    if untraceable:
        raise TraceError(untraceable)
    try:
        if keep_graph is None:
            return ModelProfile(query.model.composed(), query.image, device, memory_limit=limit)
        graph = keep_graph(lambda: trace(query.model.composed(), torch.device(device)))
        return ModelProfile(graph, query.image, device, traced=graph, memory_limit=limit)
    except OverMemoryLimit as exc:
        raise over_limit(query, exc) from None
    except (RuntimeError, ValueError, TypeError, MemoryError) as exc:   # TraceError passes through
        raise model_failure(query, exc) from None


def over_limit(query: OcclusionQuery, exc: OverMemoryLimit) -> KqlError:
    """A planning pass refused before it ran, as the plans over the limit are, pointing at
    the image."""
    size = "x".join(str(int(v)) for v in query.image.shape[1:])
    needed = memory.size_text(exc.needed)
    error = memory.MemoryLimitError(
        f"planning runs model '{query.model.name}' once on the {size} image; {exc.what} "
        f"needs {needed} at BATCH 1 but memory_limit is {memory.size_text(exc.limit)}; SET "
        f"memory_limit = '{math.ceil(exc.needed / 2**30)} GB' to allow it, or occlude a "
        "smaller image", exc.needed)
    return at_node(error, query.statement.image)


def model_failure(query: OcclusionQuery, exc: Exception) -> Exception:
    if out_of_memory(exc):
        return KqlExecutionError(f"out of memory running model '{query.model.name}' once on "
                                 f"the {tuple(query.image.shape[1:])} image (planning); "
                                 f"occlude a smaller image")
    detail = " ".join(str(exc).split())[:300]
    return KqlModelError(f"model '{query.model.name}' failed on the "
                         f"{tuple(query.image.shape[1:])} image: {detail}")


@torch.inference_mode()
def unoccluded_logits(query: OcclusionQuery, device: str, limit: Optional[int] = None) -> torch.Tensor:
    """``[classes]``: the model's output on the query's image (no trace)."""
    try:
        model = on_device(query.model.composed(), device)
        x = query.image.to(device).unsqueeze(0)
        check_fits(model, x, limit, "one forward pass")
        return check_logits(model(x))[0].float()
    except OverMemoryLimit as exc:
        raise over_limit(query, exc) from None
    except (RuntimeError, ValueError, TypeError, MemoryError) as exc:
        raise model_failure(query, exc) from None


def summarize_model(query: OcclusionQuery, device: str, limit: Optional[int] = None) -> ShapeSummary:
    """One forward pass's shapes (the model's errors reported as :func:`profile_model` does)."""
    try:
        return summarize(on_device(query.model.composed(), device), query.image, device, limit)
    except OverMemoryLimit as exc:
        raise over_limit(query, exc) from None
    except (RuntimeError, ValueError, TypeError, MemoryError) as exc:
        raise model_failure(query, exc) from None


def scored(query: OcclusionQuery, base_logits: torch.Tensor) -> OcclusionQuery:
    """The query with its output scoring and its classes settled from the unoccluded
    output (OUTPUT detected, TARGET TOP k and PREDICTED resolved), and why."""
    output, why = detect_output(query.output, base_logits)
    if query.top is not None:
        if query.top > base_logits.numel():
            raise fail(query.statement, "target", f"TARGET TOP {query.top}: model "
                       f"'{query.model.name}' has only {base_logits.numel()} classes")
        targets = top_classes(base_logits, query.top, output)
    else:
        try:
            targets = resolve_targets(query.targets, base_logits, output)
        except IndexError as exc:
            raise fail(query.statement, "target", str(exc)) from None
    return query.replace(output=output, output_note=why, resolved=targets)
