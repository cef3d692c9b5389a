"""Multi-task balancers usable with any torch optimizer: the methods PUB is compared with in
its paper (arXiv 2410.05806, section VI) and MultiBalance.

- gradient balancers on the shared parameters: LS, NashMTL, MGDA-UB, IMTL-G, PCGrad, CAGrad;
- loss weightings: :class:`Uncertainty` (Kendall et al., 2018) and :class:`FAMO` (Liu et al.,
  2023);
- balancing on the shared representation: :class:`MultiBalance` (He et al., 2024).

Python layer over ``pub_native._autograd`` (per-task gradients, shared-parameter detection) and
the native K×K weight solver. Every balancer fills ``.grad`` as ``loss.backward()`` would::

    bal = pub_native.balancers.NashMTL(model.parameters())
    opt = torch.optim.Adam(model.parameters())
    opt.zero_grad(); bal.backward(losses); opt.step(); bal.weights

For the gradient balancers, ``backward`` computes g_i = ∂L_i/∂θ on the shared parameters θ
(reached by two or more task losses; detected from the autograd graph on the first call unless
``shared=`` is given), turns them into one gradient Σ_i w_i g_i (the method's w, computed from
the K×K Gram matrix G_ij = ⟨g_i, g_j⟩) and accumulates it into ``.grad`` of θ. The loss
weightings take one backward pass of a weighted loss; :class:`Uncertainty` owns parameters for
your optimizer and :class:`FAMO` updates its weights after the step (``update``).
:class:`MultiBalance` takes the representation too: ``backward(losses, z)``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
import warnings
import weakref
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from ._autograd import (
    REENTRANT_CHECKPOINT,
    TaskGradients,
    as_loss_list,
    backward_grad_mode,
    compiled_graph,
    dense_strides,
    layout_view,
    named_pair,
    not_dense,
    reached_by_gradients,
    reached_parameters,
    reentrant_checkpoint,
    refuse_names,
    sink_edge,
    sum_into,
    task_reach,
    task_roots,
    walk_graph,
    walked_reach,
)
from ._caller import user_stacklevel
from ._distributed import (
    DDPRef,
    _is_sharded_parameter,
    _replicated,
    agree_on,
    average_gradients,
    checked_process_group,
    data_parallel_group,
    ddp_holders,
    differs_between_processes,
    is_distributed,
    own_averaging_checks,
    refuse_join,
    several_holders,
)
from ._numbers import is_integer, is_real
from ._rollback import attributes_kept_on_error
from .solver import METHODS, SolveStatus, solve_weights

__all__ = [
    "BALANCERS",
    "CAGrad",
    "FAMO",
    "GradientBalancer",
    "IMTLG",
    "LS",
    "MGDAUB",
    "MultiBalance",
    "NashMTL",
    "PCGrad",
    "Uncertainty",
    "cagrad_weights",
    "imtl_g_weights",
    "min_norm_weights",
    "multibalance_weights",
    "pcgrad_weights",
]


def _unchanged_if_it_raises(backward):
    """A call that raises leaves the balancer as it was (SPEC section 7): what a first call
    decides (K, the shared parameters, the split of the heads), the step count, the weights and
    the statistics; the call may be made again (with other losses: another number of tasks).
    The call runs with grad enabled and outside inference mode (backward_grad_mode), as
    ``loss.backward()`` works under ``torch.no_grad()`` and ``torch.inference_mode()``."""
    @functools.wraps(backward)
    def call(self, *args, **kwargs):
        with backward_grad_mode(), attributes_kept_on_error(self):
            return backward(self, *args, **kwargs)
    return call


class GradientBalancer:
    """Base class: per-task gradients of the shared parameters -> one gradient in ``.grad``.

    Args:
        params: the parameters to give gradients to (tensors or torch param groups); only these
            receive ``.grad``. A frozen one (``requires_grad=False``) gets none while it is
            frozen, and is trained from the first call after it is unfrozen (it is in no
            autograd graph while frozen, so that call finds whether it is shared); one that no
            loss reaches yet is looked for again at each call in the same way.
        shared: the shared parameters; by default, those reached by two or more task losses
            in the autograd graph of the first :meth:`backward` (kept for later calls).
        weight_task_specific: whether a parameter reached by task i alone gets w_i·∂L_i/∂p
            (the method weights the losses) or ∂L_i/∂p. ``None``: what the method's published
            code does (see each class).
        process_group: under torch.distributed, ``"auto"`` (the DistributedDataParallel module
            that holds the parameters: the task gradients are averaged over its group), a
            group to average over, or None (every process trains on its own), as for
            ``pub_native.Adam``.

    Attributes:
        weights: the K task weights w of the last :meth:`backward` (float64 tensor), or None.
        stats: ``weights_time`` (seconds spent computing w from G at the last weight
            update), ``solve_time`` (the same, except for NashMTL: the native solver call
            alone, as ``pub_native.Adam`` reports it), ``updated`` (whether the last call
            computed new weights); NashMTL adds the
            solver's ``status`` (:class:`pub_native.SolveStatus`), ``iterations`` and
            ``residual`` — the keys of ``pub_native.Adam().stats``.
    """

    #: Published behaviour for task-specific parameters (loss-weighting methods: True).
    weight_task_specific_default = False
    #: Whether the method's weights may be reused on later steps (``update_weights_every``).
    _reusable = False
    #: The norm the method clips the shared gradient of each call to (0: none).
    max_norm = 0.0
    #: The constructor options that shape the method's steps: :meth:`state_dict` saves them and
    #: :meth:`load_state_dict` restores them, as torch's optimizers restore their groups'.
    _OPTIONS: tuple[str, ...] = ()

    #: The options that an attribute assignment checks (see __setattr__), per class.
    _SET_CHECKED: frozenset = frozenset({"update_weights_every", "weight_task_specific"})

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._SET_CHECKED = GradientBalancer._SET_CHECKED | (set(cls._OPTIONS) - {"min_losses"})

    def __setattr__(self, name: str, value) -> None:
        # An option set as an attribute (how the README changes one after a load) is checked as
        # the constructor checks it: a bad value raises here, naming it, not at a later call.
        if name in self._SET_CHECKED:
            value = self._checked_option(name, value, name)
        super().__setattr__(name, value)

    def __init__(self, params, *, shared=None, weight_task_specific: bool | None = None,
                 update_weights_every: int = 1, process_group="auto"):
        self.params = _param_list(params, "params")
        self._process_group = checked_process_group(process_group)
        if not _active(self.params):
            raise ValueError("params is empty (no tensor requires grad)")
        ids = {id(p) for p in self.params}
        self._shared_given = None
        if shared is not None:
            self._shared_given = _param_list(shared, "shared")
            for i, p in enumerate(self._shared_given):
                if id(p) not in ids:
                    raise ValueError(f"shared[{i}] (shape {tuple(p.shape)}) is not in params")
        if weight_task_specific is None:
            weight_task_specific = self.weight_task_specific_default
        # (checked by __setattr__, as every option in _SET_CHECKED)
        self.weight_task_specific = weight_task_specific
        self.update_weights_every = update_weights_every
        self.k: int | None = None
        self.shared: list[torch.Tensor] | None = None
        self.weights: torch.Tensor | None = None
        # What weight_task_specific multiplies task i's own parameters' gradient by: w_i, or 1
        # where task i's shared gradient was zero at the solve (None: the weights).
        self._head_weights: torch.Tensor | None = None
        self.stats: dict = {}
        self.steps = 0
        self._dp_group = None  # the data-parallel group, decided at the first backward
        self._ddp = None  # a weak reference to the DistributedDataParallel module, if any
        self._grads: TaskGradients | None = None
        self._solve_time: float | None = None
        # Per parameter (as in self.params): the tasks whose graph reached it, from the first
        # detection that found it unfrozen and reached (until then it is looked for again).
        self._reach: list[frozenset[int] | None] = [None] * len(self.params)
        # Per parameter: decided from a compiled graph's task gradients.
        self._by_gradients: list[bool] = [False] * len(self.params)
        self._warned_compiled = False
        self._warned_surprise: set[int] = set()
        self._loaded_k: int | None = None  # K of a state dict loaded before the first call
        self._reach_checked = False  # by _check_reached, on this object's first call
        # The loss weightings' and MultiBalance's data-parallel group (_dp_group), decided at
        # their first call, and whether they average the parameters' gradients themselves.
        self._dp_decided = False
        self._dp_own = False

    # -- set-up -------------------------------------------------------------------------------

    def _setup(self, raw_losses, losses: list[torch.Tensor]) -> None:
        # Under DistributedDataParallel the per-task gradients (taken with autograd.grad, which
        # DDP does not see) are averaged here, so every process computes the same weights.
        group, ddp = data_parallel_group(self.params, self._process_group)
        if ddp is not None:
            self._ddp_checks(ddp)
        self._dp_group = group
        self._keep_ddp(ddp)
        self._detect(raw_losses, losses)
        self._grads = self._new_buffer(len(losses))

    def __getstate__(self) -> dict:
        # The weak references (the DDP module; FAMO's marks of the last .grad) name objects of
        # this process that a pickled copy does not have: a copy holds none.
        state = self.__dict__.copy()
        for name in ("_ddp", "_left"):
            if name in state:
                state[name] = None
        return state

    def _keep_ddp(self, ddp) -> None:
        """Keeps the DistributedDataParallel module (or None) that :meth:`_refuse_join` reads,
        weakly: the balancer does not keep the model alive."""
        self._ddp = None if ddp is None else DDPRef(ddp, self.params, self._ddp_checks)

    def _ddp_checks(self, ddp) -> None:
        """What a DDP module must pass where this balancer averages gradients itself (see
        own_averaging_checks)."""
        if self._averages_own_gradients():
            own_averaging_checks(ddp, self.params, type(self).__name__)

    def _averages_own_gradients(self) -> bool:
        """Whether the gradients of ``params`` are averaged by this balancer under DDP, not by
        DDP's backward: the per-task ones (taken with autograd.grad)."""
        return True

    def _refuse_join(self) -> None:
        """Raises on every process inside DDP's ``join()`` context (uneven inputs), before any
        collective: a joined process stands in for DDP's all-reduce only, not for the
        balancer's own collectives (the per-task gradients, the loss values)."""
        if self._dp_group is not None and self._ddp is not None:
            refuse_join(self._ddp.refresh())

    def _new_buffer(self, k: int) -> TaskGradients:
        """The per-task gradient buffer laid out for the shared parameters as they are now,
        after checking that each is dense: a row holds a parameter's gradient as ``numel``
        consecutive elements in its memory order, which a strided view with gaps
        (``x[:, ::2]``) does not have (its view of a row would reach past it, into the next
        parameter's or task's gradient). Refused as the PUB optimizers refuse it
        (``check_param``), before anything is computed."""
        for p in self.shared:
            if not dense_strides(p):
                j = next(j for j, q in enumerate(self.params) if q is p)
                raise NotImplementedError(
                    f"params[{j}] (shape {tuple(p.shape)}) {not_dense(p)}; the balancers "
                    "take the task gradients of dense shared parameters (contiguous, "
                    "channels_last, transposed, ...): make it one, e.g. "
                    "torch.nn.Parameter(t.contiguous())")
        return _task_gradients(self.shared, k)

    def _detect(self, raw_losses, losses: list[torch.Tensor]) -> None:
        """Shared and task-specific parameters from the autograd graph of the first losses
        (under data parallelism, what any process's graph reached: see agree_on). A later call
        decides the parameters that were frozen or unreached until then, and keeps the others
        as they were."""
        # The optimizers' detection (pub_native._autograd): a stacked 1-D tensor of losses is
        # split back into its tasks at the stack, so its tasks reach what the list's would.
        roots = task_roots(raw_losses, losses)
        _refuse_reentrant(roots)
        compiled = compiled_graph(roots)
        if compiled:
            if not self._warned_compiled:
                warnings.warn(
                    "the model is compiled (torch.compile), so its autograd graph reaches every "
                    "parameter from every task: the shared parameters are detected from this "
                    "batch's task gradients instead (a parameter is shared when two or more "
                    "tasks give it a non-zero gradient, task-specific when one does; every task "
                    "adds its gradient to the ones not shared, so that none is dropped). Pass "
                    "shared= to set them exactly.", stacklevel=user_stacklevel())
                self._warned_compiled = True
            reach = reached_by_gradients(losses, self.params)
            walked = None
        else:
            # (what each task reaches through the heads' concatenated outputs too: a zero
            # gradient there is no surprise)
            walked = walked_reach(roots, losses)
            # The outputs' joins measured on the first call only: a later one decides what was
            # frozen or unreached until then from the walk (no K more backward passes at each
            # call while some parameter is never reached).
            first = all(tasks is None for tasks in self._reach)
            reach = task_reach(roots, losses) if first else walked
        if self._dp_group is not None:
            flags = agree_on(self._dp_group, len(losses),
                             [id(p) in r for r in reach for p in self.params],
                             trainable=[p.requires_grad for p in self.params])
            n = len(self.params)
            reach = [{id(p) for j, p in enumerate(self.params) if flags[i * n + j]}
                     for i in range(len(losses))]
        for j, p in enumerate(self.params):
            if p.requires_grad and self._reach[j] is None:
                # One that no task reaches yet (an expert no example was routed to) is decided
                # by the first call that reaches it, as one that is frozen now.
                tasks = frozenset(i for i, r in enumerate(reach) if id(p) in r)
                # In a compiled graph, one that every task gave a zero gradient (a degenerate
                # batch) is undecided as well, as it would be in eager mode where no task used it.
                self._by_gradients[j] = compiled
                self._reach[j] = tasks or None
        reach = [{id(p) for p, tasks in zip(self.params, self._reach, strict=True)
                  if tasks is not None and i in tasks} for i in range(len(losses))]
        counts = [sum(id(p) in r for r in reach) for p in self.params]
        if self._shared_given is not None:
            shared_ids = {id(p) for p in self._shared_given}
            self.shared = [p for p in self.params if id(p) in shared_ids]
        else:
            self.shared = [p for p, c in zip(self.params, counts, strict=True) if c >= 2]
            shared_ids = {id(p) for p in self.shared}
        # specific[i]: the non-shared parameters whose gradient task i's backward adds: every
        # decided one, for every task (autograd skips those a task does not reach at no cost),
        # as the PUB optimizers do, so that none is dropped where the first call misjudged it:
        # a task that reaches it only later (data-dependent routing, a head used by another
        # task from some step on), or, in a compiled graph, a task whose gradient was zero on
        # the first batch (a zero-initialized head, a batch without its labels). A non-shared
        # parameter reached by several tasks (one left out of shared=) gets the sum of their
        # gradients, each weighted by its task's weight where weight_task_specific (see apart).
        decided = [p for p, tasks in zip(self.params, self._reach, strict=True)
                   if tasks is not None and id(p) not in shared_ids]
        self._specific = [decided] * len(losses)
        # surprise[i]: those that task i was not found to reach by a walk of the graph, whose
        # gradient from task i (not balanced) is worth a warning.
        self._surprise = [{id(p) for p, tasks, by_grad in zip(self.params, self._reach,
                                                              self._by_gradients, strict=True)
                           if tasks is not None and not by_grad and i not in tasks
                           and id(p) not in shared_ids
                           and (walked is None or id(p) not in walked[i])}
                          for i in range(len(losses))]
        # single[i]: the non-shared parameters of task i alone, which weight_task_specific
        # weights by w_i.
        single_ids = {id(p) for p, c in zip(self.params, counts, strict=True) if c == 1}
        self._single = [[p for p in self.params
                         if id(p) in single_ids and id(p) in r and id(p) not in shared_ids]
                        for r in reach]
        specific_ids = {id(p) for spec in self._specific for p in spec}
        self._specific_all = [p for p in self.params if id(p) in specific_ids]
        self._multi = [p for p in self._specific_all if id(p) not in single_ids]
        # apart[i]: those whose gradient from task i is kept apart and weighted by w_i, as on a
        # step that reuses the weights (one backward of Σ w_i L_i) and in the published code's
        # backward of the weighted loss: those of another task alone (reached by task i later:
        # routing, or a compiled graph's zeros), not weighted by their task's weight, and those
        # reached by several tasks but not shared (left out of shared=).
        owner = {id(p): j for j, spec in enumerate(self._single) for p in spec}
        multi_ids = {id(p) for p in self._multi}
        self._apart = [{pid for pid, j in owner.items() if j != i} | multi_ids
                       for i in range(len(losses))]
        self.k = len(losses)
        if not compiled and not any(tasks for p, tasks in zip(self.params, self._reach,
                                                              strict=True) if p.requires_grad):
            raise self._nothing_reached()  # (compiled: the gradients may all be zero)

    def _warn_surprises(self) -> None:
        """Warn once per parameter that a task the first call did not find reaching it gave a
        gradient to (see ``_surprise`` in _detect)."""
        for i, p in self._grads.surprises:
            if id(p) in self._warned_surprise:
                continue
            self._warned_surprise.add(id(p))
            j = next(j for j, q in enumerate(self.params) if q is p)
            first = sorted(self._reach[j])
            warnings.warn(
                f"{self._param_label(p)} was found to be reached by task(s) "
                f"{first} alone when the balancer first saw it, but task {i} gives it a "
                "gradient now: it gets that gradient too (where weight_task_specific=True, "
                f"weighted as task {i}'s own parameters are), but is not balanced. Pass shared= "
                "(the parameters two or more tasks use) to balance it.",
                stacklevel=user_stacklevel())

    def _reached_now(self, raw_losses, losses, active: list[torch.Tensor], marks) -> bool:
        """After the one backward pass of LS, Uncertainty or FAMO: whether it gave some of
        ``active`` a gradient (:func:`_received`), or, where ``.grad`` was None before and is
        None after on all of them (hooks that step each parameter in backward and set its
        ``.grad`` to None), whether the losses' graph reaches one of them."""
        if _received(active, marks):
            return True
        if not _gone_by_hooks(active, marks):
            return False
        reached = _reached_ids(task_roots(raw_losses, losses))
        return any(id(p) in reached for p in active)

    def _check_reached(self, raw_losses, losses: list[torch.Tensor]) -> None:
        """On the first call of a balancer that takes one backward pass (LS, Uncertainty,
        FAMO), which would otherwise leave ``.grad`` empty without a word: some loss must reach
        some parameter in ``params``."""
        roots = task_roots(raw_losses, losses)
        _refuse_reentrant(roots)
        reached = _reached_ids(roots)
        active = _active(self.params)
        # FSDP2's sharded DTensors: the forward runs on unsharded copies, which the graph
        # reaches instead (the backward would leave them without a gradient).
        unreached = [p for p in active if id(p) not in reached and _is_sharded_parameter(p)]
        if unreached or not any(id(p) in reached for p in active):
            raise self._nothing_reached(unreached)
        self._reach_checked = True

    def _nothing_reached(self, sharded: list | None = None) -> Exception:
        """The error of a call whose losses reach none of ``params`` (or not ``sharded``)."""
        if sharded is None:
            sharded = [p for p in _active(self.params) if _is_sharded_parameter(p)]
        if sharded:
            return NotImplementedError(
                f"a parameter of shape {tuple(sharded[0].shape)} is sharded (FSDP2 or DTensor) "
                f"and no loss reaches it: {type(self).__name__} takes the parameters the losses "
                "are computed from; under FSDP2 weight the losses yourself and call "
                "loss.backward()")
        return ValueError(_NOTHING_REACHED)

    # -- data parallelism of the loss weightings (Uncertainty, FAMO) ----------------------------

    def _decide_group(self) -> None:
        """The data-parallel group of a loss weighting, decided at its first call (after a
        load too): ``process_group`` as the gradient balancers take it. Whether the balancer
        averages the parameters' gradients itself: only where no DistributedDataParallel
        module holds them (a group given without one); else DDP's backward averages them."""
        if self._dp_decided:
            return
        if isinstance(self._process_group, str) and self._process_group == "auto":
            # The DDP module's group; without one (a model each process trains alone, one
            # whose gradients the user all-reduces, FSDP) each process weights its own losses,
            # as LS does: a loss weighting takes one backward pass that the wrapper syncs.
            group = ddp = None
            ids = {id(p) for p in self.params}
            if is_distributed() and torch.distributed.get_world_size() > 1:
                holders = ddp_holders(ids)
                if len(holders) > 1:
                    raise NotImplementedError(several_holders(len(holders)))
                if len(holders) == 1 and ids <= holders[0][1]:
                    ddp = holders[0][0]
                    group = ddp.process_group
                    self._ddp_checks(ddp)
            own = False
        else:
            group, ddp = data_parallel_group(self.params, self._process_group)
            own = group is not None and ddp is None and not ddp_holders(
                {id(p) for p in self.params})
        self._keep_ddp(ddp)
        self._dp_group, self._dp_own, self._dp_decided = group, own, True

    def _non_finite_losses(self, losses: list[torch.Tensor]) -> list[int]:
        """The tasks whose loss value is NaN or Inf on this process or, under data
        parallelism, on any (one all-reduce of K numbers; one wait for the device)."""
        values = torch.stack([loss.detach().reshape(()).to(device=losses[0].device,
                                                           dtype=torch.float64)
                              for loss in losses])
        values = self._group_mean(values)  # a NaN or Inf anywhere stays one
        return [i for i, ok in enumerate(torch.isfinite(values).tolist()) if not ok]

    def _group_mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over the data-parallel group of each process's ``values`` (a 1-D tensor of
        the K loss values), in float64 on their device; ``values`` itself without a group."""
        if self._dp_group is None:
            return values
        return _group_mean(values, self._dp_group)

    def _loss_backward(self, total: torch.Tensor, params: list[torch.Tensor],
                       extra: list[torch.Tensor] = (), retain_graph: bool = False) -> None:
        """``.grad`` += ∂total/∂p for ``params`` and ``extra`` (one backward pass, which keeps
        the graph with ``retain_graph``). Under a data-parallel group without a DDP module (see
        _decide_group), this call's gradients of ``params`` are averaged over it, as DDP's
        backward would; ``extra`` (the balancer's own tensors, whose gradient is the same on
        every process) are not."""
        inputs = list(params) + list(extra)
        if not self._dp_own:
            torch.autograd.backward(total, inputs=inputs, retain_graph=retain_graph)
            return
        stash = _set_aside(params)  # no DDP module writes into them: see _set_aside
        try:
            torch.autograd.backward(total, inputs=inputs, retain_graph=retain_graph)
            average_gradients(params, self._dp_group)
        except BaseException:
            _restore(params, stash)
            raise
        _put_back(params, stash)

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """What a resumed run needs to go on as this one would: the number of tasks, the step
        count, the last weights and the method's own state (NashMTL's warm start, PCGrad's
        random generator, FAMO's logits and their Adam state, Uncertainty's log-variances,
        MultiBalance's Gram average). Tensors, numbers, lists and dicts only: it saves with
        ``torch.save`` and loads with ``weights_only=True``. Not the parameters (the model's
        ``state_dict`` holds them) nor which of them are shared: a loaded balancer finds those
        again on its first call (or takes ``shared=``). A balancer that loaded a state dict and
        has not been called since saves the K it loaded, so that its state dict loads again."""
        return {"method": type(self).__name__, "num_tasks": self._expected_k(),
                "steps": self.steps,
                "weights": None if self.weights is None else self.weights.detach().clone(),
                **({} if self._head_weights is None else
                   {"head_weights": self._head_weights.clone()}),
                "options": {name: _saved(getattr(self, name)) for name in self._OPTIONS},
                **self._method_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what :meth:`state_dict` gave (of a balancer of the same class). Its options
        (``update_weights_every``, ``max_norm``, ...) replace the constructor's, as a torch
        optimizer's ``load_state_dict`` restores each group's; set the attribute after loading
        to change one. A state dict that does not fit raises ValueError or TypeError naming
        the entry, leaving the balancer as it was."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        method = state_dict.get("method")
        if method != type(self).__name__:
            raise ValueError(f"state_dict is of {method!r}, this balancer is "
                             f"{type(self).__name__!r}")
        k = state_dict.get("num_tasks")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"state_dict['num_tasks'] must be None or an int >= 1, got {k!r}")
        known_k = self._expected_k()
        if k is not None and known_k is not None and k != known_k:
            raise ValueError(f"state_dict is for K = {k} tasks, this balancer is for "
                             f"K = {known_k}")
        steps = state_dict.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"state_dict['steps'] must be an int >= 0, got {steps!r}")
        weights = _loaded_vector(state_dict.get("weights"), "weights", k, optional=True)
        if weights is not None and k is None:
            raise ValueError("state_dict has weights but no num_tasks")
        heads = _loaded_vector(state_dict.get("head_weights"), "head_weights", k, optional=True)
        if heads is not None and weights is None:
            raise ValueError("state_dict has head_weights but no weights")
        options = self._loaded_options(state_dict.get("options"), k)
        apply_method = self._load_method_state(state_dict, k)  # checks; applies nothing yet
        for name, value in options.items():
            setattr(self, name, value)
        self.steps = steps
        self.weights = weights
        self._head_weights = heads
        if self.k is None:
            self._loaded_k = k  # the first call checks its number of losses against it
        apply_method()

    def _owner(self) -> str:
        return f"this {type(self).__name__}"

    def _param_label(self, p: torch.Tensor) -> str:
        """``params[j] (shape ...)``: how the errors name parameter p (found by identity)."""
        j = next(j for j, q in enumerate(self.params) if q is p)
        return f"params[{j}] (shape {tuple(p.shape)})"

    def _expected_k(self) -> int | None:
        """The number of tasks the next call must have: decided by the first call, or by a
        loaded state dict before it."""
        return self.k if self.k is not None else self._loaded_k

    def _checked_option(self, name: str, value, label: str):
        """``value`` of option ``name`` as the method keeps it, or ValueError naming ``label``
        (the argument, or the state dict's entry)."""
        if name == "update_weights_every":
            if not (is_integer(value) and value >= 1):
                raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
            if value > 1 and not self._reusable:
                raise ValueError(f"{type(self).__name__} does not reuse weights: "
                                 f"{label} must be 1")
            return int(value)
        if name == "weight_task_specific":
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{label} must be a bool, got {value!r}")
            return bool(value)
        if name in ("max_norm", "c", "gamma", "w_lr"):
            if not (is_real(value) and 0 <= value < math.inf):
                raise ValueError(f"{label} must be a finite number >= 0, got {value!r}")
            return float(value)
        if name == "ema":
            if not (is_real(value) and 0 <= value < 1):
                raise ValueError(f"{label} must be a number in [0, 1), got {value!r}")
            return float(value)
        if name == "seed":
            if value is not None and not (is_integer(value) and value >= 0):
                raise ValueError(f"{label} must be None or an integer >= 0, got {value!r}")
            return None if value is None else int(value)
        choices = {"solver": getattr(self, "SOLVERS", None),
                   "normalization": getattr(self, "NORMALIZATIONS", None),
                   "reduction": ("sum", "mean"), "form": getattr(self, "FORMS", None)}[name]
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{label} must be one of {choices}, got {value!r}")
        return value

    def _loaded_options(self, saved, k: int | None) -> dict:
        """The options of a state dict, checked (an older state dict has none: the
        constructor's stay)."""
        if saved is None:
            return {}
        if not isinstance(saved, dict):
            raise TypeError(f"state_dict['options'] must be a dict, got {type(saved).__name__}")
        unknown = sorted(set(saved) - set(self._OPTIONS), key=str)
        if unknown:
            raise ValueError(f"state_dict['options'] has {unknown}, which {type(self).__name__} "
                             f"does not have (its options: {list(self._OPTIONS)})")
        return {name: self._loaded_option(name, value, f"state_dict['options'][{name!r}]", k)
                for name, value in saved.items()}

    def _loaded_option(self, name: str, value, label: str, k: int | None):
        return self._checked_option(name, value, label)

    def _method_state(self) -> dict:
        """The method's own entries of state_dict (none here)."""
        return {}

    def _load_method_state(self, state_dict: dict, k: int | None):
        """Check the method's entries of a state dict; return a function that loads them."""
        return lambda: None

    # -- the step -----------------------------------------------------------------------------

    @_unchanged_if_it_raises
    def backward(self, losses, *, scaler=None, retain_graph: bool = False) -> None:
        """Per-task gradients -> weights -> combined gradient in ``.grad`` (accumulated).

        A loss value that is NaN or Inf (on any process, under data parallelism) raises
        FloatingPointError on every call, before any backward pass (``.grad`` and the balancer
        stay as they were), also where its gradient is finite (a cross-entropy whose target
        class is masked with −inf): a weight computed from it (MGDA-UB's
        ``normalization="loss"``) would be meaningless, and a step that reuses the weights has
        no Gram to check.

        ``scaler``: the ``torch.amp.GradScaler`` that scaled ``losses``, if any. With it, a
        non-finite loss or Gram (an overflow of the scaled losses) is no error: ``.grad`` gets
        the plain sum of the task gradients, non-finite where the overflow is, so that
        ``scaler.step`` skips the step and the scale backs off, as for ``loss.backward()``; the
        weights stay as they were. And a ``max_norm`` clips the gradient as it will be once
        unscaled.

        ``retain_graph``: keep the autograd graph of ``losses`` after the call, as in
        ``Tensor.backward`` (for a second backward pass through it); by default it is freed."""
        raw, losses = losses, as_loss_list(losses, self._expected_k(), owner=self._owner())
        scaler, scale = _scaler_in_use(scaler)
        if self.k is None:
            self._setup(raw, losses)
        elif self._undecided():
            shared = self.shared
            self._detect(raw, losses)
            if [id(p) for p in self.shared] != [id(p) for p in shared]:
                self._grads = self._new_buffer(self.k)
        # (After the set-up, which decides the data-parallel group: every process decides
        # alike, else one would raise while the others wait in the next collective.)
        self._refuse_join()
        bad_losses = self._non_finite_losses(losses)
        if bad_losses and scaler is None:
            raise FloatingPointError(f"non-finite loss in task(s) {bad_losses}")
        # The step counts once it succeeded: a step that raised is taken again as the same kind.
        reuse = self.weights is not None and self.steps % self.update_weights_every != 0
        if reuse:
            # No Gram to see a NaN or Inf on a step that reuses the weights: the shared gradient
            # of the call is checked (the losses were, above), as the Gram checks the tasks'
            # (under a GradScaler, an overflow is the scaler's to skip).
            # .grad set aside, so that the call sees its own gradient alone: for the check and
            # the clipping, and so that a call that raises (in any of its backward passes,
            # under a GradScaler too) leaves .grad as it was.
            clip = self.max_norm > 0 and bool(self.shared)
            given = self.shared + self._specific_all
            aside = _zero_aside(given)
            try:
                self._backward_fixed(losses, self.weights, retain_graph, self._head_weights)
                if scaler is None and not _all_finite([p.grad for p in self.shared]):
                    raise FloatingPointError(
                        "non-finite gradient of the shared parameters (on a step that reuses "
                        "the weights, of their weighted sum: the task is not known)")
            except BaseException:
                _undo_aside(given, aside)
                raise
            if clip:
                _clip_unscaled(self.shared, self.max_norm, scale)
            _add_back(given, aside)
            # Under a GradScaler, a step the scaler will skip (an overflow anywhere in .grad)
            # does not count, as on a step that updates the weights: one wait for the device,
            # as without a scaler.
            if not bad_losses and (scaler is None or _all_finite([p.grad for p in given])):
                self.steps += 1
            self.stats["updated"] = False
            return
        if not self._grads.matches():
            # A shared parameter changed its shape, dtype, device or memory order since the
            # buffer was laid out (model.to(...), .data = ...): lay it out again.
            self._grads = self._new_buffer(self.k)
        specific = self._specific_all
        stash = _set_aside(specific)
        try:
            # A 1-D tensor of losses: through the stack every task reaches every head (with a
            # zero gradient where it does not use it), so that no gradient is a surprise, and
            # each task's backward goes through every head (pass a list to spare that).
            stacked = isinstance(raw, torch.Tensor)
            specific_now = [_active(spec) for spec in self._specific]
            received = self._grads.compute(losses, specific_now, retain_graph=retain_graph,
                                           surprise=None if stacked else self._surprise,
                                           apart=self._apart if self.weight_task_specific
                                           else None, name_of=self._param_label,
                                           owner=self._owner())
            if not received and (_active(self.shared) or any(specific_now)):
                raise ValueError(_NOTHING_REACHED)
            self._warn_surprises()
            if self._dp_group is not None:
                self._average_task_gradients()
            buf = self._grads.buffer
            # Under a GradScaler an overflow in a task-specific gradient alone (the Gram
            # finite) skips the step too: the sums of this call's head gradients come back
            # with G, in the same wait for the device.
            heads = None if scaler is None else _sums(
                [p.grad for p in specific] + [g for _, _, g in self._grads.apart])
            G, head_sums = (_gram_float64(buf), None) if heads is None else \
                _gram_float64(buf, heads)
            overflow = bool(bad_losses) or not bool(torch.isfinite(G).all()) or (
                head_sums is not None and not bool(torch.isfinite(head_sums).all()))
            if overflow and scaler is None:
                bad = [i for i in range(self.k) if not math.isfinite(float(G[i, i]))]
                raise FloatingPointError(
                    f"non-finite gradient of the shared parameters in task(s) {bad}")
            t0 = time.perf_counter()
            self._solve_time = None
            if self._grads.size == 0 or overflow or not _active(self.shared):
                # Nothing shared to balance (every shared parameter frozen): the plain sum.
                w = torch.ones(self.k, dtype=torch.float64)
            else:
                w = torch.as_tensor(self._compute_weights(G.numpy(), losses), dtype=torch.float64)
            elapsed = time.perf_counter() - t0
            self.stats["weights_time"] = elapsed
            self.stats["solve_time"] = elapsed if self._solve_time is None else self._solve_time
        except BaseException:
            _restore(specific, stash)
            raise
        # A task whose shared gradient is zero (a head initialized to zero, a head on detached
        # features) takes no part in the balancing, whatever weight the method gives it: its
        # own parameters get their plain gradient, so that such a head trains (weighted by
        # that weight, 0 for NashMTL and IMTL-G, it never would).
        factors = w.clone()
        if not overflow:
            factors[torch.diagonal(G) == 0] = 1.0
            self.steps += 1
            self.weights = w
            self._head_weights = None if torch.equal(factors, w) else factors
        self.stats["updated"] = not overflow
        aside = self._set_aside_clipped()
        if self._grads.size:
            _accumulate(self.shared, torch.split(_combine(buf, w), self._grads.numels))
        self._clip_contribution(aside, scale)
        if self.weight_task_specific and not overflow:
            for wi, spec in zip(factors.tolist(), self._single, strict=True):
                for p in spec:
                    if p.grad is not None:
                        p.grad.mul_(wi)
        for i, p, g in self._grads.apart:  # (the plain sum where the step overflowed)
            if not overflow:
                g.mul_(float(factors[i]))
            p.grad = g if p.grad is None else sum_into(p.grad, g, p)
        _put_back(specific, stash)

    def _undecided(self) -> bool:
        """Whether a parameter that every detection so far found frozen or unreached requires
        grad now (it is looked for in this call's graph)."""
        return any(p.requires_grad and tasks is None
                   for p, tasks in zip(self.params, self._reach, strict=True))

    def _backward_fixed(self, losses: list[torch.Tensor], w: torch.Tensor,
                        retain_graph: bool, heads: torch.Tensor | None = None) -> None:
        """A step that reuses the weights w: one backward of Σ w_i L_i (two without weighting
        of the task-specific parameters, or where ``heads``, the weights of the task-specific
        ones, differ from w: one of Σ heads_i L_i for those); ``retain_graph`` keeps the graph
        after the last."""
        def weighted_sum(v):
            return sum(float(vi) * loss for vi, loss in zip(v.tolist(), losses, strict=True))

        if self.weight_task_specific:
            single, plain = [p for spec in self._single for p in spec] + self._multi, []
        else:
            single, plain = [], self._specific_all
        if heads is None:
            passes = [(weighted_sum(w), self.shared + single)]
        else:
            passes = [(weighted_sum(w), self.shared), (weighted_sum(heads), single)]
        passes.append((sum(losses), plain))
        passes = [(loss, _active(inputs)) for loss, inputs in passes]
        passes = [(loss, inputs) for loss, inputs in passes if inputs]
        if self._dp_group is not None:
            self._backward_fixed_distributed(passes, retain_graph)
            return
        for j, (loss, inputs) in enumerate(passes):
            torch.autograd.backward(loss, inputs=inputs,
                                    retain_graph=retain_graph or j < len(passes) - 1)

    def _average_task_gradients(self) -> None:
        """Average the task rows and this call's task-specific gradients over the processes."""
        rows = self._grads.buffer
        world = torch.distributed.get_world_size(self._dp_group)
        rows.div_(world)
        torch.distributed.all_reduce(rows, group=self._dp_group)
        # The gradients kept apart (see _apart in _detect) travel in the same all-reduce, in
        # slots that every process lists alike, sent where one of them has a gradient.
        slots = [] if not self.weight_task_specific else [
            (i, p) for i, ids in enumerate(self._apart) for p in self._specific_all if id(p) in ids]
        held = {(i, id(p)): g for i, p, g in self._grads.apart}
        params = self._specific_all + [p for _, p in slots]
        grads = [p.grad for p in self._specific_all] + [held.get((i, id(p))) for i, p in slots]
        average_gradients(params, self._dp_group, grads=grads)
        n = len(self._specific_all)
        for p, g in zip(self._specific_all, grads[:n], strict=True):
            p.grad = g
        self._grads.apart = [[i, p, g] for (i, p), g in zip(slots, grads[n:], strict=True)
                             if g is not None]

    def _backward_fixed_distributed(self, passes, retain_graph):
        """_backward_fixed under data parallelism: the gradients of each (loss, inputs) pass by
        autograd.grad (DDP's hooks would see partial backward passes), averaged over the
        processes, accumulated."""
        new: dict[int, torch.Tensor] = {}
        for j, (loss, inputs) in enumerate(passes):
            grads = torch.autograd.grad(loss, inputs, allow_unused=True,
                                        retain_graph=retain_graph or j < len(passes) - 1)
            for p, g in zip(inputs, grads, strict=True):
                if g is not None:
                    new[id(p)] = g
        params = [p for _, inputs in passes for p in inputs]
        stash = _set_aside(params)
        for p in params:
            p.grad = new.get(id(p))
        average_gradients(params, self._dp_group)
        _put_back(params, stash)

    def _compute_weights(self, G: np.ndarray, losses: list[torch.Tensor]) -> np.ndarray:
        raise NotImplementedError

    def _set_aside_clipped(self) -> list | None:
        """Where the method clips its shared gradient (``max_norm`` > 0: NashMTL, FAMO), the
        shared parameters' ``.grad`` set aside (_zero_aside), so that the clipping sees this
        call's gradient alone (as the published code, which clips right after ``zero_grad`` and
        one backward); None otherwise."""
        return _zero_aside(self.shared) if self.max_norm > 0 and self.shared else None

    def _clip_contribution(self, aside: list | None, scale: float) -> None:
        """Clip the shared gradient of this call and add back what ``.grad`` held before it;
        ``scale``: the GradScaler's scale of the losses (1 without one)."""
        if aside is not None:
            _clip_unscaled(self.shared, self.max_norm, scale)
            _add_back(self.shared, aside)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LS(GradientBalancer):
    """Linear scalarization: the gradient of Σ_i L_i, w = 1 (one ordinary backward pass)."""

    @_unchanged_if_it_raises
    def backward(self, losses, *, scaler=None, retain_graph: bool = False) -> None:
        """``.grad`` += the gradient of Σ_i L_i. ``scaler`` (a ``torch.amp.GradScaler``) is
        taken as the other balancers take it and changes nothing: an overflow gives the
        non-finite sum that ``scaler.step`` skips. ``retain_graph``: keep the autograd graph
        of ``losses`` after the call, as in ``Tensor.backward``."""
        raw, losses = losses, as_loss_list(losses, self._expected_k(), owner=self._owner())
        _scaler_in_use(scaler)  # (checked: a wrong argument is an error here too)
        if not self._reach_checked:
            self._check_reached(raw, losses)
        self.k = len(losses)
        self.steps += 1
        active = _active(self.params)
        marks = _grad_marks(active)
        torch.autograd.backward(sum(losses), inputs=active, retain_graph=retain_graph)
        if not self._reached_now(raw, losses, active, marks):  # (.grad as it was)
            raise self._nothing_reached()
        self.weights = torch.ones(self.k, dtype=torch.float64)
        self.stats = {"weights_time": 0.0, "solve_time": 0.0, "updated": True}


class NashMTL(GradientBalancer):
    r"""Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022), as in
    the published code (github.com/AvivNavon/nash-mtl, ``methods/weight_methods.py``).

    Ĝ = G / ‖G‖_F (Frobenius normalization, as published); α > 0 solves Ĝ α = 1/α (the Nash
    bargaining solution, :func:`pub_native.solve_weights` with ``solver`` and a warm start from
    the previous α, where the published code runs up to 20 cvxpy/ECOS CCP iterations and stops
    at a residual of 1e-3); the losses are weighted: θ.grad += Σ_i α_i g_i and each task's own
    parameters get α_i ∂L_i/∂p; then, if ``max_norm`` > 0, the shared gradient of this call is
    clipped, ``torch.nn.utils.clip_grad_norm_(shared, max_norm)``, as the published code clips
    right after ``zero_grad``; what ``.grad`` held before the call is added back unclipped, so
    that two calls accumulate two clipped gradients. With ``update_weights_every`` = n,
    α is recomputed on steps 1, n + 1, 2n + 1, ... and the steps between do one backward pass
    of Σ α_i L_i (as published).
    """

    weight_task_specific_default = True
    _reusable = True
    _OPTIONS = ("update_weights_every", "weight_task_specific", "max_norm", "solver")
    SOLVERS = tuple(sorted(METHODS))

    def __init__(self, params, *, shared=None, update_weights_every: int = 1,
                 max_norm: float = 1.0, solver: str = "newton",
                 weight_task_specific: bool | None = None, process_group="auto"):
        super().__init__(params, shared=shared, weight_task_specific=weight_task_specific,
                         update_weights_every=update_weights_every, process_group=process_group)
        self.max_norm = max_norm
        self.solver = solver  # checked now (__setattr__), not at step 1
        self._prev_alpha: np.ndarray | None = None

    def _compute_weights(self, G, losses):
        scale = float(np.linalg.norm(G))
        if scale == 0.0:
            self.stats.update(status=SolveStatus.ALL_ZERO, iterations=0, residual=0.0)
            return np.zeros(len(G))
        warm = self._prev_alpha
        if warm is not None and not (warm > 0).any():
            warm = None
        t0 = time.perf_counter()
        r = solve_weights(G / scale, method=self.solver, warm_start=warm)
        self._solve_time = time.perf_counter() - t0
        self.stats.update(status=r.status, iterations=int(r.iterations),
                          residual=float(r.residual))
        alpha = np.asarray(r.weights, dtype=np.float64)
        if np.isfinite(alpha).all():
            self._prev_alpha = alpha
        return alpha

    def _method_state(self):
        alpha = self._prev_alpha
        return {"warm_start": None if alpha is None else torch.from_numpy(alpha.copy())}

    def _load_method_state(self, state_dict, k):
        alpha = _loaded_vector(state_dict.get("warm_start"), "warm_start", k, optional=True)

        def apply():
            self._prev_alpha = None if alpha is None else alpha.numpy()
        return apply

    def __repr__(self):
        return (f"NashMTL(update_weights_every={self.update_weights_every}, "
                f"max_norm={self.max_norm}, solver={self.solver!r})")


class MGDAUB(GradientBalancer):
    r"""MGDA (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS
    2018): w is the min-norm point of the convex hull of the (normalized) task gradients,

        w = argmin_{w ≥ 0, Σw = 1} ‖Σ_i w_i ĝ_i‖²,   ĝ_i = g_i / n_i,

    with n_i = 1 (``normalization="none"``, the default of the NashMTL/FAMO code the paper
    used), ‖g_i‖ (``"l2"``), L_i (``"loss"``) or L_i‖g_i‖ (``"loss+"``). The weights are applied
    to the raw losses (as published): θ.grad += Σ_i w_i g_i, task parameters get w_i ∂L_i/∂p.
    "UB" (upper bound) in the paper means the gradients are taken with respect to the shared
    representation; here they are taken with respect to the shared *parameters*, the
    ``params="shared"`` default of that code. K = 2 has the closed form
    w_2 = clip((G_11 − G_12) / (G_11 + G_22 − 2 G_12), 0, 1); K > 2 is solved by Wolfe's
    min-norm-point algorithm, exact at any ratio of the tasks' gradient sizes (see
    :func:`min_norm_weights`). Weights sum to 1 (the
    NashMTL code multiplies them by K, which Adam does not see).
    """

    weight_task_specific_default = True
    _reusable = True
    _OPTIONS = ("update_weights_every", "weight_task_specific", "normalization")
    NORMALIZATIONS = ("none", "l2", "loss", "loss+")

    def __init__(self, params, *, shared=None, normalization: str = "none",
                 update_weights_every: int = 1, weight_task_specific: bool | None = None,
                 process_group="auto"):
        super().__init__(params, shared=shared, weight_task_specific=weight_task_specific,
                         update_weights_every=update_weights_every, process_group=process_group)
        self.normalization = normalization

    def _compute_weights(self, G, losses):
        norms = np.sqrt(np.maximum(np.diag(G), 0.0))
        loss_values = np.array([abs(float(loss.detach())) for loss in losses])
        n = {"none": np.ones(len(G)), "l2": norms, "loss": loss_values,
             "loss+": loss_values * norms}[self.normalization]
        n = np.where(n > 0, n, 1.0)
        return min_norm_weights(G / np.outer(n, n))

    def __repr__(self):
        return f"MGDAUB(normalization={self.normalization!r})"


class IMTLG(GradientBalancer):
    r"""IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021): the combined
    gradient g = Σ_i w_i g_i, Σ_i w_i = 1, has equal projections on every unit task gradient
    u_i = g_i / ‖g_i‖. Closed form, with D = [g_1 − g_2, ..., g_1 − g_K] and
    U = [u_1 − u_2, ..., u_1 − u_K]: (w_2..w_K) = g_1 Uᵀ (D Uᵀ)⁻¹, w_1 = 1 − Σ_{i≥2} w_i,
    computed from G. Tasks with a zero gradient get weight 0. Where D Uᵀ is singular to
    rounding (parallel gradients: every w with Σw = 1 gives equal projections), the weights
    nearest the uniform ones (see :func:`imtl_g_weights`). Applied to the losses (as in the
    NashMTL/FAMO code): θ.grad += Σ w_i g_i, task parameters get w_i ∂L_i/∂p.
    """

    weight_task_specific_default = True
    _reusable = True
    _OPTIONS = ("update_weights_every", "weight_task_specific")

    def __init__(self, params, *, shared=None, update_weights_every: int = 1,
                 weight_task_specific: bool | None = None, process_group="auto"):
        super().__init__(params, shared=shared, weight_task_specific=weight_task_specific,
                         update_weights_every=update_weights_every, process_group=process_group)

    def _compute_weights(self, G, losses):
        return imtl_g_weights(G)

    def __repr__(self):
        return "IMTLG()"


class PCGrad(GradientBalancer):
    r"""PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020).

    For each task i, g_i^PC starts at g_i and, for every other task j in a random order,
    loses its conflicting component: if ⟨g_i^PC, g_j⟩ < 0, g_i^PC −= ⟨g_i^PC, g_j⟩/‖g_j‖² g_j.
    θ.grad += Σ_i g_i^PC (the sum, as in the NashMTL code; ``reduction="mean"`` divides by K).
    Each g_i^PC is a linear combination of the g_j, so the whole procedure runs on G and
    ``weights`` holds w with Σ_i g_i^PC = Σ_j w_j g_j. The orders come from
    ``numpy.random.default_rng(seed)``. Task parameters get their ordinary gradient.

    Under data parallelism every process must draw the same orders (its G is the processes'
    average): at the first call, and the first after :meth:`load_state_dict`, the processes
    compare their generators' states. Where ``seed=None`` drew a different one on each, every
    process restarts from one common seed; where an explicit seed (or a loaded state) differs,
    every process raises a ValueError.
    """

    _OPTIONS = ("weight_task_specific", "seed", "reduction")

    def __init__(self, params, *, shared=None, seed: int | None = 0, reduction: str = "sum",
                 weight_task_specific: bool | None = None, process_group="auto"):
        super().__init__(params, shared=shared, weight_task_specific=weight_task_specific,
                         process_group=process_group)
        self.reduction = reduction
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self._rng_compared = False  # with the other processes' (see the class docstring)

    def _compute_weights(self, G, losses):
        if self._dp_group is not None and not self._rng_compared:
            self._same_rng_everywhere()
        w = pcgrad_weights(G, self.rng)
        return w / len(G) if self.reduction == "mean" else w

    def _same_rng_everywhere(self) -> None:
        common = differs_between_processes(self._dp_group, self.rng.bit_generator.state)
        if common is not None:
            if self.seed is not None or self.steps:
                raise ValueError(
                    f"PCGrad's random generator differs between the processes (seed="
                    f"{self.seed!r} here, or state dicts that differ were loaded): under data "
                    "parallelism every process must draw the same task orders, or the replicas "
                    "drift apart. Give every process the same seed and load the same state")
            self.rng = np.random.default_rng(common)
        self._rng_compared = True

    def _method_state(self):
        return {"rng": copy.deepcopy(self.rng.bit_generator.state)}

    def _load_method_state(self, state_dict, k):
        rng = np.random.default_rng()
        try:
            rng.bit_generator.state = copy.deepcopy(state_dict.get("rng"))
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"state_dict['rng'] is not the state of numpy's "
                             f"{type(rng.bit_generator).__name__} generator ({e})") from None

        def apply():
            self.rng = rng
            self._rng_compared = False
        return apply

    def __repr__(self):
        return f"PCGrad(seed={self.seed!r}, reduction={self.reduction!r})"


