"""Checks of configuration values that raise a `ValueError` naming the field."""

from __future__ import annotations

import math
from typing import Any


def require_finite(name: str, value: Any) -> float:
    """`value` as a float.

    Raises:
        ValueError: naming the field `name`, when `value` is not a finite number.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{name}` must be a number, got {type(value).__name__}: {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}.")
    return float(value)


def require_positive_int(name: str, value: Any) -> int:
    """`value`, checked to be an integer >= 1 (not a bool).

    Raises:
        ValueError: naming the field `name` otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return value


def require_unit_interval(name: str, value: Any) -> float:
    """`value` as a float in [0, 1].

    Raises:
        ValueError: naming the field `name` otherwise.
    """
    number = require_finite(name, value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"`{name}` must be in [0, 1], got {value}.")
    return number
