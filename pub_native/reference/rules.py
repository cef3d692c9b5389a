"""The per-element update rules of the base optimizers, written straight from SPEC section 3 in
plain PyTorch (reference layer). Each rule is pure: it returns (u, new_state) for a gradient g
and never writes into ``state``; g may carry a leading task dimension K, against which the
state broadcasts (one shared state: u_i for every task at once) or which the state carries too
(AdaTask's per-task state). Hyper-parameters come as a param group's constants; the bias
corrections are computed here from the step number t, independently of the native header.
"""

from __future__ import annotations

import math

import torch

__all__ = ["adagrad_rule", "adam_rule", "clippy_scale", "rmsprop_rule", "RULES"]


def adam_rule(g, state, c, t):
    """torch.optim.Adam: m' = β1 m + (1−β1) g, v' = β2 v + (1−β2) g²,
    u = lr/(1−β1^t) · m' / (sqrt(v̂)/sqrt(1−β2^t) + ε), v̂ = max(v_max, v') with amsgrad."""
    beta1, beta2 = c["beta1"], c["beta2"]
    bias_correction1 = 1.0 - beta1**t
    bias_correction2 = 1.0 - beta2**t
    exp_avg = beta1 * state["exp_avg"] + (1.0 - beta1) * g
    exp_avg_sq = beta2 * state["exp_avg_sq"] + (1.0 - beta2) * g * g
    new_state = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if c["amsgrad"]:
        exp_avg_sq = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq)
        new_state["max_exp_avg_sq"] = exp_avg_sq
    denom = exp_avg_sq.sqrt() / math.sqrt(bias_correction2) + c["eps"]
    return (c["lr"] / bias_correction1) * (exp_avg / denom), new_state


def adagrad_rule(g, state, c, t):
    """torch.optim.Adagrad: s' = s + g², u = lr/(1 + (t−1)·lr_decay) · g / (sqrt(s') + ε)."""
    clr = c["lr"] / (1.0 + (t - 1.0) * c["lr_decay"])
    state_sum = state["sum"] + g * g
    return clr * (g / (state_sum.sqrt() + c["eps"])), {"sum": state_sum}


def rmsprop_rule(g, state, c, t):
    """torch.optim.RMSprop: v' = α v + (1−α) g²; centered: a' = α a + (1−α) g and
    denom = sqrt(v' − a'²) + ε, else sqrt(v') + ε; u = lr·g/denom, or with momentum μ:
    b' = μ b + g/denom, u = lr·b'."""
    alpha = c["alpha"]
    square_avg = alpha * state["square_avg"] + (1.0 - alpha) * g * g
    new_state = {"square_avg": square_avg}
    if c["centered"]:
        grad_avg = alpha * state["grad_avg"] + (1.0 - alpha) * g
        new_state["grad_avg"] = grad_avg
        denom = (square_avg - grad_avg * grad_avg).sqrt() + c["eps"]
    else:
        denom = square_avg.sqrt() + c["eps"]
    if c["momentum"] > 0:
        buf = c["momentum"] * state["momentum_buffer"] + g / denom
        new_state["momentum_buffer"] = buf
        return c["lr"] * buf, new_state
    return c["lr"] * (g / denom), new_state


def clippy_scale(u, theta, lambda_rel, lambda_abs):
    """Clippy (SPEC section 5) for one tensor: σ_i = min(1, min_j (λ_rel|θ_j| + λ_abs)/|u_ij|)
    over the coordinates with u_ij ≠ 0; u is (K, *theta.shape). Returns σ (K,)."""
    # λ_abs alone for λ_rel = 0, also where θ is infinite or NaN (0·Inf would be NaN).
    bound = lambda_rel * theta.abs() + lambda_abs if lambda_rel != 0 else \
        torch.full_like(theta, lambda_abs)
    # A NaN parameter bounds nothing (as the native kernels have it, and as torch steps around
    # it); a NaN in u propagates, and the Gram's finiteness check sees it anyway.
    ratio = torch.where((u != 0) & ~bound.isnan(), bound / u.abs(), torch.full_like(u, math.inf))
    # The column of ones is the "min(1, ·)" and keeps empty tensors well defined.
    ratio = torch.cat([ratio.reshape(u.shape[0], -1), ratio.new_ones(u.shape[0], 1)], dim=1)
    return ratio.amin(dim=1)


#: rule per base optimizer name.
RULES = {"adam": adam_rule, "adagrad": adagrad_rule, "rmsprop": rmsprop_rule}