class CAGrad(GradientBalancer):
    r"""CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS
    2021), as in its published code (``rescale=1``) and the NashMTL/FAMO code.

    g_0 = (1/K) Σ_i g_i, φ = c‖g_0‖. Dual: w* = argmin_{w ≥ 0, Σw = 1} g_wᵀ g_0 + φ‖g_w‖ with
    g_w = Σ_i w_i g_i; then d = (g_0 + φ/‖g_w*‖ · g_w*) / (1 + c²), and θ.grad += K·d (the
    NashMTL code's "match the sum loss" factor, so c = 0 gives exactly the LS gradient
    Σ_i g_i). ``weights``: w with K·d = Σ_i w_i g_i. The dual is solved on G normalized to
    unit mean diagonal (scale-free; the published code adds absolute 1e-8 terms instead) by
    bisection for K = 2 and, for K > 2, as a root in one variable of min-norm points of the
    shifted gradients (exact, also where G is ill-conditioned; projected gradient descent on
    the simplex when the hull holds the origin), replacing scipy's SLSQP. Task parameters get
    their ordinary gradient.
    """

    _OPTIONS = ("weight_task_specific", "c")

    def __init__(self, params, *, shared=None, c: float = 0.5,
                 weight_task_specific: bool | None = None, process_group="auto"):
        super().__init__(params, shared=shared, weight_task_specific=weight_task_specific,
                         process_group=process_group)
        self.c = c

    def _compute_weights(self, G, losses):
        return cagrad_weights(G, self.c)

    def __repr__(self):
        return f"CAGrad(c={self.c})"


