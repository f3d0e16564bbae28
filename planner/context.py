"""What planning consults: the session (:class:`PlanContext`) and, for one query on one
device, the :class:`Planning` every decision of :mod:`.physical` is handed.

Settings are read through the typed properties below, each with the one default of its
row in :data:`.settings.ROWS`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Mapping, Optional

import torch

from . import calibrate, devices, memory
from .cache import PlanCache
from .feedback import Feedback
from .logical import OcclusionQuery
from .settings import DEFAULTS
from .model_passes import profile_model, summarize_model, unoccluded_logits


@dataclass
class PlanContext:
    """What the planner may consult: session settings, the catalog directory, the machine."""

    settings: Mapping = field(default_factory=dict)     # a kql.settings.Settings (read by name)
    directory: Optional[str] = None
    tuning_lookup: Optional[Callable] = None            # (model name, key) -> record dict or None
    cache: Optional[PlanCache] = None                   # the connection's plan cache

    def setting(self, name: str):
        """The session's value of the planner setting ``name``, else its row's default."""
        return self.settings.get(name, DEFAULTS[name])

    @property
    def strategy(self) -> str:
        return str(self.setting("strategy"))

    @property
    def crossover(self):
        """'auto', 'none' or a fraction."""
        return self.setting("crossover")

    @property
    def tau(self):
        """'auto' or a fraction."""
        return self.setting("tau")

    @property
    def gates(self) -> str:
        return str(self.setting("gates"))

    @property
    def layout(self) -> str:
        return str(self.setting("layout"))

    @property
    def position_groups(self) -> str:
        """'auto' or 'off'."""
        return str(self.setting("position_groups"))

    @property
    def delta_convolutions(self) -> str:
        """'auto', 'on' or 'off'."""
        return str(self.setting("delta_convolutions"))

    @property
    def precision(self) -> str:
        """'auto', 'float32', 'bfloat16', 'float16' or 'int8'."""
        return str(self.setting("precision"))

    @property
    def memory_setting(self):
        """The ``memory_limit`` setting as given ('auto', a size, bytes)."""
        return self.setting("memory_limit")

    @property
    def exact_settings(self) -> bool:
        """Whether no setting asks for an approximate map: tau 1 or left to the query
        ('auto'), global gates computed exactly."""
        return self.tau in ("auto", 1, 1.0) and self.gates == "exact"

    def cuda_available(self) -> bool:
        return devices.cuda_available()

    def memory_limit(self, device: str) -> int:
        """Bytes a plan (and planning's own passes) may use on ``device``."""
        return memory.allowed(self.memory_setting, device)

    def profile(self, query, device: str) -> tuple:
        """``(profile, what came from the cache)``: of the query's model on its image;
        ``"profile"`` when all of it, ``"graph"`` when only its trace (another image)."""
        limit = self.memory_limit(device)
        if self.cache is None:
            return profile_model(query, device, limit=limit), ""
        cache, model = self.cache, query.model
        traced = cache.has_graph(model, device)

        def keep_graph(build):
            return cache.graph(model, model.name, device, build)[0]
        build = lambda: profile_model(query, device, keep_graph, limit)     # noqa: E731
        profile, hit = self._kept(query, device, "profile", build)
        if hit and profile.shapes_only and (limit is None or profile.shapes_only <= limit):
            self.cache.drop(model, query.image, device, "profile")    # views fit now: build them
            profile, hit = self._kept(query, device, "profile", build)
        return profile, "profile" if hit else ("graph" if traced else "")

    def shapes(self, query, device: str) -> tuple:
        """``(shape summary, from the cache?)`` of one forward pass of the query's model."""
        limit = self.memory_limit(device)
        return self._kept(query, device, "shapes", lambda: summarize_model(query, device, limit))

    def base_logits(self, query, device: str) -> torch.Tensor:
        """The model's output on the unoccluded image: planning's, else one forward pass."""
        if self.cache is not None:
            for kind, field_name in (("profile", "base_logits"), ("shapes", "logits")):
                found = self.cache.peek(query.model, query.image, device, kind)
                if found is not None:
                    return getattr(found, field_name)
        limit = self.memory_limit(device)
        return self._kept(query, device, "logits", lambda: unoccluded_logits(query, device, limit))[0]

    def _kept(self, query, device: str, kind: str, build) -> tuple:
        if self.cache is None:
            return build(), False
        return self.cache.profile(query.model, query.model.name, query.image, device, build, kind)

    def throughput(self, device: str):
        return calibrate.throughput(device, self.directory)

    def feedback(self) -> Feedback:
        """Observed/predicted ratios of earlier scans, kept with the calibration."""
        if "_feedback" not in self.__dict__:
            learning = self.cache.learning if self.cache is not None else True
            self.__dict__["_feedback"] = Feedback(calibrate.folder_of(self.directory), learning)
        return self.__dict__["_feedback"]


@dataclass(frozen=True)
class Planning:
    """One query planned on one device: the session, the device's calibration, the
    threads the plan runs on and the model's profile, handed as one to every decision."""

    query: OcclusionQuery
    ctx: PlanContext
    device: str                          # torch device type: 'cpu' | 'cuda'
    throughput: calibrate.Throughput     # the device's calibration table
    threads: Optional[int] = None        # CPU threads (torch's, as a plain loop); None on GPU
    profile: object = None               # the traced model and its views; None: not traced
    reason: str = ""                     # why it is not traced (quoted), where it cannot be
    precision: Optional[str] = None      # the arithmetic, where a candidate sets its own
                                         # (a verified scan's); None: the session's

    @property
    def arithmetic(self) -> str:
        """The precision setting this planning follows: its own, else the session's."""
        return self.precision or self.ctx.precision

    @classmethod
    def on_device(cls, query: OcclusionQuery, ctx: PlanContext, device: str) -> "Planning":
        threads = torch.get_num_threads() if device == "cpu" else None
        return cls(query, ctx, device, ctx.throughput(device), threads)

    @cached_property
    def cap(self) -> Optional[int]:
        """The memory limit in bytes ('auto' reads the free memory once per planning)."""
        return self.ctx.memory_limit(self.device)

    def of(self, query: OcclusionQuery) -> "Planning":
        """The same planning for another query (a drill-down stage, a tuned choice)."""
        return dataclasses.replace(self, query=query)
