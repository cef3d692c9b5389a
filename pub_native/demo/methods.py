"""The multi-task methods of the demo and the benchmarks, each behind one ``step``.

Demo layer: every method is a torch optimizer (Adam) plus, except for PUB, a balancer from
``pub_native.balancers``, driven by the same training loop so that only the method differs.
A step takes a loss function ``loss_fn(with_representation)`` that runs the forward pass:
MultiBalance needs the shared representation, FAMO a second (no-grad) forward after the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import balancers, optim

__all__ = ["FAMILIES", "METHODS", "Method", "MethodOptions", "check_methods"]

#: method key -> label, in the order of the tables.
METHODS = {
    "ls": "LS",
    "uncertainty": "Uncertainty",
    "famo": "FAMO",
    "nashmtl": "NashMTL",
    "mgda-ub": "MGDA-UB",
    "imtl-g": "IMTL-G",
    "pcgrad": "PCGrad",
    "cagrad": "CAGrad",
    "multibalance": "MultiBalance",
    "pub": "PUB",
    "pub+clippy": "PUB+Clippy",
    "pub+adatask": "PUB+AdaTask",
}

#: method key -> what it balances (for the plan and the README).
FAMILIES = {
    "ls": "the sum of the losses",
    "uncertainty": "loss weights (learned log-variances)",
    "famo": "loss weights (balanced log-loss decrease)",
    "nashmtl": "gradients of the shared parameters",
    "mgda-ub": "gradients of the shared parameters",
    "imtl-g": "gradients of the shared parameters",
    "pcgrad": "gradients of the shared parameters",
    "cagrad": "gradients of the shared parameters",
    "multibalance": "gradients of the shared representation",
    "pub": "parameter updates of the shared parameters",
    "pub+clippy": "parameter updates, clipped (Clippy)",
    "pub+adatask": "parameter updates, per-task Adam state (AdaTask)",
}

_PUB_UMM = {"pub": None, "pub+clippy": "clippy", "pub+adatask": "adatask"}

#: Learning rate of the balancers' own parameters (Uncertainty's log-variances), as in the
#: NashMTL/FAMO training code (``--method-params-lr 0.025``).
BALANCER_PARAM_LR = 0.025


def check_methods(methods: Sequence[str]) -> None:
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")


@dataclass
class MethodOptions:
    """What every method shares: the base optimizer's settings and the methods' options."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    update_weights_every: int = 1  # NashMTL and PUB
    clippy_preset: str = "paper"  # PUB+Clippy


class Method:
    """One method on one model: ``step(loss_fn)`` does zero_grad, backward and step.

    ``loss_fn(with_representation)`` runs the forward pass and returns the K losses, or
    ``(losses, representation)`` when asked (MultiBalance). FAMO calls it once more after the
    step, under ``torch.no_grad()``, for the losses at the new parameters (as in its published
    training loops).
    """

    def __init__(self, key: str, params, n_tasks: int, options: MethodOptions, *,
                 seed: int = 0):
        check_methods([key])
        self.key = key
        params = [p for p in params if p.requires_grad]
        hp = dict(lr=options.lr, weight_decay=options.weight_decay)
        self.balancer = None
        if key in _PUB_UMM:
            if key == "pub+clippy":
                hp["clippy_preset"] = options.clippy_preset
            self.opt = optim.Adam(params, umm=_PUB_UMM[key],
                                  update_weights_every=options.update_weights_every, **hp)
            return
        kwargs = {}
        if key == "nashmtl":
            kwargs["update_weights_every"] = options.update_weights_every
        elif key == "pcgrad":
            kwargs["seed"] = seed
        elif key in ("uncertainty", "famo"):
            kwargs["n_tasks"] = n_tasks
        self.balancer = balancers.BALANCERS[key](params, **kwargs)
        groups = [{"params": params}]
        if key == "uncertainty":
            groups.append({"params": self.balancer.parameters(), "lr": BALANCER_PARAM_LR,
                           "weight_decay": 0.0})
        self.opt = torch.optim.Adam(groups, **hp)

    def step(self, loss_fn: Callable) -> list[float]:
        """One training step; returns the K loss values (before the step)."""
        self.opt.zero_grad(set_to_none=True)
        if self.key == "multibalance":
            losses, rep = loss_fn(True)
            self.balancer.backward(losses, rep)
        else:
            losses = loss_fn(False)
            if self.balancer is None:
                self.opt.backward(losses)
            else:
                self.balancer.backward(losses)
        self.opt.step()
        if self.key == "famo":
            with torch.no_grad():
                self.balancer.update(loss_fn(False))
        return [float(loss.detach()) for loss in losses]

    @property
    def stats(self) -> dict:
        return self.balancer.stats if self.balancer is not None else self.opt.stats

    @property
    def weighs_tasks(self) -> bool:
        """Whether the method computes task weights from a Gram matrix (its solve time is
        reported): the gradient balancers, MultiBalance and PUB."""
        return self.key not in ("ls", "uncertainty", "famo")

    @property
    def weights(self) -> list[float]:
        w = self.balancer.weights if self.balancer is not None else self.opt.task_weights
        return [] if w is None else [float(x) for x in w]

    def solve_ms(self) -> float | None:
        """Time of the last weight computation (ms), or None when there was none."""
        stats = self.stats
        if not self.weighs_tasks or not stats.get("updated", False):
            return None
        return 1e3 * float(stats.get("solve_time", math.nan))
