"""The planner's session settings: each a name, a default, a check and a description.

:mod:`kql.settings` holds every setting of a session (these, the engine's and the
overlay's) and checks ``SET``; the planner reads the values it is given by name.

>>> [s.name for s in ROWS][:3]
['strategy', 'crossover', 'tau']
>>> one_of("gates", "exact", "frozen")("loose")
"gates must be 'exact' or 'frozen', got 'loose'"
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

from kql.operators.layout import LAYOUTS
from kql.operators.precision import PRECISIONS

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


def one_of(name: str, *choices):
    """The check of a setting that takes one of ``choices``."""
    listed = ", ".join(f"'{c}'" for c in choices[:-1]) + f" or '{choices[-1]}'"

    def check(value) -> Optional[str]:
        return None if value in choices else f"{name} must be {listed}, got {value!r}"
    return check


_check_gates = one_of("gates", "exact", "frozen")


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


# The planner's rows of the session's settings (kql.settings holds them all).
ROWS = (
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
    Setting("position_groups", "auto", one_of("position_groups", "auto", "off"),
            "incremental inference in groups of positions, each with its own region sizes "
            "(smaller near the border): 'auto' (where predicted cheaper) or 'off' (one size for all)"),
    Setting("delta_convolutions", "auto", one_of("delta_convolutions", "auto", "on", "off"),
            "stride-1 convolutions of incremental inference compute the change of their output "
            "from their input's change (no read-in halo; exact): 'auto' (each where predicted "
            "cheaper), 'on' (wherever they can) or 'off'"),
    Setting("precision", "auto", one_of("precision", "auto", *PRECISIONS),
            "arithmetic of the scans: 'float32' (exact), 'bfloat16', 'float16' or 'int8' "
            "(approximate, checked by EXPLAIN ANALYZE against float32; int8 in the plain loop "
            "only, incremental scans run bfloat16); 'auto': float32"),
    Setting("layout", "auto", _check_layout,
            "memory layout of full-size batches: 'auto' (channels_last on CPU, where oneDNN "
            "runs convolutions faster in it; contiguous on GPU), 'channels_last' or 'contiguous'"),
)

DEFAULTS = {row.name: row.default for row in ROWS}     # the one default of each setting
