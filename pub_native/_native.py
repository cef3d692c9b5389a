"""Loads the compiled modules, ``_C`` (always built) and ``_C_cuda`` (optional), and mirrors the
codes, table columns and limits the native core exports, once, as Python enums and constants.

``import pub_native`` never fails because CUDA is missing; :func:`cuda_module` raises a clear error
naming the rebuild flag when a CUDA path is used without it.
"""

from __future__ import annotations

import enum

from . import _C

try:
    from . import _C_cuda
except ImportError as exc:  # not built, or its runtime cannot load here
    _C_cuda = None
    _CUDA_IMPORT_ERROR: ImportError | None = exc
else:
    _CUDA_IMPORT_ERROR = None

__all__ = [
    "Algorithm", "BaseCol", "CUDA_MAX_TASKS", "DType", "MAX_STATES", "SYMMETRY_TOL",
    "SegmentKind", "SolveMethod", "SolveStatus", "StepOutcome", "TableCol", "Umm",
    "ZERO_TASK_REL_TOL",
    "_C", "cuda_available", "cuda_module",
]


def _mirror(name: str, doc: str) -> type[enum.IntEnum]:
    mirrored = enum.IntEnum(name, dict(_C.CODES[name]), module=__name__)
    mirrored.__doc__ = doc
    return mirrored


Algorithm = _mirror("Algorithm", "Base optimizer of a step segment (update_rules.h).")
DType = _mirror("DType", "Element type of a step segment's parameters (numeric.h).")
SegmentKind = _mirror("SegmentKind", "Shared tensors (K task gradients) or plain ones (step.h).")
TableCol = _mirror("TableCol", "Columns of the int64 tensor table (step.h).")
BaseCol = _mirror("BaseCol", "Columns of the float64 table of param-group constants (hyper.h).")
Umm = _mirror("Umm", "Update manipulation method codes (update_rules.h).")
StepOutcome = _mirror("StepOutcome", """What an optimizer step did (step.h).

APPLIED: parameters, state and step counters advanced. SKIPPED_FOUND_INF: a
``torch.amp.GradScaler`` found inf/NaN in the gradients, the step was skipped. NONFINITE_GRAD:
a gradient was NaN/Inf. NONFINITE_UPDATE: the gradients were finite but a task update or the
Gram matrix overflowed (learning rate, eps). GRAD_EDITED: a shared parameter's ``.grad`` was
changed between ``backward(losses)`` and ``step()`` in a way that is not a rescaling.""")
SolveStatus = _mirror("SolveStatus", "Outcome of one weight solve (values shared with the "
                                     "native core).")
SolveMethod = _mirror("SolveMethod", "Weight solver codes (common.h).")

MAX_STATES: int = _C.MAX_STATES
CUDA_MAX_TASKS: int = _C.CUDA_MAX_TASKS
#: max |G − Gᵀ| ≤ tol · max |G| counts as symmetric, for float64 and float32 Gram matrices.
SYMMETRY_TOL: dict[str, float] = {"float64": _C.SYMMETRY_TOL_F64, "float32": _C.SYMMETRY_TOL_F32}
ZERO_TASK_REL_TOL: float = _C.ZERO_TASK_REL_TOL


def cuda_available() -> bool:
    """True when the CUDA module was built and imports."""
    return _C_cuda is not None


def cuda_module():
    """The ``_C_cuda`` module, or a RuntimeError that says how to get it."""
    if _C_cuda is None:
        raise RuntimeError(
            "pub_native was built without its CUDA module (_C_cuda), so CUDA tensors cannot be "
            "used. Rebuild with a CUDA compiler on PATH and PUB_NATIVE_CUDA=ON, e.g. "
            "`PUB_NATIVE_CUDA=ON pip install --no-build-isolation -v .`"
            + (f" (import error: {_CUDA_IMPORT_ERROR})" if _CUDA_IMPORT_ERROR else "")
        )
    return _C_cuda
