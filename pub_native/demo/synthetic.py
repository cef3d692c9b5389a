"""The synthetic two-task regression data of the MMoE paper (Ma et al., "Modeling Task
Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018, section 4.1)
and the shared-bottom and MMoE regressors it compares.

Demo layer, for ``benches/bench_mtl_synthetic.py``. The task relatedness is set by the cosine
similarity ρ of the two tasks' weight vectors:

    u_1 ⊥ u_2 unit vectors in R^d;  w_1 = c·u_1,  w_2 = c·(ρ u_1 + √(1 − ρ²) u_2);
    x ~ N(0, I_d);  y_k = w_kᵀx + Σ_{i=1}^{m} sin(α_i w_kᵀx + β_i) + ε_k,  ε_k ~ N(0, σ²).

The paper uses d = 100 and does not give the values of c, m, α, β and σ. Defaults here: c = 1,
m = 10, α_i and β_i drawn from N(0, 1) once per data set (from ``seed``), σ = 0.1 (ε ~ N(0,
0.01) read as a variance). With N(0, 1) the sinusoids have about the frequency of the linear
part, so a small network can learn them and what is left is the task relation; the fixed
frequencies α_i = i of Google Research's public generator (``alphas="google"``) make most of
the label variance a sum of sines up to 10 times faster, which these models cannot fit.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MMoERegressor", "RegressionBatch", "SharedBottomRegressor", "SyntheticTasks",
           "make_tasks", "REGRESSORS"]


class RegressionBatch(NamedTuple):
    x: torch.Tensor  # (B, d)
    y: torch.Tensor  # (B, K)


class SyntheticTasks(NamedTuple):
    """Train, validation and test parts of one synthetic data set, with the weight vectors."""

    train: RegressionBatch
    validation: RegressionBatch
    test: RegressionBatch
    weights: np.ndarray  # (2, d): w_1, w_2
    rho: float


def make_tasks(rho: float, *, n_train: int = 10000, n_val: int = 2000, n_test: int = 5000,
               dim: int = 100, c: float = 1.0, m: int = 10, noise_std: float = 0.1,
               alphas: str = "normal", seed: int = 0) -> SyntheticTasks:
    """Two regression tasks whose weight vectors have cosine similarity ``rho``; a fresh draw of
    u_1, u_2, α, β and the data for every ``seed``. ``alphas``: ``"normal"`` (α_i, β_i ~ N(0, 1))
    or ``"google"`` (α_i = i, β_i = (i − 1)²)."""
    if not -1.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [-1, 1], got {rho!r}")
    if dim < 2:
        raise ValueError(f"dim must be at least 2, got {dim!r}")
    if alphas not in ("normal", "google"):
        raise ValueError(f"alphas must be 'normal' or 'google', got {alphas!r}")
    rng = np.random.default_rng(seed)
    # Two orthonormal vectors: QR of a Gaussian d×2 matrix.
    q, _ = np.linalg.qr(rng.normal(size=(dim, 2)))
    u1, u2 = q[:, 0], q[:, 1]
    w = np.stack([c * u1, c * (rho * u1 + math.sqrt(max(1.0 - rho * rho, 0.0)) * u2)])
    if alphas == "normal":
        a, b = rng.normal(size=m), rng.normal(size=m)
    else:
        a, b = np.arange(1, m + 1, dtype=np.float64), np.arange(m, dtype=np.float64) ** 2

    def draw(n):
        x = rng.normal(size=(n, dim))
        t = x @ w.T  # (n, 2)
        y = t + np.sin(a * t[..., None] + b).sum(-1) + rng.normal(scale=noise_std, size=t.shape)
        return RegressionBatch(torch.from_numpy(x).float(), torch.from_numpy(y).float())

    return SyntheticTasks(draw(n_train), draw(n_val), draw(n_test), w, float(rho))


class _Regressor(nn.Module):
    n_tasks = 2

    def representation_and_outputs(self, x: torch.Tensor) -> tuple:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.representation_and_outputs(x)[1], dim=1)

    def task_losses(self, batch: RegressionBatch, *, with_representation: bool = False):
        """Mean squared error of each task; with ``with_representation``, ``(losses, z)``."""
        z, outputs = self.representation_and_outputs(batch.x)
        losses = [F.mse_loss(out, batch.y[:, k]) for k, out in enumerate(outputs)]
        return (losses, z) if with_representation else losses


def _tower(in_dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class SharedBottomRegressor(_Regressor):
    """Shared bottom ReLU(W x + b) of ``hidden`` units, then a tower (``tower`` units) per task.
    Representation z: the bottom's output."""

    def __init__(self, dim: int = 100, hidden: int = 128, tower: int = 8, n_tasks: int = 2):
        super().__init__()
        self.n_tasks = n_tasks
        self.bottom = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.towers = nn.ModuleList(_tower(hidden, tower) for _ in range(n_tasks))

    def representation_and_outputs(self, x):
        z = self.bottom(x)
        return z, [t(z).squeeze(1) for t in self.towers]


class MMoERegressor(_Regressor):
    """MMoE as in the paper's synthetic experiment: ``n_experts`` single-layer ReLU experts of
    ``expert_dim`` units, a softmax gate per task on the input, a tower per task. Representation
    z: the experts' outputs (the gates read the input data, which carries no gradient)."""

    def __init__(self, dim: int = 100, n_experts: int = 8, expert_dim: int = 16, tower: int = 8,
                 n_tasks: int = 2):
        super().__init__()
        self.n_tasks = n_tasks
        self.n_experts, self.expert_dim = n_experts, expert_dim
        self.experts = nn.Linear(dim, n_experts * expert_dim)
        self.gates = nn.ModuleList(nn.Linear(dim, n_experts) for _ in range(n_tasks))
        self.towers = nn.ModuleList(_tower(expert_dim, tower) for _ in range(n_tasks))

    def representation_and_outputs(self, x):
        e = F.relu(self.experts(x)).view(x.shape[0], self.n_experts, self.expert_dim)
        outs = []
        for gate, tower in zip(self.gates, self.towers, strict=True):
            g = torch.softmax(gate(x), dim=1)
            outs.append(tower((g.unsqueeze(2) * e).sum(1)).squeeze(1))
        return e, outs


REGRESSORS = {"shared-bottom": SharedBottomRegressor, "mmoe": MMoERegressor}
