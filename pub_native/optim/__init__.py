"""PUB optimizers: drop-in ``torch.optim`` classes that balance the per-task parameter updates
of the shared parameters (SPEC sections 3-5)."""

from ._pub import CLIPPY_PRESETS
from .adagrad import AdaGrad
from .adam import Adam
from .rmsprop import RMSProp

__all__ = ["Adam", "AdaGrad", "RMSProp", "CLIPPY_PRESETS"]
