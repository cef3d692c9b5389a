"""References that the native paths are tested and benchmarked against (reference layer).

Not the product path: plain, readable, slow, and independent of the native code. The per-element
rules of the base optimizers (:mod:`.rules`), a float64 numpy solver of Gα = 1/α
(:mod:`.solver`), the whole PUB step in plain PyTorch behind the backends' interface
(:mod:`.step`; use it as ``pub_native.Adam(..., backend="reference")``), and the NashMTL/PUB
weight procedure written with cvxpy + ECOS (:mod:`.nashmtl_cvxpy`; cvxpy and ECOS are imported
only when it is called).
"""

from .nashmtl_cvxpy import CvxpyReferenceError, NashMTLSolverReference, nash_weights_cvxpy
from .rules import RULES, adagrad_rule, adam_rule, clippy_scale, rmsprop_rule
from .solver import nash_weights
from .step import ReferenceBackend, pub_step

__all__ = [
    "CvxpyReferenceError",
    "NashMTLSolverReference",
    "RULES",
    "ReferenceBackend",
    "adagrad_rule",
    "adam_rule",
    "clippy_scale",
    "nash_weights",
    "nash_weights_cvxpy",
    "pub_step",
    "rmsprop_rule",
]
