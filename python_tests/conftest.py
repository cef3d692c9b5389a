"""Shared test settings: the one tolerance table, the device/dtype choices and the CUDA skip.

Every tolerance the tests use lives in TOL, each looser one with its reason. Tests marked
``cuda`` are skipped unless a CUDA device and the _C_cuda module are present; PUB_TEST_DEVICES
(e.g. "cpu,cuda") narrows the backends the parity tests run on.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

TOL = {
    # ---- the weight solver (relative residual ‖Gα − 1/α‖/‖1/α‖ or relative α error) ----
    # After a float64 solve (SPEC target).
    "residual_f64": 1e-10,
    # Same for cond(G) = 1e8: computing Gα alone rounds at eps·cond(G)·‖G‖‖α‖/‖Gα‖ ≲ 1e-8.
    "residual_f64_ill": 1e-7,
    # Newton vs CCP, both native float64, both converged to rounding.
    "methods_agree": 1e-8,
    # Properties that only reorder or rescale float64 arithmetic.
    "property_f64": 1e-10,
    # ... and for cond(G) = 1e8, where rounding is amplified by the conditioning.
    "property_f64_ill": 1e-6,
    # Per-task scale equivariance over scales 1e-4 ... 1e4 (SPEC section 4 / the 1e-6):
    # the equilibration rounds G_ij/(s_i s_j) once; the solve is then identical.
    "equivariance": 1e-6,
    # Native vs the cvxpy/ECOS reference: ECOS's interior point stops near 1e-9 relative.
    "vs_cvxpy": 1e-5,
    # float32 input: rounding of G to float32 (~6e-8) amplified by cond(G) ≤ 1e3 in these tests.
    "f32_vs_f64": 1e-4,
    # Native vs the independent numpy solver of the reference, float64, well conditioned.
    "vs_reference_solver": 1e-9,
    # ---- the cvxpy reference itself ----
    # ECOS at abstol = reltol = feastol = 1e-10 lands near 1e-10 on well-scaled matrices; the
    # bound leaves three orders of margin for other platforms / ECOS builds.
    "cvxpy_tight_residual": 1e-7,
    # α error ≈ cond(Jacobian) × residual; these matrices have condition numbers << 10.
    "cvxpy_alpha": 1e-6,
    # The independent scipy solve is Newton-polished in float64 and must be near exact.
    "scipy_residual": 1e-12,
    # Published settings (residual_tol = 1e-3, ECOS defaults ~1e-8): only the stop rule's bound.
    "cvxpy_default_residual": 1e-3,
    # ---- optimizer steps: max-abs error relative to the max-abs of the expected tensor ----
    # Same equations, float64, operations in another order: a few ulps after 7-10 steps.
    ("torch", F64): 1e-12,
    ("reference", F64): 1e-11,
    # float32: torch's kernels fuse multiply-adds and divide by sqrt(1 − β2^t) where the native
    # kernel multiplies by its inverse; the per-step rounding differences (~1e-7 relative of an
    # update) carry through the Adam denominators of coordinates with tiny v. 10 steps.
    ("torch", F32): 2e-6,
    # centered RMSProp divides by sqrt(v − a²): the cancellation amplifies those differences.
    ("torch", F32, "centered"): 2e-5,
    # Native float32 against the float64 reference: the float32 rounding above plus α̂ from G
    # summed in another order and solved from float32 updates.
    ("reference", F32): 2e-5,
    # 16-bit parameters, float32 state and math: the stored parameter is one rounding of the
    # float32 result, so it may differ by an ulp of the 16-bit type at its own magnitude, which
    # is up to two ulps at the largest (bf16: 2^-7 per unit, f16: 2^-10 per unit).
    ("reference", BF16): 2 ** -6,
    ("reference", F16): 2 ** -9,
    # GradScaler run vs the unscaled run: a power-of-two scale is undone exactly inside the
    # native passes, so float32 and bfloat16 runs are bitwise equal; in float16 the unscaled
    # backward itself rounds small gradients (subnormals) that the scaled one keeps, which the
    # state carries at about 1e-4 relative.
    ("scaler", F32): 0.0,
    ("scaler", BF16): 0.0,
    ("scaler", F16): 2 ** -9,
    # CUDA vs CPU float32: same per-element math; the device fuses multiply-adds differently
    # and sums G in another order.
    ("cuda", F32): 2e-5,
    ("cuda", BF16): 2 ** -6,
    ("cuda", F16): 2 ** -9,
}


def backends() -> list[str]:
    """The native backends the parity tests run on: the CPU always, CUDA when available
    (tests for it are marked ``cuda`` by the parametrization)."""
    wanted = os.environ.get("PUB_TEST_DEVICES", "cpu,cuda").split(",")
    return [b for b in ("cpu", "cuda") if b in wanted]


def pytest_collection_modifyitems(config, items):
    # Tests marked `slow` run when PUB_RUN_SLOW=1 (CI sets it) or when selected with -m.
    if not os.environ.get("PUB_RUN_SLOW") and "slow" not in (config.getoption("-m") or ""):
        skip_slow = pytest.mark.skip(reason="slow: set PUB_RUN_SLOW=1 (CI does) or -m slow")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)
    try:
        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - a broken driver counts as none
        has_cuda = False
    from pub_native import cuda_available

    if has_cuda and cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and the _C_cuda module")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny problems: they run fastest on one, and two threads
    slow down many times over when another process keeps a core of a small machine busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
