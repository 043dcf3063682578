"""Checks of numeric settings, shared by the Python API and the CLI's option parser, so both refuse
the same values with the same message (which states the valid range)."""

from __future__ import annotations

import math
import operator
import os

import numpy as np

from .errors import SettingError


def integer(value, name: str, *, minimum: int | None = 1, maximum: int | None = None) -> int:
    """``value`` as an int in [minimum, maximum] (bounds None: open); a float or bool is refused."""
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise SettingError(f"{name} must be an integer{_range(minimum, maximum)}, got {value!r}") from None
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise SettingError(f"{name} must be an integer{_range(minimum, maximum)}, got {number}")
    return number


# More intra-op threads than this only slow a session down, and creating thousands takes ORT minutes
# (a hundred thousand get the process killed).
MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))


def threads(value, name: str = "threads") -> int:
    """A thread count in [1, MAX_THREADS]."""
    return integer(value, name, minimum=1, maximum=MAX_THREADS)


def optional_integer(value, name: str, **bounds) -> int | None:
    return None if value is None else integer(value, name, **bounds)


def real(value, name: str, *, minimum: float | None = None, maximum: float | None = None,
         exclusive_minimum: bool = False, exclusive_maximum: bool = False) -> float:
    """``value`` as a finite float within the bounds (NaN and infinities are refused)."""
    try:
        if isinstance(value, (bool, np.bool_, str, bytes)):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        number = None
    low_ok = minimum is None or (number is not None and (number > minimum if exclusive_minimum else number >= minimum))
    high_ok = maximum is None or (number is not None and (number < maximum if exclusive_maximum else number <= maximum))
    if number is None or not math.isfinite(number) or not (low_ok and high_ok):
        bounds = _interval(minimum, maximum, exclusive_minimum, exclusive_maximum)
        raise SettingError(f"{name} must be a finite number{bounds}, got {value!r}")
    return number


def rate(value, name: str = "rate") -> float:
    """A perforation rate: the fraction of output positions skipped, in [0, 1)."""
    try:
        return real(value, name, minimum=0.0, maximum=1.0, exclusive_maximum=True)
    except SettingError:
        raise SettingError(f"{name} is the fraction of output positions skipped and must lie in [0, 1), "
                           f"got {value!r}") from None


def _range(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def _interval(minimum, maximum, exclusive_minimum, exclusive_maximum) -> str:
    if minimum is None and maximum is None:
        return ""
    if maximum is None:
        return f" {'>' if exclusive_minimum else '>='} {minimum:g}"
    if minimum is None:
        return f" {'<' if exclusive_maximum else '<='} {maximum:g}"
    return (f" in {'(' if exclusive_minimum else '['}{minimum:g}, {maximum:g}{')' if exclusive_maximum else ']'}")
