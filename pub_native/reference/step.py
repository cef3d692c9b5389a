"""The PUB step in plain PyTorch, float64, written from SPEC sections 3-5 and 7 (reference layer).

:func:`pub_step` takes the same checked plan as the native backends and does the whole step with
the per-element rules of :mod:`.rules` and the independent solver of :mod:`.solver`: it
materializes the K task updates of every shared tensor (which the native core never does) and
decides skip / solve / apply by the SPEC's rules on its own. :class:`ReferenceBackend` gives it
the backends' interface, so that ``pub_native.Adam(..., backend="reference")`` runs the product's
shell (options, detection, state, checkpoints) on this math.
"""

from __future__ import annotations

import math
import time
from math import isfinite as math_isfinite

import numpy as np
import torch

from .._native import Algorithm, BaseCol, SegmentKind, SolveStatus, StepOutcome, Umm
from .rules import RULES, clippy_scale
from .solver import nash_weights

__all__ = ["ReferenceBackend", "pub_step"]

F64 = torch.float64
_RULE_OF = {Algorithm.ADAM: "adam", Algorithm.ADAGRAD: "adagrad", Algorithm.RMSPROP: "rmsprop"}


def _constants(seg, base_row) -> dict:
    """A param group's constants as the rules read them."""
    b = base_row
    return {
        "lr": b[BaseCol.LR], "beta1": b[BaseCol.BETA1], "beta2": b[BaseCol.BETA2],
        "eps": b[BaseCol.EPS], "lr_decay": b[BaseCol.LR_DECAY], "alpha": b[BaseCol.BETA2],
        "momentum": b[BaseCol.BETA1] if seg.momentum else 0.0, "amsgrad": seg.amsgrad,
        "centered": seg.centered,
    }


def _decay(seg, base_row) -> tuple[float, float]:
    """(L2 weight decay added to every gradient, decoupled decay factor of θ)."""
    wd = base_row[BaseCol.WEIGHT_DECAY]
    if seg.algo == Algorithm.ADAM and base_row[BaseCol.DECOUPLED]:
        return 0.0, 1.0 - base_row[BaseCol.LR] * wd
    return wd, 1.0


def _task_sum(x: torch.Tensor) -> torch.Tensor:
    """Σ over the tasks (dim 0) from −0, as the kernels sum: −0 adds nothing to any term, so one
    task's −0 stays −0 (torch's sum starts from +0)."""
    total = torch.full_like(x[0], -0.0)
    for term in x:
        total = total + term
    return total


class _Row:
    """One tensor of a segment, in float64: θ, its K effective gradients and its state."""

    def __init__(self, seg, r, base, multipliers):
        self.param = seg.params[r]
        self.theta = self.param.detach().to(F64)
        row = base[seg.groups[r]]
        self.c = _constants(seg, row)
        self.t = float(seg.steps[r]) + 1.0
        l2, self.decay = _decay(seg, row)
        sign = -1.0 if seg.maximize else 1.0
        g = seg.grads[r].detach().to(F64)
        if seg.kind == SegmentKind.PLAIN:
            g = g.unsqueeze(0)  # a plain step's one "task"
        mult = torch.as_tensor(multipliers, dtype=F64).view(-1, *([1] * self.theta.dim()))
        self.raw = g * mult * sign  # non-finite inputs show here
        # torch adds the L2 term only for wd ≠ 0 (0·Inf would make an infinite θ's gradient NaN)
        self.g = self.raw + l2 * self.theta if l2 != 0.0 else self.raw
        self.names = seg.state_names[r]
        self.targets = seg.states[r]
        self.step = seg.steps[r]
        self.state = {n: t.detach().to(F64) for n, t in zip(self.names, seg.states[r])}


# How far (relative, 2-norm) a rescaled .grad may be from c·s and still count as a rescaling.
_RESCALE_TOL = {torch.bfloat16: 1.0 / 128.0, torch.float16: 1.0 / 512.0}


