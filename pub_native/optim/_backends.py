"""Backends of the PUB step (Python layer): one small interface, implemented by the native CPU
core, the native CUDA core and the plain-PyTorch reference (``pub_native.reference.step``).

    result = backend.step(plan, solve=..., options=..., grad_scale=..., found_inf=...,
                          task_scale=..., between=...)

A backend takes a checked :class:`~pub_native.optim._plan.StepPlan` and does the whole step in
one call: the Gram phase, the decision (skip or apply), the weight solve on solve steps, the
apply phase and the step counters. Between the Gram phase and the rest it calls ``between()``
when given: data parallelism sums phase 1's outputs over the processes there, through
``gram_summary()`` / ``set_gram_summary()`` (G, the task gradient norms, and the flags that
decide the step). The result is read lazily: on CUDA nothing is copied to the host until a field
is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._native import _C, SegmentKind, SolveStatus, StepOutcome
from ..solver import METHODS
from ._plan import DTYPES, PlanSegment, StepPlan

__all__ = ["CpuBackend", "StepResult", "solver_args"]


def solver_args(options) -> tuple[int, float, float, int]:
    """(method code, ridge, tol, max_iter) of the options' solver."""
    code, tol, max_iter = METHODS[options.solver]
    return code, options.ridge, tol, max_iter


@dataclass
class StepResult:
    """What one step did (host values)."""

    outcome: StepOutcome
    solved: bool  # a weight-update step (the solve ran)
    stats: dict[str, Any] = field(default_factory=dict)
    bad_tasks: list[int] = field(default_factory=list)
    bad_params: list[torch.Tensor] = field(default_factory=list)


def flagged_params(plan: StepPlan, flags_of_segment, kind: SegmentKind) -> list[torch.Tensor]:
    """The parameters of the segments of one kind whose per-tensor flag is set."""
    out = []
    for s, seg in enumerate(plan.segments):
        if seg.kind != kind:
            continue
        flags = flags_of_segment(s)
        out.extend(p for p, bad in zip(seg.params, flags) if bad)
    return out


class CpuBackend:
    """The native CPU core (``_C.Stepper``): both phases of the step in C++."""

    def __init__(self, k: int, device: torch.device | None = None):
        self._stepper = _C.Stepper(k)
        self._configs: dict[tuple, Any] = {}
        self.device = torch.device("cpu") if device is None else device
        self._applied = False  # a step on shared parameters was applied since set_weights
        self._applied_seed = None  # what set_weights gave (α̂, or the applied weights)

    @property
    def k(self) -> int:
        return self._stepper.num_tasks

    def _config(self, seg: PlanSegment):
        key = seg.key
        cfg = self._configs.get(key)
        if cfg is None:
            cfg = self._configs[key] = _C.StepConfig(
                int(seg.algo), seg.amsgrad, seg.centered, seg.momentum, int(seg.umm),
                int(DTYPES[seg.dtype]), int(seg.kind), seg.k, seg.grad_stride,
                -1.0 if seg.maximize else 1.0, seg.clippy[0], seg.clippy[1], seg.has_l2)
        return cfg

    # α̂ in use and the warm start, for checkpoints.
    def get_weights(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        st = self._stepper
        return (st.weights if st.has_weights else None, st.alpha if st.has_alpha else None)

    def applied_weights(self) -> np.ndarray | None:
        """The weights the last applied step used (α̂ with absent tasks at 0); before any, what
        set_weights gave; None before both."""
        return self._stepper.applied if self._applied else self._applied_seed

    def set_weights(self, weights, alpha, applied=None) -> None:
        self._applied = False
        self._applied_seed = applied if applied is not None else weights
        st = self._stepper
        st.has_weights = weights is not None
        st.has_alpha = alpha is not None
        st.weights = weights if weights is not None else np.full(st.num_tasks, 1 / st.num_tasks)
        st.alpha = alpha if alpha is not None else np.zeros(st.num_tasks)

    def gram_summary(self) -> torch.Tensor:
        st = self._stepper
        flags = [st.grad_nonfinite, st.grad_edited, st.update_nonfinite]
        return torch.from_numpy(np.concatenate([
            st.G.ravel(), st.task_sq, st.bad_task.astype(np.float64),
            np.array(flags, dtype=np.float64)]))

    def set_gram_summary(self, summary: torch.Tensor) -> None:
        st, k = self._stepper, self._stepper.num_tasks
        v = summary.numpy()
        st.G = v[:k * k].reshape(k, k)
        st.task_sq = v[k * k:k * k + k]
        st.set_bad_task((v[k * k + k:k * k + 2 * k] > 0).astype(np.uint8))
        st.grad_nonfinite, st.grad_edited, st.update_nonfinite = (bool(x > 0) for x in v[-3:])

    def step(self, plan: StepPlan, *, solve: bool, options, grad_scale=None, found_inf=None,
             task_scale: np.ndarray | None = None, between=None) -> StepResult:
        st = self._stepper
        # GradScaler's tensors live on the CPU here: reading them costs no synchronization.
        inv_scale = 1.0 if grad_scale is None else 1.0 / float(grad_scale)
        found = found_inf is not None and bool(found_inf)
        segs = [(self._config(seg), seg.table) for seg in plan.segments]
        st.gram(segs, plan.base, solve, inv_scale, task_scale, plan.shared_finite)
        if between is not None:
            between()
        code, ridge, tol, max_iter = solver_args(options)
        outcome = StepOutcome(st.finish(segs, plan.base, solve, code, ridge, tol, max_iter,
                                        options.weight_norm == "sum", found))
        result = StepResult(outcome, solve)
        if outcome == StepOutcome.APPLIED and plan.has_shared:
            self._applied = True
        if outcome == StepOutcome.APPLIED and solve:
            result.stats = {"status": SolveStatus(st.status), "iterations": st.iterations,
                            "residual": st.residual, "solve_time": st.solve_time,
                            "task_grad_norms": torch.from_numpy(np.sqrt(st.task_sq))}
        elif outcome in (StepOutcome.NONFINITE_GRAD, StepOutcome.NONFINITE_UPDATE):
            result.bad_tasks = np.flatnonzero(st.bad_task).tolist()
            result.bad_params = flagged_params(plan, st.bad_tensors, SegmentKind.PLAIN)
        elif outcome == StepOutcome.GRAD_EDITED:
            result.bad_params = flagged_params(plan, st.edited_tensors, SegmentKind.SHARED)
        return result