class Uncertainty(GradientBalancer):
    r"""Uncertainty weighting (Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to
    Weigh Losses for Scene Geometry and Semantics", CVPR 2018): each task i has a learnable
    log-variance s_i = log σ_i² (``log_vars``, initialized to 0), owned by the balancer. It is
    float32 for a float16 or bfloat16 model (the parameters' dtype promoted with float32), and
    L is formed in the type the losses and s promote to: a loss above 65504 would make a float16
    ∂L/∂s_i infinite, and bfloat16 holds e^{−s_i} to 8 bits. A state dict saved with 16-bit
    log-variances loads into them.

    ``form="regression"`` (the default; Kendall et al. eq. 7, and the form the NashMTL and FAMO
    code, from which the PUB paper reimplemented its baselines, uses for every task,
    classification included)::

        L = Σ_i ½ (exp(−s_i) L_i + s_i)

    ``form="classification"`` (eq. 10 with the approximation of eq. 11: a softmax likelihood
    with temperature σ²)::

        L = Σ_i exp(−s_i) L_i + ½ s_i

    :meth:`backward` accumulates ∂L/∂θ into ``.grad`` of ``params`` — θ.grad += Σ_i w_i g_i with
    w_i = ½ exp(−s_i) (regression) or exp(−s_i) (classification), for task-specific parameters
    too — and ∂L/∂s_i into ``log_vars.grad``. For fixed losses, L is minimized at
    s_i = log L_i (regression) or s_i = log 2L_i (classification), where every task gets the
    weight w_i = 1/(2 L_i): at equilibrium the losses are weighted by their inverse.

    The log-variances are trained by *your* optimizer; add them to it (the published code gives
    them the learning rate 0.025)::

        bal = Uncertainty(model.parameters(), n_tasks=2)
        opt = torch.optim.Adam([{"params": model.parameters()},
                                {"params": bal.parameters(), "lr": 0.025}], lr=1e-3)
        opt.zero_grad(); bal.backward(losses); opt.step()

    Args:
        params: the model's parameters (tensors or torch param groups).
        n_tasks: K.
        form: ``"regression"`` or ``"classification"`` (above).
        process_group: under torch.distributed, ``"auto"`` (the DistributedDataParallel module
            that holds ``params``: its group; without one, as under FSDP or gradients the user
            all-reduces, none: each process weights its own losses), a group (``params`` taken
            as replicated over it; without a DDP module the balancer averages their gradients
            itself), or None (every process trains on its own). Over the group, ∂L/∂s_i
            takes the loss values averaged over the processes (one all-reduce of K numbers per
            call), so ``log_vars`` get the same gradient on every process — that of one process
            on the whole batch when each process's loss is the mean over an equal slice — and
            stay identical, while DDP averages the model's gradients as usual.
    """

    FORMS = ("regression", "classification")
    _OPTIONS = ("form",)

    def _averages_own_gradients(self) -> bool:
        return False  # (DDP's backward averages them)

    def __init__(self, params, n_tasks: int, *, form: str = "regression",
                 process_group="auto"):
        super().__init__(params, process_group=process_group)
        n_tasks = _task_count(n_tasks)
        self.form = form
        ref = self.params[0]
        # float32 at least: a 16-bit s would overflow in ∂L/∂s_i = ½(1 − e^{−s_i} L_i) for a
        # loss above 65504 (float16) and hold e^{−s_i} to 8 bits (bfloat16).
        dtype = torch.promote_types(ref.dtype, torch.float32) if ref.is_floating_point() \
            else torch.float32
        self.log_vars = torch.zeros(n_tasks, dtype=dtype, device=ref.device, requires_grad=True)
        self.k = n_tasks

    def parameters(self) -> list[torch.Tensor]:
        """The balancer's own trainable tensors (``[log_vars]``), for the optimizer."""
        return [self.log_vars]

    @_unchanged_if_it_raises
    def backward(self, losses, *, scaler=None, retain_graph: bool = False) -> None:
        """``.grad`` += ∂L/∂θ, ``log_vars.grad`` += ∂L/∂s. ``scaler``: the
        ``torch.amp.GradScaler`` that scaled ``losses``, if any: the s_i terms of L are scaled
        by the same factor, so that every gradient, ``log_vars``' included, is the scaled one
        that ``scaler.unscale_`` and ``scaler.step`` expect. ``retain_graph``: keep the
        autograd graph of ``losses`` after the call, as in ``Tensor.backward``."""
        raw, losses = losses, as_loss_list(losses, self._expected_k(), owner=self._owner())
        scaler, c = _scaler_in_use(scaler)
        if not self._reach_checked:
            self._check_reached(raw, losses)
        self._decide_group()
        self._refuse_join()
        self.steps += 1
        s = self.log_vars
        # The losses in their common type with s: a float32 loss of a float16 model is not
        # rounded to float16.
        dtype = functools.reduce(torch.promote_types, (loss.dtype for loss in losses), s.dtype)
        loss_vec = torch.stack([loss.to(dtype) for loss in losses])
        e = torch.exp(-s)
        if self._dp_group is None:
            weighted = e * loss_vec
        else:
            # ∂L/∂s_i from the loss values averaged over the processes (as one process on the
            # whole batch has them), ∂L/∂θ from this process's losses (DDP averages those).
            mean = self._group_mean(loss_vec.detach()).to(dtype)
            weighted = e.detach() * loss_vec + e * mean
        if self.form == "regression":
            total = 0.5 * (weighted + c * s).sum()
            w = 0.5 * torch.exp(-s.detach())
        else:
            total = (weighted + 0.5 * c * s).sum()
            w = torch.exp(-s.detach())
        active = _active(self.params)
        marks = _grad_marks(active)
        kept = s.grad, None if s.grad is None else s.grad.clone()
        self._loss_backward(total, active, [s], retain_graph)
        if not self._reached_now(raw, losses, active, marks):
            # The model's .grad is as it was; log_vars' gradient of this call is taken back.
            if kept[0] is not None:
                kept[0].copy_(kept[1])
            s.grad = kept[0]
            raise self._nothing_reached()
        self.weights = w.to(torch.float64).cpu()
        self.stats = {"weights_time": 0.0, "solve_time": 0.0, "updated": True}

    def _method_state(self):
        return {"log_vars": self.log_vars.detach().clone()}

    def _load_method_state(self, state_dict, k):
        values = _loaded_vector(state_dict.get("log_vars"), "log_vars", self.k)

        def apply():
            with torch.no_grad():  # in place: the optimizer holds this tensor
                self.log_vars.copy_(values)
        return apply

    def __repr__(self):
        return f"Uncertainty(n_tasks={self.k}, form={self.form!r})"


def _logit_adam_entry(key: str) -> property:
    """An attribute of FAMO that is entry ``key`` of its logits' Adam's param group."""
    def get(self) -> float:
        return float(self._logit_opt.param_groups[0][key])

    def put(self, value) -> None:
        self._logit_opt.param_groups[0][key] = value
    return property(get, put)


