"""PUB optimizers: drop-in ``torch.optim`` classes that balance the per-task parameter updates
of the shared parameters (SPEC sections 3-5)."""

from .._native import StepOutcome
from ._options import CLIPPY_PRESETS
from .adagrad import AdaGrad
from .adam import Adam
from .rmsprop import RMSProp

#: torch's spellings.
Adagrad = AdaGrad
RMSprop = RMSProp

__all__ = ["Adam", "AdaGrad", "Adagrad", "RMSProp", "RMSprop", "CLIPPY_PRESETS", "StepOutcome"]
