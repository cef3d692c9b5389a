"""Tests of the cvxpy/ECOS NashMTL reference itself (pub_native.reference.nashmtl_cvxpy).

Reference layer: before the native solvers are compared with it, it must solve Gα = 1/α, agree
with an independent scipy solve, and fail loudly wherever the published code silently keeps α.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import TOL

cvxpy = pytest.importorskip("cvxpy")
pytest.importorskip("ecos")
scipy_optimize = pytest.importorskip("scipy.optimize")

from pub_native.reference import (  # noqa: E402
    CvxpyReferenceError,
    NashMTLSolverReference,
    nash_weights_cvxpy,
)

TIGHT = {"ecos_tol": 1e-10, "residual_tol": 1e-10, "step_tol": 1e-13, "max_iter": 100}


def residual(G: np.ndarray, alpha: np.ndarray) -> float:
    return float(np.linalg.norm(G @ alpha - 1 / alpha) / np.linalg.norm(1 / alpha))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def positive_gram(K: int, seed: int) -> np.ndarray:
    """Gram matrix with all entries > 0 (tasks that agree more than they conflict).

    With G > 0 every coefficient of the CCP subproblem's linear objective is positive, so the
    published procedure's first subproblem from α = 1 is bounded; strongly conflicting tasks
    are covered separately (test_conflicting_tasks_*).
    """
    rng = np.random.default_rng(seed)
    A = np.abs(rng.standard_normal((K, K + 3)))
    return A @ A.T


def scipy_nash(G: np.ndarray) -> np.ndarray:
    """Independent solve of α ∘ (Gα) = 1 in y = log α, from α0 = 1/sqrt(diag G) (not ones).

    The roots are the stationary points of ψ(y) = ½ e^yᵀ G e^y − Σ y; trust-exact on ψ gets
    close from any start, then a root-finder on ∇ψ(y) = e^y ∘ (G e^y) − 1 polishes.
    """

    def psi(y: np.ndarray) -> tuple[float, np.ndarray]:
        a = np.exp(y)
        g_a = G @ a
        return 0.5 * a @ g_a - y.sum(), a * g_a - 1

    def hess(y: np.ndarray) -> np.ndarray:
        a = np.exp(y)
        return np.diag(a * (G @ a)) + np.outer(a, a) * G

    y0 = -0.5 * np.log(np.diag(G))
    coarse = scipy_optimize.minimize(
        psi, y0, jac=True, hess=hess, method="trust-exact", options={"gtol": 1e-12}
    )
    fine = scipy_optimize.root(lambda y: psi(y)[1], coarse.x, jac=hess, tol=1e-15)
    alpha = np.exp(fine.x)
    assert residual(G, alpha) <= TOL["scipy_residual"], "the scipy cross-check itself failed"
    return alpha


# (a) Gα = 1/α to tight accuracy.


@pytest.mark.parametrize("K", [1, 2, 3, 5, 10])
@pytest.mark.parametrize("seed", [0, 1])
def test_tight_settings_solve_the_nash_equation(K, seed):
    G = positive_gram(K, seed)
    alpha, info = nash_weights_cvxpy(G, return_info=True, **TIGHT)
    assert alpha.dtype == np.float64 and alpha.shape == (K,)
    assert np.all(alpha > 0)
    assert residual(G, alpha) <= TOL["cvxpy_tight_residual"]
    assert info["status"] in ("optimal", "optimal_inaccurate")
    assert 1 <= info["iterations"] <= TIGHT["max_iter"]
    assert info["residual"] == pytest.approx(residual(G, alpha), rel=1e-6, abs=1e-15)
    assert info["solve_time"] > 0


def test_published_default_settings_meet_their_stop_rule():
    G = positive_gram(4, 7)
    alpha, info = nash_weights_cvxpy(G, return_info=True)
    assert residual(G, alpha) < TOL["cvxpy_default_residual"]
    assert info["converged"] and info["iterations"] <= 20


# (b) Agreement with an independent solve.


@pytest.mark.parametrize(
    "G",
    [
        positive_gram(2, 3),
        positive_gram(3, 4),
        positive_gram(5, 5),
        positive_gram(10, 6),
        np.array([[9.0, -2.0], [-2.0, 1.0]]),
    ],
    ids=["K2", "K3", "K5", "K10", "negative-correlation"],
)
def test_agrees_with_independent_scipy_solve(G):
    alpha = nash_weights_cvxpy(G, **TIGHT)
    assert rel_err(alpha, scipy_nash(G)) <= TOL["cvxpy_alpha"]


def test_scale_and_permutation_equivariance():
    G = positive_gram(4, 8)
    alpha = nash_weights_cvxpy(G, **TIGHT)
    assert rel_err(nash_weights_cvxpy(9.0 * G, **TIGHT), alpha / 3.0) <= TOL["cvxpy_alpha"]
    perm = np.array([2, 0, 3, 1])
    alpha_perm = nash_weights_cvxpy(G[np.ix_(perm, perm)], **TIGHT)
    assert rel_err(alpha_perm, alpha[perm]) <= TOL["cvxpy_alpha"]


def test_ridge_solves_the_ridged_matrix():
    G = positive_gram(3, 9)
    rho = 0.5
    ridged = G + rho * np.diag(np.diag(G))
    alpha = nash_weights_cvxpy(G, ridge=rho, **TIGHT)
    assert rel_err(alpha, scipy_nash(ridged)) <= TOL["cvxpy_alpha"]


# (c) The result is the solution, not the starting point.


@pytest.mark.parametrize(
    ("G", "expected"),
    [
        (np.diag([4.0, 0.25, 1.0]), np.array([0.5, 2.0, 1.0])),
        (np.array([[9.0, -2.0], [-2.0, 1.0]]), np.array([1 / np.sqrt(3), np.sqrt(3)])),
    ],
    ids=["diagonal", "negative-correlation"],
)
def test_moves_off_the_start(G, expected):
    assert residual(G, np.ones(len(G))) > 0.5  # premise: α = 1 is far from the solution
    alpha = nash_weights_cvxpy(G)
    assert np.max(np.abs(alpha - 1)) > 0.4
    assert rel_err(alpha, expected) <= TOL["cvxpy_default_residual"]


# (d) Loud failure wherever the published code silently keeps α.


def test_raises_when_ecos_is_not_installed(monkeypatch):
    solver = NashMTLSolverReference(2)
    monkeypatch.setattr(cvxpy, "installed_solvers", lambda: ["CLARABEL", "SCS"])
    with pytest.raises(CvxpyReferenceError, match="pip install ecos"):
        nash_weights_cvxpy(positive_gram(2, 0))
    with pytest.raises(CvxpyReferenceError, match="pip install ecos"):
        solver.solve(positive_gram(2, 0))  # checked on every solve, not only at construction


def test_raises_when_cvxpy_is_not_importable(monkeypatch):
    monkeypatch.setitem(sys.modules, "cvxpy", None)
    with pytest.raises(CvxpyReferenceError, match="pip install cvxpy ecos"):
        nash_weights_cvxpy(positive_gram(2, 0))


def test_package_imports_without_cvxpy():
    script = textwrap.dedent(
        """
        import sys
        sys.modules["cvxpy"] = None  # as if cvxpy were not installed
        import numpy as np
        import pub_native.reference as ref
        try:
            ref.nash_weights_cvxpy(np.eye(2))
        except ref.CvxpyReferenceError:
            print("raised")
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "raised"


