"""``pub_native.RMSProp``: PUB on top of ``torch.optim.RMSprop`` (Python layer).

The per-task RMSProp update is ``RMSPropRule`` in csrc/include/pub_native/update_rules.h.
"""

from __future__ import annotations

import torch

from .._native import Algorithm
from ._pub import PUBOptimizer, pub_arguments

__all__ = ["RMSProp"]


class RMSProp(PUBOptimizer, torch.optim.RMSprop):
    r"""RMSProp with Parameter Update Balancing on the shared parameters (arXiv 2410.05806).

    Takes every argument of :class:`torch.optim.RMSprop` (``momentum``, ``centered``) plus PUB's
    keyword arguments (see :class:`pub_native.Adam`). For shared parameters:

    .. math::
        v_i = α v + (1-α) g_i^2,\quad d_i = \sqrt{v_i - a_i^2} + ε \text{ (centered, }
        a_i = α a + (1-α) g_i\text{) else } \sqrt{v_i} + ε

    u_i = lr·g_i/d_i, or with momentum μ: b_i = μ b + g_i/d_i and u_i = lr·b_i. Then α̂ from
    Gα = 1/α on G = UᵀU, θ ← θ − Σ_i α̂_i u_i, and v, a, b advance with g_α = Σ_i α̂_i g_i.
    ``umm="adatask"`` keeps all RMSProp state per task. Also exported as
    ``pub_native.RMSprop``, torch's spelling.
    """

    _ALGO = Algorithm.RMSPROP

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False, *, shared=None, update_weights_every=1, solver="newton",
                 weight_norm="sum", ridge=1e-8, umm=None, clippy_preset="paper",
                 clippy_lambda_rel=None, clippy_lambda_abs=None, absent_tasks="skip",
                 process_group="auto", shard_state=True, backend=None):
        params = self._materialize(params)
        torch.optim.RMSprop.__init__(
            self, params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
            momentum=momentum, centered=centered, capturable=capturable, foreach=foreach,
            maximize=maximize, differentiable=differentiable,
        )
        self._pub_setup(**pub_arguments(locals()))

    _NUMBER_OPTIONS = ("lr", "alpha", "eps", "weight_decay", "momentum")

    def _state_names(self, group):
        names = ["square_avg"]
        if group["centered"]:
            names.append("grad_avg")
        if group["momentum"] > 0:
            names.append("momentum_buffer")
        return names

    def _rule_flags(self, group):
        return (False, bool(group["centered"]), group["momentum"] > 0)

    def _base_row(self, group):
        return [float(group["lr"]), float(group["momentum"]), float(group["alpha"]),
                float(group["eps"]), float(group["weight_decay"]), 0.0, 0.0]

    def _initial_state_value(self, group, name):
        return 0.0
