"""Gradient tools of a PUB optimizer between ``backward(losses)`` and ``step()``: per-task
gradient norms and clipping, and a rescaling of the shared ``.grad`` (``clip_grad_norm_``,
``GradScaler.unscale_``) carried into the task gradients. Collectives under sharded data
parallelism, where each process holds a piece of every task gradient.

A mixin of :class:`pub_native.optim._pub.PUBOptimizer`.
"""

from __future__ import annotations

import math

import torch

from .._numbers import is_real
from ._plan import LazyName, flat_view, plain_grad

__all__ = ["GradientTools"]


def _factor_bounds(m: torch.Tensor, s: torch.Tensor, tol: float, tiny: float,
                   below: float) -> torch.Tensor:
    """(lo, −hi): the greatest lower and least upper bound over the elements of the factors c
    for which c·s_j rounds to m_j (float64 m and s of one tensor; lo = +Inf where an element
    with s_j = 0 and m_j not about 0 allows none), as add_rescale_terms in step.h takes them;
    the caller widens them by tol·|c|."""
    am = m.abs()
    w = torch.where(am >= tiny, tol * am, torch.full_like(am, below))
    zero = s == 0
    inf = torch.tensor(math.inf, dtype=torch.float64, device=m.device)
    safe = torch.where(zero, torch.ones_like(s), s)
    a, b = (m - w) / safe, (m + w) / safe
    lo = torch.where(zero, -inf, torch.minimum(a, b)).amax() if m.numel() else -inf
    hi = torch.where(zero, inf, torch.maximum(a, b)).amin() if m.numel() else inf
    lo = torch.where((zero & ~(am <= w)).any(), inf, lo)
    return torch.stack([lo, -hi])


