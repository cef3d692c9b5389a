"""pub_native: Parameter Update Balancing (PUB) for multi-task learning.

Drop-in ``torch.optim`` optimizers that balance the parameter updates of several tasks on their
shared parameters (arXiv 2410.05806), on a native C++/CUDA core. This release provides the
optimizers :class:`Adam`, :class:`AdaGrad` and :class:`RMSProp` and the native K×K weight
solver :func:`solve_weights`; ``pub_native.reference`` holds the plain-PyTorch and cvxpy
references they are validated against.
"""

from . import baselines, data, models
from ._native import cuda_available
from .optim import AdaGrad, Adagrad, Adam, RMSProp, RMSprop, StepOutcome
from .solver import METHODS, SolveResult, SolveStatus, solve_weights

__version__ = "0.1.0"

__all__ = [
    "baselines",
    "data",
    "models",
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
