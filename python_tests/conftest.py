"""Shared test settings: the tolerance table and the device/dtype choice.

Every tolerance used by the solver tests lives in TOL, each looser one with its reason.
Tests marked ``cuda`` are skipped unless a CUDA device and the _C_cuda module are present.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

TOL = {
    # Relative residual ‖Gα − 1/α‖/‖1/α‖ after a float64 solve (SPEC target).
    "residual_f64": 1e-10,
    # Same for cond(G) = 1e8: computing Gα alone rounds at eps·cond(G)·‖G‖‖α‖/‖Gα‖ ≲ 1e-8.
    "residual_f64_ill": 1e-7,
    # Newton vs CCP, both native float64, both converged to rounding.
    "methods_agree": 1e-8,
    # Properties that only reorder or rescale float64 arithmetic.
    "property_f64": 1e-10,
    # ... and for cond(G) = 1e8, where rounding is amplified by the conditioning.
    "property_f64_ill": 1e-6,
    # Native vs the cvxpy/ECOS reference: ECOS's interior point stops near 1e-9 relative.
    "vs_cvxpy": 1e-5,
    # float32 input: rounding of G to float32 (~6e-8) amplified by cond(G) ≤ 1e3 in these tests.
    "f32_vs_f64": 1e-4,
}


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    from pub_native import cuda_available

    if has_cuda and cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and the _C_cuda module")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