class GradientTools:
    """task_grad_norms, clip_task_grad_norm_ and the helpers they share."""

    def _task_rows(self, j: int):
        """The (averaged) task gradients of shared parameter j that this process holds, as
        (K, n) in memory order, and the same part of its current .grad (1-D): the whole
        parameter, or its piece under sharded data parallelism."""
        g, p, dp = self._grads, self._grads.params[j], self._dp
        grad = plain_grad(p, LazyName(self, p))
        if dp is not None and dp.shard:
            lo, hi, _ = dp.pieces[j]
            return dp.piece_rows(j, g.k), flat_view(grad, lo, hi)
        o, n = g.offsets[j], g.numels[j]
        return g.buffer[:g.k, o:o + n], flat_view(grad, 0, n)

    def _summed(self, t: torch.Tensor, op=None) -> torch.Tensor:
        """t summed (or reduced with ``op``, a ReduceOp or "max") over the processes when each
        holds a shard."""
        dp = self._dp
        if dp is not None and dp.shard:
            import torch.distributed as dist

            op = dist.ReduceOp.MAX if op == "max" else op or dist.ReduceOp.SUM
            dist.all_reduce(t, op=op, group=dp.group)
        return t

    def _refresh_sum(self) -> None:
        """The sum row (the shared .grad) formed again from the task gradients."""
        g, dp = self._grads, self._dp
        if dp is not None and dp.shard:
            dp.finish_task_rows(g, [])
        else:
            g.form_sum()
        for j in self._stepped():
            g.params[j].grad = self._grad_views[j] = g.sum_view(j)

    def _fold_grad_rescale(self) -> None:
        """Carry a rescaling of the shared ``.grad`` since backward (``clip_grad_norm_``,
        ``GradScaler.unscale_``) into the task gradients themselves, so that they and ``.grad``
        agree again; a change that is no rescaling raises RuntimeError naming the parameter.
        Compares each ``.grad`` with the task gradients' sum (a pass over the K×P buffer)."""
        g = self._grads
        if g is None or not self._pending:
            raise RuntimeError("call backward(losses) first: there are no task gradients")
        if isinstance(self._unfit_pending, str):  # an accumulating backward raised part-way
            raise RuntimeError(self._unfit_pending)
        acc = torch.float32 if g.dtype in (torch.bfloat16, torch.float16) else g.dtype
        tol = {torch.bfloat16: 1 / 128, torch.float16: 1 / 512}.get(g.dtype, 1e-6)
        # As the step measures it (rescale_factor in step.h): at every element, the interval
        # of factors c for which c·s_j rounds to m_j.
        tiny = torch.finfo(g.dtype).tiny
        below = 4 * tiny * torch.finfo(g.dtype).eps  # four of the smallest subnormals
        active = self._stepped()
        parts, bounds, sums = [], [], []
        for j in active:
            rows, m = self._task_rows(j)
            s = rows.sum(0, dtype=acc).to(g.dtype).double()
            md = m.double()
            sums.append(rows)
            parts.append(torch.stack([(md * s).sum(), (s * s).sum(), (md * md).sum()]))
            bounds.append(_factor_bounds(md, s, tol, tiny, below))
        if not parts:
            return
        ms, ss, mm = self._summed(torch.stack(parts)).unbind(1)
        lo, neg_hi = self._summed(torch.stack(bounds), "max").unbind(1)
        c = torch.where(ss > 0, ms / ss.clamp(min=1e-300), torch.ones_like(ss))
        band = tol * c.abs()
        edited = torch.where(ss > 0, ~(lo <= c + band) | ~(c - band <= -neg_hi),
                             mm != 0) | ~torch.isfinite(c)
        # A non-finite gradient (a GradScaler overflow, an inf loss) is no edit: task gradients
        # that are not finite stay as they are, and finite ones under a .grad made non-finite
        # since (clip_grad_norm_ of a non-finite total norm) become NaN, as .grad did. Either
        # way the step sees them: GradScaler skips it, a plain step raises FloatingPointError.
        rows_finite = torch.isfinite(ss)
        grad_finite = torch.isfinite(mm)
        c = torch.where(rows_finite, torch.where(grad_finite, c, torch.full_like(c, math.nan)),
                        torch.ones_like(c))
        edited &= rows_finite & grad_finite
        # A tensor whose task gradients cancel (s = 0 and .grad still 0) shows no factor: it
        # takes the one the others share, as the step does (share_rescale_factor in step.h).
        hidden = (ss == 0) & (mm == 0)
        shown = c[~hidden & ~edited & torch.isfinite(c)]
        if bool(hidden.any()):
            fill = 1.0
            if shown.numel() and bool(((shown - shown[0]).abs() <= tol * shown[0].abs()).all()):
                fill = float(shown[0])
            c = torch.where(hidden, torch.full_like(c, fill), c)
        for j, bad in zip(active, edited.tolist()):
            if bad:
                raise RuntimeError(
                    f"the .grad of {self._param_name(g.params[j])} was changed since "
                    "backward(losses) in a way that is not a rescaling, so the task gradients "
                    "cannot follow it")
        for rows, cj in zip(sums, c.tolist()):
            if cj != 1.0:
                rows.mul_(cj)
        self._refresh_sum()

    def task_grad_norms(self, norm_type: float = 2.0) -> torch.Tensor:
        """Each task's gradient norm over the shared parameters, shape (K,), float64 on their
        device: what multi-task training logs. Call between ``backward(losses)`` and ``step()``;
        a rescaling of the shared ``.grad`` since backward (e.g. ``GradScaler.unscale_``) is
        taken into account. (After a weight-update step, ``stats["task_grad_norms"]`` has the
        2-norms the step used, computed in its Gram pass at no extra cost.) This reads the
        K×P buffer and, on CUDA, waits for the device; under data parallelism it is a
        collective (every process calls it)."""
        order = _norm_order(norm_type)
        self._fold_grad_rescale()
        g = self._grads
        # The parameters the step will update: frozen ones and those whose .grad was removed
        # (torch's way of leaving a parameter out) count for nothing, as in clip_grad_norm_.
        # (Under sharding a process may hold none of a parameter: an empty piece.)
        rows = [r for r in (self._task_rows(j)[0] for j in self._stepped()) if r.shape[1]]
        dp = self._dp
        if not rows and not (dp is not None and dp.shard):  # nothing stepped: zeros
            return torch.zeros(g.k, dtype=torch.float64, device=g.buffer.device)
        # Under sharding every process reduces alike, one that holds no piece of any shared
        # parameter too (its part: the reduction's identity).
        if abs(order) == math.inf:  # the largest or smallest |g| (torch.linalg.vector_norm)
            import torch.distributed as dist

            big = order > 0
            local = torch.full((g.k,), 0.0 if big else math.inf, dtype=torch.float64,
                               device=g.buffer.device)
            if rows:
                parts = torch.stack([(r.abs().amax(1) if big else r.abs().amin(1)).double()
                                     for r in rows])
                local = parts.amax(0) if big else parts.amin(0)
            op = dist.ReduceOp.MAX if big else dist.ReduceOp.MIN
            return self._summed(local, op if dp is not None else None)
        local = torch.zeros(g.k, dtype=torch.float64, device=g.buffer.device)
        if order == 0:  # the number of non-zero elements
            if rows:
                local = torch.stack([r.ne(0).sum(1).double() for r in rows]).sum(0)
            return self._summed(local)
        if rows:
            local = torch.stack([r.double().abs().pow(order).sum(1) for r in rows]).sum(0)
        return self._summed(local).pow(1.0 / order)

    def _stepped(self) -> list[int]:
        """Indices of the shared parameters that require grad and have a ``.grad``."""
        return [j for j, p in enumerate(self._grads.params)
                if p.requires_grad and p.grad is not None]

    def clip_task_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Per-task gradient clipping: scale each task's gradient of the shared parameters to a
        norm of at most ``max_norm`` (as ``torch.nn.utils.clip_grad_norm_`` does for one
        gradient), before the step balances them. The shared ``.grad`` is updated to the sum of
        the clipped task gradients. Returns the norms before clipping (K,). Call between
        ``backward(losses)`` and ``step()``, after ``GradScaler.unscale_`` if one is used."""
        if isinstance(max_norm, torch.Tensor) and max_norm.numel() == 1 \
                and not max_norm.is_complex() and max_norm.dtype != torch.bool:
            max_norm = max_norm.item()  # as torch's clip_grad_norm_ takes it
        if not (is_real(max_norm) and max_norm > 0):
            raise ValueError(f"max_norm must be a number > 0, got {max_norm!r}")
        max_norm = float(max_norm)
        norms = self.task_grad_norms(norm_type)
        g = self._grads
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0).to(g.dtype).unsqueeze(1)
        for j in self._stepped():
            self._task_rows(j)[0].mul_(coef)
        self._refresh_sum()
        return norms


def _norm_order(norm_type) -> float:
    """``norm_type`` as torch's ``clip_grad_norm_`` takes it (a number, or a string such as
    ``"inf"``), or an error naming it."""
    if not (is_real(norm_type) or isinstance(norm_type, str)):
        raise TypeError(f"norm_type must be a number (or 'inf'), got {norm_type!r}")
    try:
        order = float(norm_type)
    except ValueError:
        raise ValueError(f"norm_type must be a number (or 'inf'), got {norm_type!r}") from None
    if math.isnan(order):
        raise ValueError("norm_type must not be NaN")
    return order
