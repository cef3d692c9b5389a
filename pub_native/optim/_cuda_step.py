"""The PUB step of the shared parameters on a CUDA device (Python layer of the CUDA backend).

Everything stays on the device and on torch's current stream: the hyper-parameters (bias
corrections) are computed from the device step counters, the Gram pass, the K×K solve (one warp)
and the apply pass run back to back, and nothing here waits for the GPU. A non-finite task
gradient cannot raise inside ``step()`` without a synchronization, so the device skips the
update (parameters, state and step counters untouched) and the optimizer raises
``FloatingPointError`` when its ``task_weights`` or ``stats`` are next read.
"""

from __future__ import annotations

import numpy as np
import torch

from .._native import cuda_module
from ..solver import METHODS, SolveStatus

__all__ = ["CudaStep"]

_DTYPES = {torch.float32: 0, torch.bfloat16: 2, torch.float16: 3}
_CHUNK = 1 << 16  # elements per work item (fixed, so the Gram sums are deterministic)


class CudaStep:
    """Device buffers and launches of one optimizer's shared part (one kernel configuration)."""

    def __init__(self, opt, segments):
        self.cmod = cuda_module()
        if len(segments) != 1:
            raise NotImplementedError(
                "the CUDA PUB step needs every shared parameter group to use the same amsgrad/"
                "centered/momentum/maximize options"
            )
        grads = opt._grads
        if grads.dtype not in _DTYPES:
            raise NotImplementedError(
                f"the CUDA PUB step supports float32, bfloat16 and float16 parameters, got "
                f"{grads.dtype}"
            )
        k = opt._k
        if k > self.cmod.MAX_TASKS:
            raise NotImplementedError(
                f"the CUDA PUB step supports up to {self.cmod.MAX_TASKS} tasks, got K = {k}"
            )
        self.opt = opt
        self.device = grads.device
        self.k = k
        _, members, key = segments[0]
        self.members = members
        has_l2 = any(opt._hyper_row(opt.param_groups[gi], 1)[4] != 0.0 for gi, _, _ in members)
        amsgrad, centered, momentum = opt._config_flags(key[:-1])
        self.cfg = self.cmod.make_config(
            opt._ALGO, amsgrad, centered, momentum, {None: 0, "clippy": 1, "adatask": 2}[opt.umm],
            _DTYPES[grads.dtype], k, grads.size, -1.0 if key[-1] else 1.0,
            opt.clippy_lambdas[0], opt.clippy_lambdas[1], has_l2,
        )
        dev = self.device
        n = len(members)
        items = []
        for t, (_, p, _) in enumerate(members):
            numel = p.numel()
            items.extend((t, b, min(numel, b + _CHUNK)) for b in range(0, numel, _CHUNK))
        self.n_items = len(items)
        f64 = dict(dtype=torch.float64, device=dev)
        self.items = torch.tensor(items, dtype=torch.int64).reshape(-1, 3).to(dev)
        self.partial = torch.zeros(max(self.n_items, 1) * (k * k + k), **f64)
        self.G = torch.zeros(k, k, **f64)
        self.sigma = torch.ones(max(n, 1), k, **f64)
        self.alpha = torch.zeros(k, **f64)
        self.weights = torch.full((k,), 1.0 / k, **f64)
        if opt._weights is not None:
            self.weights.copy_(torch.from_numpy(opt._weights))
        if opt._warm is not None:
            self.alpha.copy_(torch.from_numpy(opt._warm))
        self.status = torch.zeros(1, dtype=torch.int32, device=dev)
        self.iterations = torch.zeros(1, dtype=torch.int32, device=dev)
        self.residual = torch.zeros(1, **f64)
        self.skip = torch.zeros(1, dtype=torch.int32, device=dev)
        self.workspace = torch.zeros(opt._ws_size(k) + k, **f64)
        self.hyper = torch.zeros(max(n, 1), 9, **f64)
        self.table = None
        self.table_key = None
        self._base_host = None
        self._base_dev = None
        self.solved = False

    def _refresh_table(self, states):
        opt = self.opt
        rows, step_ptrs = [], []
        for r, (gi, p, off) in enumerate(self.members):
            st = states[id(p)]
            names = opt._state_names(opt.param_groups[gi])
            ptrs = [st[("task_" + s) if opt.umm == "adatask" else s].data_ptr() for s in names]
            ptrs += [0] * (3 - len(ptrs))
            rows.append([p.data_ptr(), p.numel(), off, r, *ptrs])
            step_ptrs.append(st["step"].data_ptr())
        key = tuple(map(tuple, rows)) + tuple(step_ptrs) + (opt._grads.buffer.data_ptr(),)
        if key != self.table_key:
            self.table = torch.tensor(rows, dtype=torch.int64).to(self.device)
            self.step_ptrs = torch.tensor(step_ptrs, dtype=torch.int64).to(self.device)
            self.table_key = key
            self.buffers = self.cmod.make_buffers(
                self.table.data_ptr(), len(rows), self.items.data_ptr(), self.n_items,
                self.hyper.data_ptr(), opt._grads.buffer.data_ptr(), self.partial.data_ptr(),
                self.G.data_ptr(), self.sigma.data_ptr(), self.alpha.data_ptr(),
                self.weights.data_ptr(), self.status.data_ptr(), self.iterations.data_ptr(),
                self.residual.data_ptr(), self.skip.data_ptr(), self.workspace.data_ptr(),
            )

    def step(self, states, solve):
        opt = self.opt
        cmod = self.cmod
        self._refresh_table(states)
        base = np.zeros((len(self.members), cmod.BASE_COLS))
        for r, (gi, _, _) in enumerate(self.members):
            base[r] = opt._base_row(opt.param_groups[gi])
        if self._base_host is None or not np.array_equal(base, self._base_host):
            # Only when lr & co. change (a scheduler step): a pinned staging copy, asynchronous;
            # torch's host allocator keeps the pinned block until the copy has run. Unchanged
            # constants upload nothing, so a captured step allocates nothing.
            self._base_dev = torch.from_numpy(base).pin_memory().to(self.device,
                                                                   non_blocking=True)
            self._base_host = base
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device).cuda_stream
            cmod.pub_hyper(opt._ALGO, self.step_ptrs.data_ptr(), self._base_dev.data_ptr(),
                           len(self.members), self.hyper.data_ptr(), stream)
            if solve or opt.umm == "clippy":
                cmod.pub_gram(self.cfg, self.buffers, stream)
            if solve:
                code, tol, max_iter = METHODS[opt.solver]
                cmod.pub_solve(self.cfg, code, opt.ridge, tol, max_iter, opt.weight_norm == "sum",
                               self.buffers, stream)
                self.solved = True
            else:
                cmod.pub_check_rows(self.cfg, self.buffers, stream)
            cmod.pub_apply(self.cfg, self.buffers, self.step_ptrs.data_ptr(), stream)

    def read(self):
        """Host copies of α̂, α and the solve stats; waits for the device (called on reads)."""
        skipped = bool(self.skip.item())
        stats = {
            "status": SolveStatus(int(self.status.item())) if self.solved else None,
            "iterations": int(self.iterations.item()),
            "residual": float(self.residual.item()),
            "skipped": skipped,
        }
        return (self.weights.cpu().numpy().copy(), self.alpha.cpu().numpy().copy(), stats)