class FAMO(GradientBalancer):
    r"""FAMO (Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS
    2023), as in its public code (github.com/Cranial-XIX/FAMO, ``famo.py``).

    Task logits ξ (initialized to 0), z = softmax(ξ); D_i = L_i − m_i + ε with the lower bounds
    m_i (``min_losses``, 0 by default) and ε = 1e-8; c = Σ_i z_i / D_i, held constant.

    :meth:`backward`: θ.grad += ∇_θ (Σ_i z_i log D_i) / c = Σ_i w_i g_i with
    w_i = z_i / (c D_i) (so Σ_i w_i = 1), task-specific parameters included; then this call's
    gradient of the shared parameters is clipped to norm ``max_norm`` (1.0, as published; 0 turns
    it off; what ``.grad`` held before is added back unclipped). Scaling a loss by a constant
    leaves the direction of this gradient unchanged.

    :meth:`update` (after the optimizer step, with the losses L'_i of the *same* batch at the new
    parameters): δ_i = log D_i − log D'_i, the decrease of each log loss; ξ.grad = J_z(ξ)ᵀ δ
    (J_z the Jacobian of the softmax) and one Adam step on ξ with learning rate ``w_lr`` = 0.025
    and weight decay ``gamma`` = 0.01 (the published defaults). A task whose log loss fell less
    than the others' gains weight.

    The published training loops pay one extra forward pass (without gradient) per step for
    L'. If :meth:`update` is not called between two :meth:`backward` calls, ``backward`` first
    updates ξ with its own losses — the next batch at the new parameters — as L', which is what
    FAMO's own toy trainer does: free, but noisier by the difference between two batches.
    ``stats["update"]`` says which happened (``"explicit"``, ``"next batch"``,
    ``"accumulating"`` or None).

    Gradient accumulation: a :meth:`backward` that finds ``.grad`` as the last one left it (no
    ``zero_grad()`` in between) and the parameters unchanged (no step) is another micro-batch
    of the same step. It does not
    update ξ, and the losses L of the step are the mean of its micro-batches' loss values
    (micro-batches of one size make it the whole batch's).

    Args:
        params: the model's parameters (tensors or torch param groups).
        n_tasks: K.
        gamma, w_lr: the weight decay and learning rate of the logits' Adam.
        max_norm: the norm the shared gradient of each call is clipped to (0: none).
        min_losses: the lower bounds m_i (K numbers; default 0).
        shared: the shared parameters that ``max_norm`` clips (default: detected, as for the
            gradient balancers).
        process_group: under torch.distributed, ``"auto"`` (the DistributedDataParallel module
            that holds ``params``: its group; without one, as under FSDP or gradients the user
            all-reduces, none: each process weights its own losses), a group (``params`` taken
            as replicated over it; without a DDP module the balancer averages their gradients
            itself), or None (every process trains on its own). Over the group, the loss
            values of :meth:`backward` and of :meth:`update` are averaged over the processes
            (one all-reduce of K numbers per call; call both on every process), so every
            process computes the same weights and logits — those of one process on the whole
            batch when each process's loss is the mean over an equal slice — while DDP averages
            the model's gradients as usual.
    """

    _OPTIONS = ("gamma", "w_lr", "max_norm", "min_losses")

    def _averages_own_gradients(self) -> bool:
        return self.max_norm > 0  # (the clip needs this call's gradient averaged)

    def __init__(self, params, n_tasks: int, *, gamma: float = 0.01, w_lr: float = 0.025,
                 max_norm: float = 1.0, min_losses=None, shared=None, process_group="auto"):
        super().__init__(params, shared=shared, process_group=process_group)
        n_tasks = _task_count(n_tasks)
        # gamma and w_lr live in the logits' Adam (below), so they are checked before it exists.
        gamma, w_lr = (self._checked_option(name, value, name)
                       for name, value in (("gamma", gamma), ("w_lr", w_lr)))
        self.max_norm = max_norm
        self.logits = torch.zeros(n_tasks, dtype=torch.float64, requires_grad=True)
        self._logit_opt = torch.optim.Adam([self.logits], lr=w_lr, weight_decay=gamma)
        try:
            m = torch.zeros(n_tasks, dtype=torch.float64) if min_losses is None else \
                torch.as_tensor(min_losses, dtype=torch.float64).detach().cpu().reshape(-1)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"min_losses must hold {n_tasks} numbers, got {min_losses!r} "
                             f"({type(e).__name__}: {e})") from None
        if m.shape != (n_tasks,):
            raise ValueError(f"min_losses must hold {n_tasks} values, got shape {tuple(m.shape)}")
        if not bool(torch.isfinite(m).all()):  # (as load_state_dict refuses them)
            raise ValueError(f"min_losses must be finite, got {m.tolist()}")
        self.min_losses = m
        self.eps = 1e-8
        self.k = n_tasks
        self._prev_log_d: torch.Tensor | None = None
        # Gradient accumulation: the .grad the last backward left (the parameters, their
        # marks), and the sum and count of the loss values of the backward calls since the
        # last step. A backward that finds .grad as the last one left it (no zero_grad, no
        # step in between) is another micro-batch of the same step.
        self._left: tuple | None = None
        self._micro: tuple | None = None
        self._updated = True
        self._skip_update = False
        # The GradScaler of the last backward and its scale then: the scale backs off exactly
        # when the scaler skips a step, so a lower scale at update() (or at the next
        # backward's implicit update) means that no step was taken to measure.
        self._scaler = None
        self._scale: float | None = None

    # w_lr and gamma are the logits' Adam's lr and weight_decay: setting one (or loading
    # state_dict['options']) changes what that Adam steps with, and state_dict saves what it
    # used.
    w_lr = _logit_adam_entry("lr")
    gamma = _logit_adam_entry("weight_decay")

    @property
    def task_probabilities(self) -> torch.Tensor:
        """z = softmax(ξ), the tasks' share of the weighting (float64)."""
        return torch.softmax(self.logits.detach(), 0)

    def _loss_values(self, losses, scale: float = 1.0) -> torch.Tensor:
        """The unscaled loss values (float64, CPU): under data parallelism, their mean over the
        processes, the same on every process (a non-finite one on any process makes it
        non-finite on every process)."""
        values = torch.stack([loss.detach().reshape(()) for loss in losses]).to(
            device="cpu", dtype=torch.float64) / scale
        return self._group_mean(values)

    def _log_d(self, values: torch.Tensor) -> torch.Tensor:
        """log D_i of the loss values (see _loss_values)."""
        d = values - self.min_losses + self.eps
        if not bool(torch.isfinite(values).all()):
            bad = [i for i, v in enumerate(values.tolist()) if not math.isfinite(v)]
            raise FloatingPointError(f"non-finite loss in task(s) {bad}")
        if not bool((d > 0).all()) or not bool(torch.isfinite(d).all()):
            raise ValueError(
                "FAMO weights log(L_i − min_losses_i): every loss must be finite and above its "
                f"min_losses, got losses {values.tolist()} and min_losses "
                f"{self.min_losses.tolist()}")
        return d.log()

    def update(self, losses_after) -> None:
        """Update the task logits from the losses after the step (see the class docstring):
        K loss values, as tensors of one element (a list, or a 1-D tensor) or as numbers
        (Python's or numpy's). The losses may be computed under ``torch.no_grad()`` or
        ``torch.inference_mode()``, and the call made there: the logits and their Adam state
        stay ordinary tensors (backward_grad_mode)."""
        with backward_grad_mode():
            self._update(losses_after)

    def _update(self, losses_after) -> None:
        items = _loss_values_after(losses_after)
        if len(items) != self.k:
            raise ValueError(f"losses_after has {len(items)} tasks, FAMO was built for "
                             f"K = {self.k}")
        if self._prev_log_d is None:
            raise RuntimeError("FAMO.update() needs a preceding backward()")
        if self._skip_update:  # after a step the GradScaler skipped
            self._skip_update = False
            self.stats["update"] = "skipped"
            return
        if self._updated:
            raise RuntimeError("FAMO.update() was already called after the last backward(): "
                               "a second call would count the same decrease of the losses again")
        if self._skipped_since(None):  # the scaler skipped the step (a gradient overflow)
            self._drop_skipped()
            self.stats["update"] = "skipped"
            return
        self._decide_group()  # (a loaded state may call update() first)
        self._update_from(self._log_d(self._loss_values(items)))
        self._updated = True
        self.stats["update"] = "explicit"

    def _accumulating(self, active: list[torch.Tensor]) -> bool:
        """Whether this backward is another micro-batch of the last one's step: ``.grad`` as
        the last backward left it (the same tensors, unchanged: no ``zero_grad()``), some of it
        there (hooks that step each parameter in backward and take its ``.grad`` leave none),
        and the parameters unchanged since (an optimizer step moves their version counters,
        torch's and pub_native's alike, also where ``.grad`` was zeroed through ``.data``)."""
        if self._updated or self._left is None:
            return False
        ids, marks, versions = self._left
        return ([id(p) for p in active] == ids and any(ref is not None for ref, _ in marks)
                and not _received(active, marks)
                and [p._version for p in active] == versions)

    def _mark_left(self, active: list[torch.Tensor]) -> None:
        """What :meth:`_accumulating` compares the next backward with."""
        self._left = ([id(p) for p in active], _grad_marks(active),
                      [p._version for p in active])

    def _skipped_since(self, scale_now: float | None) -> bool:
        """Whether the GradScaler skipped the step after the last backward: its scale now
        (``scale_now``, or read from the scaler that backward was given) is below the scale
        then. False without a scaler."""
        if self._scale is None:
            return False
        if scale_now is None:
            if self._scaler is None:
                return False
            scale_now = float(self._scaler.get_scale())
        return scale_now < self._scale

    def _drop_skipped(self) -> None:
        """The last backward's step was skipped: it does not count, and there is no decrease
        of the losses to measure from it."""
        self.steps -= 1
        self._updated = True
        self._scaler = self._scale = None

    def _update_from(self, log_d_after: torch.Tensor) -> None:
        delta = self._prev_log_d - log_d_after
        with torch.enable_grad():
            z = torch.softmax(self.logits, 0)
            (grad,) = torch.autograd.grad(z, self.logits, grad_outputs=delta)
        self._logit_opt.zero_grad()
        self.logits.grad = grad
        self._logit_opt.step()

    @_unchanged_if_it_raises
    def backward(self, losses, *, scaler=None, retain_graph: bool = False) -> None:
        """The weighted losses' gradient into ``.grad``. ``scaler``: the
        ``torch.amp.GradScaler`` that scaled ``losses``, if any: FAMO then reads the unscaled
        losses, ``max_norm`` clips the gradient as it will be once unscaled, and a non-finite
        loss (an overflow) gives ``.grad`` the plain, non-finite sum for the scaler to skip,
        leaving FAMO's state as it was. ``retain_graph``: keep the autograd graph of
        ``losses`` after the call, as in ``Tensor.backward``."""
        raw, items = losses, as_loss_list(losses, self._expected_k(), owner=self._owner())
        scaler, scale = _scaler_in_use(scaler)
        self._decide_group()  # (before the detection: its processes agree on it)
        self._refuse_join()
        if self.max_norm > 0 and (self.shared is None or self._undecided()):
            self._detect(raw, items)
        if not self._reach_checked:
            self._check_reached(raw, items)
        values = self._loss_values(items, scale)
        active = _active(self.params)
        accumulating = self._accumulating(active)
        if scaler is not None and not bool(torch.isfinite(values).all()):
            self._loss_backward(sum(items), active, retain_graph=retain_graph)
            self.stats = {"weights_time": 0.0, "solve_time": 0.0, "updated": False,
                          "update": "accumulating" if accumulating else None}
            if not accumulating:
                # A step of its own, which the scaler will skip (the step before gets no
                # update from these losses): counted, with its scale, until that is seen.
                if not self._updated and self._skipped_since(scale):
                    self._drop_skipped()  # (the step of the backward before was skipped too)
                self.steps += 1
                self._micro = None
                self._updated = False
                self._scaler, self._scale = scaler, scale
            # The scaler skips this step: an update() after it has no step to measure.
            self._skip_update = True
            self._mark_left(active)
            return
        log_d = self._log_d(values)
        # A call that raises leaves FAMO as it was: the logits' implicit update below comes
        # before the backward pass that may still fail.
        saved = (self.logits.detach().clone(), copy.deepcopy(self._logit_opt.state_dict()))
        aside = None
        try:
            update = "accumulating" if accumulating else None
            if not self._updated and not accumulating:
                if self._skipped_since(scale if scaler is not None else None):
                    self._drop_skipped()  # the GradScaler skipped the last step
                    update = "skipped"
                else:
                    self._update_from(log_d)
                    update = "next batch"
            z = torch.softmax(self.logits.detach(), 0)
            d = log_d.exp()
            c = float((z / d).sum())
            w = z / (c * d)
            total = sum(float(wi) * loss for wi, loss in zip(w.tolist(), items, strict=True))
            # Clipped: every .grad set aside (_zero_aside), so that the clip sees this call's
            # gradient alone and a call that raises after the backward pass (a sparse shared
            # gradient, which the clip cannot take) puts every .grad back as it was.
            clip = self.max_norm > 0 and bool(self.shared)
            aside = _zero_aside(active) if clip else None
            marks = _grad_marks(active)
            if clip and self._dp_group is not None:
                # Clipped: the clip needs this call's gradient averaged over the processes,
                # also inside ddp.no_sync() (where DDP's backward would average nothing and
                # each process clip its own), as the other clipping balancers average theirs.
                self._backward_fixed_distributed([(total, _active(self.params))],
                                                 retain_graph)
            else:
                self._loss_backward(total, active, retain_graph=retain_graph)
            if not self._reached_now(raw, items, active, marks):
                raise self._nothing_reached()
            if clip:
                _refuse_sparse(self.params, self.shared)
                _clip_unscaled(self.shared, self.max_norm, scale)
        except BaseException:
            _undo_aside(active, aside)
            with torch.no_grad():
                self.logits.copy_(saved[0])
            self._logit_opt.load_state_dict(saved[1])
            raise
        _add_back(active, aside)
        if accumulating:  # (one step: counted once, its losses the micro-batches' mean)
            total_values, n = self._micro if self._micro is not None else (0.0, 0)
            self._micro = (total_values + values, n + 1)
            log_d = self._log_d(self._micro[0] / (n + 1))
        else:
            self.steps += 1
            self._micro = (values, 1)
            self._skip_update = False
        self._mark_left(active)
        self.weights = w
        self._prev_log_d = log_d
        self._updated = False
        self._scaler, self._scale = (scaler, scale) if scaler is not None else (None, None)
        self.stats = {"weights_time": 0.0, "solve_time": 0.0, "updated": True, "update": update}

    def _method_state(self):
        return {"logits": self.logits.detach().clone(),
                "logit_optimizer": copy.deepcopy(self._logit_opt.state_dict()),
                "prev_log_losses": None if self._prev_log_d is None else self._prev_log_d.clone(),
                "updated": self._updated, "skip_update": self._skip_update,
                "loss_scale": self._scale}

    def _load_method_state(self, state_dict, k):
        logits = _loaded_vector(state_dict.get("logits"), "logits", self.k)
        prev = _loaded_vector(state_dict.get("prev_log_losses"), "prev_log_losses", self.k,
                              optional=True)
        flags = [state_dict.get(name) for name in ("updated", "skip_update")]
        for name, v in zip(("updated", "skip_update"), flags, strict=True):
            if not isinstance(v, bool):
                raise TypeError(f"state_dict[{name!r}] must be a bool, got {v!r}")
        loss_scale = state_dict.get("loss_scale")  # (absent from older state dicts)
        if loss_scale is not None and not (is_real(loss_scale)
                                           and 0 < loss_scale < math.inf):
            raise ValueError(f"state_dict['loss_scale'] must be None or a finite number > 0, "
                             f"got {loss_scale!r}")
        opt_state = copy.deepcopy(state_dict.get("logit_optimizer"))
        probe = torch.optim.Adam([torch.zeros(self.k, dtype=torch.float64, requires_grad=True)])
        try:  # what the logits' Adam would refuse, refused before anything is loaded
            probe.load_state_dict(copy.deepcopy(opt_state))
            entries = [v for st in probe.state.values() for name, v in st.items()
                       if name != "step"]
            if any(not isinstance(v, torch.Tensor) or tuple(v.shape) != (self.k,)
                   or not bool(torch.isfinite(v).all()) for v in entries):
                raise ValueError(f"its state must be finite tensors of shape ({self.k},)")
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ValueError(f"state_dict['logit_optimizer'] is not a state dict of the "
                             f"logits' Adam ({type(e).__name__}: {e})") from None
        # The saved options replace the constructor's (as in torch): each is checked as the
        # constructor checks w_lr and gamma (and torch's Adam its own), before anything is
        # loaded, then one step of the probe on a zero gradient must run (a string lr, say,
        # was loaded and broke every later call).
        w_lr, gamma = _checked_adam_group(probe.param_groups[0],
                                          "state_dict['logit_optimizer']['param_groups'][0]")
        probe.param_groups[0]["params"][0].grad = torch.zeros(self.k, dtype=torch.float64)
        try:
            probe.step()
        except Exception as e:  # noqa: BLE001 - whatever the step raises: refused, named
            raise ValueError(f"state_dict['logit_optimizer'] does not give the logits' Adam a "
                             f"step it can take ({type(e).__name__}: {e})") from None

        def apply():
            with torch.no_grad():  # in place: the logits' Adam holds this tensor
                self.logits.copy_(logits)
            self._logit_opt.load_state_dict(opt_state)
            self.w_lr, self.gamma = w_lr, gamma  # the saved options win, as in torch
            self._prev_log_d = prev
            self._updated, self._skip_update = flags
            self._scaler = None  # (the next backward's scaler is compared with loss_scale)
            self._scale = None if loss_scale is None else float(loss_scale)
        return apply

    def _loaded_option(self, name, value, label, k):
        if name != "min_losses":
            return super()._loaded_option(name, value, label, k)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"{label} must be a float tensor, got "
                            f"{value.dtype if isinstance(value, torch.Tensor) else value!r}")
        if tuple(value.shape) != (self.k,):
            raise ValueError(f"{label} has shape {tuple(value.shape)}, expected ({self.k},)")
        value = value.detach().to(device="cpu", dtype=torch.float64).clone()
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{label} is {value.tolist()}: it must be finite")
        return value

    def __repr__(self):
        return (f"FAMO(n_tasks={self.k}, gamma={self.gamma}, w_lr={self.w_lr}, "
                f"max_norm={self.max_norm})")