def test_raises_when_the_solve_raises(monkeypatch):
    def failing_solve(self, *args, **kwargs):
        raise cvxpy.error.SolverError("Solver 'ECOS' failed.")

    monkeypatch.setattr(cvxpy.Problem, "solve", failing_solve)
    with pytest.raises(CvxpyReferenceError, match="ECOS failed") as excinfo:
        nash_weights_cvxpy(positive_gram(3, 0))
    assert isinstance(excinfo.value.__cause__, cvxpy.error.SolverError)


def test_raises_on_a_non_optimal_status(monkeypatch):
    # The variable still holds the warm-start value (ones), which the published code returns.
    monkeypatch.setattr(cvxpy.Problem, "solve", lambda self, *args, **kwargs: np.inf)
    monkeypatch.setattr(cvxpy.Problem, "status", property(lambda self: cvxpy.INFEASIBLE))
    with pytest.raises(CvxpyReferenceError, match="infeasible"):
        nash_weights_cvxpy(positive_gram(3, 0))


@pytest.mark.parametrize("value", [None, np.array([0.0, 1.0, 1.0])], ids=["None", "zero-entry"])
def test_raises_on_optimal_status_without_a_usable_value(monkeypatch, value):
    def fake_solve(self, *args, **kwargs):
        self.var_dict["alpha"].value = value
        return 0.0

    monkeypatch.setattr(cvxpy.Problem, "solve", fake_solve)
    monkeypatch.setattr(cvxpy.Problem, "status", property(lambda self: cvxpy.OPTIMAL))
    with pytest.raises(CvxpyReferenceError):
        nash_weights_cvxpy(positive_gram(3, 0))