def _rescaling(task_grads: torch.Tensor, grad: torch.Tensor) -> tuple[float, bool]:
    """(c, edited): the factor c with .grad ≈ c·s, where s = Σ_i g_i is what backward left in
    .grad (summed in task order in the math type, rounded once to the gradient's type), and
    whether .grad is not a multiple of s within the tolerance of its type."""
    acc = torch.float32 if task_grads.dtype in _RESCALE_TOL else task_grads.dtype
    s = task_grads[0].to(acc)
    for g in task_grads[1:]:
        s = s + g.to(acc)
    s = s.to(task_grads.dtype).to(F64).reshape(-1)
    m = grad.detach().to(F64).reshape(-1)
    ms, ss, mm = float(m @ s), float(s @ s), float(m @ m)
    if not ss > 0.0:  # s = 0: only m = 0 is a rescaling of it, by any factor (NaN: none shown)
        return (1.0, True) if mm != 0.0 else (math.nan, False)
    c = ms / ss
    tol = _RESCALE_TOL.get(task_grads.dtype, 1e-6)
    return c, not (mm - c * ms <= tol * tol * mm) or not math_isfinite(c)


def _segment_rescalings(seg) -> list[tuple[float, bool] | None]:
    """_rescaling of each shared row that names its .grad, where a row whose task gradients
    cancel (s = 0, .grad still 0) takes the factor the segment's other rows share (to the
    tolerance of the type), as GradScaler.unscale_ and clip_grad_norm_ scale every .grad alike;
    1 when they disagree or none shows one."""
    found = [None if m is None else _rescaling(g, m) for g, m in zip(seg.grads, seg.grad_sums)]
    shown = [c for f in found if f is not None for c, edited in [f]
             if not edited and not math.isnan(c)]
    tol = _RESCALE_TOL.get(seg.dtype, 1e-6)
    fill = shown[0] if shown and all(abs(c - shown[0]) <= tol * abs(shown[0])
                                     for c in shown) else 1.0
    return [f if f is None or not math.isnan(f[0]) else (fill, False) for f in found]


def pub_step(plan, *, solve: bool, options, weights, inv_scale: float = 1.0,
             task_scale=None, found: bool = False):
    """One step on ``plan`` (see ``pub_native.optim._plan``). ``weights``: α̂ in use (None
    before the first solve). Returns (outcome, weights, info); writes parameters, state and
    step counters only when the outcome is APPLIED."""
    k = plan.k
    multipliers = np.full(k, inv_scale) if task_scale is None else inv_scale * np.asarray(
        task_scale, dtype=np.float64)
    # A task absent from this batch (task_scale 0) takes no part in G and gets weight 0.
    present = torch.ones(k, dtype=torch.bool) if task_scale is None else torch.as_tensor(
        np.asarray(task_scale) != 0)
    rows = []
    G = torch.zeros(k, k, dtype=F64)
    bad_tasks = torch.zeros(k, dtype=torch.bool)
    bad_params = []
    edited_params = []  # shared parameters whose .grad was changed otherwise than rescaled
    any_gram = False
    for seg in plan.segments:
        rule = RULES[_RULE_OF[seg.algo]]
        shared = seg.kind == SegmentKind.SHARED
        rescalings = _segment_rescalings(seg) if shared else None
        for r in range(len(seg.params)):
            row_multipliers = multipliers if shared else [inv_scale]
            if shared and seg.grad_sums[r] is not None:
                ratio, edited = rescalings[r]
                if edited:
                    edited_params.append(seg.params[r])
                row_multipliers = multipliers * ratio
            row = _Row(seg, r, plan.base, row_multipliers)
            finite = torch.isfinite(row.raw.reshape(row.raw.shape[0], -1)).all(dim=1)
            if shared:
                bad_tasks |= ~finite
            elif not bool(finite.all()):
                bad_params.append(row.param)
            row.u, _ = rule(row.g, row.state, row.c, row.t)
            row.sigma = torch.ones(row.u.shape[0], dtype=F64)
            if shared and seg.umm == Umm.CLIPPY:
                row.sigma = clippy_scale(row.u, row.theta, *seg.clippy)
            if shared and (solve or seg.umm == Umm.CLIPPY):
                U = (row.u * row.sigma.view(-1, *([1] * row.theta.dim()))).reshape(k, -1)
                G += U @ U.T
                any_gram = True
            rows.append((seg, row, rule))
    G = G * (present[:, None] & present[None, :])
    grad_bad = bool(bad_tasks.any()) or bool(bad_params)
    info = {"bad_tasks": torch.nonzero(bad_tasks).flatten().tolist(), "bad_params": bad_params,
            "stats": {}}
    if found:
        return StepOutcome.SKIPPED_FOUND_INF, weights, info
    if grad_bad:
        return StepOutcome.NONFINITE_GRAD, weights, info
    if edited_params:
        info["bad_params"] = edited_params
        return StepOutcome.GRAD_EDITED, weights, info
    if any_gram and not bool(torch.isfinite(G).all()):
        return StepOutcome.NONFINITE_UPDATE, weights, info

    if solve:
        t0 = time.perf_counter()
        alpha, converged = nash_weights(G.numpy(), options.ridge)
        elapsed = time.perf_counter() - t0
        total = alpha.sum()
        if total > 0 and np.isfinite(total):
            weights = alpha / total if options.weight_norm == "sum" else alpha
            status = SolveStatus.CONVERGED if converged else SolveStatus.MAX_ITER
        else:
            weights = np.full(k, 1.0 / k)
            status = SolveStatus.ALL_ZERO
        Gr = G.numpy() + options.ridge * np.diag(np.diag(G.numpy()))
        on = alpha > 0
        residual = (np.linalg.norm((Gr @ alpha - np.where(on, 1 / np.where(on, alpha, 1), 0))[on])
                    / np.linalg.norm(1 / alpha[on])) if on.any() else 0.0
        info["stats"] = {"status": status, "iterations": 0, "residual": float(residual),
                         "solve_time": elapsed, "alpha": alpha}
    if any(seg.kind == SegmentKind.SHARED for seg in plan.segments):
        w = torch.as_tensor(weights, dtype=F64) * present
        if options.weight_norm == "sum" and w.sum() > 0:
            w = w / w.sum()
        info["applied"] = w.numpy().copy()

    for seg, row, rule in rows:
        shape = [1] * row.theta.dim()
        # θ as it is now, not as it was read above: two parameters over one storage (weights
        # tied as nn.Parameter(other.data)) take both updates, as in torch and the native step.
        row.theta = row.param.detach().to(F64)
        if seg.kind == SegmentKind.SHARED:
            c = (w * row.sigma).view(-1, *shape)
            theta = row.theta * row.decay - _task_sum(c * row.u)
            if seg.umm == Umm.ADATASK:
                _, advanced = rule(row.g, row.state, row.c, row.t)
                keep = present.view(-1, *shape)
                new_state = {n: torch.where(keep, v, row.state[n]) for n, v in advanced.items()}
            else:
                g_alpha = _task_sum(w.view(-1, *shape) * row.g)
                _, new_state = rule(g_alpha, row.state, row.c, row.t)
        else:
            theta = row.theta * row.decay - row.u[0]
            _, new_state = rule(row.g[0], row.state, row.c, row.t)
        row.param.detach().copy_(theta)
        for name, target in zip(row.names, row.targets):
            target.copy_(new_state[name])
        row.step.add_(1.0)
    return StepOutcome.APPLIED, weights, info


