"""``pub_native.AdaGrad``: PUB on top of ``torch.optim.Adagrad`` (Python layer).

The per-task AdaGrad update is ``AdaGradRule`` in csrc/include/pub_native/update_rules.h.
"""

from __future__ import annotations

import torch

from .._native import Algorithm
from ._pub import PUBOptimizer, pub_arguments

__all__ = ["AdaGrad"]


class AdaGrad(PUBOptimizer, torch.optim.Adagrad):
    r"""AdaGrad with Parameter Update Balancing on the shared parameters (arXiv 2410.05806).

    Takes every argument of :class:`torch.optim.Adagrad` plus PUB's keyword arguments (see
    :class:`pub_native.Adam`). For shared parameters, at step t:

    .. math::
        s_i = s + g_i^2,\quad clr = \frac{lr}{1 + (t-1)\,lr\_decay},\quad
        u_i = clr\,\frac{g_i}{\sqrt{s_i} + ε}

    then α̂ from Gα = 1/α on G = UᵀU, θ ← θ − Σ_i α̂_i u_i and s ← s + g_α² with
    g_α = Σ_i α̂_i g_i. ``umm="adatask"`` keeps one s_i per task. ``sum`` is float32 for 16-bit
    parameters (torch makes it in the parameter's dtype at construction; it is converted once).
    Also exported as ``pub_native.Adagrad``, torch's spelling.
    """

    _ALGO = Algorithm.ADAGRAD

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
                 eps=1e-10, foreach=None, *, maximize=False, differentiable=False, fused=None,
                 shared=None, update_weights_every=1, solver="newton", weight_norm="sum",
                 ridge=1e-8, umm=None, clippy_preset="paper", clippy_lambda_rel=None,
                 clippy_lambda_abs=None, absent_tasks="skip", process_group="auto",
                 shard_state=True, backend=None):
        params = self._materialize(params)
        torch.optim.Adagrad.__init__(
            self, params, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value, eps=eps, foreach=foreach,
            maximize=maximize, differentiable=differentiable, fused=fused,
        )
        self._pub_setup(**pub_arguments(locals()))

    _NUMBER_OPTIONS = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")

    def _state_names(self, group):
        return ["sum"]

    def _initial_state_value(self, group, name):
        # The constructor's value, in every group, as torch's Adagrad starts `sum` (at
        # construction for the groups given, at the first step for a group added later): a
        # group's own initial_accumulator_value is kept in the group and used by neither.
        return float(self.defaults["initial_accumulator_value"])

    def _rule_flags(self, group):
        return (False, False, False)

    def _base_row(self, group):
        return [float(group["lr"]), 0.0, 0.0, float(group["eps"]),
                float(group["weight_decay"]), 0.0, float(group["lr_decay"])]
