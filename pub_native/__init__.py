"""pub_native: Parameter Update Balancing (PUB) for multi-task learning.

Drop-in ``torch.optim`` optimizers that balance the parameter updates of several tasks on their
shared parameters (arXiv 2410.05806), on a native C++/CUDA core. This release provides the
native K×K weight solver :func:`solve_weights`; see ``pub_native.reference`` for the cvxpy
reference it is validated against.
"""

from ._native import cuda_available
from .solver import METHODS, SolveResult, SolveStatus, solve_weights

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "SolveResult",
    "SolveStatus",
    "__version__",
    "cuda_available",
    "solve_weights",
]
