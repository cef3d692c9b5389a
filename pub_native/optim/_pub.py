"""The PUB machinery shared by ``pub_native.Adam``, ``AdaGrad`` and ``RMSProp`` (Python layer).

A PUB optimizer is its torch base class plus this mixin: task-specific parameters take the base
class's own step; shared parameters take SPEC section 5 through the native two-pass kernels
(Gram pass, K×K solve, apply pass) on the K×P buffer of per-task gradients.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch

from .. import _autograd
from .._native import _C, cuda_module
from ..solver import METHODS, SolveStatus

__all__ = ["PUBOptimizer", "CLIPPY_PRESETS"]

# Clippy thresholds (λ_rel, λ_abs): the PUB paper's setting and TensorFlow Recommenders'
# ClippyAdagrad defaults.
CLIPPY_PRESETS = {"paper": (0.5, 1e-2), "tfrs": (0.1, 1e-7)}
_UMMS = {None: 0, "clippy": 1, "adatask": 2}
_WEIGHT_NORMS = ("sum", "none")
_DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
_TABLE_COLS = _C.TABLE_COLS
_HYPER_COLS = _C.HYPER_COLS


def _scalar_dtype():
    try:
        from torch.optim.optimizer import _get_scalar_dtype

        return _get_scalar_dtype()
    except ImportError:  # pragma: no cover - older torch
        return torch.get_default_dtype()


def _float(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


class PUBOptimizer:
    """Mixin that turns a ``torch.optim`` optimizer into its PUB version (see the subclasses).

    Subclasses set ``_ALGO`` (native rule code) and implement ``_state_names(group)`` (the torch
    state keys of a shared parameter, in the native rule's order) and ``_hyper_row(group, t)``.
    """

    _ALGO: int

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

    def _pub_setup(self, shared, update_weights_every, solver, weight_norm, ridge, umm,
                   clippy_preset, clippy_lambda_rel, clippy_lambda_abs):
        if isinstance(update_weights_every, bool) or not isinstance(update_weights_every, int) \
                or update_weights_every < 1:
            raise ValueError(
                f"Invalid update_weights_every value: {update_weights_every!r} (an integer >= 1)"
            )
        if solver not in METHODS:
            raise ValueError(f"Invalid solver: {solver!r}, expected one of {sorted(METHODS)}")
        if weight_norm not in _WEIGHT_NORMS:
            raise ValueError(f"Invalid weight_norm: {weight_norm!r}, expected 'sum' or 'none'")
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) \
                or not 0.0 <= ridge < math.inf:
            raise ValueError(f"Invalid ridge value: {ridge!r} (a finite number >= 0)")
        if umm not in _UMMS:
            raise ValueError(f"Invalid umm: {umm!r}, expected None, 'clippy' or 'adatask'")
        if clippy_preset not in CLIPPY_PRESETS:
            raise ValueError(
                f"Invalid clippy_preset: {clippy_preset!r}, expected one of "
                f"{sorted(CLIPPY_PRESETS)}"
            )
        if umm != "clippy" and (clippy_preset != "paper" or clippy_lambda_rel is not None
                                or clippy_lambda_abs is not None):
            raise ValueError(
                f"clippy_preset / clippy_lambda_rel / clippy_lambda_abs are only used with "
                f"umm='clippy', got umm={umm!r}"
            )
        lam_rel, lam_abs = CLIPPY_PRESETS[clippy_preset]
        for name, value in (("clippy_lambda_rel", clippy_lambda_rel),
                            ("clippy_lambda_abs", clippy_lambda_abs)):
            if value is not None and not (isinstance(value, (int, float))
                                          and not isinstance(value, bool)
                                          and 0.0 <= value < math.inf):
                raise ValueError(f"Invalid {name} value: {value!r} (a finite number >= 0)")
        if clippy_lambda_rel is not None:
            lam_rel = float(clippy_lambda_rel)
        if clippy_lambda_abs is not None:
            lam_abs = float(clippy_lambda_abs)
        if umm == "clippy" and lam_rel == 0.0 and lam_abs == 0.0:
            raise ValueError("Clippy needs clippy_lambda_rel > 0 or clippy_lambda_abs > 0")
        for group in self.param_groups:
            if group.get("differentiable", False):
                raise NotImplementedError("PUB optimizers do not support differentiable=True")
            for p in group["params"]:
                if p.is_complex():
                    raise TypeError(f"{self._param_name(p)}: complex parameters are not supported")
        self.update_weights_every = update_weights_every
        self.solver = solver
        self.weight_norm = weight_norm
        self.ridge = float(ridge)
        self.umm = umm
        self.clippy_preset = clippy_preset
        self.clippy_lambdas = (lam_rel, lam_abs)
        self._explicit_shared = None if shared is None else {id(p) for p in shared}
        if shared is not None:
            known = {id(p) for g in self.param_groups for p in g["params"]}
            if not self._explicit_shared <= known:
                raise ValueError(
                    "shared contains tensors that are not among the optimizer's params"
                )
        self._reset_pub()

    def _reset_pub(self):
        self._k: int | None = None
        self._shared: list[torch.Tensor] | None = None  # resolved shared params, in group order
        self._grads: _autograd.TaskGradients | None = None
        self._pending = False  # backward(losses) ran since the last step
        self._t = 0  # PUB steps taken (1-based counter of SPEC section 5 after increment)
        self._weights: np.ndarray | None = None  # α̂ in use
        self._warm: np.ndarray | None = None  # raw α of the last solve
        self._stats: dict[str, Any] = {}
        self._segments_cache = None
        self._cuda_step = None  # CudaStep once shared parameters on a CUDA device have stepped
        self._cuda_unread = False  # device results not yet copied to the host

    # ---- introspection -----------------------------------------------------------------------

    def _param_name(self, p) -> str:
        for gi, group in enumerate(self.param_groups):
            for j, q in enumerate(group["params"]):
                if q is p:
                    names = group.get("param_names")
                    if names:
                        return f"parameter {names[j]!r}"
                    return f"param_groups[{gi}]['params'][{j}] (shape {tuple(p.shape)})"
        return f"tensor of shape {tuple(p.shape)}"

    @property
    def task_weights(self) -> torch.Tensor | None:
        """α̂ used by the last step (float64, shape (K,)), or None before the first PUB step.

        On CUDA this copies from the device (the step itself never waits for it).
        """
        self._read_device()
        return None if self._weights is None else torch.from_numpy(self._weights.copy())

    @property
    def stats(self) -> dict[str, Any]:
        """Of the last weight solve: status, iterations, residual, solve_time (s, CPU only);
        and whether the last step solved (``updated``) or reused α̂."""
        self._read_device()
        return dict(self._stats)

    def _read_device(self):
        if not self._cuda_unread:
            return
        self._cuda_unread = False
        weights, alpha, stats = self._cuda_step.read()
        self._weights = weights
        if alpha.any():
            self._warm = alpha
        self._stats.update(stats)
        if stats["skipped"]:
            raise FloatingPointError(
                "a task gradient or update was NaN/Inf on the last CUDA step: the device skipped "
                "it, parameters and optimizer state are unchanged"
            )

    @property
    def num_tasks(self) -> int | None:
        return self._k

    @property
    def shared_parameters(self) -> list[torch.Tensor] | None:
        """The parameters PUB balances (None until decided by the first ``backward``)."""
        return None if self._shared is None else list(self._shared)

    def __repr__(self) -> str:
        base = super().__repr__()
        head, _, rest = base.partition(" (")
        pub = (
            f"PUB: num_tasks={self._k}, solver={self.solver!r}, "
            f"update_weights_every={self.update_weights_every}, "
            f"weight_norm={self.weight_norm!r}, ridge={self.ridge}, umm={self.umm!r}"
        )
        if self.umm == "clippy":
            pub += f", clippy_lambda_rel={self.clippy_lambdas[0]}, " \
                   f"clippy_lambda_abs={self.clippy_lambdas[1]}"
        return f"{head} (\n{pub}{rest}"

    # ---- backward ----------------------------------------------------------------------------

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _resolve_shared(self, roots):
        params = self._all_params()
        auto = None
        decided = []
        for group in self.param_groups:
            flag = group.get("shared")
            for p in group["params"]:
                if self._explicit_shared is not None:
                    decided.append(id(p) in self._explicit_shared)
                elif flag is not None:
                    decided.append(bool(flag))
                else:
                    if auto is None:
                        auto = dict(zip(map(id, params), _autograd.split_shared(roots, params)))
                    decided.append(auto[id(p)])
        shared = [p for p, s in zip(params, decided) if s and p.requires_grad]
        for p in shared:
            self._check_shared_param(p)
        return shared

    def _check_shared_param(self, p):
        if p.dtype not in _DTYPES:
            raise TypeError(
                f"{self._param_name(p)}: dtype {p.dtype} is not supported for shared parameters "
                "(float32, float64, bfloat16, float16)"
            )
        if p.device.type == "cuda":
            cuda_module()  # a clear error naming PUB_NATIVE_CUDA when the module is missing
            if p.dtype == torch.float64:
                raise NotImplementedError(
                    f"{self._param_name(p)}: the CUDA PUB step supports float32, bfloat16 and "
                    "float16 parameters"
                )
        elif p.device.type != "cpu":
            raise NotImplementedError(
                f"{self._param_name(p)}: the PUB step runs on the CPU and on CUDA devices, not "
                f"on {p.device}"
            )
        if p.is_sparse or not p.is_contiguous():
            raise NotImplementedError(
                f"{self._param_name(p)}: shared parameters must be dense and contiguous"
            )

    def backward(self, losses, *, retain_graph: bool = False) -> None:
        """Per-task gradients of the shared parameters into the K×P buffer, and the ordinary
        gradients (of Σ_i L_i) of every other parameter into ``.grad``.

        Args:
            losses: K scalar losses, a list/tuple of 0-dim tensors or a 1-D tensor.
            retain_graph: keep the autograd graph after the last task, as in
                ``Tensor.backward``.

        Calling ``backward`` again before ``step`` accumulates, as ``Tensor.backward`` does.
        """
        items = _autograd.as_loss_list(losses, self._k)
        k = len(items)
        if self._shared is None:
            self._shared = self._resolve_shared(_autograd.task_roots(losses, items))
            self._segments_cache = None
        if self._k is None:
            self._k = k
        if self._grads is None or self._grads.k != k:
            self._grads = _autograd.TaskGradients(self._shared, k)
        shared_ids = {id(p) for p in self._shared}
        specific = [p for p in self._all_params() if p.requires_grad and id(p) not in shared_ids]
        self._grads.compute(items, [specific] * k, retain_graph=retain_graph,
                            accumulate=self._pending)
        self._pending = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the ``.grad`` of every parameter and drop pending per-task gradients."""
        self._pending = False
        super().zero_grad(set_to_none=set_to_none)

    # ---- state -------------------------------------------------------------------------------

    def _state_dtype(self, p):
        return torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype

    def _init_shared_state(self, p, group) -> dict | None:
        """Missing state entries of a shared parameter (returned, not yet stored).

        With AdaTask, a plain entry already there (torch's Adagrad creates ``sum`` at
        construction; plain steps before the first ``backward(losses)`` create the others)
        becomes the starting value of every task's copy and is dropped (``None`` in the result).
        """
        st = self.state.get(p, {})
        names = self._state_names(group)
        new = {}
        if "step" not in st:
            # On CUDA the counter lives on the device, as with torch's capturable=True, so the
            # bias corrections are computed there and a step can be captured in a CUDA graph.
            new["step"] = (torch.zeros((), dtype=torch.float32, device=p.device)
                           if p.device.type == "cuda" else
                           torch.tensor(0.0, dtype=_scalar_dtype()))
        dtype = self._state_dtype(p)
        for name in names:
            if self.umm == "adatask":
                key = "task_" + name
                if key not in st:
                    if name in st:
                        base = st[name].to(dtype)
                        new[name] = None
                    else:
                        base = torch.full(p.shape, self._initial_state_value(group, name),
                                          dtype=dtype, device=p.device)
                    new[key] = base.unsqueeze(0).repeat(self._k, *([1] * p.dim())).contiguous()
            elif name not in st:
                new[name] = torch.full(p.shape, self._initial_state_value(group, name),
                                       dtype=dtype, device=p.device)
        return new or None

    def _prospective_states(self):
        """Each shared parameter's state as it will be once the missing entries exist, and
        those entries (stored only by ``_commit_state`` when the step cannot fail any more)."""
        groups_of = {id(p): g for g in self.param_groups for p in g["params"]}
        states, new_entries = {}, {}
        for p in self._shared:
            new = self._init_shared_state(p, groups_of[id(p)])
            st = dict(self.state.get(p, {}))
            if new:
                new_entries[p] = new
                st.update({key: v for key, v in new.items() if v is not None})
            states[id(p)] = st
        return states, new_entries

    def _commit_state(self, p, new):
        st = self.state[p]
        for key, value in new.items():
            if value is None:
                st.pop(key, None)
            else:
                st[key] = value

    def _initial_state_value(self, group, name) -> float:
        return 0.0

    def _segments(self):
        """Shared tensors grouped by kernel configuration; cached until the layout or a
        group's rule options (amsgrad, maximize, L2 weight decay on or off, ...) change."""
        signature = tuple(self._config_key(g) + (bool(g.get("maximize", False)),
                                                 self._hyper_row(g, 1)[4] != 0.0)
                          for g in self.param_groups)
        if self._segments_cache is not None and self._segments_signature == signature:
            return self._segments_cache
        self._segments_signature = signature
        offsets = dict(zip(map(id, self._grads.params), self._grads.offsets))
        shared_ids = set(offsets)
        by_key: dict = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if id(p) in shared_ids:
                    key = self._config_key(group) + (group.get("maximize", False),)
                    by_key.setdefault(key, []).append((gi, p, offsets[id(p)]))
        segments = []
        for key, members in by_key.items():
            has_l2 = any(self._hyper_row(self.param_groups[gi], 1)[4] != 0.0
                         for gi, _, _ in members)
            segments.append((self._config(key, self._k, _UMMS[self.umm], has_l2), members, key))
        self._segments_cache = segments
        return segments

    def _config_key(self, group) -> tuple:
        """Group options that select a different native rule (e.g. amsgrad)."""
        return ()

    def _config_flags(self, key) -> tuple:
        """(amsgrad, centered, momentum) for the native rule of a ``_config_key``."""
        return (False, False, False)

    def _config(self, key, k, umm_code, has_l2):
        return _C.StepConfig(
            self._ALGO, *self._config_flags(key[:-1]), umm_code, _DTYPES[self._grads.dtype], k,
            self._grads.size, -1.0 if key[-1] else 1.0, self.clippy_lambdas[0],
            self.clippy_lambdas[1], has_l2,
        )

    def _tables(self, segments, states, steps):
        """Per segment: the int64 tensor table and the float64 hyper table for this step."""
        out = []
        for cfg, members, _ in segments:
            table = np.zeros((len(members), _TABLE_COLS), dtype=np.int64)
            rows: dict = {}
            hyper = []
            for r, (gi, p, off) in enumerate(members):
                group = self.param_groups[gi]
                t = steps[id(p)] + 1
                key = (gi, t)
                if key not in rows:
                    rows[key] = len(hyper)
                    hyper.append(self._hyper_row(group, t))
                st = states[id(p)]
                names = self._state_names(group)
                table[r, 0] = p.data_ptr()
                table[r, 1] = p.numel()
                table[r, 2] = off
                table[r, 3] = rows[key]
                for s, name in enumerate(names):
                    key_s = ("task_" + name) if self.umm == "adatask" else name
                    table[r, 4 + s] = st[key_s].data_ptr()
            out.append((cfg, table, np.asarray(hyper, dtype=np.float64).reshape(-1, _HYPER_COLS)))
        return out

    # ---- step --------------------------------------------------------------------------------

    def step(self, closure=None):
        """One optimizer step: SPEC section 5 after ``backward(losses)``, else the base step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            if self._pending:
                self._pub_step()
            elif self._shared:
                self._plain_step_with_shared()
            else:
                super().step()
        return loss

    def _specific_grads_finite(self, shared_ids):
        grads = [p.grad for p in self._all_params() if id(p) not in shared_ids
                 and p.grad is not None and not p.grad.is_sparse]
        if not grads:
            return
        norms = torch._foreach_norm(grads, math.inf)
        bad = [i for i, n in enumerate(norms) if not math.isfinite(float(n))]
        if bad:
            names = [self._param_name(p) for p in self._all_params()
                     if id(p) not in shared_ids and p.grad is not None]
            raise FloatingPointError(
                "non-finite gradient (NaN/Inf) in task-specific "
                + ", ".join(names[i] for i in bad[:5]) + "; the step was not taken"
            )

    def _pub_step(self):
        if self._shared and self._grads.device.type == "cuda":
            return self._pub_step_cuda()
        k = self._k
        shared = self._shared
        shared_ids = {id(p) for p in shared}
        states, new_entries = self._prospective_states()
        steps = {id(p): _float(states[id(p)]["step"]) for p in shared}

        t = self._t + 1
        solve = self._weights is None or (t - 1) % self.update_weights_every == 0
        tables = self._tables(self._segments(), states, steps) if shared else []
        grads_ptr = self._grads.buffer.data_ptr() if shared else 0
        sigmas = [None] * len(tables)
        weights, stats = self._weights, dict(self._stats, updated=False)
        # Clippy's per-tensor scales come from the Gram pass, so it runs on reuse steps too.
        if solve or (self.umm == "clippy" and shared):
            G = np.zeros((k, k))
            for s, (cfg, table, hyper) in enumerate(tables):
                Gs, sigmas[s] = _C.pub_gram(cfg, table, hyper, grads_ptr)
                G += Gs
            bad = [i for i in range(k) if not np.isfinite(G[i, i])]
            if not bad and not np.isfinite(G).all():  # finite updates whose products overflow
                bad = list(range(k))
            if bad:
                raise FloatingPointError(
                    f"non-finite update (NaN/Inf gradient) for task(s) {bad}; the step was not "
                    "taken and parameters and optimizer state are unchanged"
                )
            if solve:
                weights, stats = self._solve(G)
        elif shared:
            bad = np.flatnonzero(_C.rows_finite(_DTYPES[self._grads.dtype], grads_ptr, k,
                                                self._grads.size)).tolist()
            if bad:
                raise FloatingPointError(
                    f"non-finite gradient (NaN/Inf) for task(s) {bad}; the step was not taken "
                    "and parameters and optimizer state are unchanged"
                )
        self._specific_grads_finite(shared_ids)

        # The base step of the task-specific parameters first: if torch refuses it (e.g.
        # capturable=True on CPU tensors), the shared part is still untouched.
        self._base_step_without(shared)
        # Commit: nothing below raises on valid input.
        for p, new in new_entries.items():
            self._commit_state(p, new)
        for s, (cfg, table, hyper) in enumerate(tables):
            _C.pub_apply(cfg, table, hyper, grads_ptr, weights, sigmas[s])
        if shared:
            torch._foreach_add_([self.state[p]["step"] for p in shared], 1.0)
        self._t = t
        self._weights = weights
        self._stats = stats
        self._pending = False

    def _pub_step_cuda(self):
        from ._cuda_step import CudaStep

        groups_of = {id(p): g for g in self.param_groups for p in g["params"]}
        states = {}
        for p in self._shared:
            new = self._init_shared_state(p, groups_of[id(p)])
            if new:
                self._commit_state(p, new)
            st = self.state[p]
            # torch keeps 'step' on the CPU (plain steps, load_state_dict); the device kernels
            # read and advance it on the device.
            if st["step"].device != p.device or st["step"].dtype != torch.float32:
                st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
            states[id(p)] = st
        if self._cuda_step is None:
            self._cuda_step = CudaStep(self, self._segments())
        t = self._t + 1
        solve = not self._cuda_step.solved and self._weights is None \
            or (t - 1) % self.update_weights_every == 0
        self._cuda_step.step(states, solve)
        self._t = t
        self._stats = {"updated": solve}
        self._cuda_unread = True
        self._pending = False
        self._base_step_without(self._shared)

    def _ws_size(self, k):
        return _C.workspace_size(k)

    def _solve(self, G):
        k = G.shape[0]
        code, tol, max_iter = METHODS[self.solver]
        t0 = time.perf_counter()
        if not G.any():
            alpha = np.zeros(k)
            status, iters, res = int(SolveStatus.ALL_ZERO), 0, 0.0
        else:
            alpha, status, iters, res = _C.solve_weights(G, self._warm, code, self.ridge, tol,
                                                         max_iter)
        elapsed = time.perf_counter() - t0
        total = float(alpha.sum())
        if total > 0.0 and np.isfinite(total):
            weights = alpha / total if self.weight_norm == "sum" else alpha.copy()
            self._warm = alpha
        else:
            # Every task update is zero: any weights give the same (zero) update; uniform
            # weights keep the state advance equal to the base optimizer's.
            weights = np.full(k, 1.0 / k)
        stats = {
            "status": SolveStatus(status),
            "iterations": int(iters),
            "residual": float(res),
            "solve_time": elapsed,
            "updated": True,
        }
        return weights, stats

    def _base_step_without(self, shared):
        """The base class's step on every parameter except ``shared`` (whose .grad is hidden)."""
        shared_ids = {id(p) for p in shared}
        if all(p.grad is None for p in self._all_params() if id(p) not in shared_ids):
            return  # nothing to step (and nothing for torch to object to inside a CUDA graph)
        hidden = [(p, p.grad) for p in shared if p.grad is not None]
        for p, _ in hidden:
            p.grad = None
        try:
            super().step()
        finally:
            for p, g in hidden:
                p.grad = g

    def _plain_step_with_shared(self):
        """step() without backward(losses): K = 1 on the shared params' own ``.grad``."""
        shared = [p for p in self._shared if p.grad is not None]
        if shared and shared[0].device.type == "cuda":
            raise NotImplementedError(
                "step() without backward(losses) on CUDA shared parameters that PUB has stepped "
                "is not supported; call opt.backward(losses)"
            )
        if shared and self.umm == "adatask":
            raise RuntimeError(
                "umm='adatask' keeps per-task state for the shared parameters: call "
                "opt.backward(losses) before opt.step()"
            )
        if shared:
            if any(p.grad.is_sparse for p in shared):
                raise TypeError("PUB optimizers do not support sparse gradients")
            buf = self._grads.buffer
            row = buf[0]
            for p, off, n in zip(self._grads.params, self._grads.offsets, self._grads.numels):
                if p.grad is None:
                    row[off:off + n].zero_()
                else:
                    row[off:off + n].copy_(p.grad.reshape(-1))
            states, new_entries = self._prospective_states()
            for p, new in new_entries.items():
                self._commit_state(p, new)
            with_grad = {id(p) for p in shared}
            steps = {id(p): _float(states[id(p)]["step"]) for p in self._shared}
            segs = []
            for _, members, key in self._segments():
                members = [m for m in members if id(m[1]) in with_grad]
                if members:
                    segs.append((self._config(key, 1, 0, True), members, key))
            for cfg1, table, hyper in self._tables(segs, states, steps):
                _C.pub_apply(cfg1, table, hyper, buf.data_ptr(), np.ones(1), None)
            torch._foreach_add_([self.state[p]["step"] for p in shared], 1.0)
        self._base_step_without(self._shared)

    # ---- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict plus ``"pub"``: K, shared params (by index), step
        counter, α̂ in use, solver warm start and last solve stats."""
        self._read_device()
        sd = super().state_dict()
        index = {id(p): i for i, p in enumerate(self._all_params())}
        sd["pub"] = {
            "num_tasks": self._k,
            "shared": None if self._shared is None else [index[id(p)] for p in self._shared],
            "step": self._t,
            "task_weights": (None if self._weights is None
                             else torch.from_numpy(self._weights.copy())),
            "warm_start": None if self._warm is None else torch.from_numpy(self._warm.copy()),
            "umm": self.umm,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer (or of its torch base class).

        Raises ValueError, leaving the optimizer unchanged, when the number of tasks, the UMM or
        any state tensor's shape does not match.
        """
        pub = state_dict.get("pub")
        params = self._all_params()
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        k = None
        shared_idx: set[int] = set()
        if pub is not None:
            k = pub.get("num_tasks")
            if self._k is not None and k is not None and k != self._k:
                raise ValueError(
                    f"loaded state dict is for K = {k} tasks, this optimizer uses K = {self._k}"
                )
            if pub.get("umm") != self.umm:
                raise ValueError(
                    f"loaded state dict was saved with umm={pub.get('umm')!r}, this optimizer "
                    f"uses umm={self.umm!r}"
                )
            if pub.get("shared") is not None:
                shared_idx = set(pub["shared"])
                if any(not 0 <= i < len(params) for i in shared_idx):
                    raise ValueError("loaded state dict names shared parameters out of range")
            for name in ("task_weights", "warm_start"):
                v = pub.get(name)
                if v is not None and (k is None or tuple(v.shape) != (k,)):
                    raise ValueError(
                        f"loaded PUB {name} has shape {tuple(v.shape)}, expected ({k},)"
                    )
        # Shapes of every state entry, checked before anything is touched.
        id_map = {}
        for g_saved, g in zip(saved_groups, self.param_groups):
            if len(g_saved["params"]) != len(g["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size "
                    "of optimizer's group"
                )
            id_map.update(zip(g_saved["params"], g["params"]))
        index = {id(p): i for i, p in enumerate(params)}
        for key, st in state_dict.get("state", {}).items():
            p = id_map.get(key)
            if p is None:
                continue
            for name, v in st.items():
                if name == "step" or not isinstance(v, torch.Tensor):
                    continue
                expect = tuple(p.shape)
                if name.startswith("task_"):
                    if index[id(p)] not in shared_idx or k is None:
                        raise ValueError(f"loaded state entry {name!r} of a non-shared parameter")
                    expect = (k,) + expect
                if tuple(v.shape) != expect:
                    raise ValueError(
                        f"loaded state {name!r} of {self._param_name(p)} has shape "
                        f"{tuple(v.shape)}, expected {expect}"
                    )
        base = {k_: v for k_, v in state_dict.items() if k_ != "pub"}
        super().load_state_dict(base)
        # torch casts floating state to the parameter's dtype; PUB keeps float32 state for
        # 16-bit shared parameters, so take those entries again from the source.
        for key, st in state_dict.get("state", {}).items():
            p = id_map.get(key)
            if p is None or index[id(p)] not in shared_idx:
                continue
            if p.dtype in (torch.bfloat16, torch.float16):
                for name, v in st.items():
                    if name != "step" and isinstance(v, torch.Tensor) and v.is_floating_point():
                        self.state[p][name] = v.to(device=p.device, dtype=torch.float32).clone()
        self._reset_pub()
        if pub is not None:
            self._k = k
            self._t = int(pub.get("step", 0))
            if pub.get("shared") is not None:
                self._shared = [params[i] for i in sorted(shared_idx, key=lambda i: i)]
                order = {id(p): i for i, p in enumerate(params)}
                self._shared.sort(key=lambda p: order[id(p)])
                if self._k is not None:
                    self._grads = _autograd.TaskGradients(self._shared, self._k)
            for name, attr in (("task_weights", "_weights"), ("warm_start", "_warm")):
                v = pub.get(name)
                if v is not None:
                    setattr(self, attr, v.detach().cpu().double().numpy().copy())