class MultiBalance(GradientBalancer):
    r"""MultiBalance (He et al., "MultiBalance: Multi-Objective Gradient Balancing in
    Industrial-Scale Multi-Task Recommendation System", arXiv 2411.11871): gradient balancing
    on the shared *representation* z (what the task heads read from the shared trunk) instead of
    the shared parameters.

    ``backward(losses, representation)`` per step:

    1. K backward passes through the task heads only, one per task, stopping at z: they give
       r_i = ∂L_i/∂z (flattened over the batch and the features; summed over the tensors when z
       is several tensors) and ∂L_i/∂φ for the head parameters φ.
    2. The K×K Gram G_ij = ⟨r_i, r_j⟩, with float64 products and sums whatever z's dtype (in
       column blocks: no K×(B·D) copy), so that nearly parallel gradients keep a PSD Gram and
       float32 or float16 gradients whose squares overflow their own type give a finite one.
       Under data parallelism (``process_group`` below), G is summed over the processes (one
       all-reduce of a fixed layout of K² + 2K + (number of representation tensors) +
       (number of head parameters) numbers: the Gram, the loss values, and flags, so that
       every process sends the same numbers whatever its slice of the batch reached): each
       process holds ∂L_i/∂z for its own rows of the batch, so the sum is exactly the Gram of
       the whole batch (divided by N², N processes, for losses averaged per process, as DDP
       assumes).
    3. EMA (``ema`` = β, 0 turns it off): Ḡ_t = β Ḡ_{t−1} + (1 − β) G_t, used with the bias
       correction Ḡ_t / (1 − β^t).
    4. Normalization n_i: ``"l2"`` (default) n_i = √Ḡ_ii, the magnitude of the task's
       representation gradient; ``"loss"`` n_i = L_i; ``"none"`` n_i = 1; Ĝ_ij = Ḡ_ij/(n_i n_j).
    5. Weights w' on the simplex from Ĝ: ``solver="min-norm"`` (default; MGDA's min-norm point of
       the normalized gradients, :func:`min_norm_weights`), ``"nash"`` (the Nash bargaining
       solution Ĝα = 1/α of the native solver, α/Σα) or ``"mean"`` (w' = 1/K: magnitude
       normalization alone).
    6. Task weights w_i = w'_i · (Σ_j n_j) / n_i: Σ_i w_i r_i = (Σ_j n_j) Σ_i w'_i r_i/n_i is the
       balanced combination of the *normalized* gradients at the scale of the summed loss, and K
       identical tasks give w = 1, exactly linear scalarization. A task whose norm in the Gram
       of step 5 is zero (√Ḡ_ii ≤ 1e-12 max_j √Ḡ_jj, e.g. one that never uses z) keeps
       w_i = 1 and is left out of steps 4–5. With ``ema`` > 0 that is the averaged Gram: a
       task absent from one batch (r_i = 0 there) keeps the weight its average gives it.
    7. Head parameters: φ.grad += Σ_i w_i ∂L_i/∂φ. Trunk: one backward from z with the weighted
       representation gradient Σ_i w_i r_i (both sums taken in float32 at least, rounded once
       into a 16-bit dtype). Every parameter thus receives ∂(Σ_i w_i L_i)/∂θ,
       and the step costs one head pass per task and one trunk pass — the work of an ordinary
       backward, plus the Gram. Under data parallelism the head gradients are averaged over
       the processes by one all-reduce here (every head parameter that some process's slice
       reached, zeros where this one's did not), and DDP averages the trunk's in the trunk
       backward (wrap the *trunk*, not the whole model, in DDP).

    A loss value, a representation gradient or a head gradient that is not finite (NaN or Inf,
    in any task) raises FloatingPointError naming the task(s), leaving ``.grad`` and the
    balancer (weights, Gram average, step count) as they were — except under a
    ``torch.amp.GradScaler`` given as ``scaler=``, where it is an overflow (see
    :meth:`backward`).

    What the paper states (its abstract): per-task gradients are balanced with respect to the
    shared feature representation, which needs only those K small gradients and keeps the
    training cost close to a plain step (neutral QPS at Meta, against a 70–80% QPS loss for
    balancing on the shared parameters), and the weights come without grid search. Its exact
    weighting rule is not public: steps 3–6 are this implementation's choices — MGDA-UB's
    min-norm weights on magnitude-normalized representation gradients with an EMA of the Gram
    (for two tasks the min-norm point of two unit vectors is their midpoint, so the default
    equalizes the EMA'd gradient magnitudes at z) — exposed as the options above.

    The representation is a tensor, or a list of tensors none of which is computed from
    another, through which the heads reach *all* of the trunk: a trunk parameter that a loss
    reaches around z makes the first call raise, naming it (add the tensor the head reads it
    from to the list — e.g. MMoE's gates read the embedding, so its representation is the
    experts' output *and* the gates' input; or a head reads another output of the operation
    that made z, as ``a, b = trunk(x).chunk(2, 1)`` with z = a: pass ``[a, b]``). The first
    call makes the head/trunk split, which is kept; a later call whose graph no longer fits it
    (a loss that now reaches a trunk parameter around z, z taken from another layer, a balancer
    whose tensors are no longer the model's) raises. A hook on z (``z.register_hook``) runs in
    each head pass, on r_i, and not again in the trunk's backward from Σ w_i hook(r_i). Usable
    with any torch optimizer::

        bal = MultiBalance(model.parameters())
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for x, ys in loader:
            z = model.trunk(x)                             # shared representation (B, D)
            losses = [F.mse_loss(head(z).squeeze(1), y) for head, y in zip(model.heads, ys)]
            opt.zero_grad()
            bal.backward(losses, z)
            opt.step()

    Args:
        params: the parameters to give ``.grad`` to.
        normalization: ``"l2"``, ``"loss"`` or ``"none"`` (step 4).
        solver: ``"min-norm"``, ``"nash"`` or ``"mean"`` (step 5).
        ema: β of the Gram's exponential moving average, in [0, 1) (step 3; default 0.9).
        process_group: under torch.distributed, as for the other balancers and
            ``pub_native.Adam``: ``"auto"`` (default) the group of the DistributedDataParallel
            module that holds the trunk (the heads stay plain modules; parameters identical on
            every process with no DDP module are an error that says so), a group to take the
            parameters as replicated over (without a DDP module around the trunk, MultiBalance
            then averages the trunk's gradients too), or None (every process trains on its
            own). The processes agree on the head/trunk split of the first call (what any
            process's graph reached) in two small all-reduces.

    Attributes (after the first call): ``heads`` (per task, the head parameters it reaches),
    ``trunk`` (the parameters behind the representation), ``gram`` (the last G) and
    ``weights`` (the last w).
    """

    NORMALIZATIONS = ("l2", "loss", "none")
    SOLVERS = ("min-norm", "nash", "mean")
    _OPTIONS = ("normalization", "solver", "ema")

    def _averages_own_gradients(self) -> bool:
        return False  # (DDP's backward averages the trunk's; the heads sit outside DDP)

    def __init__(self, params, *, normalization: str = "l2", solver: str = "min-norm",
                 ema: float = 0.9, process_group="auto"):
        super().__init__(params, process_group=process_group)
        self.normalization, self.solver, self.ema = normalization, solver, ema
        self.heads: list[list[torch.Tensor]] | None = None
        self.trunk: list[torch.Tensor] | None = None
        self._unsplit: list[bool] = []
        self._gram_avg: list | None = None
        self._last_gram: list | None = None

    @property
    def gram(self) -> torch.Tensor | None:
        """G of the last :meth:`backward` (before the EMA; summed over the ranks; of the
        unscaled gradients under a GradScaler), float64."""
        return None if self._last_gram is None else torch.tensor(self._last_gram,
                                                                 dtype=torch.float64)

    def _decide_group(self) -> None:
        """The data-parallel group, decided at the first call: ``process_group`` as the other
        balancers take it, except that with ``"auto"`` the DistributedDataParallel module is the
        trunk's alone (the heads are plain modules, whose gradients this balancer averages)."""
        if self._dp_decided:
            return
        pg = self._process_group
        if isinstance(pg, str) and pg == "auto" and is_distributed() \
                and torch.distributed.get_world_size() > 1:
            group, ddp = _trunk_group(self.params)
        else:
            group, ddp = data_parallel_group(self.params, pg)
        self._keep_ddp(ddp)
        self._dp_group, self._dp_decided = group, True

    def _split(self, raw, items, reps) -> None:
        """Head parameters per task (reached from the loss without crossing z) and the trunk
        (reached from z); a parameter in both is reached around z. Under data parallelism,
        what any process's graph reached (every process then has the same split, and the same
        errors)."""
        _check_independent(reps)
        starts = task_roots(raw, items)
        _refuse_reentrant(starts)
        stops, stop_leaves = _stops(reps)
        walks = [_reached_stopping(start, stops, stop_leaves) for start in starts]
        reach = [leaves for leaves, _ in walks]
        crossed = any(c for _, c in walks)  # whether some loss reaches the representation
        behind = set()
        for z in reps:
            behind |= _reached_stopping(z, set(), set())[0]
        group = self._dp_group
        if group is not None:
            n = len(self.params)
            flags = agree_on(group, len(items),
                             [id(p) in r for r in (*reach, behind) for p in self.params]
                             + [crossed], trainable=[p.requires_grad for p in self.params])
            agreed = [{id(p) for j, p in enumerate(self.params) if flags[i * n + j]}
                      for i in range(len(items) + 1)]
            reach, behind, crossed = agreed[:-1], agreed[-1], flags[-1]
        if not crossed:
            # (before the check below: a loss that reaches the representation's node through
            # its other outputs alone, as from a compiled region that computes both, is this
            # error, not a path around it)
            _no_representation(raw, items)
        names = {id(p): i for i, p in enumerate(self.params)}
        for r in reach:
            around = sorted(names[pid] for pid in r & behind if pid in names)
            if around:
                p = self.params[around[0]]
                raise ValueError(
                    f"params[{around[0]}] (shape {tuple(p.shape)}) is reached by a task loss "
                    "both through the representation and around it; pass the tensor that "
                    "head reads it from as part of the representation (a list of tensors; "
                    "e.g. another output of the operation that made the representation, as "
                    "b of a, b = h.chunk(2, 1))")
        heads = [[p for p in self.params if id(p) in r] for r in reach]
        if group is not None and ddp_holders({id(p) for h in heads for p in h}):
            raise ValueError(
                "the task heads are inside a DistributedDataParallel module: wrap only the trunk "
                "(the part below the representation) in DDP and keep the heads plain modules; "
                "MultiBalance averages the heads' gradients itself, and DDP's own reduction "
                "would see only part of its parameters' gradients")
        trunk = [p for p in self.params if id(p) in behind]
        own = False
        if group is not None and trunk:
            wrapped = set()
            for _, ids in ddp_holders({id(p) for p in trunk}):
                wrapped |= ids
            # A group given without a DDP module around the trunk: its gradients are averaged
            # here, as the other balancers average the gradients of such parameters.
            own = not wrapped and not (isinstance(self._process_group, str)
                                       and self._process_group == "auto")
            loose = [i for i, p in enumerate(self.params)
                     if id(p) in behind and id(p) not in wrapped]
            if loose and not own:
                p = self.params[loose[0]]
                raise ValueError(
                    f"params[{loose[0]}] (shape {tuple(p.shape)}) is in the trunk (below the "
                    "representation) but not inside a DistributedDataParallel module: each "
                    "process would keep its own gradient of it and the replicas would drift "
                    "apart; wrap the trunk in DDP (MultiBalance averages the heads' gradients "
                    "and the Gram itself, DDP the trunk's)")
        self.heads = heads
        self.trunk = trunk
        self._dp_own = own
        self.k = len(items)
        # A frozen parameter is in no graph, nor is one no loss reached yet (an expert no
        # example was routed to): split again once one of them requires grad and is reached.
        placed = behind.union(*reach)
        self._unsplit = [not p.requires_grad or id(p) not in placed for p in self.params]
        if all(self._unsplit):
            raise ValueError(_NOTHING_REACHED)

    def _split_changed(self, raw, items, reps) -> str | None:
        """Why this call's graph does not fit the split of the first call, or None. The heads'
        graph is walked (from the losses to z: the part a head pass runs through anyway):
        a trunk parameter reached there is reached around z, or z was taken from an earlier
        layer; the trunk's graph only where a head parameter went unreached (z taken from a
        later layer, or the balancer's tensors are no longer those of the model: the error of
        a call that reaches none of them)."""
        stops, stop_leaves = _stops(reps)
        reached: set[int] = set()
        crossed = False
        for start in task_roots(raw, items):
            leaves, c = _reached_stopping(start, stops, stop_leaves)
            reached |= leaves
            crossed = crossed or c
        if not crossed and self._dp_group is None:  # (every parameter is reached "around" it)
            # (Under data parallelism a process whose slice has no loss that reaches z is
            # fine: the call's all-reduce tells whether any process's did.)
            try:
                _no_representation(raw, items)
            except ValueError as e:
                return str(e)
        index = {id(p): j for j, p in enumerate(self.params) if p.requires_grad}
        heads = {id(p) for params in self.heads for p in params if id(p) in index}
        for j, p in enumerate(self.params):
            if id(p) in reached and id(p) in index and id(p) not in heads:
                return (f"params[{j}] (shape {tuple(p.shape)}) is behind the representation (in "
                        "the trunk) at the first call, but a task loss now reaches it without "
                        "going through the representation: around it (pass the tensor that "
                        "head reads it from as part of the representation), or the "
                        "representation is taken from an earlier layer than at the first call "
                        "(MultiBalance keeps the head/trunk split of its first call: build a "
                        "new one)")
        missing = heads - reached
        if not missing and heads:
            return None
        behind: set[int] = set()
        for z in reps:
            behind |= _reached_stopping(z, set(), set())[0]
        for j, p in enumerate(self.params):
            if id(p) in missing and id(p) in behind:
                return (f"params[{j}] (shape {tuple(p.shape)}) is a head parameter at the first "
                        "call, but it is now behind the representation: the representation is "
                        "taken from a later layer than at the first call (MultiBalance keeps the "
                        "head/trunk split of its first call: build a new one)")
        if not (reached | behind) & index.keys():
            return _NOTHING_REACHED
        return None

    @_unchanged_if_it_raises
    def backward(self, losses, representation=None, *, scaler=None,
                 retain_graph: bool = False) -> None:
        """Head passes -> Gram -> weights -> head gradients and one trunk pass (see above).

        ``scaler``: the ``torch.amp.GradScaler`` that scaled ``losses``, if any. With it, a
        non-finite loss value, representation gradient or head gradient (an overflow) is no
        error: the heads and the trunk get the plain sum of the task gradients (non-finite
        where the overflow is), so that ``scaler.step`` skips the step, and the weights, the
        Gram average and the step count stay as they were.

        ``retain_graph``: keep the autograd graph of ``losses`` (heads and trunk) after the
        call, as in ``Tensor.backward``."""
        # The K×K math runs on Python floats: for a handful of tasks that is several times
        # faster than numpy's per-call overhead, and this step is meant to cost about as much
        # as a plain backward.
        raw, items = losses, as_loss_list(losses, self._expected_k(), owner=self._owner())
        reps = _representation_list(representation)
        scaler, scale = _scaler_in_use(scaler)
        self._decide_group()
        self._refuse_join()
        split_now = self.heads is None or any(
            p.requires_grad and later for p, later in zip(self.params, self._unsplit, strict=True))
        # A later call whose graph no longer fits the first call's split (a loss that reaches a
        # trunk parameter around z, a representation taken from another layer, a balancer
        # whose tensors are no longer the model's) is refused: the split would drop gradients.
        changed = None
        if split_now:
            self._split(raw, items, reps)
        else:
            changed = self._split_changed(raw, items, reps)
            if changed is not None and self._dp_group is None:
                raise ValueError(changed)
        group = self._dp_group
        k, m = len(items), len(reps)
        t0 = time.perf_counter()
        # The head parameters of the split, in params order: the same on every process. Every
        # task's pass asks for all of them, not only for those its loss reached at the split: a
        # head that a task starts to read later gets that task's gradient too, as from
        # Σ_i w_i L_i (the ones it does not reach come back None, at no cost).
        head_ids = {id(p) for params in self.heads for p in _active(params)}
        order = [p for p in self.params if id(p) in head_ids]
        heads = [order] * len(items)
        # rows[t][i]: ∂L_i/∂z_t (None where task i does not reach z_t); head[i]: ∂L_i/∂φ.
        rows = [[None] * k for _ in range(m)]
        head = []
        # A representation tensor that retains its gradient (z.retain_grad()) gets it from
        # each head pass too: put back as it was, the trunk's pass gives it Σ_i w_i r_i.
        retained = [(z, None if z.grad is None else z.grad.clone())
                    for z in reps if z.retains_grad]
        try:
            for i, loss in enumerate(items):
                grads = torch.autograd.grad(loss, reps + heads[i],
                                            retain_graph=retain_graph or i < k - 1,
                                            allow_unused=True)
                for t in range(m):
                    rows[t][i] = grads[t]
                head.append(grads[m:])
        finally:
            for z, g in retained:
                z.grad = g
        reached = [any(r is not None for r in per_rep) for per_rep in rows]
        if group is None and not any(reached):
            _no_representation(raw, items)
        # This call's numbers in one float64 vector of a fixed layout (summed over the
        # processes under data parallelism; one wait for the device): the Gram's K²
        # entries, the K unscaled loss values, per task the sum of its head gradients' norms
        # (not finite where one of them is not), and under data parallelism, per
        # representation tensor whether a task reached it and per head parameter whether it
        # has a gradient.
        numbers = [_gram_entries(rows, k),
                   torch.stack([loss.detach().reshape(()).to(device=items[0].device,
                                                              dtype=torch.float64)
                                for loss in items]) / scale,
                   _head_norms(head)]
        if group is not None:
            got = {id(p) for params, grads in zip(heads, head, strict=True)
                   for p, g in zip(params, grads, strict=True) if g is not None}
            sparse = {id(p) for params, grads in zip(heads, head, strict=True)
                      for p, g in zip(params, grads, strict=True) if g is not None and g.is_sparse}
            numbers += [torch.tensor([float(x) for x in reached], dtype=torch.float64),
                        torch.tensor([float(id(p) in got) for p in order], dtype=torch.float64),
                        torch.tensor([float(id(p) in sparse) for p in order],
                                     dtype=torch.float64),
                        torch.tensor([float(changed is not None)], dtype=torch.float64)]
        device = _numbers_device(group, numbers)
        packed = torch.cat([x.to(device=device, dtype=torch.float64) for x in numbers])
        world = 1
        if group is not None:
            world = torch.distributed.get_world_size(group)
            torch.distributed.all_reduce(packed, group=group)
        packed = packed.tolist()
        n_pairs = k * k
        entries = [x / (world * world) for x in packed[:n_pairs]]
        values = [x / world for x in packed[n_pairs:n_pairs + k]]
        bad_head = [i for i, x in enumerate(packed[n_pairs + k:n_pairs + 2 * k])
                    if not math.isfinite(x)]
        if bad_head:  # (or a norm beyond its dtype's range: the elements decide)
            bad_head = self._non_finite_heads(head, bad_head)
        present = None
        if group is not None:
            rest = packed[n_pairs + 2 * k:]
            reached = [x > 0 for x in rest[:m]]
            n = len(order)
            # per head parameter: 0 no process has a gradient of it, 1 some have, dense, 2
            # sparse on some (an nn.Embedding(sparse=True)): sparse after the all-reduce too
            present = [(2 if y > 0 else 1) if x > 0 else 0
                       for x, y in zip(rest[m:m + n], rest[m + n:m + 2 * n], strict=True)]
            if rest[-1] > 0:  # (every process raises: one's graph no longer fits the split)
                raise ValueError(changed or "on another process: the head/trunk split of the "
                                 "first call no longer fits the losses' graph (see its error)")
            if not any(reached):
                _no_representation(raw, items)
        G = [[0.0] * k for _ in range(k)]
        for i in range(k):  # (its lower triangle: exactly symmetric)
            for j in range(i + 1):
                G[i][j] = G[j][i] = entries[i * k + j]
        bad_loss = [i for i in range(k) if not math.isfinite(values[i])]
        bad_rep = [i for i in range(k) if not math.isfinite(G[i][i])] or \
            [i for i in range(k) if not all(math.isfinite(x) for x in G[i])]
        if bad_loss or bad_rep or bad_head:
            if scaler is not None:
                self._give_gradients(heads, head, reps, rows, [1.0] * k, order, present,
                                     reached, retain_graph)
                self.stats = {"weights_time": 0.0, "solve_time": 0.0, "updated": False,
                              "gram_time": time.perf_counter() - t0}
                return
            found = [f"non-finite {what} in task(s) {bad}" for what, bad in (
                ("loss", bad_loss), ("representation gradient", bad_rep),
                ("gradient of the head parameters", bad_head)) if bad]
            where = f" (over the {world} processes)" if world > 1 else ""
            raise FloatingPointError("; ".join(found) + where)
        if scaler is not None:
            # The Gram of the unscaled gradients: the average mixes Grams of steps the scaler
            # scaled differently (the scale is a power of two: the quotient is exact).
            c2 = scale ** 2
            G = [[x / c2 for x in row] for row in G]
        last_gram = G
        t1 = time.perf_counter()
        avg = self._gram_avg
        if self.ema > 0:
            b = self.ema
            avg = [[(1 - b) * x for x in row] for row in G] if avg is None else \
                [[b * a + (1 - b) * x for a, x in zip(ra, rg)] for ra, rg in zip(avg, G)]
            corr = 1.0 / (1.0 - b ** (self.steps + 1))
            G = [[corr * a for a in row] for row in avg]
        wl = _multibalance_weights(G, values, self.normalization, self.solver)
        elapsed = time.perf_counter() - t1
        self._give_gradients(heads, head, reps, rows, wl, order, present, reached,
                             retain_graph)
        self._last_gram, self._gram_avg = last_gram, avg
        self.steps += 1
        self.weights = torch.tensor(wl, dtype=torch.float64)
        self.stats = {"weights_time": elapsed, "solve_time": elapsed, "updated": True,
                      "gram_time": t1 - t0}

    def _non_finite_heads(self, head, tasks: list[int]) -> list[int]:
        """Of ``tasks``, those with a head gradient that has a NaN or Inf on some process."""
        flags = torch.tensor([float(i in tasks and not all(
            bool(torch.isfinite(g._values() if g.is_sparse else g).all())
            for g in head[i] if g is not None))
            for i in range(len(head))], dtype=torch.float64)
        if self._dp_group is not None:
            flags = flags.to(_numbers_device(self._dp_group, [flags]))
            torch.distributed.all_reduce(flags, group=self._dp_group)
        return [i for i, x in enumerate(flags.tolist()) if x > 0]

    def _give_gradients(self, heads, head, reps, rows, wl, order, present, reached,
                        retain_graph) -> None:
        """The heads' Σ w_i ∂L_i/∂φ and the trunk's backward from z with Σ_i w_i r_i."""
        self._head_grads(heads, head, wl, order, present)
        trunk = _active(self.trunk)
        if trunk:
            self._trunk_backward(reps, rows, wl, reached, trunk, retain_graph)

    def _trunk_backward(self, reps, rows, wl, reached, trunk, retain_graph) -> None:
        """One backward from z with Σ_i w_i r_i, summed in a tensor of its own: the r_i that
        autograd handed back may be held elsewhere (a tensor hook on z or on a tensor the
        heads compute from it may keep it; autograd may hand one tensor to two inputs), so
        none is written to. The sum is taken in float32 at least and rounded once into z's
        dtype, as the gradient balancers combine theirs (see :func:`_combine`). Under data
        parallelism a representation tensor that some process reached gets a backward on
        every process (zeros where no task reached it here), so that every process takes part
        in the trunk's gradient averaging."""
        tensors, grads = [], []
        distributed = self._dp_group is not None
        for z, per_rep, there in zip(reps, rows, reached, strict=True):
            combined = None
            for wi, r in zip(wl, per_rep, strict=True):
                if r is None:
                    continue
                if combined is not None:
                    combined.add_(r, alpha=wi)
                else:
                    combined = r.to(torch.promote_types(r.dtype, torch.float32)) * wi
            if combined is None and distributed and there:
                combined = torch.zeros_like(z)
            if combined is not None:
                tensors.append(z)
                grads.append(combined.to(z.dtype))
        if not tensors:
            return
        if not self._dp_own:
            with _tensor_hooks_silenced(tensors):
                torch.autograd.backward(tensors, grads, inputs=trunk, retain_graph=retain_graph)
            return
        stash = _set_aside(trunk)  # no DDP module writes into them (see _split)
        try:
            with _tensor_hooks_silenced(tensors):
                torch.autograd.backward(tensors, grads, inputs=trunk, retain_graph=retain_graph)
            average_gradients(trunk, self._dp_group)
        except BaseException:
            _restore(trunk, stash)
            raise
        _put_back(trunk, stash)

    def _head_grads(self, heads, head, wl, order, present) -> None:
        """φ.grad += Σ_i w_i ∂L_i/∂φ (averaged over the processes under data parallelism); one
        ``_foreach`` product per task, in float32 at least (16-bit gradients are widened, and
        their sum rounded once into the parameter's dtype, as in :func:`_combine`). ``order``:
        the head parameters of the split, the same on every process; ``present``: per
        parameter of ``order``, 0 where no process has a gradient of it, 1 where some has, 2
        where some has a sparse one (None without data parallelism). Each process packs every
        present one, zeros where it has none (dense: the all-reduce of a fixed layout), so that
        the all-reduce adds each parameter's gradient to its own, whatever each process's slice
        of the batch reached; a sparse one is made sparse again after it."""
        sums: dict[int, torch.Tensor] = {}
        for wi, params, grads in zip(wl, heads, head, strict=True):
            given = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
            if not given:
                continue
            widened = [g.to(torch.promote_types(g.dtype, torch.float32)) for _, g in given]
            # (an nn.Embedding(sparse=True) in a head: a sparse gradient, which _foreach_mul
            # does not take)
            scaled = [g * wi for g in widened] if any(g.is_sparse for g in widened) else \
                torch._foreach_mul(widened, wi)
            for (p, _), g in zip(given, scaled, strict=True):
                key = id(p)
                if key in sums:
                    sums[key].add_(g)
                else:
                    sums[key] = g
        for p in order:
            g = sums.get(id(p))
            if g is not None and g.dtype != p.dtype:
                sums[id(p)] = g.to(p.dtype)
        if present is None:
            targets = [p for p in order if id(p) in sums]
        else:
            targets = [p for p, there in zip(order, present, strict=True) if there]
            world = torch.distributed.get_world_size(self._dp_group)
            kinds: dict = {}
            for p in targets:
                kinds.setdefault((p.dtype, p.device), []).append(p)
            for params in kinds.values():
                flat = torch.cat([_dense(sums[id(p)]) if id(p) in sums else
                                  torch.zeros_like(p).reshape(-1) for p in params])
                flat.div_(world)
                torch.distributed.all_reduce(flat, group=self._dp_group)
                for p, chunk in zip(params, flat.split([p.numel() for p in params]),
                                    strict=True):
                    sums[id(p)] = chunk.view(p.shape)
            for p, there in zip(order, present, strict=True):
                if there == 2:  # (rows: the layout of an embedding's sparse gradient)
                    sums[id(p)] = sums[id(p)].to_sparse(sparse_dim=min(1, p.dim()))
        for p in targets:
            g = sums[id(p)]
            if p.grad is None:
                # In the parameter's memory order, as autograd lays out a gradient it creates
                # (a channels_last head keeps channels_last gradients).
                p.grad = g if g.is_sparse or g.stride() == p.stride() or not dense_strides(p) \
                    else torch.empty_like(p, dtype=g.dtype).copy_(g)
            else:
                p.grad.add_(g)

    def _method_state(self):
        return {"gram_average": copy.deepcopy(self._gram_avg),
                "last_gram": copy.deepcopy(self._last_gram)}

    def _load_method_state(self, state_dict, k):
        average = _loaded_gram(state_dict.get("gram_average"), "gram_average", k)
        last = _loaded_gram(state_dict.get("last_gram"), "last_gram", k)

        def apply():
            self._gram_avg, self._last_gram = average, last
        return apply

    def __repr__(self):
        return (f"MultiBalance(normalization={self.normalization!r}, solver={self.solver!r}, "
                f"ema={self.ema})")


