"""Plain-PyTorch reference of the PUB optimizers (SPEC §3–5, §7): Adam, AdaGrad, RMSProp + UMMs.

Reference layer: written straight from the SPEC for readability, float64-capable; the native
optimizers are tested against it state entry by state entry. It materializes the K per-task
updates (K × the shared parameters' size), which the native core never does.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch

from ..solver import METHODS, SolveStatus, solve_weights

__all__ = ["ReferenceAdaGrad", "ReferenceAdam", "ReferenceRMSProp"]

# Shared 16-bit parameters keep float32 state and are updated in float32 (SPEC §6 / STYLE:
# "compute 16-bit types in float"); task-specific ones follow torch (state in the param dtype).
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_UMMS = (None, "clippy", "adatask")
_WEIGHT_NORMS = ("sum", "none")
# Clippy (λ_rel, λ_abs): the PUB paper's values and TensorFlow Recommenders' ClippyAdagrad's.
_CLIPPY_PRESETS = {"paper": (0.5, 1e-2), "tfrs": (0.1, 1e-7)}
# torch.optim options that change nothing but speed are accepted; the others cannot be honoured.
_TORCH_SPEED_OPTIONS = ("foreach",)
_TORCH_UNSUPPORTED_OPTIONS = ("fused", "capturable", "differentiable")
# AdaTask keeps these per task (leading K dimension) under the name "task_" + key.
_TASK_PREFIX = "task_"
# Optimizer-level PUB attributes that pickling/deepcopy must carry besides torch's three.
_PUB_ATTRIBUTES = (
    "pub_options",
    "stats",
    "_task_weights",
    "raw_task_weights",
    "gram_matrix",
    "_num_tasks",
    "_pub_step",
    "_pending",
    "_task_grads",
    "_shared",
)


# ---------------------------------------------------------------------------------------------
# Per-optimizer math (SPEC §3). Each rule is pure: it returns (u, new_state) for the gradient g
# and never writes into `state`. g may carry a leading task dimension K; the state entries then
# broadcast against it (one shared state: u_i for every task at once) or carry the same leading
# K (AdaTask's per-task state). The same function therefore gives u_i, the state advanced with
# g_α, AdaTask's per-task advance and the plain base-optimizer step.
# ---------------------------------------------------------------------------------------------


def adam_rule(g, state, hp, t):
    """torch.optim.Adam: m' = β1 m + (1−β1) g, v' = β2 v + (1−β2) g²,
    u = lr/(1−β1^t) · m' / (sqrt(v̂)/sqrt(1−β2^t) + ε), v̂ = max(v_max, v') if amsgrad else v'."""
    beta1, beta2 = hp["betas"]
    bias_correction1 = 1.0 - beta1**t
    bias_correction2 = 1.0 - beta2**t
    exp_avg = beta1 * state["exp_avg"] + (1.0 - beta1) * g
    exp_avg_sq = beta2 * state["exp_avg_sq"] + (1.0 - beta2) * g * g
    new_state = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if hp["amsgrad"]:
        exp_avg_sq = torch.maximum(state["max_exp_avg_sq"], exp_avg_sq)
        new_state["max_exp_avg_sq"] = exp_avg_sq
    denom = exp_avg_sq.sqrt() / bias_correction2**0.5 + hp["eps"]
    u = (hp["lr"] / bias_correction1) * (exp_avg / denom)
    return u, new_state


def adagrad_rule(g, state, hp, t):
    """torch.optim.Adagrad: s' = s + g², u = lr/(1 + (t−1)·lr_decay) · g / (sqrt(s') + ε)."""
    clr = hp["lr"] / (1.0 + (t - 1.0) * hp["lr_decay"])
    state_sum = state["sum"] + g * g
    u = clr * (g / (state_sum.sqrt() + hp["eps"]))
    return u, {"sum": state_sum}


def rmsprop_rule(g, state, hp, t):
    """torch.optim.RMSprop: v' = α v + (1−α) g²; centered a' = α a + (1−α) g, denom =
    sqrt(v' − a'²) + ε, else sqrt(v') + ε; u = lr·g/denom, or with momentum μ: b' = μ b +
    g/denom, u = lr·b'."""
    alpha = hp["alpha"]
    square_avg = alpha * state["square_avg"] + (1.0 - alpha) * g * g
    new_state = {"square_avg": square_avg}
    if hp["centered"]:
        grad_avg = alpha * state["grad_avg"] + (1.0 - alpha) * g
        new_state["grad_avg"] = grad_avg
        denom = (square_avg - grad_avg * grad_avg).sqrt() + hp["eps"]
    else:
        denom = square_avg.sqrt() + hp["eps"]
    if hp["momentum"] > 0:
        buf = hp["momentum"] * state["momentum_buffer"] + g / denom
        new_state["momentum_buffer"] = buf
        u = hp["lr"] * buf
    else:
        u = hp["lr"] * (g / denom)
    return u, new_state


