"""Loads the compiled modules: ``_C`` (always built) and ``_C_cuda`` (optional).

``import pub_native`` never fails because CUDA is missing; :func:`cuda_module` raises a clear error
naming the rebuild flag when a CUDA path is used without it.
"""

from __future__ import annotations

from . import _C

try:
    from . import _C_cuda
except ImportError as exc:  # not built, or its runtime cannot load here
    _C_cuda = None
    _CUDA_IMPORT_ERROR: ImportError | None = exc
else:
    _CUDA_IMPORT_ERROR = None

__all__ = ["_C", "cuda_available", "cuda_module"]


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
