"""Checks of user arguments shared by the config, calibration and the one-weight API: numpy and other integer or
real types are accepted and returned as plain Python values (a config must stay JSON-serializable); bools are not
integers here, and strings such as "False" are not bools."""

from __future__ import annotations

import math
import numbers


def integer(value, what: str, least: int | None = None) -> int:
    """``value`` as an int (any ``numbers.Integral`` but bool), at least ``least``; else ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (least is not None and value < least):
        bound = "" if least is None else f" >= {least}"
        raise ValueError(f"{what} must be an integer{bound}, got {value!r}")
    return int(value)


def flag(value, what: str, expected: str = "True or False") -> bool:
    """``value`` as a bool (Python or numpy bool); else ValueError naming ``what`` and the ``expected`` values."""
    if type(value).__name__ not in ("bool", "bool_"):
        raise ValueError(f"{what} must be {expected}, got {value!r}")
    return bool(value)


def fraction(value, what: str) -> float:
    """``value`` as a float in [0, 1) (any finite ``numbers.Real`` but bool); else ValueError naming ``what``."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or not 0.0 <= value < 1.0):
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)