def clippy_scale(u, theta, lambda_rel, lambda_abs):
    """Clippy (SPEC §5): u_i ← σ_i u_i with σ_i = min(1, min_j (λ_rel|θ_j| + λ_abs)/|u_ij|) over
    the coordinates with u_ij ≠ 0, for one tensor; u is (K, *theta.shape)."""
    bound = lambda_rel * theta.abs() + lambda_abs
    ratio = torch.where(u != 0, bound / u.abs(), torch.full_like(u, math.inf))
    # The column of ones is the "min(1, ·)" and keeps empty tensors well defined.
    ratio = torch.cat([ratio.reshape(u.shape[0], -1), ratio.new_ones(u.shape[0], 1)], dim=1)
    sigma = ratio.amin(dim=1)  # NaN in u propagates, so the finite check still catches it
    return u * sigma.view(-1, *([1] * theta.dim()))


def _reached_leaves(root) -> set[int]:
    """ids of the leaf tensors (AccumulateGrad nodes' .variable) reachable from grad_fn `root`."""
    leaves: set[int] = set()
    seen: set = set()
    stack = [root]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None:
            leaves.add(id(variable))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return leaves


def _as_float_hparams(group: dict) -> dict:
    """A param group's hyper-parameters as Python floats/bools (tensor lr/betas allowed)."""
    hp = {}
    for key, value in group.items():
        if key == "params":
            continue
        if isinstance(value, bool) or value is None or isinstance(value, str):
            hp[key] = value
        elif isinstance(value, (tuple, list)):
            hp[key] = tuple(float(v) for v in value)
        elif isinstance(value, (int, float, torch.Tensor)):
            hp[key] = float(value)
        else:
            hp[key] = value
    hp.setdefault("decoupled_weight_decay", False)
    return hp


