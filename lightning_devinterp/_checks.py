"""Argument checks shared by every public entry point, so that each bad value is named the same way everywhere."""

from __future__ import annotations

import math
from typing import Any


def is_integer(value: Any) -> bool:
    """A real integer (``bool`` is not one, whatever Python says)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_count(name: str, value: Any, minimum: int) -> None:
    """``value`` must be an integer >= ``minimum``."""
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def check_number(name: str, value: Any, *, minimum: float = 0.0, allow_minimum: bool = True) -> None:
    """``value`` must be a finite real number >= ``minimum`` (or > it, with ``allow_minimum=False``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (value == minimum and not allow_minimum):
        relation = ">=" if allow_minimum else ">"
        raise ValueError(f"{name} must be a finite number {relation} {minimum:g}, got {value!r}.")


def check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    """``value`` must be a finite number > 0 (or >= 0, with ``allow_zero``)."""
    check_number(name, value, minimum=0.0, allow_minimum=allow_zero)


def check_callable(name: str, value: Any, usage: str) -> None:
    """``value`` must be None or callable as ``usage`` says."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable as {usage}, got {type(value).__name__}.")