@contextlib.contextmanager
def _tensor_hooks_silenced(tensors: list[torch.Tensor]):
    """The hooks registered on the (non-leaf) representation tensors with ``register_hook``,
    kept from running inside the block. They ran in the head passes, on each task's gradient,
    and the trunk's backward starts from Σ_i w_i hook(r_i): run again there, a hook would act
    twice (a gradient reversal would cancel itself, a scaling be squared), where
    ``loss.backward()`` runs it once. torch keeps them in the tensor's ``_backward_hooks``
    dict, which its node reads at each call: each is replaced by one that changes nothing for
    the block, and put back unless it was removed meanwhile (a hook registered meanwhile
    stays)."""
    saved = []
    for z in tensors:
        hooks = getattr(z, "_backward_hooks", None) if z.grad_fn is not None else None
        if hooks:
            saved.append((hooks, list(hooks.items())))
            for key in hooks:
                hooks[key] = _no_change
    try:
        yield
    finally:
        for hooks, items in saved:
            for key, hook in items:
                if key in hooks:
                    hooks[key] = hook


def _no_change(grad):
    """A tensor hook that leaves the gradient as it is."""
    return None


def _trunk_group(params: list[torch.Tensor]):
    """MultiBalance's ``process_group="auto"`` under torch.distributed with several processes:
    (group, module) of the DistributedDataParallel module that holds its parameters (the
    trunk), (None, None) where no module holds any and the parameters differ between the
    processes (every process trains its own model). Sharded parameters, several DDP
    modules, and parameters identical on every process without a DDP module raise."""
    for p in params:
        if _is_sharded_parameter(p):
            raise NotImplementedError(
                f"a parameter of shape {tuple(p.shape)} is sharded (FSDP or DTensor): "
                "MultiBalance takes whole parameters; wrap the trunk in "
                "DistributedDataParallel")
    holders = ddp_holders({id(p) for p in params})
    if holders:
        inside = set()
        for _, ids in holders:
            inside |= ids
        # (several DDP modules: the error of the other balancers, naming the supported set-ups)
        return data_parallel_group([p for p in params if id(p) in inside], "auto")
    if _replicated(params):
        raise ValueError(
            f"torch.distributed is initialized with {torch.distributed.get_world_size()} "
            "processes and the parameters are identical on all of them, but none is inside a "
            "DistributedDataParallel module: the trunk's gradients would stay each process's "
            "own and the replicas would drift apart; wrap the trunk in DDP (MultiBalance "
            "averages the heads' gradients and the Gram itself, DDP the trunk's), pass "
            "process_group=<group> to take the parameters as replicated over it, or "
            "process_group=None if every process trains a model of its own")
    return None, None


def _no_representation(raw, items) -> None:
    """The error of a call whose losses reach no representation tensor."""
    if compiled_graph(task_roots(raw, items)):
        raise ValueError(
            "no task loss depends on representation in the autograd graph: the losses "
            "come from a compiled region (torch.compile) that computes representation "
            "inside it too. Compile the trunk and the heads apart (e.g. "
            "torch.compile(model.trunk)), so that representation is an input of the "
            "heads' graph")
    raise ValueError("no task loss depends on representation: pass the tensor the "
                     "task heads are computed from (not a detached copy)")


def _reached_ids(roots: list) -> set[int]:
    """ids of the leaves that the graphs below ``roots`` reach."""
    return set().union(*(reached_parameters(root) for root in roots))


def _stops(reps: list[torch.Tensor]) -> tuple[set, set]:
    """Where a walk from the losses stops at the representation: the edges into z's own output
    of its node (z.grad_fn, z.output_nr) — an edge into another output of that node (a head
    that reads a sibling of z: a, b = h.chunk(2, 1)) goes around z — and the ids of the
    representation tensors that are leaves."""
    return ({(z.grad_fn, z.output_nr) for z in reps if z.grad_fn is not None},
            {id(z) for z in reps if z.grad_fn is None})


def _reached_stopping(start, stops: set, stop_leaves: set) -> tuple[set[int], bool]:
    """ids of the leaves reached from ``start`` (a tensor: from its own output of its node; or
    an edge (node, input_nr)) without passing through an edge in ``stops`` or the leaves in
    ``stop_leaves``, and whether the walk came to one of those. An edge into a node that is
    not in ``stops`` goes on through the node even if another of its outputs is: only the
    stopped output is cut. The single output node of DistributedDataParallel
    (``_DDPSinkBackward``), entered through output j, goes on through the input that output
    passed through alone (see :func:`pub_native._autograd.sink_edge`)."""
    leaves: set[int] = set()
    crossed = False
    if isinstance(start, torch.Tensor):
        if start.grad_fn is None:
            if id(start) in stop_leaves:
                return leaves, True
            if start.requires_grad:
                leaves.add(id(start))
            return leaves, False
        start = (start.grad_fn, start.output_nr)
    seen: set = set()
    sinks: set = set()
    stack = [start]
    while stack:
        node, nr = stack.pop()
        if node is None or node in seen:
            continue
        if (node, nr) in stops:
            crossed = True
            continue
        kind = _NODE_KINDS.get(type(node))
        if kind is None:
            kind = _NODE_KINDS[type(node)] = _node_kind(node)
        if kind == _SINK:
            edge = sink_edge(node, nr)
            if edge is not None:
                if (node, nr) not in sinks:
                    sinks.add((node, nr))
                    if edge >= 0:
                        stack.append(node.next_functions[edge])
                continue
        seen.add(node)
        if kind == _LEAF:
            var = node.variable
            if id(var) in stop_leaves:
                crossed = True
            else:
                leaves.add(id(var))
            continue
        stack.extend(node.next_functions)
    return leaves, crossed


# What the walks make of a node, by its type (looked up once per type: the walk that checks a
# later call's split runs at every MultiBalance call).
_OTHER, _LEAF, _SINK = 0, 1, 2
_NODE_KINDS: dict[type, int] = {}


def _node_kind(node) -> int:
    if node.name() == "_DDPSinkBackward":
        return _SINK
    return _LEAF if getattr(node, "variable", None) is not None else _OTHER


def _gram_entries(rows, k: int) -> torch.Tensor:
    """Σ_t R_t R_tᵀ (K×K, flattened), R_t the K gradients of representation tensor t (None =
    zero), float64 on the gradients' device (zeros on the CPU where no task reached any):
    products and sums in float64 (see :func:`_gram_block`)."""
    total = None
    for per_rep in rows:
        tasks = [i for i in range(k) if per_rep[i] is not None]
        if not tasks:
            continue
        G = _gram_block([per_rep[i].reshape(-1) for i in tasks])
        if len(tasks) < k:
            full = torch.zeros((k, k), dtype=torch.float64, device=G.device)
            index = torch.tensor(tasks, device=G.device)
            full[index[:, None], index[None, :]] = G
            G = full
        total = G if total is None else total + G
    if total is None:
        return torch.zeros(k * k, dtype=torch.float64)
    return total.reshape(-1)