class ReferenceBackend:
    """:func:`pub_step` behind the backends' interface (see ``pub_native.optim._backends``)."""

    def __init__(self, k: int, device: torch.device):
        self.k = k
        self.device = device
        self._weights = None
        self._alpha = None
        self._applied = None

    def applied_weights(self):
        return None if self._applied is None else np.array(self._applied)

    def get_weights(self):
        return (None if self._weights is None else np.array(self._weights),
                None if self._alpha is None else np.array(self._alpha))

    def set_weights(self, weights, alpha, applied=None) -> None:
        self._applied = None if applied is None and weights is None else np.array(
            applied if applied is not None else weights, dtype=np.float64)
        self._weights = None if weights is None else np.array(weights, dtype=np.float64)
        self._alpha = None if alpha is None else np.array(alpha, dtype=np.float64)

    def step(self, plan, *, solve, options, grad_scale=None, found_inf=None, task_scale=None,
             between=None):
        from ..optim._backends import StepResult

        inv_scale = 1.0 if grad_scale is None else 1.0 / float(grad_scale)
        found = found_inf is not None and bool(found_inf)
        outcome, weights, info = pub_step(plan, solve=solve, options=options,
                                          weights=self._weights, inv_scale=inv_scale,
                                          task_scale=task_scale, found=found)
        if outcome == StepOutcome.APPLIED:
            self._weights = weights
            self._applied = info.get("applied", self._applied)
            if solve and info["stats"]["status"] != SolveStatus.ALL_ZERO:
                self._alpha = info["stats"].pop("alpha")
            info["stats"].pop("alpha", None)
        return StepResult(outcome, solve, info["stats"], info["bad_tasks"], info["bad_params"])
