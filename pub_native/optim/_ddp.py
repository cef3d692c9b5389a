"""Exact data parallelism for the PUB optimizers (SPEC section 10; Python layer).

With N processes each holding a slice of the batch, PUB's task updates are nonlinear in the task
gradients, so the per-task gradients themselves are averaged over the processes before anything
else. Two schemes, both exact (N processes train like one on the whole batch, to float
rounding) and both keeping the processes bitwise identical:

* sharded (default, ZeRO-1 style): each task's gradient is reduce-scattered (launched as soon as
  that task's backward is done, so it overlaps the next task's), each process computes the task
  updates and a partial Gram matrix on its 1/N shard of the shared parameters (shards may split
  tensors), one small all-reduce sums the K×K Gram matrix and the step's flags, every process
  solves the same α, applies the step to its shard with its shard of the optimizer state, and
  the parameters are all-gathered. The shared ``.grad`` (the sum of the averaged task
  gradients) is all-gathered too, so that clipping, norm logging and GradScaler see the global
  gradient on every process. Per step ≈ (K + 2)/2 × the traffic of DDP + Adam, optimizer state
  and task-gradient buffer per process ÷ N.
* replicated: each task's gradient is all-reduced and every process does the whole step:
  K × the traffic, no memory saving; simpler, and fewer collectives.

Task-specific gradients take one all-reduce, with a presence flag per parameter so that a
parameter without gradient anywhere stays without one. Gradient accumulation under
``ddp.no_sync()`` accumulates locally and reduces at the first backward outside it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .._autograd import TaskGradients, sum_rows
from .._distributed import DDPRef, agree_on, all_gather, average_gradients, reduce_scatter

__all__ = ["DataParallel"]


class DataParallel:
    """The collectives of one optimizer over its data-parallel process group."""

    def __init__(self, group, ddp, shard: bool, params=(), checks=None):
        self.group = group
        self._ddp = DDPRef(ddp, list(params), checks)  # (see ddp)
        self.shard = shard
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.unreduced = False  # task gradients accumulated under no_sync, not reduced yet
        self.bytes_sent = 0.0  # per process, by the ring model, since the last reset
        self._layout = None
        self._dummy = None

    @property
    def ddp(self):
        """The DistributedDataParallel module (or None), held weakly: a model wrapped again
        (the earlier wrapper gone) is found again."""
        return self._ddp()

    def refresh(self):
        """Once per backward call: the DDP module in use (see DDPRef.refresh)."""
        return self._ddp.refresh()

    # ---- layout ------------------------------------------------------------------------------

    def row_length(self, size: int) -> int:
        """Length of a task row: padded to N equal shards when sharding."""
        if not self.shard:
            return size
        return math.ceil(size / self.world) * self.world

    def set_layout(self, grads: TaskGradients) -> None:
        """This process's shard of the flat shared-parameter space: one piece (begin, end,
        offset in the shard) per shared parameter, empty where it holds none of it."""
        key = (id(grads), grads.size, grads.row_length)
        if self._layout == key:
            return
        self._layout = key
        self.S = grads.row_length // self.world if self.shard else grads.size
        lo, hi = self.rank * self.S, min((self.rank + 1) * self.S, grads.size)
        self.pieces = []
        for o, n in zip(grads.offsets, grads.numels):
            a, b = max(o, lo), min(o + n, hi)
            self.pieces.append((a - o, b - o, a - lo) if a < b else (0, 0, 0))
        if self.shard:
            self.shard_rows = torch.zeros((grads.k + 1, self.S), dtype=grads.dtype,
                                          device=grads.device)
            self.gathered = torch.zeros(grads.row_length, dtype=grads.dtype, device=grads.device)
            self.send = torch.zeros(self.S, dtype=grads.dtype, device=grads.device)

    def dummy(self, dtype, device) -> torch.Tensor:
        """A one-element tensor for the state pointers of an empty piece (nothing is read)."""
        if self._dummy is None or self._dummy.dtype != dtype or self._dummy.device != device:
            self._dummy = torch.zeros(1, dtype=dtype, device=device)
        return self._dummy

    # ---- backward ----------------------------------------------------------------------------

    def agree(self, k: int, shared: list[bool], trainable: list[bool],
              failed: bool = False) -> list[bool]:
        """The same task count on every process, the same parameters frozen, and each
        parameter shared where any process detected it shared (:func:`agree_on`)."""
        self._count("all_reduce", (len(shared) + 2 * len(trainable) + 5) * 8)
        return agree_on(self.group, k, shared, failed, trainable)

    def syncing(self) -> bool:
        """False inside ``ddp.no_sync()``: accumulate locally, reduce later."""
        return self.ddp is None or self.ddp.require_backward_grad_sync

    def _count(self, kind: str, nbytes: int) -> None:
        n = self.world
        factor = {"reduce_scatter": (n - 1) / n, "all_gather": (n - 1) / n,
                  "all_reduce": 2 * (n - 1) / n}[kind]
        self.bytes_sent += factor * nbytes

    def reduce_task(self, grads: TaskGradients, i: int):
        """Start averaging task i's gradient row (its values are already divided by N)."""
        row = grads.buffer[i]
        nbytes = row.numel() * row.element_size()
        if self.shard:
            self._count("reduce_scatter", nbytes)
            return reduce_scatter(self.shard_rows[i], row, group=self.group, async_op=True)
        self._count("all_reduce", nbytes)
        return dist.all_reduce(row, group=self.group, async_op=True)

    def finish_task_rows(self, grads: TaskGradients, handles) -> None:
        """Wait for the task rows; form the sum row (the shared .grad) on every process (again,
        after the shard's rows changed, with no handles)."""
        for h in handles:
            h.wait()
        if not self.shard:
            grads.form_sum()
            return
        grads.sum_finite = False  # each process summed its shard only
        if self.S:
            sum_rows(self.shard_rows, grads.k, self.S)
        out = grads.buffer[grads.k]
        self._count("all_gather", out.numel() * out.element_size())
        all_gather(out, self.shard_rows[grads.k], group=self.group)
        grads.sum_version = grads.buffer._version

    def reduce_plain(self, params: list[torch.Tensor], present: list[bool]) -> list[bool]:
        """Average the task-specific gradients (a parameter without gradient on every process
        keeps none) and make ``present`` (tasks with a loss graph) the OR over processes."""
        before = average_gradients.bytes_sent
        summed = average_gradients(params, self.group, [float(x) for x in present])
        self.bytes_sent += average_gradients.bytes_sent - before
        return [x > 0 for x in summed]

    # ---- step --------------------------------------------------------------------------------

    def piece_view(self, p: torch.Tensor, j: int) -> torch.Tensor:
        """This process's piece of shared parameter j, as a 1-D view in memory order."""
        lo, hi, _ = self.pieces[j]
        return p.detach().as_strided((hi - lo,), (1,), p.storage_offset() + lo)

    def piece_rows(self, j: int, k: int) -> torch.Tensor:
        """The averaged task gradients of this process's piece of parameter j: (K, n)."""
        lo, hi, off = self.pieces[j]
        return self.shard_rows[:k, off:off + (hi - lo)]

    def reduce_summary(self, backend) -> None:
        """Sum phase 1's outputs (Gram matrix, task norms, flags) over the processes."""
        summary = backend.gram_summary()
        self._count("all_reduce", summary.numel() * summary.element_size())
        dist.all_reduce(summary, group=self.group)
        backend.set_gram_summary(summary)

    def gather_params(self, params: list[torch.Tensor], grads: TaskGradients) -> None:
        """All-gather the shared parameters from their shards."""
        send = self.send
        for j, p in enumerate(params):
            lo, hi, off = self.pieces[j]
            if hi > lo:
                send[off:off + (hi - lo)].copy_(self.piece_view(p, j))
        self._count("all_gather", self.gathered.numel() * self.gathered.element_size())
        all_gather(self.gathered, send, group=self.group)
        for j, p in enumerate(params):
            o, n = grads.offsets[j], grads.numels[j]
            p.detach().as_strided((n,), (1,), p.storage_offset()).copy_(self.gathered[o:o + n])
