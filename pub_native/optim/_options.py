"""PUB's own options (SPEC sections 4-5), validated once, for every PUB optimizer (Python layer)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._native import Umm
from .._numbers import is_integer, is_real
from ..solver import METHODS

__all__ = ["ABSENT_TASKS", "CLIPPY_PRESETS", "PubOptions", "UMMS", "WEIGHT_NORMS"]

# Clippy thresholds (λ_rel, λ_abs): the PUB paper's setting and TensorFlow Recommenders'
# ClippyAdagrad defaults.
CLIPPY_PRESETS = {"paper": (0.5, 1e-2), "tfrs": (0.1, 1e-7)}
UMMS = {None: Umm.NONE, "clippy": Umm.CLIPPY, "adatask": Umm.ADATASK}
WEIGHT_NORMS = ("sum", "none")
# What backward(losses) does with a task loss that has no graph (no labels in the batch).
ABSENT_TASKS = ("skip", "error")


def _finite_nonneg(value) -> bool:
    """A finite number >= 0: Python's or numpy's, not a bool."""
    return is_real(value) and 0.0 <= value < math.inf


@dataclass(frozen=True)
class PubOptions:
    """The PUB keyword arguments of ``pub_native.Adam/AdaGrad/RMSProp`` (see their docstrings)."""

    update_weights_every: int = 1
    solver: str = "newton"
    weight_norm: str = "sum"
    ridge: float = 1e-8
    umm: str | None = None
    clippy_preset: str = "paper"
    clippy_lambda_rel: float | None = None
    clippy_lambda_abs: float | None = None
    absent_tasks: str = "skip"

    def __post_init__(self):
        every = self.update_weights_every
        if not (is_integer(every) and every >= 1):
            raise ValueError(f"Invalid update_weights_every value: {every!r} (an integer >= 1)")
        object.__setattr__(self, "update_weights_every", int(every))  # numpy's ints too
        if self.solver not in METHODS:
            raise ValueError(f"Invalid solver: {self.solver!r}, expected one of {sorted(METHODS)}")
        if self.weight_norm not in WEIGHT_NORMS:
            raise ValueError(
                f"Invalid weight_norm: {self.weight_norm!r}, expected 'sum' or 'none'")
        if not _finite_nonneg(self.ridge):
            raise ValueError(f"Invalid ridge value: {self.ridge!r} (a finite number >= 0)")
        object.__setattr__(self, "ridge", float(self.ridge))
        if self.umm not in UMMS:
            raise ValueError(f"Invalid umm: {self.umm!r}, expected None, 'clippy' or 'adatask'")
        if self.clippy_preset not in CLIPPY_PRESETS:
            raise ValueError(f"Invalid clippy_preset: {self.clippy_preset!r}, expected one of "
                             f"{sorted(CLIPPY_PRESETS)}")
        if self.umm != "clippy" and (self.clippy_preset != "paper"
                                     or self.clippy_lambda_rel is not None
                                     or self.clippy_lambda_abs is not None):
            raise ValueError(
                "clippy_preset / clippy_lambda_rel / clippy_lambda_abs are only used with "
                f"umm='clippy', got umm={self.umm!r}")
        for name in ("clippy_lambda_rel", "clippy_lambda_abs"):
            value = getattr(self, name)
            if value is not None and not _finite_nonneg(value):
                raise ValueError(f"Invalid {name} value: {value!r} (a finite number >= 0)")
            if value is not None:
                object.__setattr__(self, name, float(value))
        if self.absent_tasks not in ABSENT_TASKS:
            raise ValueError(f"Invalid absent_tasks: {self.absent_tasks!r}, expected 'skip' or "
                             "'error'")
        if self.umm == "clippy" and self.clippy_lambdas == (0.0, 0.0):
            raise ValueError("Clippy needs clippy_lambda_rel > 0 or clippy_lambda_abs > 0")

    @property
    def clippy_lambdas(self) -> tuple[float, float]:
        """(λ_rel, λ_abs) in effect: the preset, overridden by the explicit values."""
        rel, abs_ = CLIPPY_PRESETS[self.clippy_preset]
        if self.clippy_lambda_rel is not None:
            rel = float(self.clippy_lambda_rel)
        if self.clippy_lambda_abs is not None:
            abs_ = float(self.clippy_lambda_abs)
        return rel, abs_

    @property
    def umm_code(self) -> int:
        return int(UMMS[self.umm])
