"""Gram-matrix families for the solver tests: each returns a float64 (K, K) PSD matrix G = U Uᵀ
(or its ridge-needing limit) from a numpy Generator."""

from __future__ import annotations

import numpy as np


def random_gram(rng, K, P=None):
    U = rng.standard_normal((K, P or K + 8))
    return U @ U.T


def scaled_gram(rng, K, decades=6):
    """Tasks whose update norms span `decades` orders of magnitude."""
    U = rng.standard_normal((K, K + 8)) * 10.0 ** rng.uniform(-decades / 2, decades / 2, (K, 1))
    return U @ U.T


def ill_conditioned_gram(rng, K, cond=1e8):
    """Eigenvalues log-spaced over `cond` (exactly `cond` for K >= 2)."""
    Q, _ = np.linalg.qr(rng.standard_normal((K, K)))
    lam = np.logspace(0, -np.log10(cond), K) if K > 1 else np.ones(1)
    G = (Q * lam) @ Q.T
    return 0.5 * (G + G.T)


def near_duplicate_gram(rng, K):
    """Two tasks whose updates differ by 1e-6 relative."""
    U = rng.standard_normal((K, K + 8))
    if K >= 2:
        U[1] = U[0] + 1e-6 * rng.standard_normal(U.shape[1])
    return U @ U.T


def opposing_gram(rng, K):
    """Task 1 = −task 0 plus 1e-7 noise: a zero non-negative combination, the ridge path."""
    U = rng.standard_normal((K, K + 8))
    if K >= 2:
        U[1] = -U[0] + 1e-7 * rng.standard_normal(U.shape[1])
    return U @ U.T


def zero_task_gram(rng, K):
    """Task 0 has a zero update."""
    U = rng.standard_normal((K, K + 8))
    U[0] = 0.0
    return U @ U.T


FAMILIES = {
    "random": random_gram,
    "scaled": scaled_gram,
    "ill_conditioned": ill_conditioned_gram,
    "near_duplicate": near_duplicate_gram,
    "opposing": opposing_gram,
    "zero_task": zero_task_gram,
}
