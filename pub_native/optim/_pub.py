"""The PUB machinery shared by ``pub_native.Adam``, ``AdaGrad`` and ``RMSProp`` (Python layer).

A PUB optimizer is its torch base class (arguments, defaults, validation, param groups,
schedulers, state-dict keys) plus this mixin, which owns PUB's options, shared-parameter
detection and the per-task gradients (``backward``) and the step's decisions (solve or reuse,
raise or skip); gradient tools (``_grad_tools``) and checkpoints (``_checkpoint``) are mixins of
it. The step itself is one call of a
backend (``_backends``) on a checked plan (``_plan``); torch's own ``step`` is never called, so
every parameter goes through one path and step hooks fire once.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from typing import Any

import numpy as np
import torch
from torch.optim import optimizer as _torch_optimizer

from .. import _autograd
from .._caller import user_stacklevel
from .._distributed import (
    checked_process_group,
    data_parallel_group,
    own_averaging_checks,
    refuse_join,
)
from .._native import StepOutcome
from ._backends import CpuBackend
from ._checkpoint import Checkpoints
from ._compile import compiled_step, outside_graph
from ._compile import prepare as prepare_for_compile
from ._compile import register as register_for_compile
from ._ddp import DataParallel
from ._grad_tools import GradientTools
from ._options import CLIPPY_PRESETS, PubOptions
from ._plan import StepPlan, build_plan, check_param, mark_written, not_dense_message

__all__ = ["BACKENDS", "CLIPPY_PRESETS", "PUBOptimizer"]

#: Step backends by name; "native" picks the CPU or CUDA core by the parameters' device.
#: PUB_NATIVE_BACKEND in the environment sets the default.
BACKENDS = ("native", "reference")


# What observes an optimizer step besides its own hooks (torch.optim.optimizer): global step hooks
# and the profiler. Where this torch lacks either, every step is treated as observed.
_GLOBAL_STEP_HOOKS = tuple(getattr(_torch_optimizer, name, None) for name in (
    "_global_optimizer_pre_hooks", "_global_optimizer_post_hooks"))
_profiler_enabled = getattr(torch._C._autograd, "_profiler_enabled", None)
_OBSERVABLE = _profiler_enabled is not None and None not in _GLOBAL_STEP_HOOKS


def _observed(opt, hooks: bool) -> bool:
    """Whether torch's own wrapping of ``step`` (``hooks``) or ``zero_grad`` must run: step
    hooks registered (for ``step``), the profiler on, or the compiler tracing."""
    if not _OBSERVABLE or torch.compiler.is_compiling() or _profiler_enabled():
        return True
    return hooks and bool(opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks
                          or _GLOBAL_STEP_HOOKS[0] or _GLOBAL_STEP_HOOKS[1])


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


def _scaler_skip(outcome, under_scaler: bool) -> bool:
    """Whether a skipped step is a GradScaler's protocol, not an error: the scaler found an
    inf/NaN, or, under a scaler, a gradient overflowed (the scaler found it in .grad, the
    tasks' sum, and backs off). Updates that overflow from finite gradients are not the
    scale's doing, and a smaller scale would not mend them: they raise as without a scaler
    (the found_inf handed to step() is the scaler's copy, so setting it would not back the
    scale off)."""
    return outcome == StepOutcome.SKIPPED_FOUND_INF or (
        under_scaler and outcome == StepOutcome.NONFINITE_GRAD)


class PUBOptimizer(GradientTools, Checkpoints):
    """Mixin that turns a ``torch.optim`` optimizer into its PUB version (see the subclasses).

    Subclasses set ``_ALGO`` (:class:`pub_native._native.Algorithm`) and give, per param group,
    ``_state_names`` (torch's state keys, in the native rule's order), ``_rule_flags``
    ((amsgrad, centered, momentum)), ``_base_row`` (the constants in ``BaseCol`` order) and
    ``_initial_state_value``; and ``_NUMBER_OPTIONS`` (the group options that are numbers) and
    ``_PAIR_OPTIONS`` (those that are pairs of numbers), which every step checks.
    """

    _ALGO: int
    _NUMBER_OPTIONS: tuple[str, ...] = ()
    _PAIR_OPTIONS: tuple[str, ...] = ()
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
        self._process_group = checked_process_group(process_group)
        backend = _default_backend() if backend is None else backend
        if backend not in BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r}, expected one of {BACKENDS}")
        self.backend = backend
        for group in self.param_groups:
            self._refuse_unsupported(group)
        known = {id(p) for p in self._all_params()}
        self._compile_handle = register_for_compile(self)
        if isinstance(shared, torch.Tensor):  # iterating it would give its rows
            raise TypeError("shared must be an iterable of parameters (e.g. [p] or "
                            "model.trunk.parameters()), got a single Tensor")
        self._explicit_shared = None if shared is None else list(shared)
        if shared is not None:  # names, not tensors: said so (not "not among the params")
            _autograd.refuse_names(shared if isinstance(shared, (str, tuple))
                                   else self._explicit_shared, "shared")
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
        # backward(losses) ran before a load_state_dict whose shared parameters its task
        # gradients do not fit (True), or an accumulating backward(losses) raised part-way
        # (the message to raise): step() raises until zero_grad() or backward(losses) afresh.
        self._unfit_pending: bool | str = False
        self._t = 0  # PUB steps applied
        # α̂ in use may be reused: a solve that saw every task was applied since the last solve
        # that lacked one (an absent task's weight 0 is for its own step only: the next step
        # solves again).
        self._solved = False
        self._backend = None
        self._seed_weights: tuple | None = None  # (α̂, α) for the next backend (checkpoints)
        self._seed_applied = None  # the weights the last step applied, for a copy's backend
        self._stats: dict[str, Any] = {}
        self._unread = None  # (device result, under a GradScaler) not yet read back
        # (error class, message) of a device step read back where it could not raise
        # (state_dict, a copy): raised at the next read that can.
        self._deferred_error = None
        self._dp: DataParallel | None = None  # data parallelism, decided at the first backward
        self._dp_resolved = False
        self._shard_state: dict = {}  # param -> its shard's state (sharded data parallelism)
        # What the plan found right last time (so that unchanged parameters and state are not
        # checked again): id(param) -> its signature / its state tensors.
        self._checked: dict = {}
        self._state_memo: dict = {}
        self._plan_memo = None  # the last plan, for the steps that step the same tensors

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
        they are detected at the next ``backward``). A parameter listed twice in the group is
        an error (torch warns and would step it twice, one state for both; PUB's single pass
        over the group cannot), raised before the group is added."""
        params = param_group.get("params") if isinstance(param_group, dict) else None
        if params is not None and not isinstance(params, (torch.Tensor, set)):
            params = list(params)  # a generator is read once: hand torch the list
            param_group = {**param_group, "params": params}
        if isinstance(params, list):
            seen: dict[int, int] = {}
            for j, p in enumerate(params):
                if isinstance(p, tuple) and len(p) == 2:  # (name, parameter), as torch takes
                    p = p[1]
                if isinstance(p, torch.Tensor) and seen.setdefault(id(p), j) != j:
                    raise ValueError(
                        f"param_groups[{len(self.param_groups)}]['params'][{j}] (shape "
                        f"{tuple(p.shape)}) is ['params'][{seen[id(p)]}] again: list each "
                        "parameter once")
        super().add_param_group(param_group)
        if not hasattr(self, "_decided"):  # within torch's constructor: ours checks the groups
            return
        group = self.param_groups[-1]
        try:
            self._refuse_unsupported(group)
        except BaseException:
            self.param_groups.pop()  # torch only appended it: the optimizer is as it was
            raise
        prepare_for_compile(self)
        if group.get("shared") is not None:
            for p in group["params"]:
                self._decided[id(p)] = bool(group["shared"])

    def _refuse_unsupported(self, group: dict) -> None:
        """Raises for a group that asks what the PUB step cannot do (a group in param_groups).
        ``capturable`` is accepted and changes nothing: on CUDA the step never synchronizes and
        keeps its step counters on the device whatever it says, so it can always be captured
        in a CUDA graph."""
        if group.get("differentiable", False):
            raise NotImplementedError("PUB optimizers do not support differentiable=True")
        for p in group["params"]:
            if torch.nn.parameter.is_lazy(p):
                # A lazy module's parameter before its first forward (torch.optim takes it):
                # it becomes an ordinary one in place, which the steps check as any other.
                continue
            if p.is_complex():
                raise TypeError(f"{self._param_name(p)}: complex parameters are not supported")
            # Refused at once, not at the first step (sparse ones are, by the step; a frozen
            # one, which the step never reads, where it is unfrozen and has a gradient).
            if p.requires_grad and p.layout == torch.strided and not _autograd.dense_strides(p):
                raise NotImplementedError(f"{self._param_name(p)}: {not_dense_message(p)}")

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
                    shape = "not yet known" if torch.nn.parameter.is_lazy(p) else \
                        tuple(p.shape)
                    return f"param_groups[{gi}]['params'][{j}] (shape {shape})"
        return f"tensor of shape {tuple(p.shape)}"

    def _read_device_result(self, raise_errors: bool = True) -> None:
        """Read back the last CUDA step's result (this waits for the device): its solve stats,
        and, unless a GradScaler drove it, a FloatingPointError if the device skipped it."""
        deferred = getattr(self, "_deferred_error", None)
        if raise_errors and deferred is not None:
            self._deferred_error = None
            raise deferred[0](deferred[1])
        if self._unread is None:
            return
        result, under_scaler = self._unread
        self._unread = None
        outcome = result.outcome
        if outcome == StepOutcome.APPLIED:
            self._stats = dict(result.stats if result.solved else self._stats,
                               updated=result.solved)
        elif not _scaler_skip(outcome, under_scaler):
            error = RuntimeError if outcome == StepOutcome.GRAD_EDITED else FloatingPointError
            if getattr(result, "from_earlier", False):
                message = (f"a CUDA step since the last read of task_weights/stats was skipped "
                           f"on the device ({outcome.name}: a non-finite gradient or update, or "
                           "a .grad edited other than by a rescaling), leaving parameters and "
                           "state as they were; the steps after it were taken")
            else:
                message = (self._failure_message(result._plan, result)
                           + " (the CUDA step was skipped on the device)")
            if not raise_errors:
                self._deferred_error = (error, message)
                return
            raise error(message)

    def _current_weights(self) -> tuple | None:
        """(α̂, α) in use, as host float64 arrays (either may be None)."""
        if self._backend is not None:
            return self._backend.get_weights()
        return self._seed_weights

    def _current_applied(self):
        """The weights the last PUB step applied (host float64), or None."""
        if self._backend is not None:
            return self._backend.applied_weights()
        if self._seed_applied is not None:
            return self._seed_applied
        return None if self._seed_weights is None else self._seed_weights[0]

    @property
    def task_weights(self) -> torch.Tensor | None:
        """α̂ used by the last PUB step (float64, shape (K,)), or None before the first one: with
        a task absent from that step's batch, 0 for it and the others renormalized. A copy
        (deepcopy, pickle) shows the same; after ``load_state_dict``, until the next step, the
        loaded α̂.

        On CUDA this copies from the device (the step itself never waits for it), and raises
        FloatingPointError if the device skipped the last step for a NaN/Inf."""
        self._read_device_result()
        applied = self._current_applied()
        if applied is None:
            return None
        return torch.from_numpy(np.array(applied, dtype=np.float64))

    @property
    def stats(self) -> dict[str, Any]:
        """Of the last weight solve: status, iterations, residual, solve_time (s, CPU) and
        task_grad_norms (each task's gradient 2-norm over the shared parameters, as the Gram
        pass measured it); and whether the last PUB step solved (``updated``) or reused α̂. On
        CUDA this waits for the device, and raises FloatingPointError if it skipped the last
        step for a NaN/Inf."""
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
        (which needs every task present). A frozen parameter is in no graph: it is left to the
        first call that finds it unfrozen (gradual unfreezing of a trunk)."""
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
                elif p.requires_grad:
                    if auto is None:
                        absent = [i for i, loss in enumerate(items) if loss is None]
                        if absent:
                            raise ValueError(
                                f"task(s) {absent} have no loss graph in this batch, so the "
                                "shared parameters cannot be detected from it: pass shared= "
                                "(or param-group 'shared' flags), or start with a batch in "
                                "which every task has a loss")
                        roots = _autograd.task_roots(losses, items)
                        if _autograd.reentrant_checkpoint(roots):
                            # (the walk below would not see the parameters inside it: at the
                            # bottom of the model they got no gradient, silently)
                            raise NotImplementedError(_autograd.REENTRANT_CHECKPOINT)
                        if _autograd.compiled_graph(roots):
                            warnings.warn(
                                "the model is compiled (torch.compile), so its autograd graph "
                                "reaches every parameter from every task: the shared parameters "
                                "are detected from this batch's task gradients instead (a "
                                "parameter is shared when two or more tasks give it a non-zero "
                                "gradient). Pass shared= (or param-group 'shared' flags) to set "
                                "them exactly.", stacklevel=user_stacklevel())
                            split = _autograd.split_shared_by_gradients(items, params)
                        else:
                            split = _autograd.split_shared(roots, items, params)
                        auto = dict(zip(map(id, params), split))
                    self._decided[id(p)] = auto[id(p)]
        return [p for p in params if self._decided.get(id(p), False)]

    def _task_losses(self, losses) -> tuple[list, list[torch.Tensor]]:
        """The K task losses (None for a task absent from this batch) and the shared
        parameters, or a ValueError."""
        skip_absent = self.options.absent_tasks == "skip"
        try:
            items = _autograd.as_loss_list(losses, self._k, allow_absent=skip_absent)
        except ValueError as exc:
            if "does not require grad" in str(exc):
                raise ValueError(f"{exc}; a task with no labels in a batch can be skipped at "
                                 "that step with absent_tasks='skip'") from None
            raise
        if not any(loss is not None for loss in items):
            raise ValueError("losses: no task loss requires grad (none is connected to a "
                             "parameter), so there is nothing to differentiate")
        return items, self._resolve_shared(losses, items)

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
        if torch.compiler.is_compiling():  # torch 2.11 fails on the attributes set below
            return outside_graph(type(self).backward)(self, losses, retain_graph=retain_graph)
        # The data-parallel set-up first: deciding it may take collectives, which every
        # process must reach in the same order whatever its batch holds.
        dp = self._data_parallel()
        if dp is not None:
            refuse_join(dp.refresh())  # the same on every process: none has taken a collective
        # A call that raises decides nothing and leaves the layout of the task gradients as it
        # was (a graph torch cannot differentiate, such as a reentrant checkpoint, would
        # otherwise leave its parameters decided from a walk that could not see them).
        decided = len(self._decided)
        kept = (self._k, self._shared, self._grads, self._grad_views, self._present)
        try:
            # Grad enabled and inference mode off, whatever the caller's context (as
            # loss.backward() works under torch.no_grad() and torch.inference_mode()): the
            # buffer and the .grad it writes are ordinary tensors that later calls update.
            with _autograd.backward_grad_mode():
                written = self._backward(losses, retain_graph, dp, decided)
        except BaseException:
            for key in list(self._decided)[decided:]:
                del self._decided[key]
            if self._grads is not kept[2]:
                self._plan_memo = None  # it may hold the buffer made by this call
            self._k, self._shared, self._grads, self._grad_views, self._present = kept
            raise
        # Once every .grad is final (averaged too, under data parallelism): the hooks
        # loss.backward() would run after accumulating them.
        _autograd.run_post_accumulate_grad_hooks(written)

    def _backward(self, losses, retain_graph: bool, dp, decided: int) -> list[torch.Tensor]:
        """backward(losses) past the data-parallel set-up; returns the tensors whose .grad it
        wrote."""
        try:
            items, shared = self._task_losses(losses)
        except ValueError:
            # Where the other processes go on to the agreement below (the first batch, or
            # parameters still to be detected), join it, so that they raise too instead of
            # waiting in a collective that this process never reaches; then raise this
            # process's own error.
            params = self._all_params()
            if dp is not None and (self._k is None or any(
                    id(p) not in self._decided and p.requires_grad for p in params)):
                with contextlib.suppress(ValueError):
                    dp.agree(0, [False] * len(params), [p.requires_grad for p in params],
                             failed=True)
            raise
        k = len(items)
        present = [loss is not None for loss in items]
        if dp is not None and (self._k is None or len(self._decided) != decided):
            # Decided from this process's batch: agree with the others before any collective
            # that depends on it (a different K, or a parameter one batch reached with two
            # tasks and another with one, would pair mismatched collectives: a hang or abort).
            params = self._all_params()
            agreed = dp.agree(k, [self._decided.get(id(p), False) for p in params],
                              [p.requires_grad for p in params])
            for p, flag in zip(params, agreed):
                if id(p) in self._decided:  # (a frozen one stays undecided)
                    self._decided[id(p)] = flag
            shared = [p for p in params if self._decided.get(id(p), False)]
        grads = self._grads
        torn = self._unfit_pending if isinstance(self._unfit_pending, str) else None
        try:
            accumulate = self._accumulating(shared)
        except RuntimeError:
            if torn:  # the rows it accumulated into are not what .grad shows: say why
                raise RuntimeError(torn) from None
            raise
        if accumulate and torn:
            raise RuntimeError(torn)
        if (grads is None or grads.k != k
                or [id(p) for p in shared] != [id(p) for p in grads.params]
                or not grads.matches()):
            if accumulate:
                raise RuntimeError(
                    "the shared parameters or their dtype, device or shape changed between two "
                    "backward(losses) calls of one step; call step() or zero_grad() first")
            if dp is not None and self._shard_state:
                raise RuntimeError(
                    "the shared parameters changed under sharded data parallelism (a parameter "
                    "frozen at detection and unfrozen now, or one whose dtype or shape "
                    "changed): the optimizer state is split by the old layout. Save a "
                    "state_dict and load it into a new optimizer, or build the optimizer "
                    "with shared= naming every parameter to balance (frozen ones too), or "
                    "with shard_state=False")
            for p in shared:
                check_param(p, self._param_name(p), shared[0].device)
                if p.dtype != shared[0].dtype:
                    raise TypeError(
                        f"the shared parameters must have one dtype: {self._param_name(p)} is "
                        f"{p.dtype}, {self._param_name(shared[0])} is {shared[0].dtype}. Convert "
                        "them to one dtype, or name the ones to balance with shared= (the "
                        "others get the ordinary step)")
            size = sum(p.numel() for p in shared)
            self._plan_memo = None  # it holds the old buffer
            grads = self._grads = _autograd.TaskGradients(
                shared, k, with_sum=True, row_length=dp.row_length(size) if dp else None,
                pad_rows=True)
        if self._grad_views is None or len(self._grad_views) != len(shared):
            self._grad_views = [None] * len(shared)
        self._shared = shared
        first = self._k is None
        if first:
            self._k = k
        if not accumulate:
            self._present = [False] * k
        self._present = [a or b for a, b in zip(self._present, present)]
        shared_ids = {id(p) for p in shared}
        params = self._all_params()
        # (Not a lazy module's parameter before its first forward: no graph holds it yet.)
        specific = [p for p in params if p.requires_grad and id(p) not in shared_ids
                    and not torch.nn.parameter.is_lazy(p)]
        if first:
            self._warn_other_leaves(items, params)
        handles: list = []
        sync = dp is not None and dp.syncing()
        extra = {}
        if dp is not None:
            dp.set_layout(grads)
            if accumulate and not dp.shard and not dp.unreduced:
                # The replicated rows hold the average of an earlier synced backward, the same
                # on every process: ÷ N, so that the next all-reduce (a sum; this call's, or
                # under no_sync() a later one's) keeps it once, as average_gradients does with
                # .grad (the sharded scheme reduce-scatters from rows it leaves unreduced).
                grads.buffer[:k].div_(dp.world)
            extra = {"scale": 1.0 / dp.world,
                     "on_task": (lambda i: handles.append(dp.reduce_task(grads, i)))
                     if sync else None}
        unreached = None
        if specific or any(p.requires_grad for p in shared):
            unreached = (
                "losses: no task loss reaches any parameter of this optimizer that requires "
                "grad, so backward(losses) would leave them all as they are: give the optimizer "
                "the parameters the losses are computed from (one built on a model that was "
                "since copied or reloaded holds the old model's tensors; FullyShardedDataParallel "
                "with use_orig_params=True computes the gradients of its flat parameters, "
                "which PUB does not balance)")
        written = [p for p in shared if p.requires_grad]
        try:
            grads.compute(items, [specific] * k, retain_graph=retain_graph,
                          accumulate=accumulate, nothing_reached=unreached, written=written,
                          name_of=self._param_name, **extra)
        except _autograd.NothingReached:
            # Nothing was written (no gradient, no reduction: the rows of an accumulation are
            # as they were), except under data parallelism, whose reductions ran.
            if accumulate and grads.touched and dp is not None:
                self._torn_by_error()
            raise
        except BaseException:
            if accumulate and grads.touched:
                self._torn_by_error()
            raise
        if sync:
            dp.finish_task_rows(grads, handles)
            self._present = dp.reduce_plain(specific, self._present)
            dp.unreduced = False
            # The averaging wrote every task-specific gradient that some process has.
            written = [p for p in shared if p.requires_grad] + [
                p for p in specific if p.grad is not None]
        else:  # (inside ddp.no_sync(): accumulated here, reduced at the next synced backward)
            grads.form_sum()
            if dp is not None:
                dp.unreduced = True
        for j, p in enumerate(shared):
            view = None  # (a frozen parameter has no .grad of ours to watch)
            if p.requires_grad:
                view = grads.sum_view(j)
                p.grad = view
            self._grad_views[j] = view
        self._pending = True
        self._unfit_pending = False
        return written

    def _warn_other_leaves(self, items, params) -> None:
        """On the first backward: a warning naming the tensors requiring grad that the losses
        reach outside this optimizer (another optimizer's parameters), which backward(losses)
        leaves without a gradient, unlike loss.backward()."""
        others = _autograd.other_leaves(items, params)
        if others:
            shapes = ", ".join(str(tuple(t.shape)) for t in others[:3])
            warnings.warn(
                f"the losses reach {len(others)} tensor(s) that require grad outside this "
                f"optimizer (shapes {shapes}{', ...' if len(others) > 3 else ''}): "
                "backward(losses) computes the gradients of this optimizer's parameters only. "
                "Give those tensors theirs with torch.autograd.backward(sum(losses), "
                "inputs=[...], retain_graph=True) before it (under DistributedDataParallel: "
                "torch.autograd.grad, then average it over the processes; see the README), or "
                "give them to this optimizer",
                stacklevel=user_stacklevel())

    def _torn_by_error(self) -> None:
        """An accumulating backward(losses) raised after adding some tasks' gradients to the
        ones of the calls before it (task-specific .grad is left as it was; the per-task rows
        cannot be taken back exactly): the step and further accumulation refuse them."""
        self._unfit_pending = (
            "the last backward(losses) raised part-way, after it had added some tasks' "
            "gradients to those of the backward(losses) calls before it: the accumulated task "
            "gradients are incomplete. Call zero_grad() and run the batches again")

    def _data_parallel(self) -> DataParallel | None:
        """The data-parallel set-up (SPEC section 10), decided once, at the first backward."""
        if not self._dp_resolved:
            params = self._all_params()
            group, ddp = data_parallel_group(params, self._process_group)
            def checks(ddp):
                own_averaging_checks(ddp, params, "the PUB optimizer")

            if ddp is not None:
                checks(ddp)
            if group is not None:
                if self.backend == "reference":
                    raise NotImplementedError(
                        "the reference backend runs in one process; use backend='native' with "
                        "data parallelism")
                # Clippy scales each tensor by a minimum over all its elements, which a shard
                # that splits the tensor does not see: Clippy takes the replicated scheme.
                self._dp = DataParallel(group, ddp,
                                        self.shard_state and self.options.umm != "clippy",
                                        params, checks)
            self._dp_resolved = True
        return self._dp

    def _accumulating(self, shared) -> bool:
        """Whether this backward adds to the task gradients: before a step (pending), or after
        one whose gradients were not zeroed (every shared .grad is still the optimizer's view,
        as Tensor.backward accumulates into a .grad that is still there). Checks that nothing
        else lies in a shared .grad: a non-zero .grad from a plain loss.backward() cannot be
        attributed to a task and is refused rather than dropped."""
        grads = self._grads
        if self._pending and grads is not None and \
                [id(p) for p in shared] != [id(p) for p in grads.params]:
            return True  # the shared set changed within a step: backward names that error
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

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the ``.grad`` of every parameter and drop pending per-task gradients."""
        if torch.compiler.is_compiling():  # torch 2.5-2.11 fail on the attribute set below
            return outside_graph(type(self).zero_grad)(self, set_to_none)
        self._pending = self._unfit_pending = False
        if set_to_none and not _observed(self, hooks=False):
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None
            return
        super().zero_grad(set_to_none=set_to_none)

    # ---- step --------------------------------------------------------------------------------

    def step(self, *args, **kwargs):
        """One optimizer step: SPEC section 5 after ``backward(losses)``, else the base step
        (K = 1) on every parameter's ``.grad``. ``step(closure=None)``, as torch's."""
        # A subclass's own step() is wrapped by torch (below): its hooks have run already.
        if type(self).step is PUBOptimizer.step and _observed(self, hooks=True):
            return self._observed_step(*args, **kwargs)  # the hooks see the arguments as given
        return self._step(*args, **kwargs)

    # torch.optim wraps the step of every optimizer class in a profiler range and its step hooks
    # (Optimizer.profile_hook_step). Entering the range costs tens of microseconds in a training
    # loop even when no profiler listens, so the step takes torch's wrapper only when something
    # observes it: a step hook, the profiler, or the compiler. (RecordFunction observers without
    # the profiler, such as a standalone ExecutionTraceObserver, are not seen.)
    step.hooked = True  # type: ignore[attr-defined]  # torch: "already wrapped"

    def _step(self, closure=None):
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

    _observed_step = torch.optim.Optimizer.profile_hook_step(_step)
    step.__signature__ = inspect.signature(_step)  # type: ignore[attr-defined]

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
            b.set_weights(*seed, applied=self._seed_applied)
        self._backend = b
        self._seed_weights = self._seed_applied = None
        return b

    def _scaler_inputs(self):
        """GradScaler's grad_scale and found_inf, when a ``scaler.step(opt)`` is under way."""
        return getattr(self, "grad_scale", None), getattr(self, "found_inf", None)

    def _take_step(self) -> None:
        if isinstance(self._unfit_pending, str):
            raise RuntimeError(self._unfit_pending)
        if self._unfit_pending:
            raise RuntimeError(
                "backward(losses) ran before load_state_dict(), whose state dict balances other "
                "shared parameters: those task gradients do not fit the loaded optimizer, and "
                "a plain step would drop them. Call zero_grad() and backward(losses) again")
        pending = self._pending
        if pending and self._grads is not None and not self._grads.matches():
            if not self._grads.intact():
                raise ValueError(
                    "the task gradients of the shared parameters are gone: the storage of "
                    "their buffer, which the shared parameters' .grad are views of, was shrunk "
                    "in place (untyped_storage().resize_) since backward(losses); call "
                    "backward(losses) again")
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
        plan.shared_finite = (pending and not rescan and dp is None
                              and self._grads.sum_finite)
        backend = self._backend_for(plan)
        every = self.options.update_weights_every
        solve = pending and plan.has_shared and (not self._solved or self._t % every == 0)
        task_scale = None
        if pending and self._present is not None and not all(self._present):
            task_scale = np.array(self._present, dtype=np.float64)
        if not getattr(backend, "lazy", False):
            self._read_device_result(raise_errors=False)
        between = (lambda: dp.reduce_summary(backend)) if plan.sharded else None
        try:
            result = backend.step(plan, solve=solve, options=self.options,
                                  grad_scale=grad_scale, found_inf=found_inf,
                                  task_scale=task_scale, between=between)
        finally:
            plan.release_grads()
        if plan.sharded and (getattr(result, "lazy", False)
                             or result.outcome == StepOutcome.APPLIED):
            # On CUDA the device decides: gathering unchanged shards is harmless.
            dp.gather_params(self._grads.params, self._grads)
        # Weights solved with a task absent, or where every shared parameter's lr was 0 (a
        # warm-up from 0: every update is 0, so the solve could only give 1/K, while α̂ does
        # not depend on the lr for any lr > 0), are for that step only.
        self._finish_step(plan, result, pending,
                          solve and task_scale is None and not self._shared_lr_zero(), solve,
                          found_inf)

    def _shared_lr_zero(self) -> bool:
        """Whether every param group holding a shared parameter has lr 0 (a tensor lr on an
        accelerator is not read: that would wait for the device)."""
        shared = {id(p) for p in self._shared or ()}
        lrs = [g["lr"] for g in self.param_groups if any(id(p) in shared for p in g["params"])]
        if not lrs or any(isinstance(lr, torch.Tensor) and lr.device.type != "cpu"
                          for lr in lrs):
            return False
        return all(float(lr) == 0.0 for lr in lrs)

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

    def _finish_step(self, plan: StepPlan, result, pending: bool, reusable: bool, solve: bool,
                     found_inf) -> None:
        # Lazy (CUDA): the device decides; nothing here may wait for it. The entries the
        # kernels used are kept either way (a skipped step leaves their values as they were).
        lazy = getattr(result, "lazy", False)
        if lazy or result.outcome == StepOutcome.APPLIED:
            mark_written(plan.written)
            self._commit_state(plan)
            if pending and plan.has_shared:
                self._t += 1
                if solve:
                    self._solved = reusable
                if not lazy:
                    self._stats = dict(result.stats if solve else self._stats, updated=solve)
            self._pending = False
            if lazy:
                self._unread = (result, found_inf is not None)
            return
        outcome = result.outcome
        if _scaler_skip(outcome, found_inf is not None):
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
        # Off the hot path: which shared parameters hold Inf or NaN themselves (their L2 term
        # makes their updates NaN), for a message that names them.
        nonfinite = [p for p in (self._shared or [])
                     if not bool(torch.isfinite(p.detach()).all())]
        if nonfinite:
            names = ", ".join(self._param_name(p) for p in nonfinite[:5])
            return (f"the task updates are non-finite (non-finite Gram matrix) although every "
                    f"gradient is finite: shared parameter(s) {names} hold Inf or NaN, which "
                    "L2 weight decay turns into NaN updates" + tail)
        return ("the task updates overflowed (non-finite Gram matrix) although every gradient "
                "is finite: check the learning rate, eps and the optimizer state (a NaN or "
                "negative entry)" + tail)