# Older cvxpy (1.6, the oldest-torch CI) warns that ECOS's solution "may be inaccurate" on the
# conflicting start; the test checks the outcome itself.
@pytest.mark.filterwarnings("ignore:Solution may be inaccurate")
def test_conflicting_tasks_raise_from_ones_but_solve_from_a_warm_start():
    # (G·1)_2 = 0: the published linearization at α = 1 divides by zero, ECOS fails, and the
    # published code returns α = 1. The Nash solution exists: α = (1/√2, √2).
    G = np.array([[4.0, -1.0], [-1.0, 1.0]])
    with np.errstate(divide="ignore"), pytest.raises(CvxpyReferenceError, match="tasks \\[1\\]"):
        nash_weights_cvxpy(G)
    alpha = nash_weights_cvxpy(G, warm_start=[1.0, 1.5], **TIGHT)
    assert rel_err(alpha, np.array([1 / np.sqrt(2), np.sqrt(2)])) <= TOL["cvxpy_alpha"]


def test_warns_when_stopped_before_converging():
    with pytest.warns(RuntimeWarning, match="stopped with relative residual"):
        alpha, info = nash_weights_cvxpy(
            positive_gram(3, 0), max_iter=1, residual_tol=0.0, step_tol=0.0, return_info=True
        )
    assert info["iterations"] == 1 and not info["converged"]
    assert np.all(alpha > 0)


# (e) Zero tasks.


def test_zero_task_gets_weight_zero_and_the_rest_solve_the_reduced_problem():
    reduced = positive_gram(3, 10)
    G = np.zeros((4, 4))
    keep = np.array([0, 2, 3])
    G[np.ix_(keep, keep)] = reduced
    G[1, 1] = 1e-26 * reduced.max()  # ‖u_1‖ = 1e-13 max‖u_j‖, below the 1e-12 threshold
    alpha, info = nash_weights_cvxpy(G, return_info=True, **TIGHT)
    assert alpha[1] == 0.0
    assert info["n_active"] == 3
    assert rel_err(alpha[keep], nash_weights_cvxpy(reduced, **TIGHT)) <= TOL["cvxpy_alpha"]


def test_all_zero_tasks_give_zeros():
    alpha, info = nash_weights_cvxpy(np.zeros((3, 3)), return_info=True)
    assert np.array_equal(alpha, np.zeros(3))
    assert info["iterations"] == 0


# (f) Validation.