class _ReferencePUB(torch.optim.Optimizer):
    """PUB around one base optimizer; subclasses give the rule, its state and its validation.

    Step t with ``backward(losses)`` (SPEC §5), on the shared parameters θ of all groups:
    g_i ← −g_i if maximize, g_i ← g_i + wd·θ (L2); u_i = rule(g_i, shared state) (or task i's
    own state with ``umm="adatask"``), u_i ← clippy(u_i) with ``umm="clippy"``;
    G_ij = Σ ⟨u_i, u_j⟩ in float64; α from ``solve_weights(G)`` when (t−1) % every == 0, else the
    last one; α̂ = α/Σα; θ ← θ·(1 − lr·wd) (decoupled only); θ ← θ − Σ α̂_i u_i; the state then
    advances with g_α = Σ α̂_i g_i (AdaTask: task i's state with its own g_i). Task-specific
    parameters get the base step on ``.grad``; ``step()`` without ``backward`` is the base
    optimizer on every parameter with ``.grad``.
    """

    _rule = None  # set by subclasses: one of the *_rule functions above

    def __init__(self, params, defaults: dict, pub_kwargs: dict) -> None:
        options = self._check_pub_options(pub_kwargs)
        shared = options.pop("shared")
        self.pub_options = options
        self.stats: dict[str, Any] = {"status": None, "iterations": 0, "residual": math.nan}
        # α̂ of the last PUB step, the raw α of the last solve (warm start), its G.
        self._task_weights: torch.Tensor | None = None
        self.raw_task_weights: torch.Tensor | None = None
        self.gram_matrix: torch.Tensor | None = None
        self._num_tasks: int | None = None
        self._pub_step = 0  # t of the last PUB step (steps driven by backward(losses))
        self._pending = False  # backward(losses) called since the last step()
        self._task_grads: dict[torch.Tensor, list] = {}  # shared param -> K gradients or None
        self._shared: set[torch.Tensor] | None = None  # decided once, then cached
        super().__init__(params, defaults)
        if shared is not None:
            self._set_explicit_shared(shared)
        elif all("shared" in group for group in self.param_groups):
            self._shared = {p for g in self.param_groups if g["shared"] for p in g["params"]}

    # ----- options and validation --------------------------------------------------------------

    @staticmethod
    def _check_pub_options(kwargs: dict) -> dict:
        options = {
            "shared": None,
            "update_weights_every": 1,
            "solver": "newton",
            "weight_norm": "sum",
            "ridge": 1e-8,
            "umm": None,
            "clippy_preset": "paper",
            "clippy_lambda_rel": None,
            "clippy_lambda_abs": None,
        }
        for key, value in kwargs.items():
            if key in _TORCH_SPEED_OPTIONS:
                continue
            if key in _TORCH_UNSUPPORTED_OPTIONS:
                if value:
                    raise NotImplementedError(f"PUB optimizers do not support {key}={value!r}")
                continue
            if key not in options:
                raise TypeError(f"unexpected keyword argument {key!r}")
            options[key] = value
        every = options["update_weights_every"]
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"update_weights_every must be an integer >= 1, got {every!r}")
        if options["solver"] not in METHODS:
            raise ValueError(f"solver must be one of {sorted(METHODS)}, got {options['solver']!r}")
        if options["weight_norm"] not in _WEIGHT_NORMS:
            raise ValueError(
                f"weight_norm must be one of {_WEIGHT_NORMS}, got {options['weight_norm']!r}"
            )
        ridge = options["ridge"]
        if not (isinstance(ridge, (int, float)) and 0.0 <= ridge < math.inf):
            raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
        if options["umm"] not in _UMMS:
            raise ValueError(f"umm must be one of {_UMMS}, got {options['umm']!r}")
        if options["clippy_preset"] not in _CLIPPY_PRESETS:
            raise ValueError(
                f"clippy_preset must be one of {sorted(_CLIPPY_PRESETS)}, "
                f"got {options['clippy_preset']!r}"
            )
        lambda_rel, lambda_abs = _CLIPPY_PRESETS[options["clippy_preset"]]
        for name in ("clippy_lambda_rel", "clippy_lambda_abs"):
            value = options[name]
            if value is None:
                continue
            if options["umm"] != "clippy":
                raise ValueError(
                    f"{name} is only used with umm='clippy', got umm={options['umm']!r}"
                )
            if not (isinstance(value, (int, float)) and 0.0 <= value < math.inf):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if options["clippy_preset"] != "paper" and options["umm"] != "clippy":
            raise ValueError(
                f"clippy_preset is only used with umm='clippy', got umm={options['umm']!r}"
            )
        if options["clippy_lambda_rel"] is None:
            options["clippy_lambda_rel"] = lambda_rel
        if options["clippy_lambda_abs"] is None:
            options["clippy_lambda_abs"] = lambda_abs
        return options

    def _validate_group(self, group: dict) -> None:  # subclasses: torch's checks and wording
        raise NotImplementedError

    def _state_init(self, hp: dict) -> dict[str, float]:  # subclasses: state key -> initial value
        raise NotImplementedError

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_group(group)
        if "shared" in group and not isinstance(group["shared"], bool):
            raise ValueError(f"param group 'shared' must be True or False, got {group['shared']!r}")
        for p in group["params"]:
            if p.is_complex():
                raise NotImplementedError(
                    f"{self._describe(p)}: complex parameters are not supported"
                )
        if self._shared is not None and group.get("shared"):
            self._shared.update(group["params"])

    def _set_explicit_shared(self, shared: Iterable[torch.Tensor]) -> None:
        shared = [shared] if isinstance(shared, torch.Tensor) else list(shared)
        chosen = {id(t) for t in shared}
        mine = {id(p) for p in self._params()}
        if not all(isinstance(t, torch.Tensor) for t in shared) or not chosen <= mine:
            raise ValueError("shared must contain only parameters given to this optimizer")
        for group in self.param_groups:
            flags = {id(p) in chosen for p in group["params"]}
            if "shared" in group and flags - {group["shared"]}:
                raise ValueError("shared= disagrees with a param group's 'shared' flag")
        self._shared = {p for p in self._params() if id(p) in chosen}

    # ----- small helpers -----------------------------------------------------------------------

    def _params(self):
        for group in self.param_groups:
            yield from group["params"]

    def _describe(self, p: torch.Tensor) -> str:
        for gi, group in enumerate(self.param_groups):
            for j, q in enumerate(group["params"]):
                if q is p:
                    return f"param_groups[{gi}]['params'][{j}] (shape {tuple(p.shape)}, {p.dtype})"
        return f"tensor of shape {tuple(p.shape)}"

    def _is_shared(self, p: torch.Tensor) -> bool:
        return self._shared is not None and p in self._shared

    def _compute_dtype(self, p: torch.Tensor) -> torch.dtype:
        return torch.float32 if p.dtype in _HALF_DTYPES and self._is_shared(p) else p.dtype

    @staticmethod
    def _scalar_dtype() -> torch.dtype:
        # torch.optim's 'step' dtype (torch.optim.optimizer._get_scalar_dtype).
        return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32

    @property
    def task_weights(self) -> torch.Tensor | None:
        """α̂ used by the last PUB step, float64 (K,); None before the first one."""
        return self._task_weights

    @property
    def num_tasks(self) -> int | None:
        """K, fixed by the first ``backward`` (or a loaded checkpoint)."""
        return self._num_tasks

    # ----- state ---------------------------------------------------------------------------------

    def _read_state(self, p, hp, cdtype, per_task):
        """(state in cdtype keyed by plain names, new 'step' tensor, t) for p, without writing.

        Missing entries start at their initial value; 16-bit entries of a shared param are
        promoted to float32; with per_task (AdaTask) a plain entry becomes K copies of it.
        """
        st = self.state[p]
        step = st.get("step")
        new_step = torch.tensor(1.0, dtype=self._scalar_dtype()) if step is None else step + 1
        never_stepped = step is None or float(step) == 0.0
        shape = ((self._num_tasks,) if per_task else ()) + tuple(p.shape)
        state = {}
        for name, init in self._state_init(hp).items():
            value = st.get(_TASK_PREFIX + name) if per_task else None
            if value is None:
                value = st.get(name)
                if value is not None and never_stepped and value.dtype != cdtype:
                    value = None  # still its initial value: build it exactly in cdtype
                if value is not None:
                    value = value.to(cdtype).expand(shape)
            if value is None:
                value = torch.full(shape, init, dtype=cdtype, device=p.device)
            state[name] = value
        return state, new_step, float(new_step)

    def _write_state(self, p, new_state, new_step, per_task):
        # Entries are replaced, never written in place: a failed step cannot leave half-written
        # state, and tensors shared with a state_dict are never modified behind its back.
        st = self.state[p]
        for name, value in new_state.items():
            if per_task:
                st.pop(name, None)
                st[_TASK_PREFIX + name] = value
            else:
                st[name] = value
        st["step"] = new_step

    # ----- backward ------------------------------------------------------------------------------

    def backward(self, losses) -> None:
        """Per-task gradients of the shared parameters, ordinary gradients for the others.

        Args:
            losses: the K task losses, a list/tuple of 0-dim tensors or a 1-D tensor.

        g_i = ∂losses[i]/∂θ is stored (accumulated until ``zero_grad``) for every shared θ; the
        gradient of Σ losses is accumulated into ``.grad`` of the task-specific parameters.
        On the first call the shared parameters are detected, unless given explicitly.
        """
        task_losses = self._check_losses(losses)
        K = len(task_losses)
        if self._num_tasks is None:
            self._num_tasks = K
        elif K != self._num_tasks:
            raise ValueError(
                f"losses has {K} tasks, but this optimizer is used with K = {self._num_tasks}"
            )
        if self._shared is None:
            self._detect_shared(self._task_roots(losses, task_losses))
        shared = [p for p in self._params() if p.requires_grad and self._is_shared(p)]
        specific = [p for p in self._params() if p.requires_grad and not self._is_shared(p)]
        if shared:
            for i, loss in enumerate(task_losses):
                grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
                for p, g in zip(shared, grads, strict=True):
                    if g is None:
                        continue
                    if g.is_sparse:
                        raise TypeError(f"{self._describe(p)}: sparse gradients are not supported")
                    slots = self._task_grads.setdefault(p, [None] * K)
                    slots[i] = g if slots[i] is None else slots[i] + g
        if specific:
            total = losses.sum() if isinstance(losses, torch.Tensor) else sum(task_losses)
            torch.autograd.backward(total, inputs=specific)
        self._pending = True

    @staticmethod
    def _check_losses(losses) -> list[torch.Tensor]:
        """The K scalar task losses, or a ValueError naming ``losses`` (SPEC §7)."""
        if isinstance(losses, torch.Tensor):
            if losses.dim() != 1:
                raise ValueError(
                    "losses must be a list/tuple of scalar tensors or a 1-D tensor of K losses, "
                    f"got a tensor of shape {tuple(losses.shape)}"
                    + (" (wrap a single loss as [loss])" if losses.dim() == 0 else "")
                )
            task_losses = list(losses.unbind(0))
        elif isinstance(losses, (list, tuple)):
            task_losses = list(losses)
            for i, loss in enumerate(task_losses):
                if not isinstance(loss, torch.Tensor):
                    raise TypeError(f"losses[{i}] must be a tensor, got {type(loss).__name__}")
                if loss.dim() != 0:
                    raise ValueError(
                        f"losses[{i}] must be a scalar (0-dim) tensor, "
                        f"got shape {tuple(loss.shape)}"
                    )
        else:
            raise TypeError(
                "losses must be a list/tuple of tensors or a 1-D tensor, "
                f"got {type(losses).__name__}"
            )
        if not task_losses:
            raise ValueError("losses must contain at least one loss, got 0")
        for i, loss in enumerate(task_losses):
            if not loss.is_floating_point():
                raise ValueError(f"losses[{i}] must be a real floating-point tensor")
            if not loss.requires_grad:
                raise ValueError(f"losses[{i}] does not require grad (it has no autograd graph)")
        return task_losses

    @staticmethod
    def _task_roots(losses, task_losses) -> list:
        """The autograd root of each task, for shared-parameter detection."""
        if not isinstance(losses, torch.Tensor):
            return [loss.grad_fn for loss in task_losses]
        # A 1-D tensor: each element's graph runs through the whole tensor. torch.stack keeps
        # one input edge per task, which separates the tasks again.
        fn = losses.grad_fn
        if (
            fn is not None
            and fn.name().startswith("StackBackward")
            and len(fn.next_functions) == len(task_losses)
        ):
            return [next_fn for next_fn, _ in fn.next_functions]
        if len(task_losses) > 1:
            warnings.warn(
                "losses is a 1-D tensor not built by torch.stack: every parameter it depends on "
                "counts as reached by every task; pass a list of losses or shared= to detect "
                "shared parameters exactly",
                stacklevel=4,
            )
        return [fn] * len(task_losses)

    def _detect_shared(self, roots) -> None:
        """A parameter reached from two or more tasks' autograd graphs is shared (SPEC §1).
        Param groups with a 'shared' flag keep their flag."""
        reached_by = [_reached_leaves(root) for root in roots]
        shared = set()
        for group in self.param_groups:
            for p in group["params"]:
                if "shared" in group:
                    is_shared = group["shared"]
                else:
                    is_shared = sum(id(p) in leaves for leaves in reached_by) >= 2
                if is_shared:
                    shared.add(p)
        self._shared = shared

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if set_to_none:
            self._task_grads.clear()
        else:
            for slots in self._task_grads.values():
                for g in slots:
                    if g is not None:
                        g.zero_()

    # ----- step ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._pending:
            self._pub_step_()
        else:
            self._plain_step_()
        self._pending = False
        return loss

    def _plain_step_(self) -> None:
        """The base optimizer (torch.optim semantics) on every parameter with a .grad."""
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(f"{self._describe(p)}: sparse gradients are not supported")
                if any(k.startswith(_TASK_PREFIX) for k in self.state[p]):
                    raise RuntimeError(
                        f"{self._describe(p)} holds AdaTask per-task state; step() on it needs "
                        "a preceding opt.backward(losses)"
                    )
                work.append((group, p))
        for group, p in work:
            self._base_step(group, p, p.grad)

    def _base_step(self, group, p, grad) -> None:
        hp = _as_float_hparams(group)
        cdtype = self._compute_dtype(p)
        state, new_step, t = self._read_state(p, hp, cdtype, per_task=False)
        theta = p.detach().to(cdtype)
        g = grad.to(cdtype)
        if hp["maximize"]:
            g = -g
        if hp["weight_decay"] != 0 and not hp["decoupled_weight_decay"]:
            g = g + hp["weight_decay"] * theta
        u, new_state = type(self)._rule(g, state, hp, t)
        if hp["weight_decay"] != 0 and hp["decoupled_weight_decay"]:
            theta = theta * (1.0 - hp["lr"] * hp["weight_decay"])
        p.copy_(theta - u)
        self._write_state(p, new_state, new_step, per_task=False)

    def _pub_step_(self) -> None:
        K = self._num_tasks
        adatask = self.pub_options["umm"] == "adatask"
        rule = type(self)._rule

        # Phase 1: everything that can fail, with no write to a parameter or to the state.
        work = []
        for group in self.param_groups:
            hp = _as_float_hparams(group)
            for p in group["params"]:
                slots = self._task_grads.get(p) if self._is_shared(p) else None
                if slots is None or all(g is None for g in slots):
                    continue
                cdtype = self._compute_dtype(p)
                state, new_step, t = self._read_state(p, hp, cdtype, per_task=adatask)
                theta = p.detach().to(cdtype)
                g = torch.stack(
                    [
                        torch.zeros_like(p, dtype=cdtype) if gi is None else gi.to(cdtype)
                        for gi in slots
                    ]
                )
                if hp["maximize"]:
                    g = -g
                if hp["weight_decay"] != 0 and not hp["decoupled_weight_decay"]:
                    g = g + hp["weight_decay"] * theta
                u, task_state = rule(g, state, hp, t)
                if self.pub_options["umm"] == "clippy":
                    # θ before this step's decoupled decay.
                    u = clippy_scale(
                        u,
                        theta,
                        self.pub_options["clippy_lambda_rel"],
                        self.pub_options["clippy_lambda_abs"],
                    )
                if not adatask:
                    task_state = None  # only AdaTask keeps the per-task advanced state
                work.append((group, hp, p, cdtype, state, new_step, t, theta, g, u, task_state))
        specific = [
            (group, p)
            for group in self.param_groups
            for p in group["params"]
            if not self._is_shared(p) and p.grad is not None
        ]
        for _, p in specific:
            if p.grad.is_sparse:
                raise TypeError(f"{self._describe(p)}: sparse gradients are not supported")
        self._check_finite(work, specific)

        if not work:  # no shared gradient at all: nothing to balance, t does not advance
            for group, p in specific:
                self._base_step(group, p, p.grad)
            return

        t_pub = self._pub_step + 1
        update_weights = (t_pub - 1) % self.pub_options["update_weights_every"] == 0
        if update_weights or self._task_weights is None:
            gram = self._gram(work)
            alpha, task_weights, stats = self._solve(gram)
        else:
            gram, alpha, task_weights, stats = None, None, self._task_weights, None

        # Phase 2: apply θ ← θ − Σ α̂_i u_i and advance the state.
        for _group, hp, p, cdtype, state, new_step, t, theta, g, u, task_state in work:
            weights = task_weights.to(device=p.device, dtype=cdtype).view(K, *([1] * p.dim()))
            if hp["weight_decay"] != 0 and hp["decoupled_weight_decay"]:
                theta = theta * (1.0 - hp["lr"] * hp["weight_decay"])
            p.copy_(theta - (weights * u).sum(dim=0))
            if adatask:
                new_state = task_state  # each task's state advanced with its own g_i
            else:
                _, new_state = rule((weights * g).sum(dim=0), state, hp, t)  # g_α
            self._write_state(p, new_state, new_step, per_task=adatask)
        for group, p in specific:
            self._base_step(group, p, p.grad)

        self._pub_step = t_pub
        self._task_weights = task_weights
        if gram is not None:
            self.gram_matrix, self.raw_task_weights, self.stats = gram, alpha, stats

    def _check_finite(self, work, specific) -> None:
        bad_tasks = set()
        for *_, g, u, _task_state in work:
            K = g.shape[0]
            finite = torch.isfinite(g.reshape(K, -1)).all(1)
            finite &= torch.isfinite(u.reshape(K, -1)).all(1)
            bad_tasks.update(i for i in range(K) if not finite[i])
        bad_params = [self._describe(p) for _, p in specific if not torch.isfinite(p.grad).all()]
        if bad_tasks or bad_params:
            what = []
            if bad_tasks:
                what.append(f"the gradient/update of task(s) {sorted(bad_tasks)}")
            if bad_params:
                what.append(f"the gradient of task-specific {', '.join(bad_params)}")
            raise FloatingPointError(
                f"PUB step: non-finite values (NaN/Inf) in {' and '.join(what)}; parameters and "
                "optimizer state were left unchanged"
            )

    def _gram(self, work) -> torch.Tensor:
        """G_ij = Σ over all shared tensors ⟨u_i, u_j⟩, accumulated in float64 (SPEC §4)."""
        K = self._num_tasks
        gram = torch.zeros(K, K, dtype=torch.float64)
        for *_, u, _task_state in work:
            U = u.reshape(K, -1).to(torch.float64)
            gram += (U @ U.T).cpu()
        gram = 0.5 * (gram + gram.T)  # exactly symmetric whatever the matmul's blocking
        if not torch.isfinite(gram).all():
            bad = [i for i in range(K) if not torch.isfinite(gram[i]).all()]
            raise FloatingPointError(
                f"PUB step: the Gram matrix of the task updates overflowed for task(s) {bad}; "
                "parameters and optimizer state were left unchanged"
            )
        return gram

    def _solve(self, gram):
        """α from G α = 1/α (warm-started from the last α) and α̂ (SPEC §4)."""
        K = self._num_tasks
        warm = self.raw_task_weights
        if warm is not None and tuple(warm.shape) != (K,):
            warm = None
        result = solve_weights(
            gram,
            method=self.pub_options["solver"],
            warm_start=warm,
            ridge=self.pub_options["ridge"],
        )
        alpha = result.weights.to(torch.float64)
        if not (torch.isfinite(alpha).all() and (alpha >= 0).all()):
            raise RuntimeError(
                f"weight solver returned invalid weights {alpha.tolist()} "
                f"(status {result.status!r}); parameters and optimizer state were left unchanged"
            )
        stats = {
            "status": SolveStatus(int(result.status)),
            "iterations": int(result.iterations),
            "residual": float(result.residual),
        }
        if self.pub_options["weight_norm"] == "none":
            return alpha, alpha.clone(), stats
        total = float(alpha.sum())
        if total > 0:
            return alpha, alpha / total, stats
        # Every update is zero (SolveStatus.ALL_ZERO): the step is zero whatever the weights; the
        # uniform α̂ (the limit of K identical tasks) decides how the state advances.
        return alpha, torch.full((K,), 1.0 / K, dtype=torch.float64), stats

    # ----- checkpoints ---------------------------------------------------------------------------

    def __getstate__(self):
        # torch.optim.Optimizer pickles only defaults, state and param_groups.
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in _PUB_ATTRIBUTES if k in self.__dict__})
        return state

    def state_dict(self) -> dict:
        """torch's state_dict plus "pub": K, t, α̂, raw α, last stats and the shared params'
        indices (in the order of the packed "params" lists)."""
        sd = super().state_dict()
        index = {id(p): i for i, p in enumerate(self._params())}

        def copy(x):
            return None if x is None else x.detach().clone()

        sd["pub"] = {
            "num_tasks": self._num_tasks,
            "step": self._pub_step,
            "task_weights": copy(self._task_weights),
            "raw_task_weights": copy(self.raw_task_weights),
            "gram_matrix": copy(self.gram_matrix),
            # Plain Python types only, so torch.load(weights_only=True) reads it back.
            "stats": {
                **self.stats,
                "status": None if self.stats["status"] is None else int(self.stats["status"]),
            },
            "shared": None if self._shared is None else sorted(index[id(p)] for p in self._shared),
            "umm": self.pub_options["umm"],
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        pub = state_dict.pop("pub", None)
        params = list(self._params())
        saved_groups = state_dict["param_groups"]
        same_layout = len(saved_groups) == len(self.param_groups) and all(
            len(s["params"]) == len(g["params"])
            for s, g in zip(saved_groups, self.param_groups, strict=False)
        )
        if not same_layout:
            super().load_state_dict(state_dict)  # raises torch's ValueError
            return
        saved_ids = [i for s in saved_groups for i in s["params"]]
        id_map = dict(zip(saved_ids, params, strict=True))
        K, shared = self._check_checkpoint(pub, state_dict["state"], id_map, params)

        super().load_state_dict(state_dict)
        self._shared = shared
        if pub is not None:
            self._num_tasks = K
            self._pub_step = int(pub["step"])
            self._task_weights = pub["task_weights"]
            self.raw_task_weights = pub["raw_task_weights"]
            self.gram_matrix = pub.get("gram_matrix")
            status = pub["stats"]["status"]
            self.stats = {**pub["stats"], "status": None if status is None else SolveStatus(status)}
        # torch casts every entry to the param's dtype; a shared 16-bit param keeps float32.
        for saved_id, value in state_dict["state"].items():
            p = id_map.get(saved_id)
            if p is not None and p.dtype in _HALF_DTYPES and self._is_shared(p):
                for key, tensor in value.items():
                    if key != "step":
                        self.state[p][key] = tensor.to(device=p.device, dtype=torch.float32)

    def _check_checkpoint(self, pub, saved_state, id_map, params):
        """Validate a checkpoint against this optimizer before anything is loaded (SPEC §7)."""
        K = self._num_tasks
        shared = self._shared
        if pub is not None:
            if self._num_tasks is not None and pub["num_tasks"] not in (None, self._num_tasks):
                raise ValueError(
                    f"checkpoint has K = {pub['num_tasks']} tasks, this optimizer K = "
                    f"{self._num_tasks}; optimizer unchanged"
                )
            K = pub["num_tasks"] if pub["num_tasks"] is not None else self._num_tasks
            if pub["shared"] is not None:
                if any(not 0 <= i < len(params) for i in pub["shared"]):
                    raise ValueError("checkpoint's shared indices are out of range")
                shared = {params[i] for i in pub["shared"]}
            for key in ("task_weights", "raw_task_weights"):
                w = pub[key]
                if w is not None and (K is None or tuple(w.shape) != (K,)):
                    raise ValueError(f"checkpoint's {key} has shape {tuple(w.shape)}, K = {K}")
        for saved_id, value in saved_state.items():
            p = id_map.get(saved_id)
            if p is None:
                continue
            for key, tensor in value.items():
                if not isinstance(tensor, torch.Tensor):
                    continue
                if key == "step":
                    expected = ()
                elif key.startswith(_TASK_PREFIX):
                    if self.pub_options["umm"] != "adatask" or shared is None or p not in shared:
                        raise ValueError(
                            f"checkpoint holds per-task state {key!r} for {self._describe(p)}, "
                            "which this optimizer does not use (umm='adatask' on shared params)"
                        )
                    expected = (K, *p.shape)
                else:
                    expected = tuple(p.shape)
                if tuple(tensor.shape) != tuple(expected):
                    raise ValueError(
                        f"checkpoint state {key!r} of {self._describe(p)} has shape "
                        f"{tuple(tensor.shape)}, expected {tuple(expected)}; optimizer unchanged"
                    )
        return K, shared


def _check_lr(lr) -> None:
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


class ReferenceAdam(_ReferencePUB):
    """PUB-Adam reference (SPEC §3, §5; PUB paper §4). Shared parameters, per task i:

        m_i = β1 m + (1−β1) g_i,  v_i = β2 v + (1−β2) g_i²,
        u_i = lr/(1−β1^t) · m_i / (sqrt(v̂_i)/sqrt(1−β2^t) + ε),  v̂_i = max(v_max, v_i) | v_i;
        θ ← θ − Σ α̂_i u_i;  m ← β1 m + (1−β1) g_α,  v ← β2 v + (1−β2) g_α²,
        v_max ← max(v_max, v),  g_α = Σ α̂_i g_i.

    State keys are torch's ('step', 'exp_avg', 'exp_avg_sq', 'max_exp_avg_sq'); with
    ``umm="adatask"`` shared params hold 'task_exp_avg', 'task_exp_avg_sq'
    ('task_max_exp_avg_sq') with a leading K dimension.
    """

    _rule = staticmethod(adam_rule)

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        amsgrad=False,
        *,
        maximize=False,
        decoupled_weight_decay=False,
        **pub_kwargs,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        super().__init__(params, defaults, pub_kwargs)

    def _validate_group(self, group):
        _check_lr(group["lr"])
        betas, eps, weight_decay = group["betas"], group["eps"], group["weight_decay"]
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")

    def _state_init(self, hp):
        init = {"exp_avg": 0.0, "exp_avg_sq": 0.0}
        if hp["amsgrad"]:
            init["max_exp_avg_sq"] = 0.0
        return init


class ReferenceAdaGrad(_ReferencePUB):
    """PUB-AdaGrad reference (SPEC §3, §5). Shared parameters, per task i:

        s_i = s + g_i²,  u_i = lr/(1 + (t−1)·lr_decay) · g_i / (sqrt(s_i) + ε);
        θ ← θ − Σ α̂_i u_i;  s ← s + g_α²,  g_α = Σ α̂_i g_i.

    State keys are torch's ('step', 'sum', created at construction as torch does); with
    ``umm="adatask"`` shared params hold 'task_sum' with a leading K dimension.
    """

    _rule = staticmethod(adagrad_rule)

    def __init__(
        self,
        params,
        lr=1e-2,
        lr_decay=0.0,
        weight_decay=0.0,
        initial_accumulator_value=0.0,
        eps=1e-10,
        *,
        maximize=False,
        **pub_kwargs,
    ):
        defaults = dict(
            lr=lr,
            lr_decay=lr_decay,
            eps=eps,
            weight_decay=weight_decay,
            initial_accumulator_value=initial_accumulator_value,
            maximize=maximize,
        )
        super().__init__(params, defaults, pub_kwargs)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:  # torch.optim.Adagrad creates its state at construction
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=self._scalar_dtype())
                state["sum"] = torch.full_like(
                    p, group["initial_accumulator_value"], memory_format=torch.preserve_format
                )

    def _validate_group(self, group):
        _check_lr(group["lr"])
        if not 0.0 <= group["lr_decay"]:
            raise ValueError(f"Invalid lr_decay value: {group['lr_decay']}")
        if not 0.0 <= group["weight_decay"]:
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
        if not 0.0 <= group["initial_accumulator_value"]:
            raise ValueError(
                f"Invalid initial_accumulator_value value: {group['initial_accumulator_value']}"
            )
        if not 0.0 <= group["eps"]:
            raise ValueError(f"Invalid epsilon value: {group['eps']}")

    def _state_init(self, hp):
        return {"sum": hp["initial_accumulator_value"]}


