"""Reference implementations that the native paths are tested and benchmarked against.

Not the product path: plain, readable, slow. Optional dependencies (cvxpy, ECOS) are imported
only when a reference that needs them is called.
"""

from .nashmtl_cvxpy import CvxpyReferenceError, NashMTLSolverReference, nash_weights_cvxpy

__all__ = ["CvxpyReferenceError", "NashMTLSolverReference", "nash_weights_cvxpy"]
