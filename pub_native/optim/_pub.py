"""The PUB machinery shared by ``pub_native.Adam``, ``AdaGrad`` and ``RMSProp`` (Python layer).

A PUB optimizer is its torch base class (arguments, defaults, validation, param groups,
schedulers, state-dict keys) plus this mixin, which owns everything else in one place: PUB's
options, shared-parameter detection and the per-task gradients (``backward``), the step's
decisions (solve or reuse, raise or skip) and checkpoints. The step itself is one call of a
backend (``_backends``) on a checked plan (``_plan``); torch's own ``step`` is never called, so
every parameter goes through one path and step hooks fire once.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np
import torch

from .. import _autograd
from .._distributed import data_parallel_group
from .._native import StepOutcome
from ._backends import CpuBackend
from ._compile import compiled_step
from ._compile import register as register_for_compile
from ._ddp import DataParallel
from ._options import CLIPPY_PRESETS, PubOptions
from ._plan import LazyName, StepPlan, build_plan, check_param, flat_view, plain_grad, state_dtype

__all__ = ["BACKENDS", "CLIPPY_PRESETS", "PUBOptimizer"]

#: Step backends by name; "native" picks the CPU or CUDA core by the parameters' device.
#: PUB_NATIVE_BACKEND in the environment sets the default.
BACKENDS = ("native", "reference")


#: The keyword arguments every PUB optimizer takes besides its torch base class's.
PUB_ARGUMENTS = ("shared", "update_weights_every", "solver", "weight_norm", "ridge", "umm",
                 "clippy_preset", "clippy_lambda_rel", "clippy_lambda_abs", "absent_tasks",
                 "process_group", "shard_state", "backend")


def pub_arguments(local_vars: dict) -> dict:
    """PUB's arguments out of an optimizer constructor's locals()."""
    return {name: local_vars[name] for name in PUB_ARGUMENTS}


def _default_backend() -> str:
    name = os.environ.get("PUB_NATIVE_BACKEND", "native")
    if name not in BACKENDS:
        raise ValueError(f"PUB_NATIVE_BACKEND={name!r}: expected one of {BACKENDS}")
    return name


class PUBOptimizer:
    """Mixin that turns a ``torch.optim`` optimizer into its PUB version (see the subclasses).

    Subclasses set ``_ALGO`` (:class:`pub_native._native.Algorithm`) and give, per param group,
    ``_state_names`` (torch's state keys, in the native rule's order), ``_rule_flags``
    ((amsgrad, centered, momentum)), ``_base_row`` (the constants in ``BaseCol`` order) and
    ``_initial_state_value``.
    """

    _ALGO: int
    # torch.amp.GradScaler hands this optimizer its scale and found_inf (as torch's fused Adam):
    # the per-task gradients are unscaled inside the native passes and an overflow skips the
    # whole step.
    _step_supports_amp_scaling = True

    # ---- construction ------------------------------------------------------------------------

    @staticmethod
    def _materialize(params):
        """Turn a one-shot iterable of params/groups into a list, keeping groups as given."""
        if isinstance(params, torch.Tensor):
            raise TypeError(
                "params argument given to the optimizer should be an iterable of Tensors or "
                f"dicts, but got {torch.typename(params)}"
            )
        return list(params)

    def _pub_setup(self, shared, backend, process_group, shard_state, **pub_kwargs):
        self.options = PubOptions(**pub_kwargs)
        if not isinstance(shard_state, bool):
            raise ValueError(f"Invalid shard_state: {shard_state!r} (True or False)")
        self.shard_state = shard_state
        self._process_group = process_group
        backend = _default_backend() if backend is None else backend
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}, expected one of {BACKENDS}")
        self.backend = backend
        for group in self.param_groups:
            if group.get("differentiable", False):
                raise NotImplementedError("PUB optimizers do not support differentiable=True")
            if group.get("capturable", False):
                raise NotImplementedError(
                    "capturable=True is not needed: on CUDA the PUB step never synchronizes "
                    "and keeps its step counters on the device")
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError(f"{self._param_name(p)}: complex parameters are not "
                                    "supported")
        known = {id(p) for p in self._all_params()}
        self._compile_handle = register_for_compile(self)
        self._explicit_shared = None if shared is None else list(shared)
        if shared is not None and not {id(p) for p in self._explicit_shared} <= known:
            raise ValueError("shared contains tensors that are not among the optimizer's params")
        self._reset_pub()

    def _reset_pub(self):
        self._k: int | None = None
        self._decided: dict[int, bool] = {}  # id(param) -> shared? (flags, explicit, detection)
        self._shared: list[torch.Tensor] | None = None  # in param-group order
        self._grads: _autograd.TaskGradients | None = None
        self._grad_views: list | None = None  # the .grad views handed to the shared params
        self._present: list[bool] | None = None  # tasks with a loss graph in this step
        self._pending = False  # backward(losses) ran since the last step
        self._t = 0  # PUB steps applied
        self._solved = False  # a weight solve has been applied
        self._backend = None
        self._seed_weights: tuple | None = None  # (α̂, α) for the next backend (checkpoints)
        self._stats: dict[str, Any] = {}
        self._unread = None  # (device result, under a GradScaler) not yet read back
        self._dp: DataParallel | None = None  # data parallelism, decided at the first backward
        self._dp_resolved = False
        self._shard_state: dict = {}  # param -> its shard's state (sharded data parallelism)
        # What the plan found right last time (so that unchanged parameters and state are not
        # checked again): id(param) -> its signature / its state tensors.
        self._checked: dict = {}
        self._state_memo: dict = {}

    # PUB's options, also as attributes.
    update_weights_every = property(lambda self: self.options.update_weights_every)
    solver = property(lambda self: self.options.solver)
    weight_norm = property(lambda self: self.options.weight_norm)
    ridge = property(lambda self: self.options.ridge)
    umm = property(lambda self: self.options.umm)
    clippy_preset = property(lambda self: self.options.clippy_preset)
    clippy_lambdas = property(lambda self: self.options.clippy_lambdas)

    # ---- torch.optim citizenship -------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group``; a ``"shared"`` flag decides the new parameters (else
        they are detected at the next ``backward``)."""
        super().add_param_group(param_group)
        if hasattr(self, "_decided"):
            group = self.param_groups[-1]
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError(f"{self._param_name(p)}: complex parameters are not "
                                    "supported")
                if group.get("shared") is not None:
                    self._decided[id(p)] = bool(group["shared"])

    def __getstate__(self) -> dict[str, Any]:
        self._read_device_result(raise_errors=False)
        state = super().__getstate__()
        params = self._all_params()
        weights = self._current_weights()
        state["_pub"] = {
            "options": self.options,
            "backend": self.backend,
            "shard_state": self.shard_state,
            # A process group does not travel: a copy finds its set-up again ("auto").
            "process_group": self._process_group if self._process_group in ("auto", None)
            else "auto",
            "shards": self._shard_state,
            "explicit_shared": self._explicit_shared,
            "decided": [self._decided.get(id(p)) for p in params],
            "k": self._k,
            "grads": self._grads,
            "grad_views": self._grad_views,
            "present": self._present,
            "pending": self._pending,
            "t": self._t,
            "solved": self._solved,
            "weights": weights,
            "stats": self._stats,
        }
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        pub = state.pop("_pub", None)
        super().__setstate__(state)
        if pub is None:
            return
        self.options = pub["options"]
        self.backend = pub["backend"]
        self.shard_state = pub["shard_state"]
        self._process_group = pub["process_group"]
        self._compile_handle = register_for_compile(self)
        self._explicit_shared = pub["explicit_shared"]
        self._reset_pub()
        params = self._all_params()
        self._decided = {id(p): d for p, d in zip(params, pub["decided"]) if d is not None}
        self._k = pub["k"]
        self._grads = pub["grads"]
        self._shared = None if self._grads is None else list(self._grads.params)
        self._grad_views = pub["grad_views"]
        self._present = pub["present"]
        self._pending = pub["pending"]
        self._t = pub["t"]
        self._solved = pub["solved"]
        self._seed_weights = pub["weights"]
        self._stats = pub["stats"]
        self._shard_state = pub["shards"]

    def __repr__(self) -> str:
        base = super().__repr__()
        head, _, rest = base.partition(" (")
        o = self.options
        pub = (f"PUB: num_tasks={self._k}, solver={o.solver!r}, "
               f"update_weights_every={o.update_weights_every}, "
               f"weight_norm={o.weight_norm!r}, ridge={o.ridge}, umm={o.umm!r}")
        if o.umm == "clippy":
            rel, abs_ = o.clippy_lambdas
            pub += f", clippy_lambda_rel={rel}, clippy_lambda_abs={abs_}"
        return f"{head} (\n{pub}{rest}"

    # ---- introspection -----------------------------------------------------------------------

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _shared_ids(self) -> set[int]:
        return set() if self._shared is None else {id(p) for p in self._shared}

    def _param_name(self, p) -> str:
        for gi, group in enumerate(self.param_groups):
            for j, q in enumerate(group["params"]):
                if q is p:
                    names = group.get("param_names")
                    if names:
                        return f"parameter {names[j]!r}"
                    return f"param_groups[{gi}]['params'][{j}] (shape {tuple(p.shape)})"
        return f"tensor of shape {tuple(p.shape)}"

    def _read_device_result(self, raise_errors: bool = True) -> None:
        """Read back the last CUDA step's result (this waits for the device): its solve stats,
        and, unless a GradScaler drove it, a FloatingPointError if the device skipped it."""
        if self._unread is None:
            return
        result, under_scaler = self._unread
        self._unread = None
        outcome = result.outcome
        if outcome == StepOutcome.APPLIED:
            self._stats = dict(result.stats if result.solved else self._stats,
                               updated=result.solved)
        elif raise_errors and outcome != StepOutcome.SKIPPED_FOUND_INF and (
                not under_scaler or outcome == StepOutcome.GRAD_EDITED):
            error = RuntimeError if outcome == StepOutcome.GRAD_EDITED else FloatingPointError
            raise error(self._failure_message(result._plan, result)
                        + " (the CUDA step was skipped on the device)")

    def _current_weights(self) -> tuple | None:
        """(α̂, α) in use, as host float64 arrays (either may be None)."""
        if self._backend is not None:
            return self._backend.get_weights()
        return self._seed_weights

    @property
    def task_weights(self) -> torch.Tensor | None:
        """α̂ used by the last PUB step (float64, shape (K,)), or None before the first one.

        On CUDA this copies from the device (the step itself never waits for it), and raises
        FloatingPointError if the device skipped the last step for a NaN/Inf."""
        self._read_device_result()
        weights = self._current_weights()
        if weights is None or weights[0] is None:
            return None
        return torch.from_numpy(np.array(weights[0], dtype=np.float64))

    @property
    def stats(self) -> dict[str, Any]:
        """Of the last weight solve: status, iterations, residual, solve_time (s, CPU); and
        whether the last PUB step solved (``updated``) or reused α̂. On CUDA this waits for the
        device, and raises FloatingPointError if it skipped the last step for a NaN/Inf."""
        self._read_device_result()
        return dict(self._stats)

    @property
    def num_tasks(self) -> int | None:
        return self._k

    @property
    def shared_parameters(self) -> list[torch.Tensor] | None:
        """The parameters PUB balances (None until decided by the first ``backward``)."""
        return None if self._shared is None else list(self._shared)

    # ---- backward ----------------------------------------------------------------------------

    def _resolve_shared(self, losses, items) -> list[torch.Tensor]:
        """The shared parameters, deciding those not decided yet: the explicit ``shared``
        argument, else a group's ``"shared"`` flag, else the autograd graph of these losses
        (which needs every task present)."""
        params = self._all_params()
        explicit = None if self._explicit_shared is None else {id(p) for p in
                                                               self._explicit_shared}
        auto = None
        for group in self.param_groups:
            flag = group.get("shared")
            for p in group["params"]:
                if id(p) in self._decided:
                    continue
                if explicit is not None:
                    self._decided[id(p)] = id(p) in explicit
                elif flag is not None:
                    self._decided[id(p)] = bool(flag)
                else:
                    if auto is None:
                        absent = [i for i, loss in enumerate(items) if loss is None]
                        if absent:
                            raise ValueError(
                                f"task(s) {absent} have no loss graph in this batch, so the "
                                "shared parameters cannot be detected from it: pass shared= "
                                "(or param-group 'shared' flags), or start with a batch in "
                                "which every task has a loss")
                        roots = _autograd.task_roots(losses, items)
                        if _autograd.compiled_graph(roots):
                            warnings.warn(
                                "the model is compiled (torch.compile), so its autograd graph "
                                "reaches every parameter from every task: the shared parameters "
                                "are detected from this batch's task gradients instead (a "
                                "parameter is shared when two or more tasks give it a non-zero "
                                "gradient). Pass shared= (or param-group 'shared' flags) to set "
                                "them exactly.", stacklevel=3)
                            split = _autograd.split_shared_by_gradients(items, params)
                        else:
                            split = _autograd.split_shared(roots, params)
                        auto = dict(zip(map(id, params), split))
                    self._decided[id(p)] = auto[id(p)]
        return [p for p in params if self._decided[id(p)]]

    def backward(self, losses, *, retain_graph: bool = False) -> None:
        """Per-task gradients of the shared parameters into the K×P buffer, and the ordinary
        gradients (of Σ_i L_i) of every other parameter into ``.grad``.

        Afterwards each shared parameter's ``.grad`` holds Σ_i ∂L_i/∂θ, what
        ``sum(losses).backward()`` gives (a view of the optimizer's buffer), so that clipping
        and gradient-norm tools over ``model.parameters()`` see the shared parameters. A
        rescaling of it before ``step()`` (``clip_grad_norm_``, ``GradScaler.unscale_``) is
        applied to every task's gradient of that parameter; any other change makes ``step()``
        raise.

        Args:
            losses: K scalar losses, a list/tuple of 0-dim tensors or a 1-D tensor. With
                ``absent_tasks="skip"`` a loss without a graph marks a task absent from this
                batch (weight 0 at this step).
            retain_graph: keep the autograd graph after the last task, as in
                ``Tensor.backward``.

        Calling ``backward`` again before ``step`` (or without ``zero_grad`` in between)
        accumulates, as ``Tensor.backward`` does.
        """
        skip_absent = self.options.absent_tasks == "skip"
        try:
            items = _autograd.as_loss_list(losses, self._k, allow_absent=skip_absent)
        except ValueError as exc:
            if "does not require grad" in str(exc):
                raise ValueError(f"{exc}; a task with no labels in a batch can be skipped at "
                                 "that step with absent_tasks='skip'") from None
            raise
        k = len(items)
        present = [loss is not None for loss in items]
        if not any(present):
            raise ValueError("losses: no task loss requires grad (none is connected to a "
                             "parameter), so there is nothing to differentiate")
        shared = self._resolve_shared(losses, items)
        dp = self._data_parallel()
        grads = self._grads
        accumulate = self._accumulating(shared)
        if (grads is None or grads.k != k
                or [id(p) for p in shared] != [id(p) for p in grads.params]
                or not grads.matches()):
            if accumulate:
                raise RuntimeError(
                    "the shared parameters or their dtype, device or shape changed between two "
                    "backward(losses) calls of one step; call step() or zero_grad() first")
            for p in shared:
                check_param(p, self._param_name(p), shared[0].device)
            size = sum(p.numel() for p in shared)
            grads = self._grads = _autograd.TaskGradients(
                shared, k, with_sum=True, row_length=dp.row_length(size) if dp else None)
            if dp is not None and self._shard_state:
                raise RuntimeError(
                    "the shared parameters changed under sharded data parallelism: the "
                    "optimizer state is split by the old layout; save and load a state_dict")
        if self._grad_views is None or len(self._grad_views) != len(shared):
            self._grad_views = [None] * len(shared)
        self._shared = shared
        if self._k is None:
            self._k = k
        if not accumulate:
            self._present = [False] * k
        self._present = [a or b for a, b in zip(self._present, present)]
        shared_ids = {id(p) for p in shared}
        specific = [p for p in self._all_params() if p.requires_grad and id(p) not in shared_ids]
        if dp is None:
            grads.compute(items, [specific] * k, retain_graph=retain_graph,
                          accumulate=accumulate)
            grads.form_sum()
        else:
            dp.set_layout(grads)
            handles: list = []
            sync = dp.syncing()
            grads.compute(items, [specific] * k, retain_graph=retain_graph,
                          accumulate=accumulate, scale=1.0 / dp.world,
                          on_task=(lambda i: handles.append(dp.reduce_task(grads, i)))
                          if sync else None)
            if sync:
                dp.finish_task_rows(grads, handles)
                self._present = dp.reduce_plain(specific, self._present)
                dp.unreduced = False
            else:  # inside ddp.no_sync(): accumulate here, reduce at the next synced backward
                grads.form_sum()
                dp.unreduced = True
        for j, p in enumerate(shared):
            if p.requires_grad:
                view = grads.sum_view(j)
                p.grad = view
                self._grad_views[j] = view
        self._pending = True

    def _data_parallel(self) -> DataParallel | None:
        """The data-parallel set-up (SPEC section 10), decided once, at the first backward."""
        if not self._dp_resolved:
            group, ddp = data_parallel_group(self._all_params(), self._process_group)
            if group is not None:
                if self.backend == "reference":
                    raise NotImplementedError(
                        "the reference backend runs in one process; use backend='native' with "
                        "data parallelism")
                # Clippy scales each tensor by a minimum over all its elements, which a shard
                # that splits the tensor does not see: Clippy takes the replicated scheme.
                self._dp = DataParallel(group, ddp,
                                        self.shard_state and self.options.umm != "clippy")
            self._dp_resolved = True
        return self._dp

    def _accumulating(self, shared) -> bool:
        """Whether this backward adds to the task gradients: before a step (pending), or after
        one whose gradients were not zeroed (every shared .grad is still the optimizer's view,
        as Tensor.backward accumulates into a .grad that is still there). Checks that nothing
        else lies in a shared .grad: a non-zero .grad from a plain loss.backward() cannot be
        attributed to a task and is refused rather than dropped."""
        grads = self._grads
        views = getattr(self, "_grad_views", None)
        ours = grads is not None and views is not None and len(views) == len(shared)
        attached = ours and all(v is not None and p.grad is v
                                for p, v in zip(shared, views) if p.requires_grad)
        if attached and grads.buffer._version == grads.sum_version:
            return True
        for j, p in enumerate(shared):
            g = p.grad
            if g is None or not p.requires_grad:
                continue
            if ours and g is views[j] and not bool(g.count_nonzero()):
                continue  # zeroed in place (zero_grad(set_to_none=False))
            if not (ours and g is views[j]) and not bool(g.count_nonzero()):
                continue
            raise RuntimeError(
                f"{self._param_name(p)} is shared by the tasks but its .grad holds a non-zero "
                "gradient that backward(losses) did not make (a plain loss.backward(), or a "
                "change since the last backward): PUB needs every contribution to a shared "
                "parameter as a task loss. Call opt.zero_grad() first, or pass that loss as a "
                "task (or add it to each task's loss).")
        if ours and attached:
            grads.buffer.zero_()  # zeroed in place: start again from zero
        return False

    # ---- gradient tools ----------------------------------------------------------------------

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
        """t summed (or reduced with ``op``) over the processes when each holds a shard."""
        dp = self._dp
        if dp is not None and dp.shard:
            import torch.distributed as dist

            dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=dp.group)
        return t

    def _refresh_sum(self) -> None:
        """The sum row (the shared .grad) formed again from the task gradients."""
        g, dp = self._grads, self._dp
        if dp is not None and dp.shard:
            dp.finish_task_rows(g, [])
        else:
            g.form_sum()
        for j, p in enumerate(g.params):
            if p.grad is not None and p.requires_grad:
                p.grad = self._grad_views[j] = g.sum_view(j)

    def _fold_grad_rescale(self) -> None:
        """Carry a rescaling of the shared ``.grad`` since backward (``clip_grad_norm_``,
        ``GradScaler.unscale_``) into the task gradients themselves, so that they and ``.grad``
        agree again; a change that is no rescaling raises RuntimeError naming the parameter.
        Compares each ``.grad`` with the task gradients' sum (a pass over the K×P buffer)."""
        g = self._grads
        if g is None or not self._pending:
            raise RuntimeError("call backward(losses) first: there are no task gradients")
        math = torch.float32 if g.dtype in (torch.bfloat16, torch.float16) else g.dtype
        tol = {torch.bfloat16: 1 / 128, torch.float16: 1 / 512}.get(g.dtype, 1e-6)
        active = [j for j, p in enumerate(g.params) if p.requires_grad and p.grad is not None]
        parts, sums = [], []
        for j in active:
            rows, m = self._task_rows(j)
            s = rows.sum(0, dtype=math).to(g.dtype).double()
            md = m.double()
            sums.append(rows)
            parts.append(torch.stack([(md * s).sum(), (s * s).sum(), (md * md).sum()]))
        if not parts:
            return
        ms, ss, mm = self._summed(torch.stack(parts)).unbind(1)
        c = torch.where(ss > 0, ms / ss.clamp(min=1e-300), torch.ones_like(ss))
        edited = torch.where(ss > 0, mm - c * ms > tol * tol * mm, mm != 0) | ~torch.isfinite(c)
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
        self._fold_grad_rescale()
        g = self._grads
        rows = [self._task_rows(j)[0] for j, p in enumerate(g.params) if p.requires_grad]
        if norm_type == math.inf:
            local = torch.stack([r.abs().amax(1).double() for r in rows]).amax(0)
            import torch.distributed as dist

            return self._summed(local, dist.ReduceOp.MAX if self._dp else None)
        local = torch.stack([r.double().abs().pow(norm_type).sum(1) for r in rows]).sum(0)
        return self._summed(local).pow(1.0 / norm_type)

    def clip_task_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Per-task gradient clipping: scale each task's gradient of the shared parameters to a
        norm of at most ``max_norm`` (as ``torch.nn.utils.clip_grad_norm_`` does for one
        gradient), before the step balances them. The shared ``.grad`` is updated to the sum of
        the clipped task gradients. Returns the norms before clipping (K,). Call between
        ``backward(losses)`` and ``step()``, after ``GradScaler.unscale_`` if one is used."""
        if not (isinstance(max_norm, (int, float)) and max_norm > 0):
            raise ValueError(f"max_norm must be a number > 0, got {max_norm!r}")
        norms = self.task_grad_norms(norm_type)
        g = self._grads
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0).to(g.dtype).unsqueeze(1)
        for j, p in enumerate(g.params):
            if p.requires_grad:
                self._task_rows(j)[0].mul_(coef)
        self._refresh_sum()
        return norms

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the ``.grad`` of every parameter and drop pending per-task gradients."""
        self._pending = False
        super().zero_grad(set_to_none=set_to_none)

    # ---- step --------------------------------------------------------------------------------

    def step(self, closure=None):
        """One optimizer step: SPEC section 5 after ``backward(losses)``, else the base step
        (K = 1) on every parameter's ``.grad``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            if torch.compiler.is_compiling():
                compiled_step(self)  # an opaque custom op: the compiler does not trace the step
            else:
                self._take_step()
        return loss

    def _backend_for(self, plan: StepPlan):
        k = self._k or 1
        b = self._backend
        if b is not None and b.k == k and b.device == plan.device:
            return b
        seed = self._current_weights()
        if self.backend == "reference":
            from ..reference.step import ReferenceBackend

            b = ReferenceBackend(k, plan.device)
        elif plan.device.type == "cuda":
            from ._cuda import CudaBackend

            b = CudaBackend(k, plan.device)
        else:
            b = CpuBackend(k, plan.device)
        if seed is not None and b.k == k and (seed[0] is not None or seed[1] is not None):
            b.set_weights(*seed)
        self._backend = b
        self._seed_weights = None
        return b

    def _scaler_inputs(self):
        """GradScaler's grad_scale and found_inf, when a ``scaler.step(opt)`` is under way."""
        return getattr(self, "grad_scale", None), getattr(self, "found_inf", None)

    def _take_step(self) -> None:
        pending = self._pending
        if pending and self._grads is not None and not self._grads.matches():
            changed = [self._param_name(p) for p, lay in zip(self._grads.params,
                                                             self._grads.layouts)
                       if (p.shape, p.stride(), p.dtype, p.device) != lay]
            raise RuntimeError(
                f"{', '.join(changed)} changed dtype, device, shape or layout between "
                "backward(losses) and step(); its task gradients no longer fit it. Call "
                "backward(losses) again.")
        grad_scale, found_inf = self._scaler_inputs()
        # A shared .grad changed since backward (its buffer's version moved, or it is another
        # tensor now), or unscaled in place by GradScaler.unscale_ (which moves no version):
        # the step measures each tensor's rescaling against the task gradients.
        rescan = pending and (
            self._grads.buffer._version != self._grads.sum_version
            or (found_inf is not None and grad_scale is None)
            or any(p.grad is not v for p, v in zip(self._grads.params, self._grad_views)
                   if v is not None))
        dp = self._dp
        if pending and dp is not None and dp.unreduced:
            raise RuntimeError(
                "step() after backward(losses) calls made only inside ddp.no_sync(): the task "
                "gradients were never averaged over the processes. Make the last backward of "
                "an accumulation outside no_sync(), as with DDP's own backward.")
        plan = build_plan(self, pending, rescan)
        if plan is None:
            self._pending = False
            return
        backend = self._backend_for(plan)
        every = self.options.update_weights_every
        solve = pending and plan.has_shared and (not self._solved or self._t % every == 0)
        task_scale = None
        if pending and self._present is not None and not all(self._present):
            task_scale = np.array(self._present, dtype=np.float64)
        if not getattr(backend, "lazy", False):
            self._read_device_result(raise_errors=False)
        between = (lambda: dp.reduce_summary(backend)) if plan.sharded else None
        result = backend.step(plan, solve=solve, options=self.options, grad_scale=grad_scale,
                              found_inf=found_inf, task_scale=task_scale, between=between)
        if plan.sharded and (getattr(result, "lazy", False)
                             or result.outcome == StepOutcome.APPLIED):
            # On CUDA the device decides: gathering unchanged shards is harmless.
            dp.gather_params(self._grads.params, self._grads)
        self._finish_step(plan, result, pending, solve, found_inf)

    def _commit_state(self, plan: StepPlan) -> None:
        for target, pending in ((self.state, plan.pending_state),
                                (self._shard_state, plan.pending_shard_state)):
            for p, new in pending.items():
                st = target.setdefault(p, {}) if target is self._shard_state else target[p]
                for key, value in new.items():
                    if value is None:
                        st.pop(key, None)
                    else:
                        st[key] = value

    def _finish_step(self, plan: StepPlan, result, pending: bool, solve: bool,
                     found_inf) -> None:
        if getattr(result, "lazy", False):
            # The device decides; nothing here may wait for it. The entries the kernels used are
            # kept either way (a skipped step leaves their values as they were).
            self._commit_state(plan)
            if pending and plan.has_shared:
                self._t += 1
                self._solved = self._solved or solve
            self._pending = False
            self._unread = (result, found_inf is not None)
            return
        outcome = result.outcome
        if outcome == StepOutcome.APPLIED:
            self._commit_state(plan)
            if pending and plan.has_shared:
                self._t += 1
                self._solved = self._solved or solve
                self._stats = dict(result.stats if solve else self._stats, updated=solve)
            self._pending = False
            return
        if outcome == StepOutcome.SKIPPED_FOUND_INF or (
                found_inf is not None and outcome != StepOutcome.GRAD_EDITED):
            # Under a GradScaler a skipped step is the protocol, not an error.
            if found_inf is not None:
                found_inf.fill_(1.0)
            self._pending = False
            return
        error = RuntimeError if outcome == StepOutcome.GRAD_EDITED else FloatingPointError
        raise error(self._failure_message(plan, result))

    def _failure_message(self, plan: StepPlan, result) -> str:
        tail = "; the step was not taken and parameters and optimizer state are unchanged"
        parts = []
        if result.bad_tasks:
            parts.append(f"task(s) {result.bad_tasks}")
        if result.bad_params:
            parts.append(", ".join(self._param_name(plan.owners.get(id(p), p))
                                   for p in result.bad_params[:5]))
        if result.outcome == StepOutcome.NONFINITE_GRAD:
            return "non-finite gradient (NaN/Inf) for " + " and ".join(parts) + tail
        if result.outcome == StepOutcome.GRAD_EDITED:
            return (f"the .grad of {parts[-1] if parts else 'a shared parameter'} was changed "
                    "between backward(losses) and step() in a way that is not a rescaling (a "
                    "rescaling, as clip_grad_norm_ or GradScaler.unscale_ make, is applied to "
                    "every task's gradient; other changes cannot be)" + tail)
        return ("the task updates overflowed (non-finite Gram matrix) although every gradient "
                "is finite: check the learning rate and eps" + tail)

    # ---- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict plus ``"pub"``: K, shared params (by index), step
        counter, α̂ in use, solver warm start and the UMM."""
        self._read_device_result(raise_errors=False)
        sd = super().state_dict()
        index = {id(p): i for i, p in enumerate(self._all_params())}
        for p, entries in self._gathered_shard_state().items():
            sd["state"].setdefault(index[id(p)], {}).update(entries)
        weights = self._current_weights() or (None, None)
        sd["pub"] = {
            "num_tasks": self._k,
            "shared": None if self._shared is None else [index[id(p)] for p in self._shared],
            "step": self._t,
            "task_weights": None if weights[0] is None else torch.from_numpy(
                np.array(weights[0], dtype=np.float64)),
            "warm_start": None if weights[1] is None else torch.from_numpy(
                np.array(weights[1], dtype=np.float64)),
            "umm": self.options.umm,
        }
        return sd

    def _gathered_shard_state(self) -> dict:
        """Under sharded data parallelism, the full state of each shared parameter, gathered
        from the processes' shards (collective: every process must call state_dict())."""
        dp, grads = self._dp, self._grads
        if dp is None or not dp.shard or grads is None or dp._layout is None:
            return {}
        import torch.distributed as dist

        flag = torch.tensor([float(bool(self._shard_state))], dtype=torch.float64,
                            device=grads.device if dist.get_backend(dp.group) == "nccl"
                            else "cpu")
        dist.all_reduce(flag, group=dp.group)
        if not flag.item():
            return {}
        groups_of = {id(p): g for g in self.param_groups for p in g["params"]}
        keys: list[str] = []
        for p in grads.params:
            for name in self._state_names(groups_of[id(p)]):
                key = "task_" + name if self.options.umm == "adatask" else name
                if key not in keys:
                    keys.append(key)
        k_rows = grads.k if self.options.umm == "adatask" else 1
        dtype = state_dtype(grads.params[0]) if grads.params else torch.float32
        out: dict = {}
        for key in keys:
            send = torch.zeros((k_rows, dp.S), dtype=dtype, device=grads.device)
            for j, p in enumerate(grads.params):
                lo, hi, off = dp.pieces[j]
                piece = self._shard_state.get(p, {}).get(key)
                if hi > lo and piece is not None:
                    send[:, off:off + (hi - lo)].copy_(piece.reshape(k_rows, hi - lo))
            recv = torch.empty((dp.world, k_rows, dp.S), dtype=dtype, device=grads.device)
            dist.all_gather_into_tensor(recv.view(-1), send.view(-1), group=dp.group)
            flat = recv.permute(1, 0, 2).reshape(k_rows, dp.world * dp.S)
            for j, p in enumerate(grads.params):
                if key.removeprefix("task_") not in self._state_names(groups_of[id(p)]):
                    continue
                o, n = grads.offsets[j], grads.numels[j]
                full = torch.empty_strided(
                    (k_rows, *p.shape), (p.numel(), *p.stride()), dtype=dtype, device=p.device)
                for i in range(k_rows):
                    full[i].as_strided((n,), (1,), full[i].storage_offset()).copy_(
                        flat[i, o:o + n])
                out.setdefault(p, {})[key] = full if key.startswith("task_") else full[0]
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer (or of its torch base class).

        Raises ValueError, leaving the optimizer unchanged, when the number of tasks, the UMM or
        any state tensor's shape does not match. State of 16-bit parameters stays float32.
        """
        pub = state_dict.get("pub")
        params = self._all_params()
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        k = None
        shared_idx: list[int] | None = None
        if pub is not None:
            k = pub.get("num_tasks")
            if self._k is not None and k is not None and k != self._k:
                raise ValueError(
                    f"loaded state dict is for K = {k} tasks, this optimizer uses K = {self._k}")
            if pub.get("umm") != self.options.umm:
                raise ValueError(
                    f"loaded state dict was saved with umm={pub.get('umm')!r}, this optimizer "
                    f"uses umm={self.options.umm!r}")
            if pub.get("shared") is not None:
                shared_idx = sorted(set(pub["shared"]))
                if any(not 0 <= i < len(params) for i in shared_idx):
                    raise ValueError("loaded state dict names shared parameters out of range")
            for name in ("task_weights", "warm_start"):
                v = pub.get(name)
                if v is not None and (k is None or tuple(v.shape) != (k,)):
                    raise ValueError(
                        f"loaded PUB {name} has shape {tuple(v.shape)}, expected ({k},)")
        id_map = {}
        for g_saved, g in zip(saved_groups, self.param_groups):
            if len(g_saved["params"]) != len(g["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size "
                    "of optimizer's group")
            id_map.update(zip(g_saved["params"], g["params"]))
        index = {id(p): i for i, p in enumerate(params)}
        shared_set = set(shared_idx or ())
        for key, st in state_dict.get("state", {}).items():
            p = id_map.get(key)
            if p is None:
                continue
            for name, v in st.items():
                if name == "step" or not isinstance(v, torch.Tensor):
                    continue
                expect = tuple(p.shape)
                if name.startswith("task_"):
                    if index[id(p)] not in shared_set or k is None:
                        raise ValueError(f"loaded state entry {name!r} of a non-shared parameter")
                    expect = (k,) + expect
                if tuple(v.shape) != expect:
                    raise ValueError(
                        f"loaded state {name!r} of {self._param_name(p)} has shape "
                        f"{tuple(v.shape)}, expected {expect}")
        super().load_state_dict({k_: v for k_, v in state_dict.items() if k_ != "pub"})
        # torch keeps the loaded tensors themselves where no cast is needed, and casts floating
        # state to the parameter's dtype. The kernels write state in place and keep float32
        # state for 16-bit parameters: own a copy of every entry (loading one state dict into
        # two optimizers must not couple them), taking 16-bit parameters' entries again from
        # the source in float32.
        for key, st in state_dict.get("state", {}).items():
            p = id_map.get(key)
            if p is None:
                continue
            mine = self.state[p]
            for name, v in st.items():
                if not isinstance(v, torch.Tensor):
                    continue
                if (name != "step" and v.is_floating_point()
                        and p.dtype in (torch.bfloat16, torch.float16)):
                    mine[name] = v.to(device=p.device, dtype=torch.float32).clone()
                elif mine.get(name) is v:
                    mine[name] = v.clone()
        keep = (self._explicit_shared, self.options, self.backend, self._dp, self._dp_resolved)
        self._reset_pub()
        (self._explicit_shared, self.options, self.backend, self._dp,
         self._dp_resolved) = keep
        if pub is None:
            return
        self._k = k
        self._t = int(pub.get("step", 0))
        if shared_idx is not None:
            shared_set = set(shared_idx)
            for i, p in enumerate(params):
                self._decided[id(p)] = i in shared_set
        weights = tuple(None if pub.get(n) is None
                        else pub[n].detach().cpu().double().numpy().copy()
                        for n in ("task_weights", "warm_start"))
        self._solved = weights[0] is not None
        self._seed_weights = weights