class ReferenceRMSProp(_ReferencePUB):
    """PUB-RMSProp reference (SPEC §3, §5). Shared parameters, per task i:

        v_i = α v + (1−α) g_i²;  centered: a_i = α a + (1−α) g_i, d_i = sqrt(v_i − a_i²) + ε,
        else d_i = sqrt(v_i) + ε;  u_i = lr·g_i/d_i, or with momentum μ: b_i = μ b + g_i/d_i,
        u_i = lr·b_i;  θ ← θ − Σ α̂_i u_i;  then v, a, b advance with g_α = Σ α̂_i g_i
        (b ← μ b + g_α/d(g_α), d from the advanced v, a).

    State keys are torch's ('step', 'square_avg', 'momentum_buffer' if momentum > 0,
    'grad_avg' if centered); with ``umm="adatask"`` all of them but 'step' are per task
    ('task_square_avg', ...) with a leading K dimension.
    """

    _rule = staticmethod(rmsprop_rule)

    def __init__(
        self,
        params,
        lr=1e-2,
        alpha=0.99,
        eps=1e-8,
        weight_decay=0.0,
        momentum=0.0,
        centered=False,
        *,
        maximize=False,
        **pub_kwargs,
    ):
        defaults = dict(
            lr=lr,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            centered=centered,
            maximize=maximize,
        )
        super().__init__(params, defaults, pub_kwargs)

    def _validate_group(self, group):
        _check_lr(group["lr"])
        if not 0.0 <= group["eps"]:
            raise ValueError(f"Invalid epsilon value: {group['eps']}")
        if not 0.0 <= group["momentum"]:
            raise ValueError(f"Invalid momentum value: {group['momentum']}")
        if not 0.0 <= group["weight_decay"]:
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
        if not 0.0 <= group["alpha"]:
            raise ValueError(f"Invalid alpha value: {group['alpha']}")

    def _state_init(self, hp):
        init = {"square_avg": 0.0}
        if hp["momentum"] > 0:
            init["momentum_buffer"] = 0.0
        if hp["centered"]:
            init["grad_avg"] = 0.0
        return init
