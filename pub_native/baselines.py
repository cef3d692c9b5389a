"""Former name of :mod:`pub_native.balancers`, kept so that code written for it still runs.

``import pub_native.baselines`` gives the very same module object as ``pub_native.balancers``
(classes, functions and their state are shared) and emits a ``DeprecationWarning``. The package
root does not import this module.
"""

import sys
import warnings

from . import balancers

warnings.warn(
    "pub_native.baselines was renamed to pub_native.balancers; import that instead",
    DeprecationWarning,
    stacklevel=2,
)

sys.modules[__name__] = balancers
