"""An object's attributes put back as they were when an operation on it raises (SPEC section 7:
a step, a load or a balancer call that raises loses nothing)."""

from __future__ import annotations

import contextlib
import copy

__all__ = ["attributes_kept_on_error"]


@contextlib.contextmanager
def attributes_kept_on_error(obj):
    """Inside, ``obj``'s attributes may be replaced or its lists, dicts and sets changed in
    place; if the block raises, every attribute is put back (the containers as they were, one
    level deep: what they hold is not copied)."""
    saved = {name: copy.copy(value) if isinstance(value, (list, dict, set)) else value
             for name, value in vars(obj).items()}
    try:
        yield
    except BaseException:
        vars(obj).clear()
        vars(obj).update(saved)
        raise