def _gram_block(flat: list[torch.Tensor]) -> torch.Tensor:
    """The Gram matrix of the 1-D tensors ``flat`` (one dtype and length), float64: column
    blocks converted to float64 into one reused buffer (no float64 copy of them all), their
    products summed by a float64 matrix product. A product in their own type would round
    nearly parallel gradients' Gram to a non-PSD one, and overflow (float32 from a norm of
    ~1e19, float16 from ~256) to a false non-finite one."""
    p, n = len(flat), flat[0].numel()
    step = max(4096, (1 << 17) // p)  # 1 MiB of float64 (cache-sized)
    if n <= step:
        block = torch.stack(flat).to(torch.float64)
        return block @ block.t()
    buf = torch.empty((p, step), dtype=torch.float64, device=flat[0].device)
    G = None
    for s in range(0, n, step):
        w = min(step, n - s)
        block = buf[:, :w]
        for r, f in enumerate(flat):
            block[r].copy_(f[s:s + w])
        G = block @ block.t() if G is None else G.addmm_(block, block.t())
    return G


def _head_norms(head: list) -> torch.Tensor:
    """Per task, the sum of the norms of its head gradients (None: none), float64 (on the
    gradients' device, the CPU where none has one): not finite where a gradient has a NaN or
    Inf (or a norm beyond its dtype's range). One fused norm per task."""
    sums = []
    for grads in head:
        # (a sparse gradient's stored values: any NaN or Inf among them is one of the
        # gradient's, and _foreach_norm takes dense tensors only)
        given = [g._values() if g.is_sparse else g for g in grads if g is not None]
        if given:
            device = given[0].device
            norms = [x if x.device == device else x.to(device)
                     for x in torch._foreach_norm(given)]
            sums.append(torch.stack(norms).to(torch.float64).sum())
        else:
            sums.append(None)
    device = next((x.device for x in sums if x is not None), torch.device("cpu"))
    return torch.stack([torch.zeros((), dtype=torch.float64, device=device) if x is None
                        else x.to(device) for x in sums])


def _dense(g: torch.Tensor) -> torch.Tensor:
    """A head gradient as a flat dense tensor, its elements in row-major order of its shape
    (for the all-reduce; a sparse one made dense)."""
    return (g.to_dense() if g.is_sparse else g).reshape(-1)


def _numbers_device(group, numbers: list[torch.Tensor]) -> torch.device:
    """Where MultiBalance packs its per-call numbers: on the current CUDA device under NCCL,
    on the CPU under another backend, else where the Gram is (one wait for it)."""
    if group is not None:
        if torch.distributed.get_backend(group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    return numbers[0].device


def multibalance_weights(G, loss_values=None, *, normalization: str = "l2",
                         solver: str = "min-norm") -> np.ndarray:
    """MultiBalance's task weights from the (EMA'd) Gram matrix of the representation
    gradients: steps 4–6 of :class:`MultiBalance`."""
    G = _as_gram(G)
    if normalization not in MultiBalance.NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {MultiBalance.NORMALIZATIONS}, got "
                         f"{normalization!r}")
    if solver not in MultiBalance.SOLVERS:
        raise ValueError(f"solver must be one of {MultiBalance.SOLVERS}, got {solver!r}")
    if normalization == "loss":
        if loss_values is None:
            raise ValueError("normalization='loss' needs the loss values")
        loss_values = [float(v) for v in np.asarray(loss_values, dtype=np.float64).ravel()]
    return np.array(_multibalance_weights(G.tolist(), loss_values, normalization, solver))


def _multibalance_weights(G: list, values, normalization: str, solver: str) -> list[float]:
    """:func:`multibalance_weights` on nested lists of Python floats (already validated)."""
    k = len(G)
    norms = [math.sqrt(max(G[i][i], 0.0)) for i in range(k)]
    top = max(norms)
    w = [1.0] * k
    if top <= 0:
        return w
    active = [i for i in range(k) if norms[i] > 1e-12 * top]
    if normalization == "l2":
        n = [norms[i] for i in active]
    elif normalization == "loss":
        n = [abs(values[i]) or 1.0 for i in active]
    else:
        n = [1.0] * len(active)
    m = len(active)
    if solver == "mean" or m == 1 or (solver == "min-norm" and normalization == "l2" and m == 2):
        # (the min-norm point of two unit vectors is their midpoint)
        wp = [1.0 / m] * m
    else:
        Gl = [[G[a][b] / (n[x] * n[y]) for y, b in enumerate(active)]
              for x, a in enumerate(active)]
        if solver == "min-norm":
            # Python floats for a few tasks (see backward), numpy beyond or as the fallback.
            wp = _wolfe_small(Gl) if m <= 8 else None
            wp = min_norm_weights(np.array(Gl)).tolist() if wp is None else \
                _even_if_as_short(Gl, wp)
        else:
            alpha = np.asarray(solve_weights(np.array(Gl)).weights, dtype=np.float64)
            wp = (alpha / alpha.sum()).tolist() if alpha.sum() > 0 else [1.0 / m] * m
    total = sum(n)
    for a, wpi, ni in zip(active, wp, n, strict=True):
        w[a] = wpi * total / ni
    return w


def _wolfe_small(G: list) -> list[float] | None:
    """:func:`_wolfe_min_norm` on nested lists of Python floats, for a few tasks (no numpy
    call overhead; Gaussian elimination with partial pivoting on the (m+1)×(m+1) systems), with
    the same stopping rule. None if it did not finish (the caller falls back to
    :func:`min_norm_weights`)."""
    k = len(G)
    tr = sum(G[i][i] for i in range(k)) / k
    if not tr > 0:
        return [1.0 / k] * k
    G = [[x / tr for x in row] for row in G]
    sizes = [math.sqrt(max(G[i][i], 0.0)) for i in range(k)]
    first = min(range(k), key=lambda i: G[i][i])
    active = [first]
    w = [0.0] * k
    w[first] = 1.0
    for _ in range(50 * k):
        gw = [sum(G[i][j] * w[j] for j in range(k)) for i in range(k)]
        xx = sum(w[i] * gw[i] for i in range(k))
        r = sum(w[i] * sizes[i] for i in range(k))
        better = [i for i in range(k)
                  if xx - gw[i] > _WOLFE_TOL * xx + 4 * k * _EPS * r * (r + sizes[i])]
        j = min(better, key=gw.__getitem__) if better else None
        if j is None or j in active:
            total = sum(w)
            return [x / total for x in w]
        active.append(j)
        for _ in range(k + 1):
            m = len(active)
            A = [[G[a][b] for b in active] + [1.0] for a in active] + [[1.0] * m + [0.0]]
            rhs = [0.0] * m + [1.0]
            v = _solve_small(A, rhs)
            if v is None:
                return None
            v = v[:m]
            if all(x > 0 for x in v):
                w = [0.0] * k
                for a, x in zip(active, v, strict=True):
                    w[a] = x
                break
            cur = [w[a] for a in active]
            ratios = [c / (c - x) if x <= 0 and c - x > 0 else math.inf
                      for c, x in zip(cur, v, strict=True)]
            hit = min(range(m), key=ratios.__getitem__)
            falling = ratios[hit] < math.inf
            theta = ratios[hit] if falling else 0.0
            cur = [c + theta * (x - c) for c, x in zip(cur, v, strict=True)]
            if falling:
                cur[hit] = 0.0  # the point that stops the move leaves (see _wolfe_min_norm)
            w = [0.0] * k
            kept = [(a, c) for a, c in zip(active, cur, strict=True) if c > 0]
            if not kept:
                return None
            active = [a for a, _ in kept]
            for a, c in kept:
                w[a] = c
        else:
            return None
    return None


def _solve_small(A: list, b: list) -> list[float] | None:
    """A x = b for a small dense system (lists), or None if it is singular."""
    n = len(b)
    M = [row[:] + [bi] for row, bi in zip(A, b, strict=True)]
    for c in range(n):
        piv = max(range(c, n), key=lambda r: abs(M[r][c]))
        if abs(M[piv][c]) < 1e-14:
            return None
        M[c], M[piv] = M[piv], M[c]
        for r in range(c + 1, n):
            f = M[r][c] / M[c][c]
            if f:
                M[r] = [x - f * y for x, y in zip(M[r], M[c], strict=True)]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (M[r][n] - sum(M[r][j] * x[j] for j in range(r + 1, n))) / M[r][r]
    return x


def _scaler_in_use(scaler):
    """(the scaler, its loss scale): ``scaler`` as a balancer's ``backward`` takes it, a
    ``torch.amp.GradScaler`` or None; one made with ``enabled=False`` (the usual switch for
    mixed precision) is no scaler, (None, 1.0): it skips no step, so a non-finite loss or
    gradient raises as without one."""
    if scaler is None:
        return None, 1.0
    if not callable(getattr(scaler, "get_scale", None)):
        raise TypeError(f"scaler must be the torch.amp.GradScaler that scaled the losses, or "
                        f"None; got {type(scaler).__name__}")
    enabled = getattr(scaler, "is_enabled", None)
    if callable(enabled) and not enabled():
        return None, 1.0
    return scaler, float(scaler.get_scale())


def _refuse_reentrant(roots: list) -> None:
    """NotImplementedError where the graph below ``roots`` holds a reentrant checkpoint: the
    walk that decides what the losses reach does not see the parameters inside it, and the
    backward passes restricted to the balancer's tensors (per-task gradients, and the one pass
    of LS, Uncertainty and FAMO, which must leave every other tensor's ``.grad`` alone) either
    skip it or raise torch's error part-way. Checked where the graph is walked (the first
    call, and a call that looks for parameters not yet decided)."""
    if reentrant_checkpoint(roots):
        raise NotImplementedError(REENTRANT_CHECKPOINT)


def _representation_list(representation) -> list[torch.Tensor]:
    if representation is None:
        raise ValueError("MultiBalance.backward needs the shared representation: "
                         "backward(losses, representation)")
    if isinstance(representation, torch.Tensor):
        reps = [representation]
    elif isinstance(representation, Iterable) and not isinstance(representation, (Mapping, str)):
        reps = list(representation)
    else:
        raise TypeError(f"representation must be a tensor or a list or tuple of tensors; got "
                        f"{type(representation).__name__}")
    if not reps:
        raise ValueError("representation is empty")
    for i, z in enumerate(reps):
        if not isinstance(z, torch.Tensor):
            raise ValueError(f"representation[{i}] must be a tensor, got {type(z).__name__}")
        if not z.requires_grad:
            raise ValueError(f"representation[{i}] does not require grad: pass the tensor the "
                             "task heads are computed from, not a detached copy (with the "
                             "whole trunk frozen, call requires_grad_() on it: the weights "
                             "come from its gradients)")
    return reps


def _check_independent(reps: list[torch.Tensor]) -> None:
    """No representation tensor may be computed from another (its ∂L/∂z would then include the
    path through the other one, counting it twice)."""
    if len(reps) < 2:
        return
    seen: dict = {}
    for i, z in enumerate(reps):
        # The same autograd output twice (the same tensor, or the same output of one node).
        key = (z.grad_fn, z.output_nr) if z.grad_fn is not None else id(z)
        if key in seen:
            raise ValueError(f"representation[{i}] is representation[{seen[key]}] again; pass "
                             "each tensor once")
        seen[key] = i
    for i, z in enumerate(reps):
        below = _graph_nodes(z)
        for j, other in enumerate(reps):
            if i == j:
                continue
            mark = other.grad_fn if other.grad_fn is not None else other
            if (mark in below) if other.grad_fn is not None else (id(other) in below):
                raise ValueError(f"representation[{i}] is computed from representation[{j}]; "
                                 "pass tensors that do not depend on each other (e.g. "
                                 "concatenate them, or pass only the later one)")


def _graph_nodes(z: torch.Tensor) -> set:
    """Autograd nodes below z (z's own node excluded) and ids of the leaves they reach."""
    if z.grad_fn is None:
        return set()
    nodes, leaves = walk_graph(fn for fn, _ in z.grad_fn.next_functions)
    return nodes | leaves


BALANCERS = {"ls": LS, "nashmtl": NashMTL, "mgda-ub": MGDAUB, "imtl-g": IMTLG,
             "pcgrad": PCGrad, "cagrad": CAGrad, "uncertainty": Uncertainty, "famo": FAMO,
             "multibalance": MultiBalance}


# -- the K×K math (float64 numpy; G is the Gram matrix of the task gradients) ---------------

_EPS = float(np.finfo(np.float64).eps)
#: Wolfe's stopping test and _even_if_as_short: relative to the current point's squared norm.
_WOLFE_TOL = 1e-12


def min_norm_weights(G: np.ndarray, *, max_iter: int = 1000, tol: float = 1e-12
                     ) -> np.ndarray:
    """argmin over the simplex of wᵀGw: the min-norm point of the gradients' convex hull.

    K = 2 in closed form; K > 2 by Wolfe's min-norm-point algorithm (Wolfe 1976: an active-set
    method that ends, in exact arithmetic, after finitely many steps at the optimum; a few
    K×K solves here), with projected gradient descent on the simplex (``max_iter``, ``tol``)
    as the fallback should it not finish within 50·K major steps."""
    G = _as_gram(G)
    k = len(G)
    if k == 1:
        return np.ones(1)
    scale = np.trace(G) / k
    if scale <= 0:
        return np.full(k, 1.0 / k)
    G = G / scale
    if k == 2:
        denom = G[0, 0] + G[1, 1] - 2 * G[0, 1]
        gamma = 0.5 if denom <= 0 else min(max((G[0, 0] - G[0, 1]) / denom, 0.0), 1.0)
        return np.array([1 - gamma, gamma])
    w = _wolfe_min_norm(G, 50 * k)
    if w is None:
        def fun(w):
            gw = G @ w
            return w @ gw, 2 * gw

        w = _minimize_on_simplex(fun, np.full(k, 1.0 / k), max_iter=max_iter, tol=tol)
    return np.asarray(_even_if_as_short(G, w), dtype=np.float64)


def _even_if_as_short(G, w):
    """The uniform weights where they give a combination as short as w's: within 1e-12 of
    its squared norm, or within the rounding of the two quadratic forms (4K·ε times the sum of
    their terms' sizes), so that the choice is the same at any scale of G. The min-norm point
    is unique, its weights are not where gradients coincide: Wolfe's algorithm ends on a
    vertex (K identical tasks: w = e_1, every other head without a gradient)."""
    m = len(w)
    u = 1.0 / m
    even = u * u * sum(sum(row) for row in G)
    terms = [[w[i] * G[i][j] * w[j] for j in range(m)] for i in range(m)]
    norm = sum(sum(row) for row in terms)
    size = u * u * sum(abs(x) for row in G for x in row) + sum(abs(x) for row in terms
                                                               for x in row)
    return [u] * m if even <= norm + _WOLFE_TOL * abs(norm) + 4 * m * _EPS * size else w


def _wolfe_min_norm(G: np.ndarray, max_major: int) -> np.ndarray | None:
    """Wolfe's min-norm-point algorithm on the points whose Gram matrix is G: the weights of
    the point of their convex hull nearest the origin, or None if it did not finish. Major
    step: add the point most opposed to the current x = Σ w_i p_i; minor steps: move to the
    affine min-norm point of the active set, dropping points whose weight would turn negative.

    It stops where no point p_j improves on x beyond rounding: ‖x‖² − ⟨x, p_j⟩ ≤
    1e-12·‖x‖² + 4K·ε·r·(r + ‖p_j‖), r = Σ w_i ‖p_i‖ (the second term bounds the rounding of
    that difference; it ends the search where the hull holds the origin, x ≈ 0). The test is
    relative to x, not to the largest point: points whose squared norms are 1e-12 of the
    largest one's still move the solution (the gradients e_1, e_2, 1e6·e_3 have the min-norm
    weights ≈ (½, ½, 5e-13), where a threshold on max ‖p_j‖² would stop at (1, 0, 0)). A point the
    test picks that is already active (the affine solve's rounding) ends it too."""
    k = len(G)
    sizes = np.sqrt(np.maximum(np.diag(G), 0.0))
    active = [int(np.argmin(np.diag(G)))]
    w = np.zeros(k)
    w[active[0]] = 1.0
    for _ in range(max_major):
        gw = G @ w
        xx = float(w @ gw)
        r = float(w @ sizes)
        better = xx - gw > _WOLFE_TOL * xx + 4 * k * _EPS * r * (r + sizes)
        if not better.any():
            return w / w.sum()
        j = int(np.argmin(np.where(better, gw, np.inf)))
        if j in active:
            return w / w.sum()
        active.append(j)
        for _ in range(k + 1):  # minor cycle: each pass drops at least one point or ends
            m = len(active)
            A = np.ones((m + 1, m + 1))
            A[:m, :m] = G[np.ix_(active, active)]
            A[m, m] = 0.0
            b = np.zeros(m + 1)
            b[m] = 1.0
            try:
                v = np.linalg.solve(A, b)[:m]
            except np.linalg.LinAlgError:
                v = np.linalg.lstsq(A, b, rcond=None)[0][:m]
            if not np.isfinite(v).all():
                return None
            if (v > 0).all():
                w[:] = 0.0
                w[active] = v
                break
            cur = w[active]
            falling = (v <= 0) & (cur - v > 0)
            ratios = np.full(len(active), np.inf)
            ratios[falling] = cur[falling] / (cur[falling] - v[falling])
            hit = int(np.argmin(ratios))
            theta = float(ratios[hit]) if falling.any() else 0.0
            cur = cur + theta * (v - cur)
            if falling.any():
                # The point that stops the move leaves: rounding may leave it a tiny positive
                # weight, and the next pass the same move of length 0, until the cycle ends.
                cur[hit] = 0.0
            w[:] = 0.0
            keep = cur > 0
            active = [a for a, kept in zip(active, keep, strict=True) if kept]
            w[active] = cur[keep]
            if not active:
                return None
        else:
            return None
    return None


def imtl_g_weights(G: np.ndarray) -> np.ndarray:
    """IMTL-G's closed form, from G alone (see :class:`IMTLG`).

    Where D Uᵀ is singular (tasks whose gradients are parallel: u_i = u_j, whatever their
    sizes), many weights give equal projections; those nearest the uniform weights are taken
    (K identical tasks: 1/K each). Singular means to rounding: row r of D Uᵀ/‖g_1‖ is at most
    2(1 + ‖g_r‖/‖g_1‖) and holds the rounding of G at that scale (a few ε of it), so the rows
    are scaled by it and singular values below 64·K·ε are taken as 0: there the rounding would
    decide the solution (for g_2 = 0.3·g_1, anything from (1, 0) to (−1, 2), a direction
    against both tasks). Above it the closed form is kept, to the precision G gives it."""
    G = _as_gram(G)
    k = len(G)
    norms = np.sqrt(np.maximum(np.diag(G), 0.0))
    active = norms > 1e-12 * norms.max() if norms.max() > 0 else np.zeros(k, dtype=bool)
    w = np.zeros(k)
    idx = np.flatnonzero(active)
    if len(idx) == 0:
        return np.full(k, 1.0 / k)
    if len(idx) == 1:
        w[idx] = 1.0
        return w
    n = norms[idx]
    M = G[np.ix_(idx, idx)] / (n[0] * n[None, :])  # M_ij = ⟨g_i, u_j⟩ / ‖g_1‖ (scale-free)
    first = M[0, 0] - M[0, 1:]  # g_1 · (u_1 − u_j)
    DU = M[0, 0] - M[0, 1:][None, :] - M[1:, 0][:, None] + M[1:, 1:]  # (g_1 − g_r)·(u_1 − u_s)
    rows = 1.0 + n[1:] / n[0]
    left, sv, right = np.linalg.svd(DU / rows[:, None])
    rank = int((sv > 64 * len(idx) * _EPS).sum())
    if rank == len(idx) - 1:
        rest = np.linalg.solve(DU.T, first)
        w[idx[1:]] = rest
        w[idx[0]] = 1.0 - rest.sum()
        return w
    # On the part that is not rounding, with D Uᵀ = diag(rows)·L·diag(sv)·R (the SVD above):
    # diag(sv_r)·L_rᵀ·diag(rows)·rest = R_r·first, and Σ w = 1; of their solutions, the one
    # nearest the uniform weights.
    m = len(idx)
    eqs = np.zeros((rank + 1, m))
    eqs[0] = 1.0
    eqs[1:, 1:] = sv[:rank, None] * (left[:, :rank].T * rows[None, :])
    target = np.concatenate([[1.0], right[:rank] @ first])
    even = np.full(m, 1.0 / m)
    w[idx] = even + np.linalg.lstsq(eqs, target - eqs @ even, rcond=None)[0]
    return w


def pcgrad_weights(G: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """w with Σ_i g_i^PC = Σ_j w_j g_j (see :class:`PCGrad`)."""
    G = _as_gram(G)
    k = len(G)
    C = np.eye(k)  # row i: g_i^PC = Σ_j C_ij g_j
    for i in range(k):
        for j in rng.permutation(k):
            if j == i or G[j, j] <= 0:
                continue
            dot = C[i] @ G[:, j]
            if dot < 0:
                C[i, j] -= dot / G[j, j]
    return C.sum(axis=0)


def cagrad_weights(G: np.ndarray, c: float = 0.5, *, max_iter: int = 1000,
                   tol: float = 1e-12) -> np.ndarray:
    """w with K·d = Σ_i w_i g_i for CAGrad's direction d (see :class:`CAGrad`)."""
    G = _as_gram(G)
    k = len(G)
    scale = np.trace(G) / k
    if scale <= 0:
        return np.full(k, 1.0 / (1 + c * c))
    A = G / scale
    b = np.full(k, 1.0 / k)
    Ab = A @ b
    phi = c * math.sqrt(max(b @ Ab, 0.0))
    if phi == 0.0:
        return np.full(k, 1.0 / (1 + c * c))

    def fun(w):
        Aw = A @ w
        norm = math.sqrt(max(w @ Aw, 1e-30))
        return w @ Ab + phi * norm, Ab + phi * Aw / norm

    if k == 2:
        w = _bisect_pair(fun)
    else:
        w, exact = _cagrad_shifted_min_norm(A, b, phi)
        if w is None or not exact:
            # Projected gradient descent as well, and the lower f of the two.
            candidates = [_minimize_on_simplex(fun, b.copy(), max_iter=max_iter, tol=tol)]
            if w is not None:
                candidates.insert(0, w)
            w = min(candidates, key=lambda v: fun(v)[0])
    gw_norm = math.sqrt(max(w @ A @ w, 0.0))
    lam = phi / gw_norm if gw_norm > 0 else 0.0
    return k * (b + lam * w) / (1 + c * c)


def _cagrad_shifted_min_norm(A: np.ndarray, b: np.ndarray, phi: float
                             ) -> tuple[np.ndarray | None, bool]:
    """CAGrad's dual, argmin over the simplex of f(w) = wᵀAb + φ·√(wᵀAw), exactly, for K > 2.

    With g_0 = Σ b_i g_i and t > 0, let w(t) be the min-norm point of the hull of the shifted
    gradients g_i + t·g_0 (Gram A + t(a1ᵀ + 1aᵀ) + t²β11ᵀ, a = Ab, β = bᵀAb; Wolfe's exact
    algorithm). Its optimality conditions, A(w + t·b) = μ1 on the support, are f's at the t
    where ‖g_w(t)‖ = φ·t (∇f = A(b + w·φ/‖g_w‖)), so any root of h(t) = ‖g_w(t)‖ − φt gives
    f's minimum. h < 0 at t = 2·max_i ‖g_i‖/φ, and h > 0 at t = ‖m‖/(2φ) (m the min-norm
    point of the hull, ‖g_w‖ ≥ ‖m‖) or, when the hull (nearly) holds the origin, at some
    smaller t found by halving if f < 0 anywhere; geometric bisection then brackets the root
    to rounding. Ill-conditioned G (task gradients of very different sizes) is where projected
    gradient descent stalls far from the minimum; this does not. None when no t with h > 0 is
    found (min f = 0 at g_w = 0). Returns (w or None, whether every min-norm point was
    Wolfe's: where rounding stalls it (affinely dependent points), descent stands in)."""
    k = len(A)
    a = A @ b
    beta = float(b @ a)
    exact = True
    last = np.full(k, 1.0 / k)

    def shifted(t):
        nonlocal exact, last
        Gt = A + t * (a[:, None] + a[None, :]) + (t * t) * beta
        w = _wolfe_min_norm(Gt, 50 * k)
        if w is None:
            # Started from the last point found (the root search moves t a little at a time),
            # a few hundred steps do; from the centre, each took up to 1000 (20 ms).
            exact = False
            w = _minimize_on_simplex(lambda v: (v @ Gt @ v, 2.0 * (Gt @ v)), last.copy(),
                                     max_iter=300, tol=1e-12)
        last = w
        return w

    def positive(t, w):  # h(t) > 0
        return math.sqrt(max(float(w @ A @ w), 0.0)) > phi * t

    top = math.sqrt(float(np.max(np.diag(A))))
    hi = 2.0 * top / phi
    m = shifted(0.0)
    m_norm = math.sqrt(max(float(m @ A @ m), 0.0))
    if m_norm > 1e-9 * top:
        lo = 0.5 * m_norm / phi
        w = shifted(lo)
    else:
        # The hull (nearly) holds the origin: h > 0 somewhere below hi if f < 0 anywhere.
        lo = hi
        for _ in range(120):
            lo *= 0.5
            w = shifted(lo)
            if positive(lo, w):
                break
        else:
            return None, exact
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        w_mid = shifted(mid)
        if positive(mid, w_mid):
            lo, w = mid, w_mid
        else:
            hi = mid
        if hi <= lo * (1.0 + 4e-16):
            break
    return w, exact


def _bisect_pair(fun) -> np.ndarray:
    """Minimize a convex f on the segment w = (t, 1 − t), t ∈ [0, 1], by bisection on f'."""
    e = np.array([1.0, -1.0])

    def slope(t):
        return fun(np.array([t, 1 - t]))[1] @ e

    lo, hi = 0.0, 1.0
    if slope(lo) >= 0:
        return np.array([0.0, 1.0])
    if slope(hi) <= 0:
        return np.array([1.0, 0.0])
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if slope(mid) > 0:
            hi = mid
        else:
            lo = mid
    t = 0.5 * (lo + hi)
    return np.array([t, 1 - t])


def _minimize_on_simplex(fun, w: np.ndarray, *, max_iter: int, tol: float) -> np.ndarray:
    """Projected gradient descent with backtracking on {w ≥ 0, Σw = 1}; ``fun`` -> (f, ∇f)."""
    f, g = fun(w)
    step = 1.0
    for _ in range(max_iter):
        while True:
            w_new = _project_simplex(w - step * g)
            d = w_new - w
            f_new, g_new = fun(w_new)
            if f_new <= f + g @ d + (0.5 / step) * (d @ d) + 1e-15 * abs(f) or step < 1e-20:
                break
            step *= 0.5
        w, f, g = w_new, f_new, g_new
        if np.abs(d).sum() <= tol:
            break
        step *= 2.0
    return w


def _project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex (sort-based)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    ind = np.arange(1, len(v) + 1)
    rho = np.nonzero(u - css / ind > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1), 0.0)


def _sums(grads: list) -> torch.Tensor | None:
    """The float64 sum of each gradient (None skipped; a sparse one's stored values), stacked
    on the first one's device, or None where there is none: non-finite where the gradient
    holds an Inf or NaN."""
    sums = [(g._values() if g.is_sparse else g).sum(dtype=torch.float64)
            for g in grads if g is not None]
    if not sums:
        return None
    return torch.stack([t.to(sums[0].device) for t in sums])


def _gram_float64(rows: torch.Tensor, also: torch.Tensor | None = None):
    """G = rows·rowsᵀ (K×K) with float64 products and sums, exactly symmetric, on the CPU.

    Float16, bfloat16 and float32 rows are converted in column blocks of 2^18 elements (one
    block of all P was 4× slower at P = 1M, in fresh pages), so that gradients whose squares
    overflow or underflow their own type (float16 from |g| ~ 256, float32 from ~1e19) still
    give a finite, accurate G, as SPEC section 4 asks (float64 accumulation). A product in
    the rows' own type was also not exactly symmetric, which the native solver refuses beyond
    its tolerance.

    With ``also`` (a 1-D tensor on any device), ``(G, also)`` on the CPU, both brought back
    in one copy (one wait for the device)."""
    k, n = rows.shape
    if rows.dtype == torch.float64:
        G = rows @ rows.t()
    else:
        G = torch.zeros((k, k), dtype=torch.float64, device=rows.device)
        step = max(4096, (1 << 18) // max(k, 1))  # 2 MiB of float64: reused, cache-sized
        for s in range(0, n, step):
            block = rows[:, s:s + step].to(torch.float64)
            G.addmm_(block, block.t())
    G = 0.5 * (G + G.t())
    if also is None:
        return G.cpu()
    both = torch.cat([G.reshape(-1), also.to(G.device, torch.float64).reshape(-1)]).cpu()
    return both[:k * k].reshape(k, k), both[k * k:]


def _as_gram(G) -> np.ndarray:
    G = np.asarray(G, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1] or G.shape[0] == 0:
        raise ValueError(f"G must be a non-empty square (K, K) matrix, got shape {G.shape}")
    if not np.isfinite(G).all():
        raise ValueError("G contains NaN or Inf")
    return G


def _refuse_sparse(params: list[torch.Tensor], shared: list[torch.Tensor]) -> None:
    """TypeError naming the first shared parameter whose ``.grad`` is sparse
    (``nn.Embedding(sparse=True)``): FAMO's ``max_norm`` clips the shared gradient, which
    torch's ``clip_grad_norm_`` cannot take sparse, as the gradient balancers refuse one."""
    for p in shared:
        if p.grad is not None and p.grad.is_sparse:
            j = next(j for j, q in enumerate(params) if q is p)
            raise TypeError(
                f"params[{j}] (shape {tuple(p.shape)}) is shared and gets a sparse gradient "
                "(nn.Embedding(sparse=True)): max_norm clips the shared gradient, which "
                "torch's clip_grad_norm_ cannot do sparse; use sparse=False, or max_norm=0")


def _clip_unscaled(params: list[torch.Tensor], max_norm: float, scale: float) -> None:
    """``clip_grad_norm_(params, max_norm)`` on gradients that a GradScaler's ``scale`` still
    multiplies: clipped as they will be once unscaled, ε included (clipping the scaled ones at
    ``max_norm·scale`` would not scale torch's ε). The gradients are not unscaled in place and
    scaled back: in float16 that round trip is not exact (unscaled, small gradients become
    subnormal or zero, which the scaler is there to prevent, and a scale of 2¹⁶ is infinite
    in float16). Each gradient's norm is taken from the scaled gradient in float32 or wider,
    divided by the scale (exact: a power of two), and rounded to the gradient's dtype, as
    clip_grad_norm_ takes it of the unscaled gradient; the gradients are then multiplied by
    the clip coefficient once, as clip_grad_norm_ multiplies them."""
    if scale == 1.0:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = []
    for g in grads:
        wide = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
        norms.append((torch.linalg.vector_norm(g, dtype=wide) / scale).to(g.dtype))
    first = grads[0].device
    total = torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device))


