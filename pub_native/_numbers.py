"""What the option checks take as a number: Python's or numpy's scalars, never a bool (a bool is
an int to Python, and ``True`` given for a count or a scale is a mistake to name)."""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["is_integer", "is_real"]


def is_real(value) -> bool:
    """A real number (``int``, ``float``, ``np.float32``, ``np.int64``, ...), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def is_integer(value) -> bool:
    """An integer (``int``, ``np.int64``, ...), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
