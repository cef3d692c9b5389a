"""The CUDA backend of the PUB step (Python layer): device buffers and the two native calls.

Everything stays on the device and on torch's current stream: the tables of addresses are
uploaded (pinned, asynchronous) only when they change, the step counters, bias corrections,
Gram pass, decision, K×K solve (one warp) and apply pass run back to back, and nothing here
waits for the GPU. A step that must not be applied (a NaN/Inf gradient, a GradScaler overflow)
is skipped on the device as a whole, task-specific parameters included; the optimizer reports
it when its ``task_weights`` or ``stats`` are next read. The result of a step is read lazily.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._native import _C, CUDA_MAX_TASKS, SegmentKind, SolveStatus, StepOutcome, cuda_module
from ._backends import flagged_params, solver_args
from ._plan import DTYPES, PlanSegment, StepPlan

__all__ = ["CudaBackend"]

_CHUNK = _C.GRAM_CHUNK  # elements per work item (fixed, so the Gram sums are deterministic)


def _upload(host: np.ndarray, device) -> torch.Tensor:
    # A pinned staging copy, asynchronous; torch's host allocator keeps the pinned block until
    # the copy has run.
    return torch.from_numpy(host).pin_memory().to(device, non_blocking=True)


class _DeviceSegment:
    """Device buffers of one plan segment; the table is uploaded when its addresses change."""

    def __init__(self, cmod, seg: PlanSegment, cfg, device):
        self.cmod, self.cfg, self.device = cmod, cfg, device
        self.k = seg.k
        self.numels = None
        self.table_host = None
        self.native = None

    def refresh(self, seg: PlanSegment) -> None:
        numels = tuple(p.numel() for p in seg.params)
        f64 = dict(dtype=torch.float64, device=self.device)
        if numels != self.numels:
            items = [(t, b, min(n, b + _CHUNK)) for t, n in enumerate(numels)
                     for b in range(0, n, _CHUNK)]
            self.n_items = len(items)
            self.items = _upload(np.array(items, dtype=np.int64).reshape(-1, 3), self.device)
            k = self.k
            self.partial = torch.zeros(max(self.n_items, 1) * (k * k + 2 * k + 3), **f64)
            n = max(len(numels), 1)
            self.sigma = torch.ones(n, k, **f64)
            self.gscale = torch.ones(n, k, **f64)
            self.bad = torch.zeros(n, k, dtype=torch.int32, device=self.device)
            self.ratio = torch.ones(n, **f64)
            self.edited = torch.zeros(n, dtype=torch.int32, device=self.device)
            self.numels = numels
            self.table_host = None
        if self.table_host is None or not np.array_equal(seg.table, self.table_host):
            self.table = _upload(seg.table, self.device)
            self.table_host = seg.table.copy()
            self.native = self.cmod.make_segment(
                self.cfg, self.table.data_ptr(), len(numels), self.items.data_ptr(),
                self.n_items, self.partial.data_ptr(), self.sigma.data_ptr(),
                self.gscale.data_ptr(), self.bad.data_ptr(), self.ratio.data_ptr(),
                self.edited.data_ptr())


class DeviceStepResult:
    """A step's result (the fields of :class:`StepResult`) that stays on the device until a
    field is read. Read after later steps, it reports the latest step's outcome and stats,
    and an error of any step since the last read (the device keeps it: ``sticky_error``)."""

    lazy = True

    def __init__(self, backend: CudaBackend, plan: StepPlan, solved: bool,
                 segments: list[_DeviceSegment]):
        self._backend, self._plan, self._segments = backend, plan, segments
        self.solved = solved
        self._read = False

    def _materialize(self) -> None:
        if self._read:
            return
        cmod, b = self._backend.cmod, self._backend
        flags = b.flags.cpu()
        sticky = int(flags[cmod.FLAG_STICKY_ERROR])
        b.flags[cmod.FLAG_STICKY_ERROR] = 0
        latest = int(flags[cmod.FLAG_OUTCOME])
        self._outcome = StepOutcome(sticky or latest)
        # An error of an earlier step, this one taken: its flags are those of this step.
        self.from_earlier = bool(sticky) and latest == StepOutcome.APPLIED
        self._stats: dict[str, Any] = {}
        if self.solved and self._outcome == StepOutcome.APPLIED:
            self._stats = {"status": SolveStatus(int(flags[cmod.FLAG_STATUS])),
                           "iterations": int(flags[cmod.FLAG_ITERATIONS]),
                           "residual": float(b.residual.item()),
                           "task_grad_norms": b.task_sq.sqrt().cpu()}
        self._bad_tasks: list[int] = []
        self._bad_params: list[torch.Tensor] = []
        if self._outcome in (StepOutcome.NONFINITE_GRAD, StepOutcome.NONFINITE_UPDATE):
            flags_of = [s.bad.cpu().reshape(-1).numpy() for s in self._segments]
            for seg, f in zip(self._plan.segments, flags_of):
                if seg.kind == SegmentKind.SHARED:
                    k = seg.k
                    rows = f[:len(seg.params) * k].reshape(-1, k)
                    self._bad_tasks = sorted(set(self._bad_tasks)
                                             | set(np.flatnonzero(rows.any(0)).tolist()))
            self._bad_params = flagged_params(self._plan, lambda s: flags_of[s],
                                              SegmentKind.PLAIN)
        elif self._outcome == StepOutcome.GRAD_EDITED:
            edited = [s.edited.cpu().numpy() for s in self._segments]
            self._bad_params = flagged_params(self._plan, lambda s: edited[s],
                                              SegmentKind.SHARED)
        self._read = True

    @property
    def outcome(self):
        self._materialize()
        return self._outcome

    @property
    def stats(self):
        self._materialize()
        return self._stats

    @property
    def bad_tasks(self):
        self._materialize()
        return self._bad_tasks

    @property
    def bad_params(self):
        self._materialize()
        return self._bad_params


class CudaBackend:
    """The native CUDA core (``_C_cuda``): both phases of the step as device launches. Its
    results are lazy: the optimizer never reads one back inside ``step()``."""

    lazy = True

    def __init__(self, k: int, device: torch.device):
        self.cmod = cuda_module()
        if k > CUDA_MAX_TASKS:
            raise NotImplementedError(
                f"the CUDA PUB step supports up to {CUDA_MAX_TASKS} tasks, got K = {k}")
        self.k = k
        self.device = device
        f64 = dict(dtype=torch.float64, device=device)
        self.G = torch.zeros(k, k, **f64)
        self.alpha = torch.zeros(k, **f64)
        self.weights = torch.full((k,), 1.0 / k, **f64)
        self.applied = torch.full((k,), 1.0 / k, **f64)
        self.task_sq = torch.zeros(k, **f64)
        self.flags = torch.zeros(self.cmod.FLAG_COUNT, dtype=torch.int32, device=device)
        self.residual = torch.zeros(1, **f64)
        self.workspace = torch.zeros(_C.workspace_size(k) + k, **f64)
        self._configs: dict[tuple, Any] = {}
        self._segments: dict[tuple, _DeviceSegment] = {}
        self._base_host = None
        self._base = None
        self._inv_key = None

    def _segment(self, seg: PlanSegment) -> _DeviceSegment:
        if seg.dtype == torch.float64:
            raise NotImplementedError(
                "the CUDA PUB step supports float32, bfloat16 and float16 parameters, not "
                "float64")
        key = seg.key
        dev = self._segments.get(key)
        if dev is None:
            cfg = self.cmod.make_config(
                int(seg.algo), seg.amsgrad, seg.centered, seg.momentum, int(seg.umm),
                int(DTYPES[seg.dtype]), int(seg.kind), seg.k, seg.grad_stride,
                -1.0 if seg.maximize else 1.0, seg.clippy[0], seg.clippy[1], seg.has_l2)
            dev = self._segments[key] = _DeviceSegment(self.cmod, seg, cfg, self.device)
        dev.refresh(seg)
        return dev

    def gram_summary(self) -> torch.Tensor:
        lo = self.cmod.FLAG_GRAD_NONFINITE  # and FLAG_GRAD_EDITED after it
        return torch.cat([self.G.reshape(-1), self.task_sq,
                          self.flags[lo:lo + 2].to(torch.float64)])

    def set_gram_summary(self, summary: torch.Tensor) -> None:
        k = self.k
        lo = self.cmod.FLAG_GRAD_NONFINITE
        self.G.copy_(summary[:k * k].view(k, k))
        self.task_sq.copy_(summary[k * k:k * k + k])
        self.flags[lo:lo + 2].copy_((summary[k * k + k:] > 0).to(torch.int32))

    def get_weights(self):
        flags = self.flags.cpu()
        return (self.weights.cpu().numpy().copy() if flags[self.cmod.FLAG_HAS_WEIGHTS] else None,
                self.alpha.cpu().numpy().copy() if flags[self.cmod.FLAG_HAS_ALPHA] else None)

    def applied_weights(self):
        """The weights the last step the device applied used (α̂ with absent tasks at 0), or
        what set_weights gave; None before both (copies from the device)."""
        if not int(self.flags[self.cmod.FLAG_HAS_WEIGHTS]):
            return None
        return self.applied.cpu().numpy().copy()

    def set_weights(self, weights, alpha, applied=None) -> None:
        if applied is not None or weights is not None:
            self.applied.copy_(torch.as_tensor(applied if applied is not None else weights,
                                               dtype=torch.float64))
        if weights is not None:
            self.weights.copy_(torch.as_tensor(weights, dtype=torch.float64))
        if alpha is not None:
            self.alpha.copy_(torch.as_tensor(alpha, dtype=torch.float64))
        self.flags[self.cmod.FLAG_HAS_WEIGHTS] = int(weights is not None)
        self.flags[self.cmod.FLAG_HAS_ALPHA] = int(alpha is not None)

    def step(self, plan: StepPlan, *, solve: bool, options, grad_scale=None, found_inf=None,
             task_scale=None, between=None) -> DeviceStepResult:
        cmod = self.cmod
        segments = [self._segment(seg) for seg in plan.segments]
        if self._base_host is None or not np.array_equal(plan.base, self._base_host):
            # Only when lr & co. change (a scheduler step): unchanged constants upload nothing,
            # so a captured step allocates nothing.
            self._base = _upload(plan.base, self.device)
            self._base_host = plan.base.copy()
        scale_ptr = 0
        if grad_scale is not None:
            # Kept referenced until the next step: the kernels read it asynchronously.
            self._grad_scale = grad_scale.to(self.device, torch.float32)
            scale_ptr = self._grad_scale.data_ptr()
        found_ptr = 0
        if found_inf is not None:
            if found_inf.device != self.device or found_inf.dtype != torch.float32:
                raise TypeError("found_inf must be a float32 tensor on the parameters' device")
            found_ptr = found_inf.data_ptr()
        ts_ptr = 0
        if task_scale is not None:
            self._task_scale = _upload(np.asarray(task_scale, dtype=np.float64), self.device)
            ts_ptr = self._task_scale.data_ptr()
        d = cmod.make_step(self.k, self._base.data_ptr(), self.G.data_ptr(),
                           self.alpha.data_ptr(), self.weights.data_ptr(),
                           self.applied.data_ptr(), self.task_sq.data_ptr(),
                           self.flags.data_ptr(), self.residual.data_ptr(),
                           self.workspace.data_ptr(), scale_ptr, ts_ptr, found_ptr)
        natives = [s.native for s in segments]
        code, ridge, tol, max_iter = solver_args(options)
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device).cuda_stream
            cmod.gram(natives, d, solve, stream)
            if between is not None:
                between()
            cmod.finish(natives, d, solve, code, ridge, tol, max_iter,
                        options.weight_norm == "sum", stream)
        return DeviceStepResult(self, plan, solve, segments)