def _grad_marks(params: list[torch.Tensor]) -> list:
    """Each parameter's ``.grad`` as it is now (a weak reference to the tensor, and its
    version counter), for :func:`_received`: kept between calls (FAMO's accumulation test),
    marks must not keep gradients alive past ``zero_grad``."""
    return [(None, None) if p.grad is None else (weakref.ref(p.grad), p.grad._version)
            for p in params]


def _received(params: list[torch.Tensor], marks: list) -> bool:
    """Whether a backward pass since ``marks`` (:func:`_grad_marks`) gave some of ``params`` a
    gradient: a ``.grad`` that is another tensor, or the same one changed in place (autograd
    accumulates into it, which moves its version counter). No graph walk and no wait for
    the device: the check of every call of the balancers that take one backward pass, whose
    losses may stop reaching their parameters after the first call (a balancer copied or
    restored with the model's tensors, given the losses of the new model)."""
    for p, (ref, v) in zip(params, marks, strict=True):
        g = p.grad
        if ref is None:
            if g is not None:
                return True
        elif g is None or ref() is not g or g._version != v:
            return True
    return False


def _gone_by_hooks(params: list[torch.Tensor], marks: list) -> bool:
    """Whether ``.grad`` was None before the call and is None after it on every parameter: what
    a backward pass that reached nothing leaves, and also one whose post-accumulate hooks
    consumed each gradient (an optimizer stepped in backward, which sets ``.grad`` to None),
    which only the graph tells apart."""
    return all(ref is None for ref, _ in marks) and all(p.grad is None for p in params)


def _all_finite(grads: list) -> bool:
    """Whether every element of the tensors (None skipped) is finite: their sums (in float32
    at least, where an Inf or NaN stays non-finite) in one wait for the results, then, only if
    one is not finite (an overflow of the sum, or a non-finite element), each element."""
    grads = [g.detach() for g in grads if g is not None]
    if not grads:
        return True
    if any(g.is_sparse for g in grads):
        grads = [g.coalesce().values() if g.is_sparse else g for g in grads]
    sums = [g.sum(dtype=torch.float64 if g.dtype == torch.float64 else torch.float32)
            for g in grads]
    if bool(torch.isfinite(torch.stack([t.to(sums[0].device) for t in sums])).all()):
        return True
    return all(bool(torch.isfinite(g).all()) for g in grads)


def _zero_aside(params: list[torch.Tensor]) -> list:
    """A copy of the ``.grad`` of params, the tensors zeroed in place, so that a backward pass
    leaves in them its own gradient only; _add_back adds the copies back, _undo_aside puts
    ``.grad`` back as it was. The tensors stay ``.grad`` (under DDP's gradient_as_bucket_view
    they are its buckets, which its reducer writes into)."""
    kept = []
    for p in params:
        g = p.grad
        kept.append((g, None if g is None else g.clone()))
        if g is not None:
            g.zero_()
    return kept


def _add_back(params: list[torch.Tensor], kept: list | None) -> None:
    if kept is None:
        return
    for p, (_, old) in zip(params, kept, strict=True):
        if old is not None:
            if p.grad is None:
                p.grad = old
            else:
                p.grad.add_(old)


def _undo_aside(params: list[torch.Tensor], kept: list | None) -> None:
    if kept is None:
        return
    for p, (g, old) in zip(params, kept, strict=True):
        if g is not None:
            g.copy_(old)
        p.grad = g


def _set_aside(params: list[torch.Tensor]) -> list:
    """The ``.grad`` of params, taken off them (None left), so that what follows fills them
    with its own gradient only; _put_back adds them back, _restore puts them back as they
    were. Only around autograd.grad: a backward pass under DDP may write into the tensors
    taken off (see _zero_aside)."""
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return grads


def _put_back(params: list[torch.Tensor], grads: list) -> None:
    """p.grad = the set-aside gradient + p.grad, added in place into the set-aside one (as
    ``loss.backward()`` accumulates into an existing ``.grad``)."""
    for p, g in zip(params, grads, strict=True):
        if g is None:
            continue
        p.grad = g if p.grad is None else sum_into(g, p.grad, p)


def _restore(params: list[torch.Tensor], grads: list | None) -> None:
    """Put set-aside gradients back as they were (after a call that raised)."""
    if grads is not None:
        for p, g in zip(params, grads, strict=True):
            p.grad = g


def _active(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The parameters that require grad now: one frozen after the balancer was built gets no
    ``.grad``, as after ``loss.backward()``."""
    return [p for p in params if p.requires_grad]


def _task_gradients(shared: list[torch.Tensor], k: int) -> TaskGradients:
    """The per-task gradient buffer of a balancer: in the shared parameters' dtype, or, where
    they have several (a bfloat16 model with float32 norms), in the type all of them promote
    to, from which each parameter's combined gradient is rounded once to its own dtype."""
    dtype = None
    if len({p.dtype for p in shared}) > 1:
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in shared))
    return TaskGradients(shared, k, dtype=dtype)


def _combine(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i rows[i], the combined gradient (flat): in the rows' own type where it is float32
    or float64 (one matrix-vector product), in float32 where it is float16 or bfloat16. A
    16-bit product would round every weight to 16 bits (a float16 weight beyond 65504, e.g.
    NashMTL's α of a task whose gradient is 1e5 times smaller than another's, is Inf, and
    .grad with it) and round the sum at every task, tens of roundings off the exact
    combination: here the weights are float32 and the sum is accumulated in float32 task by
    task, in one P-sized buffer (no float32 copy of the K×P rows), and :func:`_accumulate`
    rounds it once into the parameter's dtype."""
    if rows.dtype not in (torch.float16, torch.bfloat16):
        return torch.mv(rows.t(), w.to(device=rows.device, dtype=rows.dtype))
    total = torch.zeros(rows.shape[1], dtype=torch.float32, device=rows.device)
    for wi, row in zip(w.tolist(), rows, strict=True):
        total.add_(row, alpha=wi)
    return total


def _accumulate(params: list[torch.Tensor], grads: Iterable[torch.Tensor]) -> None:
    """p.grad += g for flat g laid out in p's memory order (as TaskGradients lays them out),
    rounded once into p's dtype (g may be of a wider type: see :func:`_combine`); frozen
    parameters (their rows hold zeros) are left without a gradient."""
    for p, g in zip(params, grads, strict=True):
        if not p.requires_grad:
            continue
        g = layout_view(g, p)
        if p.grad is None:
            p.grad = g.to(p.dtype, memory_format=torch.preserve_format, copy=True)
        else:
            p.grad.add_(g)


def _group_mean(values: torch.Tensor, group) -> torch.Tensor:
    """The mean over the processes of ``group`` of each one's ``values`` (one all-reduce, in
    float64; on the current CUDA device under NCCL, else on the CPU), float64 on the device of
    ``values``. Every process gets the same numbers."""
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend(group) == "nccl" else torch.device("cpu")
    total = values.detach().to(device=device, dtype=torch.float64, copy=True)
    dist.all_reduce(total, group=group)
    return total.div_(dist.get_world_size(group)).to(values.device)


def _checked_adam_group(group: dict, label: str) -> tuple[float, float]:
    """(lr, weight_decay) of a loaded param group of torch's Adam, every option of which is
    checked as the constructors check theirs (ValueError naming ``label[name]``)."""
    for name in ("lr", "weight_decay", "eps"):
        value = group.get(name)
        if not (is_real(value) and 0 <= value < math.inf):
            raise ValueError(f"{label}[{name!r}] must be a finite number >= 0, got {value!r}")
    betas = group.get("betas")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(is_real(b) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"{label}['betas'] must be two numbers in [0, 1), got {betas!r}")
    for name in ("amsgrad", "maximize", "capturable", "differentiable",
                 "decoupled_weight_decay", "foreach", "fused"):
        value = group.get(name, False)
        if not (isinstance(value, bool) or (value is None and name in ("foreach", "fused"))):
            raise ValueError(f"{label}[{name!r}] must be a bool"
                             f"{' or None' if name in ('foreach', 'fused') else ''}, "
                             f"got {value!r}")
    return float(group["lr"]), float(group["weight_decay"])


def _loss_values_after(losses_after) -> list[torch.Tensor]:
    """FAMO.update's ``losses_after`` as a list of one-element tensors: a tensor (1-D, or
    (K, 1)), or a sequence (a list, a numpy array) of tensors of one element and of real
    numbers; anything else is a TypeError naming the argument."""
    if isinstance(losses_after, torch.Tensor):
        if losses_after.dim() == 0:
            raise ValueError("losses_after must hold K loss values, got a 0-dim tensor")
        items = list(losses_after.unbind(0))
    elif isinstance(losses_after, (str, bytes)) or not hasattr(losses_after, "__len__"):
        raise TypeError(f"losses_after must be K loss values (a list or a 1-D tensor), got "
                        f"{type(losses_after).__name__}")
    else:
        items = list(losses_after)
    out = []
    for i, v in enumerate(items):
        if isinstance(v, torch.Tensor):
            if v.numel() != 1 or v.is_complex():
                raise ValueError(f"losses_after[{i}] must be one real value, got a tensor of "
                                 f"shape {tuple(v.shape)} and dtype {v.dtype}")
            out.append(v)
        elif is_real(v) or (isinstance(v, np.ndarray) and v.size == 1
                            and np.issubdtype(v.dtype, np.number)
                            and not np.iscomplexobj(v)):
            out.append(torch.tensor(float(v), dtype=torch.float64))
        else:
            raise TypeError(f"losses_after[{i}] must be a loss value (a tensor of one element "
                            f"or a number), got {type(v).__name__}")
    return out


def _task_count(n_tasks) -> int:
    """``n_tasks`` of a loss weighting: a positive integer (Python's or numpy's)."""
    if not (is_integer(n_tasks) and n_tasks >= 1):
        raise ValueError(f"n_tasks must be a positive integer, got {n_tasks!r}")
    return int(n_tasks)


def _saved(value):
    """An option as a state dict holds it: a copy where it is a tensor."""
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _loaded_vector(v, name: str, k: int | None, optional: bool = False) -> torch.Tensor | None:
    """A float64 copy of a state dict's vector entry of K finite numbers."""
    if v is None and optional:
        return None
    if not isinstance(v, torch.Tensor) or not (v.is_floating_point() or v.dtype == torch.int64):
        raise TypeError(f"state_dict[{name!r}] must be a real tensor, got "
                        f"{type(v).__name__ if not isinstance(v, torch.Tensor) else v.dtype}")
    if k is not None and tuple(v.shape) != (k,):
        raise ValueError(f"state_dict[{name!r}] has shape {tuple(v.shape)}, expected ({k},)")
    out = v.detach().to(device="cpu", dtype=torch.float64).clone()
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"state_dict[{name!r}] is {out.tolist()}: it must be finite")
    return out


def _loaded_gram(v, name: str, k: int | None) -> list | None:
    """A state dict's K×K Gram entry (a list of K lists of K finite floats), or None."""
    if v is None:
        return None
    try:
        rows = [[float(x) for x in row] for row in v]
    except (TypeError, ValueError):
        raise TypeError(f"state_dict[{name!r}] must be a list of {k} lists of {k} numbers") \
            from None
    if k is None or len(rows) != k or any(len(r) != k for r in rows) \
            or not all(math.isfinite(x) for r in rows for x in r):
        raise ValueError(f"state_dict[{name!r}] must be {k} lists of {k} finite numbers")
    # A Gram matrix (or an average of them) is symmetric and positive semidefinite; the
    # weights of one that is not (a negative norm, |G_ij| > √(G_ii G_jj)) mean nothing.
    # Tested on the correlations C_ij = G_ij / √(G_ii G_jj), whose scale is 1 whatever the
    # tasks' (a task with G_ii = 0 must have a zero row).
    G = np.array(rows)
    d = np.sqrt(np.maximum(np.diag(G), 0.0))
    live = d > 0
    C = G[np.ix_(live, live)] / np.outer(d[live], d[live])
    if not np.array_equal(G, G.T) or bool((np.diag(G) < 0).any()) \
            or bool((G[~live] != 0).any()) \
            or (C.size and float(np.linalg.eigvalsh(C)[0]) < -1e-9 * len(C)):
        raise ValueError(f"state_dict[{name!r}] is not a Gram matrix (symmetric, positive "
                         "semidefinite): it was not saved by this balancer")
    return rows


_NOTHING_REACHED = (
    "no task loss reaches any tensor in params that requires grad: give the balancer the "
    "parameters the losses are computed from (a balancer built on a model that was since "
    "copied or reloaded holds the old one's tensors: build it again on the new model)")


def _param_list(params, name: str) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        params = [params]
    if name == "shared":  # names, not tensors: said so (a TypeError naming the item)
        if not isinstance(params, (str, tuple)):
            params = list(params)  # (a generator is read once)
        refuse_names(params, name)
    out, seen = [], set()
    for item in params:
        group = item["params"] if isinstance(item, dict) else [item]
        if isinstance(group, torch.Tensor):
            group = [group]
        for p in group:
            if name == "params" and named_pair(p):
                p = p[1]  # model.named_parameters(), as torch's optimizers take it
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{name} must hold tensors, got {type(p).__name__}")
            if not p.is_leaf:
                raise ValueError(
                    f"{name} holds a tensor (shape {tuple(p.shape)}) that is not a leaf: it is "
                    "computed from other tensors and gets no .grad; give the parameters it is "
                    "computed from")
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out
