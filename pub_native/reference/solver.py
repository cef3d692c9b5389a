"""An independent float64 solver of the Nash bargaining equation G α = 1/α (SPEC section 4),
in numpy (reference layer): damped Newton on f(α) = ½ αᵀ(G + ρ·diag G)α − Σ log α_i, written
separately from the native solver it checks.
"""

from __future__ import annotations

import numpy as np

__all__ = ["nash_weights"]


def nash_weights(G, ridge: float = 1e-8, *, max_iter: int = 100):
    """α > 0 with (G + ridge·diag G) α = 1/α on the tasks whose update is not negligible
    (√G_ii > 1e-12 max_j √G_jj); excluded tasks get 0. Returns (α, converged).

    Newton runs in the coordinates b = α·√G_ii (the equation is equivariant under this
    diagonal scaling) from b = 1, with backtracking that keeps b > 0, until a step no longer
    decreases the Newton decrement: the answer is then exact to float64 rounding.

    A G that is no Gram matrix (not positive semidefinite: f is then not convex and the
    equation may have no root or several) gives (0, False), as a non-finite G does.
    """
    G = np.asarray(G, dtype=np.float64)
    k = G.shape[0]
    diag = np.diag(G).copy()
    alpha = np.zeros(k)
    if not np.isfinite(G).all():
        return alpha, False
    if diag.max(initial=0.0) <= 0.0:
        return alpha, True  # every update is zero: every weight is 0
    norms = np.sqrt(np.maximum(diag, 0.0))
    active = np.flatnonzero(norms > 1e-12 * norms.max())
    s = norms[active]
    A = 0.5 * (G + G.T)[np.ix_(active, active)] / np.outer(s, s)
    if np.linalg.eigvalsh(A)[0] < -1e-9 * len(A):  # (A's diagonal is 1: a relative test)
        return alpha, False
    A[np.diag_indices_from(A)] *= 1.0 + ridge
    b = np.ones(len(active))

    def f(x):
        return 0.5 * x @ A @ x - np.log(x).sum()

    converged = False
    previous = np.inf
    for _ in range(max_iter):
        grad = A @ b - 1.0 / b
        H = A + np.diag(1.0 / b**2)
        d = -np.linalg.solve(H, grad)
        decrement = -(grad @ d)
        if decrement < 1e-20 * len(b) and decrement >= previous:
            converged = True  # quadratic convergence has reached the rounding floor
            break
        previous = decrement
        step = 1.0
        if decrement > 1e-6:  # far from the root: damp (self-concordance), stay positive
            while np.min(b + step * d) <= 0 and step > 1e-300:
                step *= 0.5
            while f(b + step * d) > f(b) - 0.25 * step * decrement and step > 1e-20:
                step *= 0.5
        b = b + step * d
        if not (np.isfinite(b).all() and b.min() > 0):
            return alpha, False
    alpha[active] = b / s
    return alpha, converged
