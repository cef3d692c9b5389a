"""pub_native: Parameter Update Balancing (PUB) for multi-task learning.

Drop-in ``torch.optim`` optimizers that balance the parameter updates of several tasks on their
shared parameters (arXiv 2410.05806), on a native C++/CUDA core. This release provides the
optimizers :class:`Adam`, :class:`AdaGrad` and :class:`RMSProp` and the native K×K weight
solver :func:`solve_weights`; ``pub_native.balancers`` holds the gradient balancers PUB is
compared with (usable with any torch optimizer), and ``pub_native.reference`` the plain-PyTorch
and cvxpy references the optimizers are validated against. The census-income demo and its data
live in ``pub_native.demo``, which ``import pub_native`` does not load.
"""

from . import balancers
from ._native import cuda_available
from .optim import AdaGrad, Adagrad, Adam, RMSProp, RMSprop, StepOutcome
from .solver import METHODS, SolveResult, SolveStatus, solve_weights

__version__ = "0.1.0"

__all__ = [
    "balancers",
    "AdaGrad",
    "Adagrad",
    "Adam",
    "RMSProp",
    "RMSprop",
    "StepOutcome",
    "METHODS",
    "SolveResult",
    "SolveStatus",
    "__version__",
    "cuda_available",
    "solve_weights",
]
