"""The two-objective toy problem of CAGrad (Liu et al., NeurIPS 2021) in the form NashMTL (Navon
et al., ICML 2022) used, and its Pareto set.

Demo layer, for ``benches/toy_pareto.py``. Parameters θ = (x1, x2); with ℓ = 5·10⁻⁶,
c1 = max(tanh(x2/2), 0) and c2 = max(tanh(−x2/2), 0):

    f1 = c1·(log max(|½(−x1 − 7) − tanh(−x2)|, ℓ) + 6)
         + c2·(((−x1 + 7)² + 0.1(−x2 − 8)²)/10 − 20)
    f2 = c1·(log max(|½(−x1 + 3) + tanh(−x2) + 2|, ℓ) + 6)
         + c2·(((−x1 − 7)² + 0.1(−x2 − 8)²)/10 − 20)

NashMTL multiplies f1 by ``scale`` = 0.1 to make the two losses differ in scale (CAGrad's
original is scale = 1). Both are bounded below by −21·scale and −21; the losses handed to the
methods here are f_i minus those bounds (FAMO's toy setting), so that they are positive —
Uncertainty weighting and FAMO take logarithms or ratios of losses, and a constant shift changes
no gradient. The Pareto set is a curve from (−7, −8.43) over (0, −8.36) to (7, −8.43), the
same for any scale.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["STARTS", "LOWER_BOUNDS", "pareto_set", "pareto_stationarity", "toy_losses",
           "toy_losses_fast"]

#: The starting points of the NashMTL/FAMO toy trainers.
STARTS = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))
#: Lower bounds of (f1 / scale, f2), subtracted from the losses.
LOWER_BOUNDS = (-21.0, -21.0)
_LOWER = 5e-6


def toy_losses(theta: torch.Tensor, scale: float = 0.1, *, shift: bool = True) -> torch.Tensor:
    """(f1, f2) at ``theta`` (shape (2,) or (N, 2)); returns shape (2,) or (N, 2).
    With ``shift``, f_i minus its lower bound (positive)."""
    x1, x2 = theta[..., 0], theta[..., 1]
    c1 = torch.clamp(torch.tanh(x2 * 0.5), min=0)
    c2 = torch.clamp(torch.tanh(-x2 * 0.5), min=0)
    f1_log = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), min=_LOWER).log() + 6
    f2_log = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), min=_LOWER).log() + 6
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f1 = (c1 * f1_log + c2 * f1_sq) * scale
    f2 = c1 * f2_log + c2 * f2_sq
    if shift:
        f1 = f1 - LOWER_BOUNDS[0] * scale
        f2 = f2 - LOWER_BOUNDS[1]
    return torch.stack([f1, f2], dim=-1)


class _ToyLosses(torch.autograd.Function):
    """(f1, f2) at one θ of shape (2,) with the Jacobian written out: one autograd node instead
    of some thirty, which is what a step of the toy benchmark spends its time on. Gradients
    follow torch's conventions at the kinks (clamp passes the gradient where the input is at
    its bound, |·| has gradient 0 at 0), so trajectories match :func:`toy_losses`."""

    @staticmethod
    def forward(ctx, theta, scale, shift):
        x1, x2 = (float(v) for v in theta.detach().tolist())
        t2, th = math.tanh(x2), math.tanh(x2 / 2)
        a1 = -0.5 * x1 - 3.5 + t2
        a2 = -0.5 * x1 + 3.5 - t2
        c1, c2 = max(th, 0.0), max(-th, 0.0)
        l1, l2 = math.log(max(abs(a1), _LOWER)) + 6, math.log(max(abs(a2), _LOWER)) + 6
        q1 = ((x1 - 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
        q2 = ((x1 + 7) ** 2 + 0.1 * (x2 + 8) ** 2) / 10 - 20
        f1 = (c1 * l1 + c2 * q1) * scale - (LOWER_BOUNDS[0] * scale if shift else 0.0)
        f2 = c1 * l2 + c2 * q2 - (LOWER_BOUNDS[1] if shift else 0.0)
        sech2, sech2_half = 1 - t2 * t2, 1 - th * th
        dc1 = 0.5 * sech2_half if th >= 0 else 0.0
        dc2 = -0.5 * sech2_half if -th >= 0 else 0.0

        def dlog(a, da1, da2):
            if abs(a) < _LOWER:
                return 0.0, 0.0
            return da1 / a, da2 / a

        dl1 = dlog(a1, -0.5, sech2)
        dl2 = dlog(a2, -0.5, -sech2)
        j = [[scale * (c1 * dl1[0] + c2 * (x1 - 7) / 5),
              scale * (dc1 * l1 + c1 * dl1[1] + dc2 * q1 + c2 * 0.02 * (x2 + 8))],
             [c1 * dl2[0] + c2 * (x1 + 7) / 5,
              dc1 * l2 + c1 * dl2[1] + dc2 * q2 + c2 * 0.02 * (x2 + 8)]]
        ctx.save_for_backward(torch.tensor(j, dtype=theta.dtype))
        return torch.tensor([f1, f2], dtype=theta.dtype)

    @staticmethod
    def backward(ctx, grad):
        (jac,) = ctx.saved_tensors
        return grad @ jac, None, None


def toy_losses_fast(theta: torch.Tensor, scale: float = 0.1, *,
                    shift: bool = True) -> torch.Tensor:
    """:func:`toy_losses` for one θ of shape (2,), with a hand-written Jacobian (same values
    and gradients, several times faster under autograd)."""
    return _ToyLosses.apply(theta, float(scale), bool(shift))


def pareto_stationarity(theta: np.ndarray, scale: float = 0.1) -> np.ndarray:
    """min over w in the simplex of ‖w ∇f1 + (1 − w) ∇f2‖ / max(‖∇f1‖, ‖∇f2‖) at each point of
    ``theta`` (N, 2): 0 exactly at Pareto-stationary points (a scale-free measure)."""
    t = torch.as_tensor(np.asarray(theta, dtype=np.float64)).reshape(-1, 2).requires_grad_(True)
    f = toy_losses(t, scale)
    g1 = torch.autograd.grad(f[:, 0].sum(), t, retain_graph=True)[0].numpy()
    g2 = torch.autograd.grad(f[:, 1].sum(), t)[0].numpy()
    d = g1 - g2
    denom = (d * d).sum(1)
    w = np.where(denom > 0, np.clip(-(g2 * d).sum(1) / np.where(denom > 0, denom, 1), 0, 1), 0.5)
    comb = w[:, None] * g1 + (1 - w[:, None]) * g2
    scale_n = np.maximum(np.linalg.norm(g1, axis=1), np.linalg.norm(g2, axis=1))
    return np.linalg.norm(comb, axis=1) / np.where(scale_n > 0, scale_n, 1.0)


def pareto_set(n: int = 201, scale: float = 0.1) -> np.ndarray:
    """Points (n, 2) of the Pareto set: for x1 on [−7, 7], the x2 in [−10, −6] where ∇f1 and
    ∇f2 are opposite (the stationarity measure is minimal), found by golden-section search."""
    x1 = np.linspace(-7.0, 7.0, n)
    inv_phi = (math.sqrt(5) - 1) / 2
    lo, hi = np.full(n, -10.0), np.full(n, -6.0)
    for _ in range(60):
        m1, m2 = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
        s = pareto_stationarity(np.concatenate([np.stack([x1, m1], 1), np.stack([x1, m2], 1)]),
                                scale)
        left = s[:n] < s[n:]
        hi = np.where(left, m2, hi)
        lo = np.where(left, lo, m1)
    return np.stack([x1, 0.5 * (lo + hi)], 1)
