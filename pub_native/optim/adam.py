"""``pub_native.Adam``: PUB on top of ``torch.optim.Adam`` (Python layer).

The per-task Adam update and the state advance are in csrc/include/pub_native/update_rules.h
(``AdamRule``); this file holds the torch-facing class.
"""

from __future__ import annotations

import inspect

import torch

from .._native import Algorithm
from ._pub import PUBOptimizer, pub_arguments

__all__ = ["Adam"]

_HAS_DECOUPLED = "decoupled_weight_decay" in inspect.signature(torch.optim.Adam.__init__).parameters


class Adam(PUBOptimizer, torch.optim.Adam):
    r"""Adam with Parameter Update Balancing on the shared parameters (arXiv 2410.05806, §IV).

    Takes every argument of :class:`torch.optim.Adam`, with the same defaults and validation,
    plus PUB's keyword arguments. For shared parameters θ, at step t with task gradients g_i
    (g_i ← g_i + wd·θ with L2 weight decay):

    .. math::
        m_i = β_1 m + (1-β_1) g_i,\quad v_i = β_2 v + (1-β_2) g_i^2,\quad
        u_i = \frac{lr}{1-β_1^t}\,\frac{m_i}{\sqrt{\hat v_i/(1-β_2^t)} + ε}

    (v̂_i = max(v_max, v_i) with ``amsgrad``), G = UᵀU, α > 0 with Gα = 1/α, α̂ = α/Σα, then
    θ ← θ − Σ_i α̂_i u_i (after θ ← θ(1 − lr·wd) with ``decoupled_weight_decay``) and the state
    advances with g_α = Σ_i α̂_i g_i. Task-specific parameters take the plain Adam step.

    Use ``opt.backward(losses)`` (K scalar losses) instead of ``loss.backward()``; after a plain
    ``loss.backward()``, ``step()`` is Adam's step (torch's to rounding; refused under
    ``umm="adatask"`` once the shared parameters have per-task state).

    Args (PUB):
        shared: the shared parameters; default: a ``"shared"`` flag of the param group, else
            the parameters that two or more task losses reach (decided on the first backward).
        update_weights_every: solve for α̂ on steps t with (t − 1) mod n = 0, reuse it otherwise.
        solver: ``"newton"`` (default) or ``"ccp"`` (the paper's procedure).
        weight_norm: ``"sum"`` (α̂ = α/Σα; one task, or K identical tasks, give plain Adam) or
            ``"none"`` (raw α, the paper's literal formula).
        ridge: ρ of the ridge ρ·diag(G) that keeps the weights finite at Pareto-stationary
            points (relative to each task's own squared update norm, SPEC section 4).
        umm: ``None``, ``"clippy"`` (clip each task update per tensor to
            λ_rel·|θ| + λ_abs) or ``"adatask"`` (per-task m_i, v_i).
        clippy_preset: ``"paper"`` (λ_rel = 0.5, λ_abs = 1e-2) or ``"tfrs"`` (0.1, 1e-7);
            ``clippy_lambda_rel`` / ``clippy_lambda_abs`` override it.
        absent_tasks: ``"skip"`` (default): a task loss without a graph (no labels for that task
            in this batch, e.g. a constant, in a list of losses) gives that task weight 0 at
            that step (the others' weights renormalized; weights solved at that step are not
            reused), its AdaTask state untouched; ``"error"``: such a loss raises.
        process_group: data parallelism (SPEC section 10): ``"auto"`` (default) finds the
            ``DistributedDataParallel`` module holding the parameters and averages the per-task
            gradients over its process group; a group: the parameters are taken as replicated
            over it; ``None``: every process trains on its own.
        shard_state: with data parallelism, shard the shared parameters' optimizer state and
            step over the processes (ZeRO-1 style, default) or replicate both.
        backend: ``"native"`` (default: the C++ core, CPU or CUDA by the parameters' device) or
            ``"reference"`` (the plain-PyTorch reference, float64 math, for checking); the
            environment variable ``PUB_NATIVE_BACKEND`` sets the default.

    Every parameter is stepped by the native kernels, task-specific ones as the plain base
    step (K = 1); 16-bit parameters keep float32 state and math. ``foreach`` and ``fused``
    are accepted and validated as torch does, and change nothing (the native step is fused).
    """

    _ALGO = Algorithm.ADAM

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 shared=None, update_weights_every=1, solver="newton", weight_norm="sum",
                 ridge=1e-8, umm=None, clippy_preset="paper", clippy_lambda_rel=None,
                 clippy_lambda_abs=None, absent_tasks="skip", process_group="auto",
                 shard_state=True, backend=None):
        params = self._materialize(params)
        kwargs = dict(foreach=foreach, maximize=maximize, capturable=capturable,
                      differentiable=differentiable, fused=fused)
        if _HAS_DECOUPLED:
            kwargs["decoupled_weight_decay"] = decoupled_weight_decay
        torch.optim.Adam.__init__(self, params, lr=lr, betas=betas, eps=eps,
                                  weight_decay=weight_decay, amsgrad=amsgrad, **kwargs)
        if not _HAS_DECOUPLED:
            # torch < 2.6: its Adam has no such option, the native step does (AdamW's decay).
            # It is kept in the defaults and the groups, as newer torch keeps it, so that
            # add_param_group and checkpoints carry it.
            self.defaults["decoupled_weight_decay"] = decoupled_weight_decay
            for group in self.param_groups:
                group.setdefault("decoupled_weight_decay", decoupled_weight_decay)
        self._pub_setup(**pub_arguments(locals()))

    _NUMBER_OPTIONS = ("lr", "eps", "weight_decay")
    _PAIR_OPTIONS = ("betas",)

    def _state_names(self, group):
        names = ["exp_avg", "exp_avg_sq"]
        if group["amsgrad"]:
            names.append("max_exp_avg_sq")
        return names

    def _rule_flags(self, group):
        return (bool(group["amsgrad"]), False, False)

    def _base_row(self, group):
        beta1, beta2 = (float(b) for b in group["betas"])
        return [float(group["lr"]), beta1, beta2, float(group["eps"]),
                float(group["weight_decay"]), float(bool(group.get("decoupled_weight_decay"))),
                0.0]

    def _initial_state_value(self, group, name):
        return 0.0
