"""Reference implementations that the native paths are tested and benchmarked against.

Not the product path: plain, readable, slow. Optional dependencies (cvxpy, ECOS) are imported
only when a reference that needs them is called. The PUB optimizers' reference is plain PyTorch.
"""

from .nashmtl_cvxpy import CvxpyReferenceError, NashMTLSolverReference, nash_weights_cvxpy
from .pub_torch import ReferenceAdaGrad, ReferenceAdam, ReferenceRMSProp

__all__ = [
    "CvxpyReferenceError",
    "NashMTLSolverReference",
    "ReferenceAdaGrad",
    "ReferenceAdam",
    "ReferenceRMSProp",
    "nash_weights_cvxpy",
]
