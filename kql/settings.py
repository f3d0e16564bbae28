"""Session settings: one table of name, default, check and description.

``SET <name> = <value>`` and ``Connection.settings.update(...)`` both go through
:class:`Settings`, which refuses an unknown name or a bad value before anything changes.
The rows come from the layer each setting steers: the planner's
(:data:`kql.planner.settings.ROWS`), the many-image engine's (here) and the overlay's
(:data:`kql.results.overlay.SETTINGS`). A new setting is one more row of its layer's table.

>>> s = Settings()
>>> dict(s)  # doctest: +NORMALIZE_WHITESPACE
{'strategy': 'auto', 'crossover': 'auto', 'tau': 'auto', 'gates': 'exact',
 'memory_limit': 'auto', 'confirm_seconds': 600, 'max_image_pixels': 64000000,
 'position_groups': 'auto', 'delta_convolutions': 'auto', 'precision': 'auto', 'layout': 'auto',
 'engine': 'local',
 'ray_address': 'local', 'overlay_colormap': 'RdBu',
 'overlay_alpha': 0.8, 'overlay_scale': 'auto', 'overlay_style': 'smooth',
 'overlay_panels': 'overlay', 'overlay_contour': 'on', 'overlay_base': 'grey'}
>>> s.set("crossover", 0.5)
>>> s["crossover"], s.get("strategy")
(0.5, 'auto')
>>> s.update({"strategy": "fast"})
Traceback (most recent call last):
...
kql.errors.KqlPlanError: strategy must be 'auto', 'naive' or 'incremental', got 'fast'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator, Optional

from .errors import KqlPlanError
from .planner import settings as planner
from .planner.settings import Setting, one_of
from .results import overlay

_check_engine = one_of("engine", "local", "ray")


def _check_ray_address(value) -> Optional[str]:
    if isinstance(value, str) and value.strip() and value.isprintable():
        return None
    return f"ray_address must be 'local' or a Ray cluster address such as 'ray://host:10001', got {value!r}"


ENGINE_ROWS = (
    Setting("engine", "local", _check_engine,
            "where many-image queries run: 'local' (this process) or 'ray' (a Ray Data "
            "pipeline, as ON RAY; needs pip install kql[ray])"),
    Setting("ray_address", "local", _check_ray_address,
            "the Ray cluster of engine 'ray': 'local' (start one on this machine) or an "
            "address ('auto', 'ray://host:10001')"),
)

SETTINGS = {s.name: s for s in (*planner.ROWS, *ENGINE_ROWS, *overlay.SETTINGS)}


def problem(name: str, value) -> Optional[str]:
    """Why ``SET name = value`` is invalid, or None.

    >>> problem("strategy", "naive") is None
    True
    >>> problem("colour", 1)
    "unknown setting 'colour'; settings: strategy, crossover, tau, gates, memory_limit, confirm_seconds, max_image_pixels, position_groups, delta_convolutions, precision, layout, engine, ray_address, overlay_colormap, overlay_alpha, overlay_scale, overlay_style, overlay_panels, overlay_contour, overlay_base"
    """
    setting = SETTINGS.get(name)
    if setting is None:
        return f"unknown setting '{name}'; settings: {', '.join(SETTINGS)}"
    return setting.check(value)


class Settings(Mapping):
    """The settings of one session: a read-only mapping whose writes are checked."""

    def __init__(self, values: Optional[Mapping] = None):
        self._values = {name: s.default for name, s in SETTINGS.items()}
        if values is not None:
            self.update(values)

    def set(self, name: str, value) -> None:
        """Change one setting; raises :class:`KqlPlanError` naming what is wrong."""
        self.update({name: value})

    def update(self, values=(), **more) -> None:
        """Change several settings at once: all of them, or (one invalid) none."""
        changes = dict(values, **more)
        for name, value in changes.items():
            why = problem(name, value)
            if why:
                raise KqlPlanError(why)
        self._values.update(changes)

    def copy(self) -> "Settings":
        return Settings(self)

    def rows(self) -> list[dict]:
        """``SHOW SETTINGS``: each setting's value, default and what it does.

        >>> Settings({"tau": 0.5}).rows()[2]["value"], Settings().rows()[2]["default"]
        (0.5, 'auto')
        """
        return [{"setting": name, "value": self._values[name], "default": s.default,
                 "description": s.description} for name, s in SETTINGS.items()]

    def __getitem__(self, name: str):
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Settings({self._values!r})"