@pytest.mark.parametrize(
    "G",
    [
        np.ones((2, 3)),
        np.ones(3),
        np.ones((2, 2, 2)),
        np.zeros((0, 0)),
        np.array([[1.0, 0.5], [0.4, 1.0]]),
        np.array([[1.0, np.nan], [np.nan, 1.0]]),
        np.array([[np.inf, 0.0], [0.0, 1.0]]),
        np.array([[-1.0, 0.0], [0.0, 1.0]]),
    ],
    ids=["non-square", "1-D", "3-D", "empty", "non-symmetric", "NaN", "Inf", "negative-diag"],
)
def test_invalid_G_raises_value_error_naming_G(G):
    with pytest.raises(ValueError, match=r"\bG\b"):
        nash_weights_cvxpy(G)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"warm_start": np.ones(3)}, "warm_start"),
        ({"warm_start": [1.0, -1.0]}, "warm_start"),
        ({"max_iter": 0}, "max_iter"),
        ({"residual_tol": -1.0}, "residual_tol"),
        ({"step_tol": float("nan")}, "step_tol"),
        ({"ecos_tol": 0.0}, "ecos_tol"),
        ({"ridge": -1e-3}, "ridge"),
    ],
)
def test_invalid_options_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        nash_weights_cvxpy(np.eye(2), **kwargs)


def test_solver_rejects_a_gram_of_the_wrong_size():
    with pytest.raises(ValueError, match=r"\bG\b"):
        NashMTLSolverReference(3).solve(np.eye(2))


# (g) The stateful solver warm-starts from its previous answer.


def test_solver_warm_starts_from_the_previous_alpha(monkeypatch):
    first_alpha_k = []
    original_solve = cvxpy.Problem.solve

    def spy(self, *args, **kwargs):
        first_alpha_k.append(self.param_dict["alpha_k"].value.copy())
        return original_solve(self, *args, **kwargs)

    monkeypatch.setattr(cvxpy.Problem, "solve", spy)
    G1 = positive_gram(4, 11)
    rng = np.random.default_rng(12)
    E = rng.standard_normal((4, 4))
    G2 = G1 + 1e-3 * (E @ E.T)
    solver = NashMTLSolverReference(4, ecos_tol=1e-10, residual_tol=1e-9)

    assert np.array_equal(solver.prev_alpha, np.ones(4))
    alpha1 = solver.solve(G1)
    iterations1 = solver.last_info["iterations"]
    assert np.array_equal(first_alpha_k[0], np.ones(4))
    assert np.array_equal(solver.prev_alpha, alpha1)

    n_calls = len(first_alpha_k)
    alpha2 = solver.solve(G2)
    assert np.array_equal(first_alpha_k[n_calls], alpha1)
    assert solver.last_info["iterations"] <= iterations1
    assert np.array_equal(solver.prev_alpha, alpha2)
    assert residual(G2, alpha2) <= TOL["cvxpy_tight_residual"]


def test_solver_warm_start_carries_it_through_conflicting_tasks():
    # From ones the CCP fails on this G (see above); from the previous step's α it succeeds.
    solver = NashMTLSolverReference(2, **TIGHT)
    solver.solve(np.array([[4.0, -0.5], [-0.5, 1.0]]))
    alpha = solver.solve(np.array([[4.0, -1.0], [-1.0, 1.0]]))
    assert rel_err(alpha, np.array([1 / np.sqrt(2), np.sqrt(2)])) <= TOL["cvxpy_alpha"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_input_matches_numpy(dtype):
    torch = pytest.importorskip("torch")
    G = torch.from_numpy(positive_gram(3, 13)).to(getattr(torch, dtype))
    from_torch = nash_weights_cvxpy(G, warm_start=torch.ones(3, dtype=G.dtype), **TIGHT)
    from_numpy = nash_weights_cvxpy(G.double().numpy(), **TIGHT)
    assert from_torch.dtype == np.float64
    assert rel_err(from_torch, from_numpy) <= TOL["cvxpy_alpha"]


def test_repr_is_exact():
    solver = NashMTLSolverReference(3, ecos_tol=1e-9)
    assert repr(solver) == (
        "NashMTLSolverReference(n_tasks=3, max_iter=20, residual_tol=0.001, step_tol=1e-06, "
        "ecos_tol=1e-09, ridge=0.0)"
    )
