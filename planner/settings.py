"""Session settings: one table of name, default, check and description.

``SET <name> = <value>`` and ``Connection.settings.update(...)`` both go through
:class:`Settings`, which refuses an unknown name or a bad value before anything changes.
A new setting is one more row of :data:`SETTINGS`.

>>> s = Settings()
>>> dict(s)
{'strategy': 'auto', 'crossover': 'auto', 'tau': 'auto', 'gates': 'exact'}
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
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from kql.errors import KqlPlanError

STRATEGIES = ("auto", "naive", "incremental")


def _check_strategy(value) -> Optional[str]:
    if value not in STRATEGIES:
        return f"strategy must be 'auto', 'naive' or 'incremental', got {value!r}"
    return None


def _check_crossover(value) -> Optional[str]:
    if value in ("auto", "none") or (isinstance(value, (int, float)) and 0 < value <= 1):
        return None
    return f"crossover must be 'auto', 'none' or a fraction in (0, 1], got {value!r}"


def _check_tau(value) -> Optional[str]:
    if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool)
                           and 0 < value <= 1):
        return None
    return f"tau must be 'auto' or a fraction in (0, 1], got {value!r}"


def _check_gates(value) -> Optional[str]:
    if value in ("exact", "frozen"):
        return None
    return f"gates must be 'exact' or 'frozen', got {value!r}"


@dataclass(frozen=True)
class Setting:
    """One session setting: its default, why a value is invalid (None: it is valid)."""

    name: str
    default: object
    check: Callable[[object], Optional[str]]
    description: str


SETTINGS = {s.name: s for s in (
    Setting("strategy", "auto", _check_strategy,
            "how heat maps are computed: 'auto' (cheapest predicted), 'naive' (one full "
            "inference per patch position) or 'incremental'"),
    Setting("crossover", "auto", _check_crossover,
            "where incremental inference hands patches on as full tensors: 'auto' (priced), "
            "'none' (never: pure incremental) or the fraction of a feature map a patch must cover"),
    Setting("tau", "auto", _check_tau,
            "projective-field threshold: no layer's changed region grows past this fraction "
            "of its map (approximate; 1 is exact); 'auto': chosen from WITH SSIM, else 1"),
    Setting("gates", "exact", _check_gates,
            "global gates (squeeze-excitation): 'exact' computes them per occlusion, 'frozen' "
            "keeps their unoccluded values so incremental inference runs through them (approximate)"),
)}


def problem(name: str, value) -> Optional[str]:
    """Why ``SET name = value`` is invalid, or None.

    >>> problem("strategy", "naive") is None
    True
    >>> problem("colour", 1)
    "unknown setting 'colour'; settings: strategy, crossover, tau, gates"
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

    def __getitem__(self, name: str):
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Settings({self._values!r})"
