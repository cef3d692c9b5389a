"""cvxpy + ECOS re-implementation of the NashMTL / PUB sequential convex procedure (CCP).

Reference layer: the ground truth that tests and benchmarks compare the native weight solvers
against. It is slow and needs cvxpy + ECOS; it is not the product path.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import numpy as np

__all__ = ["CvxpyReferenceError", "NashMTLSolverReference", "nash_weights_cvxpy"]

# A task is excluded (weight 0) when ‖u_i‖ = sqrt(G_ii) <= this × max_j sqrt(G_jj) (SPEC §4).
_ZERO_TASK_RTOL = 1e-12
# G is accepted as symmetric when max|G - Gᵀ| <= this × max|G|; it is then symmetrized.
_SYMMETRY_RTOL = 1e-8
# cvxpy statuses whose variable values are used; anything else raises.
_ACCEPTED_STATUSES = ("optimal", "optimal_inaccurate")
# ECOS iteration cap per subproblem, as in the published code.
_ECOS_MAX_ITERS = 100
# The subproblem multiplies the variable by a Parameter inside log(), so it is not DPP (as
# published); cvxpy says so on every solve. Only this message is silenced.
_DPP_WARNING = r"You are solving a parameterized problem that is not DPP"


class CvxpyReferenceError(RuntimeError):
    """The cvxpy reference produced no solution: cvxpy or ECOS is missing, or a solve failed."""


def _require_cvxpy_ecos() -> Any:
    """Import cvxpy and check that ECOS is installed; raise CvxpyReferenceError otherwise.

    The published NashMTL code catches every solver exception and keeps α = 1, so a missing
    ECOS silently turns NashMTL into equal weighting. This check makes that impossible here.
    """
    try:
        import cvxpy as cp
    except ImportError as exc:
        raise CvxpyReferenceError(
            "pub_native.reference.nash_weights_cvxpy needs cvxpy and the ECOS solver, and cvxpy "
            f"could not be imported ({exc}); install them with: pip install cvxpy ecos"
        ) from exc
    installed = list(cp.installed_solvers())
    if "ECOS" not in installed:
        raise CvxpyReferenceError(
            "the cvxpy NashMTL reference solves its subproblems with ECOS (as the published code "
            "does), but ECOS is not among cvxpy's installed solvers "
            f"{installed}; recent cvxpy releases no longer install it: pip install ecos"
        )
    return cp


def _as_gram(G: Any, name: str = "G") -> np.ndarray:
    """Validate a K×K Gram matrix and return it as a symmetric float64 numpy copy."""
    if hasattr(G, "detach"):  # torch.Tensor (any device, any float dtype) without importing torch
        G = G.detach().cpu().double().numpy()
    if np.iscomplexobj(G):
        raise ValueError(f"{name} must be real, got a complex array")
    try:
        g = np.array(G, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a real K×K matrix, got {type(G).__name__}") from exc
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"{name} must be a square 2-D matrix, got shape {g.shape}")
    if g.shape[0] < 1:
        raise ValueError(f"{name} must have at least one task (K >= 1), got shape {g.shape}")
    if not np.all(np.isfinite(g)):
        raise ValueError(f"{name} must be finite, got NaN or Inf entries")
    scale = float(np.max(np.abs(g)))
    asym = float(np.max(np.abs(g - g.T)))
    if asym > _SYMMETRY_RTOL * scale:
        raise ValueError(
            f"{name} must be symmetric: max|G - Gᵀ| = {asym:.3e} > {_SYMMETRY_RTOL:g} × max|G|"
        )
    if np.any(np.diag(g) < 0):
        raise ValueError(f"{name} must be positive semidefinite, but has a negative diagonal entry")
    return 0.5 * (g + g.T)


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_nonneg(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}") from exc
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def relative_residual(G: np.ndarray, alpha: np.ndarray) -> float:
    """‖Gα − 1/α‖ / ‖1/α‖, the scale-free error in the optimality condition Gα = 1/α."""
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / alpha
        res = float(np.linalg.norm(G @ alpha - inv) / np.linalg.norm(inv))
    return res if math.isfinite(res) else math.inf


def _failure_hint(g: np.ndarray, alpha_t: np.ndarray) -> str:
    """Explain a failed subproblem; the usual cause is a linearization point outside dom φ."""
    hint = ". The published code would silently have kept α = α_t here."
    g_alpha = g @ alpha_t
    if np.any(g_alpha <= 0):
        bad = np.flatnonzero(g_alpha <= 0).tolist()
        hint += (
            f" (Gα_t)_i <= 0 for tasks {bad} at the linearization point α_t, where "
            "φ = Σ log α_i + Σ log (Gα)_i is undefined (strongly conflicting tasks); a warm start "
            "nearer the solution avoids this."
        )
    return hint


class _CCPSubproblem:
    """The convex CCP subproblem for k tasks, built once with cvxpy Parameters (as published).

    Variable α ∈ R^k, α >= 0; parameters G_n = G / n, n = ‖G‖_F and the previous iterate α_k:

        minimize    Σ_i (G_n α)_i + ∇φ(α_k)ᵀ (α − α_k) / n
        subject to  −log(α_i n) − log((G_n α)_i) <= 0,   i = 1..k,

    with φ(α) = Σ_i log α_i + Σ_i log (G_n α)_i, ∇φ(α_k) = 1/α_k + G_nᵀ (1 / (G_n α_k)).
    """

    def __init__(self, cp: Any, k: int) -> None:
        self.alpha = cp.Variable(k, nonneg=True, name="alpha")
        self.alpha_k = cp.Parameter(k, name="alpha_k", value=np.ones(k))
        self.gram = cp.Parameter((k, k), name="G_n", value=np.eye(k))
        self.norm = cp.Parameter(nonneg=True, name="n", value=1.0)

        g_alpha = self.gram @ self.alpha
        # inv_pos(x) rather than 1 / x: cvxpy turns 1 / x of a length-1 vector into a scalar,
        # which breaks K = 1. Both evaluate to 1 / x on parameters, whatever the sign.
        inv = cp.inv_pos
        grad_phi = inv(self.alpha_k) + self.gram.T @ inv(self.gram @ self.alpha_k)
        linearized_phi = grad_phi @ (self.alpha - self.alpha_k)
        constraints = [
            -cp.log(self.alpha[i] * self.norm) - cp.log(g_alpha[i]) <= 0 for i in range(k)
        ]
        objective = cp.Minimize(cp.sum(g_alpha) + linearized_phi / self.norm)
        self.problem = cp.Problem(objective, constraints)


class NashMTLSolverReference:
    """Stateful cvxpy/ECOS reference for the NashMTL / PUB balancing weights (SPEC §4).

    Returns α > 0 with α_i (Gα)_i = 1 for every task i, i.e. Gα = 1/α (Navon et al., "Multi-Task
    Learning as a Bargaining Game", ICML 2022, §3; PUB Claim 1), by the sequential convex
    (concave–convex) procedure of the published NashMTL code. With G ← G + ρ·diag(G) when
    ``ridge`` = ρ > 0, n = ‖G‖_F and G_n = G / n, outer iteration t solves (ECOS, ≤ 100 iters)

        α_{t+1} = argmin_{α >= 0}  Σ_i (G_n α)_i + ∇φ(α_t)ᵀ (α − α_t) / n
                  s.t.  log(α_i n) + log((G_n α)_i) >= 0   (⇔ α_i (Gα)_i >= 1),

    φ(α) = Σ_i log α_i + Σ_i log (G_n α)_i, and stops after ``max_iter`` outer iterations or when
    ‖Gα_{t+1} − 1/α_{t+1}‖ / ‖1/α_{t+1}‖ < ``residual_tol`` or ‖α_{t+1} − α_t‖ < ``step_tol``.
    α_0 is the previous call's α (ones on the first call).

    Differences from the published code, all deliberate: the stop residual is relative and uses
    the unnormalized G and the new iterate (published: absolute, normalized G, old iterate); the
    new iterate is returned; any solver failure raises ``CvxpyReferenceError`` instead of
    silently keeping α; tasks with ‖u_i‖ <= 1e-12 max_j ‖u_j‖ get weight 0 and are left out of
    the solve. A run that ends with residual >= ``residual_tol`` issues a ``RuntimeWarning``.

    Args:
        n_tasks: K, the number of tasks.
        max_iter: maximum number of outer (CCP) iterations; published: 20.
        residual_tol: stop when the relative residual is below this; published: 1e-3.
        step_tol: stop when ‖α_{t+1} − α_t‖ is below this; published: 1e-6.
        ecos_tol: ECOS ``abstol``, ``reltol`` and ``feastol``; None keeps ECOS's defaults.
        ridge: ρ >= 0 in G + ρ·diag(G) (SPEC section 4); the published code uses none.
    """

    def __init__(
        self,
        n_tasks: int,
        *,
        max_iter: int = 20,
        residual_tol: float = 1e-3,
        step_tol: float = 1e-6,
        ecos_tol: float | None = None,
        ridge: float = 0.0,
    ) -> None:
        n_tasks = _check_positive_int("n_tasks", n_tasks)
        max_iter = _check_positive_int("max_iter", max_iter)
        if ecos_tol is not None and not _check_nonneg("ecos_tol", ecos_tol) > 0:
            raise ValueError(f"ecos_tol must be None or a finite number > 0, got {ecos_tol!r}")
        self.n_tasks = n_tasks
        self.max_iter = max_iter
        self.residual_tol = _check_nonneg("residual_tol", residual_tol)
        self.step_tol = _check_nonneg("step_tol", step_tol)
        self.ecos_tol = None if ecos_tol is None else float(ecos_tol)
        self.ridge = _check_nonneg("ridge", ridge)

        self._cp = _require_cvxpy_ecos()
        # One subproblem per number of non-zero tasks; the full-size one is built now.
        self._subproblems = {self.n_tasks: _CCPSubproblem(self._cp, self.n_tasks)}
        self._prev_alpha = np.ones(self.n_tasks)
        self.last_info: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_tasks={self.n_tasks}, max_iter={self.max_iter}, "
            f"residual_tol={self.residual_tol!r}, step_tol={self.step_tol!r}, "
            f"ecos_tol={self.ecos_tol!r}, ridge={self.ridge!r})"
        )

    @property
    def prev_alpha(self) -> np.ndarray:
        """The starting point of the next solve: the last α returned (ones before any solve).

        Entries that are 0 (tasks excluded last time) restart from 1, the published initial value.
        """
        return self._prev_alpha.copy()

    @prev_alpha.setter
    def prev_alpha(self, value: Any) -> None:
        if hasattr(value, "detach"):
            value = value.detach().cpu().double().numpy()
        alpha = np.array(value, dtype=np.float64)
        if alpha.shape != (self.n_tasks,):
            raise ValueError(
                f"warm_start must have shape ({self.n_tasks},), got shape {alpha.shape}"
            )
        if not (np.all(np.isfinite(alpha)) and np.all(alpha >= 0)):
            raise ValueError("warm_start must be finite and >= 0")
        self._prev_alpha = alpha

    def solve(self, G: Any) -> np.ndarray:
        """Return α (float64, not normalized) for the K×K Gram matrix G; see the class docstring.

        Sets ``prev_alpha`` to the result and ``last_info`` to a dict with ``iterations`` (outer),
        ``residual`` (relative, on the ridged G of the non-zero tasks), ``status`` (last cvxpy
        status), ``solve_time`` (seconds), ``converged`` (residual < residual_tol) and
        ``n_active`` (tasks not excluded as zero).
        """
        g = _as_gram(G)
        if g.shape[0] != self.n_tasks:
            raise ValueError(f"G must be {self.n_tasks}×{self.n_tasks}, got shape {g.shape}")
        # Checked on every call, not only in __init__: a solve must never run without ECOS.
        cp = _require_cvxpy_ecos()

        task_norms = np.sqrt(np.diag(g))
        active = task_norms > _ZERO_TASK_RTOL * task_norms.max()
        alpha = np.zeros(self.n_tasks)
        info: dict[str, Any] = {
            "iterations": 0,
            "residual": 0.0,
            "status": None,
            "solve_time": 0.0,
            "converged": True,
            "n_active": int(active.sum()),
        }
        if active.any():
            sub = g[np.ix_(active, active)]
            if self.ridge > 0:
                sub = sub + self.ridge * np.diag(np.diag(sub))
            start = self._prev_alpha[active]
            start = np.where(start > 0, start, 1.0)
            alpha[active] = self._ccp(cp, sub, start, info)
        self._prev_alpha = alpha.copy()
        self.last_info = info
        return alpha

    def _subproblem(self, cp: Any, k: int) -> _CCPSubproblem:
        if k not in self._subproblems:
            self._subproblems[k] = _CCPSubproblem(cp, k)
        return self._subproblems[k]

    def _ccp(self, cp: Any, g: np.ndarray, start: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        """Outer CCP loop on a validated, all-non-zero k×k G; fills ``info``."""
        k = g.shape[0]
        sub = self._subproblem(cp, k)
        norm = float(np.linalg.norm(g))  # Frobenius, as published
        sub.gram.value = g / norm
        sub.norm.value = norm
        solve_kwargs: dict[str, Any] = {"max_iters": _ECOS_MAX_ITERS}
        if self.ecos_tol is not None:
            solve_kwargs.update(abstol=self.ecos_tol, reltol=self.ecos_tol, feastol=self.ecos_tol)

        t0 = time.perf_counter()
        alpha_t = start
        for iteration in range(1, self.max_iter + 1):
            sub.alpha_k.value = alpha_t
            # Warm start as published (ECOS itself ignores it; cvxpy keeps the value as a hint).
            sub.alpha.value = alpha_t
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_DPP_WARNING, category=UserWarning)
                try:
                    sub.problem.solve(solver=cp.ECOS, warm_start=True, **solve_kwargs)
                except Exception as exc:  # SolverError, or anything ECOS itself raises
                    raise CvxpyReferenceError(
                        f"ECOS failed on CCP outer iteration {iteration} of the NashMTL "
                        f"reference (K={k}): {type(exc).__name__}: {str(exc).rstrip('.')}"
                        + _failure_hint(g, alpha_t)
                    ) from exc
            status = sub.problem.status
            info.update(iterations=iteration, status=status)
            if status not in _ACCEPTED_STATUSES or sub.alpha.value is None:
                raise CvxpyReferenceError(
                    f"ECOS returned status {status!r} on CCP outer iteration {iteration} of the "
                    f"NashMTL reference (K={k})" + _failure_hint(g, alpha_t)
                )
            alpha_new = np.array(sub.alpha.value, dtype=np.float64).reshape(k)
            # α_i (Gα)_i >= 1 forces α_i > 0; a zero or non-finite entry is a broken solve.
            if not (np.all(np.isfinite(alpha_new)) and np.all(alpha_new > 0)):
                raise CvxpyReferenceError(
                    f"ECOS (status {status!r}) returned an α with non-positive or non-finite "
                    f"entries on CCP outer iteration {iteration} (K={k}): {alpha_new}"
                    + _failure_hint(g, alpha_t)
                )
            residual = relative_residual(g, alpha_new)
            step = float(np.linalg.norm(alpha_new - alpha_t))
            alpha_t = alpha_new
            if residual < self.residual_tol or step < self.step_tol:
                break
        info.update(
            residual=residual,
            solve_time=time.perf_counter() - t0,
            converged=residual < self.residual_tol,
        )
        if not info["converged"]:
            warnings.warn(
                f"cvxpy NashMTL reference stopped with relative residual {residual:.3e} >= "
                f"residual_tol={self.residual_tol:g} after {iteration} outer iterations "
                f"(K={k}, last status {status!r}); its α is not the Nash solution to that accuracy",
                RuntimeWarning,
                stacklevel=3,
            )
        return alpha_t


def nash_weights_cvxpy(
    G: Any,
    *,
    warm_start: Any = None,
    ridge: float = 0.0,
    max_iter: int = 20,
    residual_tol: float = 1e-3,
    step_tol: float = 1e-6,
    ecos_tol: float | None = None,
    return_info: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
    """α > 0 with Gα = 1/α by the published NashMTL CCP with cvxpy + ECOS (reference only).

    One-shot form of ``NashMTLSolverReference`` (see it for the equations and stop rules):
    G is a K×K symmetric PSD Gram matrix G_ij = ⟨u_i, u_j⟩ (numpy or torch, any float dtype);
    the CCP starts from ``warm_start`` (shape (K,), >= 0; zeros restart from 1) or ones.
    Returns float64 α, not normalized, with 0 for zero tasks; with ``return_info`` returns
    ``(alpha, info)``, info holding ``iterations``, ``residual``, ``status``, ``solve_time``.

    Raises:
        ValueError: G is not a finite, symmetric, square matrix, or an option is invalid.
        CvxpyReferenceError: cvxpy or ECOS is missing, or a subproblem solve failed.
    """
    g = _as_gram(G)
    solver = NashMTLSolverReference(
        g.shape[0],
        max_iter=max_iter,
        residual_tol=residual_tol,
        step_tol=step_tol,
        ecos_tol=ecos_tol,
        ridge=ridge,
    )
    if warm_start is not None:
        solver.prev_alpha = warm_start
    alpha = solver.solve(g)
    if return_info:
        return alpha, dict(solver.last_info)
    return alpha
