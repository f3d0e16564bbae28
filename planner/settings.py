"""Session settings: one table of name, default, check and description.

``SET <name> = <value>`` and ``Connection.settings.update(...)`` both go through
:class:`Settings`, which refuses an unknown name or a bad value before anything changes.
A new setting is one more row of :data:`SETTINGS`.

>>> s = Settings()
>>> dict(s)  # doctest: +NORMALIZE_WHITESPACE
{'strategy': 'auto', 'crossover': 'auto', 'tau': 'auto', 'gates': 'exact',
 'memory_limit': 'auto', 'confirm_seconds': 600, 'max_image_pixels': 64000000,
 'layout': 'auto', 'engine': 'local', 'ray_address': 'local', 'overlay_colormap': 'RdBu',
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

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from kql.errors import KqlPlanError
from kql.operators.layout import LAYOUTS

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


def _one_of(name: str, *choices):
    """The check of a setting that takes one of ``choices``."""
    listed = ", ".join(f"'{c}'" for c in choices[:-1]) + f" or '{choices[-1]}'"

    def check(value) -> Optional[str]:
        return None if value in choices else f"{name} must be {listed}, got {value!r}"
    return check


_check_gates = _one_of("gates", "exact", "frozen")


UNITS = {"kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(kb|mb|gb|tb)\s*", re.I)


def byte_count(value) -> Optional[int]:
    """The bytes of a ``memory_limit`` value: ``'<n> KB|MB|GB|TB'`` (binary units, any
    case) or a number of bytes; None for 'auto' and for anything else.

    >>> byte_count("1.5 GB"), byte_count("512mb"), byte_count(10**9), byte_count("auto")
    (1610612736, 536870912, 1000000000, None)
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value) if value >= 1 else None
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return None
    size = float(match.group(1)) * UNITS[match.group(2).lower()]
    if not math.isfinite(size):          # 5,000 nines
        return None
    return int(size) if size >= 1 else None


def _check_memory_limit(value) -> Optional[str]:
    if value == "auto" or byte_count(value) is not None:
        return None
    return f"memory_limit must be 'auto', '<n> MB', '<n> GB' or a number of bytes, got {value!r}"


def _check_confirm_seconds(value) -> Optional[str]:
    if value == "none" or (isinstance(value, (int, float)) and not isinstance(value, bool)
                           and value >= 0):
        return None
    return f"confirm_seconds must be 'none' or a number of seconds (at least 0), got {value!r}"


PILLOW_MAX_PIXELS = 178_956_970      # Pillow refuses images past twice its bomb limit itself


def _check_max_image_pixels(value) -> Optional[str]:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= PILLOW_MAX_PIXELS:
        return None
    return (f"max_image_pixels must be a whole number of pixels from 1 to {PILLOW_MAX_PIXELS:,} "
            f"(Pillow's own limit), got {value!r}")


def _check_layout(value) -> Optional[str]:
    if value == "auto" or value in LAYOUTS:
        return None
    return f"layout must be 'auto', 'channels_last' or 'contiguous', got {value!r}"


@dataclass(frozen=True)
class Setting:
    """One session setting: its default, why a value is invalid (None: it is valid)."""

    name: str
    default: object
    check: Callable[[object], Optional[str]]
    description: str


_check_engine = _one_of("engine", "local", "ray")


def _check_ray_address(value) -> Optional[str]:
    if isinstance(value, str) and value.strip() and value.isprintable():
        return None
    return f"ray_address must be 'local' or a Ray cluster address such as 'ray://host:10001', got {value!r}"


def _check_overlay_colormap(value) -> Optional[str]:
    import matplotlib

    if isinstance(value, str) and value.lower() in {n.lower() for n in matplotlib.colormaps}:
        return None
    return f"overlay_colormap must be a matplotlib colour map such as 'RdBu' or 'coolwarm', got {value!r}"


def _check_overlay_alpha(value) -> Optional[str]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
        return None
    return f"overlay_alpha must be a number from 0 to 1, got {value!r}"


_check_overlay_scale = _one_of("overlay_scale", "auto", "absolute", "relative")
_check_overlay_style = _one_of("overlay_style", "smooth", "blocks")
_check_overlay_panels = _one_of("overlay_panels", "overlay", "side_by_side")
_check_overlay_contour = _one_of("overlay_contour", "on", "off")


def _check_overlay_base(value) -> Optional[str]:
    if value in ("grey", "gray", "colour", "color"):
        return None
    return f"overlay_base must be 'grey' or 'colour', got {value!r}"


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
    Setting("memory_limit", "auto", _check_memory_limit,
            "memory a plan may use: 'auto' (a quarter of the memory available on the device "
            "when planning), '<n> MB', '<n> GB' or bytes; a BATCH over it is lowered to fit"),
    Setting("confirm_seconds", 600, _check_confirm_seconds,
            "a run predicted longer than this many seconds is confirmed first (the shell asks, "
            "KQL text with no one to ask is refused, the Python API warns); 'none': never"),
    Setting("max_image_pixels", 64_000_000, _check_max_image_pixels,
            "the largest image file read, in pixels (height x width): a larger one is refused "
            "from its header, before it is decoded"),
    Setting("layout", "auto", _check_layout,
            "memory layout of full-size batches: 'auto' (channels_last on CPU, where oneDNN "
            "runs convolutions faster in it; contiguous on GPU), 'channels_last' or 'contiguous'"),
    Setting("engine", "local", _check_engine,
            "where many-image queries run: 'local' (this process) or 'ray' (a Ray Data "
            "pipeline, as ON RAY; needs pip install kql[ray])"),
    Setting("ray_address", "local", _check_ray_address,
            "the Ray cluster of engine 'ray': 'local' (start one on this machine) or an "
            "address ('auto', 'ray://host:10001')"),
    Setting("overlay_colormap", "RdBu", _check_overlay_colormap,
            "the PNG overlay's colour map (matplotlib's name), centred on the unoccluded "
            "score: with a diverging one such as 'RdBu', drops red and rises blue"),
    Setting("overlay_alpha", 0.8, _check_overlay_alpha,
            "the overlay's opacity where the score changes most (0..1); an unchanged cell "
            "leaves the image as it is"),
    Setting("overlay_scale", "auto", _check_overlay_scale,
            "the overlay's colour range around the unoccluded score: 'auto' (the largest "
            "change, at least 0.05 of probability or 0.5 logits), 'absolute' (all of 0..1; "
            "logits: 4) or 'relative' (the largest change, however small)"),
    Setting("overlay_style", "smooth", _check_overlay_style,
            "the overlay between patch centres: 'smooth' (bilinear) or 'blocks' (one stride wide)"),
    Setting("overlay_panels", "overlay", _check_overlay_panels,
            "'overlay' (the map over the image) or 'side_by_side' (the plain image first)"),
    Setting("overlay_contour", "on", _check_overlay_contour,
            "'on': outline the cells whose drop is at least half the largest drop; 'off'"),
    Setting("overlay_base", "grey", _check_overlay_base,
            "the image under the overlay: 'grey' (its luminance, readable under any map) "
            "or 'colour'"),
)}


def problem(name: str, value) -> Optional[str]:
    """Why ``SET name = value`` is invalid, or None.

    >>> problem("strategy", "naive") is None
    True
    >>> problem("colour", 1)
    "unknown setting 'colour'; settings: strategy, crossover, tau, gates, memory_limit, confirm_seconds, max_image_pixels, layout, engine, ray_address, overlay_colormap, overlay_alpha, overlay_scale, overlay_style, overlay_panels, overlay_contour, overlay_base"
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
