"""Checkpoints of a PUB optimizer: ``state_dict``/``load_state_dict`` in torch's format plus a
``"pub"`` entry, the full state gathered from the shards under sharded data parallelism, and
pickling/deepcopy of the PUB state.

A mixin of :class:`pub_native.optim._pub.PUBOptimizer`; it reads and resets the attributes that
class owns.
"""

from __future__ import annotations

import json
import math
import numbers
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from .._distributed import all_gather
from .._rollback import attributes_kept_on_error
from ._compile import register as register_for_compile
from ._plan import state_dtype

__all__ = ["Checkpoints"]


def _read_by_step(name, known: set) -> bool:
    """Whether a parameter's state entry ``name`` is one the step reads; ``known``: "step" and
    the rule's names under the group's options (AdaTask reads them as ``task_`` entries)."""
    if not isinstance(name, str):
        return False
    base = name.removeprefix("task_")
    return base in known and not (base == "step" and name != base)


def _state_steps(state: dict) -> float | None:
    """The sum of the parameters' "step" entries in an optimizer state dict's "state" (exact:
    they count steps), None where one is not a number."""
    steps = []
    for st in state.values():
        if isinstance(st, dict) and "step" in st:
            v = st["step"]
            try:
                v = float(v.item() if isinstance(v, torch.Tensor) else v)
            except (TypeError, ValueError, RuntimeError):
                return None
            steps.append(v)
    return math.fsum(steps)


class Checkpoints:
    """state_dict, load_state_dict and pickling of a PUB optimizer."""

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
            "unfit_pending": self._unfit_pending,
            "shared": self._shared,
            "t": self._t,
            "solved": self._solved,
            "weights": weights,
            "applied": self._current_applied(),
            "stats": self._stats,
            # (an error of a device step read back above, for the copy's next read too)
            "deferred_error": self._deferred_error,
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
        self._shared = pub.get("shared", None if self._grads is None else
                               list(self._grads.params))
        self._grad_views = pub["grad_views"]
        self._present = pub["present"]
        self._pending = pub["pending"]
        self._unfit_pending = pub.get("unfit_pending", False)
        self._t = pub["t"]
        self._solved = pub["solved"]
        self._seed_weights = pub["weights"]
        self._seed_applied = pub.get("applied")
        self._stats = pub["stats"]
        self._shard_state = pub["shards"]
        self._deferred_error = pub.get("deferred_error")

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state dict plus ``"pub"``: K, the shared params of the last
        backward and those decided shared (by index; a group added with ``"shared": True``
        since is balanced from the next backward), those not decided yet, the step counter,
        α̂ in use and whether a later step may reuse it, the solver warm start, the UMM and
        weight_norm."""
        self._read_device_result(raise_errors=False)
        # torch's state dict post-hooks run last, on the whole dict ("pub" included), as they
        # do on torch's own.
        post = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = OrderedDict()
        try:
            sd = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = post
        index = {id(p): i for i, p in enumerate(self._all_params())}
        for p, entries in self._gathered_shard_state().items():
            sd["state"].setdefault(index[id(p)], {}).update(entries)
        weights = self._current_weights() or (None, None)
        sd["pub"] = {
            "num_tasks": self._k,
            # Balanced by the last backward (AdaTask's per-task state is theirs).
            "shared": None if self._shared is None else [index[id(p)] for p in self._shared],
            # Decided shared: those, and those a param group's "shared" flag decided since (an
            # add_param_group after the last backward), balanced from the next backward on.
            "decided_shared": [i for p, i in index.items() if self._decided.get(p)],
            # Frozen at detection (so in no graph yet): decided once unfrozen, after a reload too.
            "undecided": [i for p, i in index.items() if p not in self._decided],
            "step": self._t,
            "task_weights": None if weights[0] is None else torch.from_numpy(
                np.array(weights[0], dtype=np.float64)),
            "warm_start": None if weights[1] is None else torch.from_numpy(
                np.array(weights[1], dtype=np.float64)),
            # False after a solve that lacked a task (its weight 0 is for that step only): the
            # next step solves again, whatever update_weights_every says.
            "weights_reusable": self._solved,
            "umm": self.options.umm,
            "weight_norm": self.options.weight_norm,
        }
        if sd["param_groups"]:
            # Carried in the first group too, for the tools that rebuild an optimizer's state
            # dict from its "state" and "param_groups" only, as torch.distributed.checkpoint's
            # get/set_optimizer_state_dict do. As one JSON string there: those tools fill the
            # dict of a new optimizer (K unknown, no weights) key by key, down to the elements
            # of lists, and take only what that dict has. With the parameters' shapes in their
            # order: those tools map the state by parameter name, and the entry's positions
            # must still name the same parameters; and with what the state held, so that a copy
            # a torch optimizer carried past steps of its own is known (_entry_carried_by_groups).
            copy = {**sd["pub"], "param_shapes": [_shape(p) for p in self._all_params()],
                    "state_steps": _state_steps(sd["state"])}
            for name in ("task_weights", "warm_start"):
                copy[name] = None if copy[name] is None else copy[name].tolist()
            sd["param_groups"][0]["pub"] = json.dumps(copy)
        for hook in post.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
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
            all_gather(recv.view(-1), send.view(-1), group=dp.group)
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

        As torch's ``load_state_dict``: the load-state-dict pre-hooks see (and may replace) the
        whole dict, ``"pub"`` included, what they leave is checked and loaded, and the post-hooks
        run once everything is restored. Raises ValueError or TypeError, leaving the optimizer
        unchanged, when the ``"pub"`` entry is malformed (a type, or a value such as non-finite
        or negative task weights) or the number of tasks, the UMM, the shared parameters (where
        this optimizer was given ``shared``: its ``shared`` argument and the ``"shared"`` flags
        of groups added since) or a state tensor's shape does not match, when a parameter's
        state (not empty: a parameter not stepped yet has none) lacks an entry the step reads,
        or its ``step`` is not one finite number >= 0; a load that torch's part refuses leaves
        it unchanged too. State of 16-bit parameters stays float32; state entries that the step
        does not read are kept as torch keeps them, and so is a group's ``"shared"`` flag that
        the loaded group lacks (a checkpoint of torch's optimizer), as torch keeps
        ``param_names``. The shared parameters are decided as the saved optimizer had decided
        them (the ``"shared"`` flag of a group added after its last ``backward`` included).

        Task gradients of a ``backward(losses)`` not yet stepped are kept, as torch keeps
        ``.grad``, where the loaded state dict balances the same parameters; otherwise the next
        ``step()`` raises (``zero_grad()`` and ``backward(losses)`` again start over).
        """
        state_dict = state_dict.copy()  # shallow, as torch's
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        state_dict = self._entry_carried_by_groups(state_dict)
        loaded = self._check_loaded(state_dict)
        # Loading replaces the optimizer's attributes (torch's part builds new state and
        # groups; _reset_pub new PUB attributes) and changes none in place: what was there
        # before is put back if any part raises, e.g. torch's own __setstate__ on a per-parameter
        # 'step' it cannot read.
        with attributes_kept_on_error(self):
            self._load_checked(state_dict, loaded)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _entry_carried_by_groups(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` (a shallow copy of its own) with the ``"pub"`` entry that a param group
        carries (a JSON string, state_dict) put back at the top where a tool left the top one
        out (as torch.distributed.checkpoint's get/set_optimizer_state_dict do), and the
        groups' copies removed (they are not options of the group). A copy that no longer
        describes the state (a torch optimizer loaded the checkpoint, stepped and saved it
        again: its "state_steps" differ) is dropped: the dict then loads as a checkpoint of
        torch's optimizer. Raises ValueError where the copy's parameters are not this
        optimizer's in the same order (its positions would name other parameters)."""
        groups = state_dict.get("param_groups")
        if not isinstance(groups, (list, tuple)):
            return state_dict
        carried = [g["pub"] for g in groups if isinstance(g, dict) and "pub" in g]
        if not carried:
            return state_dict
        state_dict["param_groups"] = [
            {k: v for k, v in g.items() if k != "pub"} if isinstance(g, dict) else g
            for g in groups]
        if "pub" in state_dict:
            return state_dict
        entry = carried[0]
        if isinstance(entry, str):
            try:
                entry = json.loads(entry)
            except ValueError:
                raise ValueError("loaded state dict's param_groups carry a 'pub' entry that is "
                                 "not the JSON that state_dict() writes") from None
        state = state_dict.get("state")
        if not (isinstance(entry, dict) and isinstance(state, dict)):
            state_dict["pub"] = entry  # refused by _checked_pub, naming it
            return state_dict
        if entry.get("state_steps") != _state_steps(state):
            return state_dict
        shapes = entry.get("param_shapes")
        mine = [_shape(p) for p in self._all_params()]
        # (None: a lazy module's parameter before its first forward, of any shape)
        differ = [i for i, (a, b) in enumerate(zip(shapes or [], mine))
                  if a is not None and b is not None and a != b]
        if shapes is not None and (len(shapes) != len(mine) or differ):
            at = differ[0] if differ else min(len(shapes), len(mine))
            raise ValueError(
                "loaded state dict's PUB entry (carried in its param groups) was saved for "
                f"{len(shapes)} parameters in another order or of other shapes than this "
                f"optimizer's {len(mine)} (the first difference at position {at}): its shared "
                "parameters are named by position. Build the optimizer's param groups in the "
                "order of the saved one")
        # The weights are lists there; a list that is not one of numbers is left for
        # _checked_pub to refuse.
        state_dict["pub"] = {**entry, **{
            name: torch.tensor(v, dtype=torch.float64)
            for name in ("task_weights", "warm_start")
            if isinstance(v := entry.get(name), (list, tuple)) and all(
                isinstance(x, numbers.Real) and not isinstance(x, bool) for x in v)}}
        return state_dict

    def _check_loaded(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Everything a state dict is checked for before any of it is loaded: its ``"pub"``
        entry (``_checked_pub``) and the state tensors that the step reads. Returns what the
        load needs of it."""
        params = self._all_params()
        if not isinstance(state_dict.get("state", {}), dict):
            raise TypeError(f"loaded state dict's 'state' is a "
                            f"{type(state_dict['state']).__name__}, expected a dict")
        saved_groups = state_dict.get("param_groups", [])
        if not isinstance(saved_groups, (list, tuple)) or not all(
                isinstance(g, dict) and isinstance(g.get("params"), (list, tuple))
                for g in saved_groups):
            raise TypeError("loaded state dict's 'param_groups' must be a list of dicts, each "
                            "with its 'params'")
        pub = self._checked_pub(state_dict.get("pub"), params)
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        id_map, known, needed = {}, {}, {}
        for g_saved, g in zip(saved_groups, self.param_groups):
            if len(g_saved["params"]) != len(g["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size "
                    "of optimizer's group")
            id_map.update(zip(g_saved["params"], g["params"]))
            # The entries the step reads under the loaded group's options (which replace the
            # group's; torch fills in the options a saved group lacks).
            names = {"step", *self._state_names({**g, **g_saved})}
            known.update((id(p), names) for p in g["params"])
            # Required: the entries of the rule without its options (Adam's amsgrad, RMSProp's
            # centered and momentum), whose entries a step makes from zero when the option is
            # turned on after the state exists, as a checkpoint taken then holds them.
            base = self._state_names({**g, **g_saved, "amsgrad": False, "centered": False,
                                      "momentum": 0.0})
            needed.update((id(p), base) for p in g["params"])
        index = {id(p): i for i, p in enumerate(params)}
        k = None if pub is None else pub["k"]
        shared_set = set((pub or {}).get("shared") or ())
        adatask = self.options.umm == "adatask"
        for key, st in state_dict.get("state", {}).items():
            p = id_map.get(key)
            if p is None:
                continue
            if not isinstance(st, dict):
                raise TypeError(f"loaded state of {self._param_name(p)} is of type "
                                f"{type(st).__name__}, expected a dict")
            # A parameter's state is empty until its first step; once there, the step reads
            # every entry of its rule, as torch's does (which raises KeyError at step() for a
            # missing one): a missing entry must not silently start again from its initial
            # value. (A missing 'step' is torch's load's KeyError.) Under AdaTask a shared
            # parameter's entry is per task, or the plain one that starts every task's copy.
            if len(st) and torch.nn.parameter.is_lazy(p):
                raise ValueError(
                    f"the checkpoint holds state for {self._param_name(p)}, a lazy module's "
                    "parameter that has no shape yet: run one forward, or load the model's state "
                    "dict, before loading the optimizer's")
            if len(st):
                for name in needed[id(p)]:
                    if name not in st and not (adatask and "task_" + name in st):
                        raise ValueError(
                            f"loaded state of {self._param_name(p)} lacks {name!r}, which the "
                            "step reads (it holds "
                            f"{', '.join(repr(n) for n in st) or 'nothing'})")
            for name, v in st.items():
                if not _read_by_step(name, known[id(p)]):
                    continue  # kept as torch keeps it
                if isinstance(v, torch.Tensor) and v.is_meta:
                    raise TypeError(f"loaded state {name!r} of {self._param_name(p)} is a meta "
                                    "tensor: it holds no values")
                if name == "step":
                    self._check_step(p, v)
                    continue
                if not isinstance(v, torch.Tensor):
                    raise TypeError(
                        f"loaded state {name!r} of {self._param_name(p)} is of type "
                        f"{type(v).__name__}, expected a tensor")
                expect = tuple(p.shape)
                if name.startswith("task_"):
                    if k is None:
                        raise ValueError(
                            f"loaded state {name!r} of {self._param_name(p)} is per task "
                            "(AdaTask), but the state dict has no \"pub\" entry to give K "
                            "and the shared parameters: load the whole dict that state_dict() "
                            "returned (a tool that rebuilt it from \"state\" and "
                            "\"param_groups\" and dropped the first group's \"pub\" entry "
                            "left it out)")
                    if index[id(p)] not in shared_set:
                        raise ValueError(
                            f"loaded state {name!r} of {self._param_name(p)} is per task "
                            "(AdaTask), but the checkpoint does not balance that parameter")
                    expect = (k,) + expect
                if tuple(v.shape) != expect:
                    raise ValueError(
                        f"loaded state {name!r} of {self._param_name(p)} has shape "
                        f"{tuple(v.shape)}, expected {expect}")
        return {"pub": pub, "id_map": id_map, "known": known}

    def _check_step(self, p, v) -> None:
        """A loaded per-parameter 'step': one finite number >= 0 (the step counts from it, and
        the bias corrections and AdaGrad's decayed learning rate are computed from it)."""
        if isinstance(v, torch.Tensor):
            if v.is_complex():
                raise TypeError(f"loaded state 'step' of {self._param_name(p)} is a {v.dtype} "
                                "tensor, expected one real number")
            if v.numel() != 1:
                raise ValueError(f"loaded state 'step' of {self._param_name(p)} has shape "
                                 f"{tuple(v.shape)}, expected one number")
            if v.layout != torch.strided:
                v = v.to_dense()
            elif (v.storage_offset() + 1) * v.element_size() > v.untyped_storage().nbytes():
                raise ValueError(f"loaded state 'step' of {self._param_name(p)} is not readable: "
                                 f"its storage ({v.untyped_storage().nbytes()} bytes) is smaller "
                                 "than its shape needs")
            value = v.detach().reshape(()).to(device="cpu", dtype=torch.float64).item()
        elif isinstance(v, numbers.Real):
            value = float(v)
        else:
            raise TypeError(
                f"loaded state 'step' of {self._param_name(p)} is {v!r} "
                f"({type(v).__name__}), expected a number or a tensor")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"loaded state 'step' of {self._param_name(p)} is {value}, "
                             "expected a finite number >= 0")

    def _checked_pub(self, pub, params: list) -> dict[str, Any] | None:
        """The ``"pub"`` entry of a loaded state dict, checked whole (types and values) against
        this optimizer; None where there is none (a state dict of torch's optimizer)."""
        if pub is None:
            return None
        if not isinstance(pub, dict):
            raise TypeError(f"loaded state dict's 'pub' entry is of type {type(pub).__name__}, "
                            "expected a dict")

        def count(name: str, default=None, least: int = 0):
            v = pub.get(name, default)
            if v is None and default is None:
                return None
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"loaded pub[{name!r}] is {v!r} ({type(v).__name__}), expected "
                                "an int")
            if v < least:
                raise ValueError(f"loaded pub[{name!r}] is {v}, expected at least {least}")
            return int(v)

        def indices(name: str) -> list[int] | None:
            v = pub.get(name)
            if v is None:
                return None
            if not isinstance(v, (list, tuple)):
                raise TypeError(f"loaded pub[{name!r}] is of type {type(v).__name__}, expected "
                                "a list of parameter indices")
            for i in v:
                if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                    raise TypeError(f"loaded pub[{name!r}] holds {i!r} ({type(i).__name__}), "
                                    "expected parameter indices (ints)")
                if not 0 <= i < len(params):
                    raise ValueError(f"loaded pub[{name!r}] names parameter {i}, out of range "
                                     f"for this optimizer's {len(params)} parameters")
            return sorted(set(int(i) for i in v))

        k = count("num_tasks", least=1)
        if self._k is not None and k is not None and k != self._k:
            raise ValueError(
                f"loaded state dict is for K = {k} tasks, this optimizer uses K = {self._k}")
        if pub.get("umm") != self.options.umm:
            raise ValueError(
                f"loaded state dict was saved with umm={pub.get('umm')!r}, this optimizer "
                f"uses umm={self.options.umm!r}")
        weight_norm = pub.get("weight_norm")  # absent from older checkpoints
        if weight_norm is not None and weight_norm != self.options.weight_norm:
            raise ValueError(
                f"loaded state dict was saved with weight_norm={weight_norm!r}, this optimizer "
                f"uses weight_norm={self.options.weight_norm!r}")
        step = count("step", default=0)
        shared = indices("shared")
        undecided = set(indices("undecided") or [])
        # The checkpoint's decision (shared or not) for each parameter it decided: those in
        # "decided_shared" are shared (in a checkpoint without it, older, those in "shared";
        # none where that is None either).
        decided_shared = indices("decided_shared")
        if decided_shared is None:
            decided_shared = shared
        decisions = None
        if decided_shared is not None:
            yes = set(decided_shared)
            decisions = {i: i in yes for i in range(len(params)) if i not in undecided}
        if decisions is not None and self._explicit_shared is not None:
            self._check_explicit_shared(params, decisions)
        weights = []
        for name in ("task_weights", "warm_start"):
            v = pub.get(name)
            if v is None:
                weights.append(None)
                continue
            if not isinstance(v, torch.Tensor) or v.is_meta or v.is_complex() \
                    or v.dtype == torch.bool:
                what = (f"a {v.dtype} tensor" if not v.is_meta else "a meta tensor") \
                    if isinstance(v, torch.Tensor) else f"of type {type(v).__name__}"
                raise TypeError(f"loaded pub[{name!r}] is {what}, expected a real tensor of "
                                "shape (K,)")
            if k is None or tuple(v.shape) != (k,):
                raise ValueError(
                    f"loaded pub[{name!r}] has shape {tuple(v.shape)}, expected ({k},) (K from "
                    "pub['num_tasks'])")
            w = v.detach().cpu().double().numpy().copy()
            # A step that reuses the weights applies them as they are: a NaN, an Inf or a
            # negative weight would be written into the parameters, and so would an overflow
            # of weights far from the sum of 1 (or 0: every task excluded) they are normalized
            # to with weight_norm="sum".
            if not (np.isfinite(w).all() and (w >= 0).all()):
                raise ValueError(f"loaded pub[{name!r}] is {w.tolist()}: the weights must be "
                                 "finite and >= 0")
            # (A tolerance that 16-bit copies of the weights keep.)
            if name == "task_weights" and self.options.weight_norm == "sum" \
                    and w.any() and abs(w.sum() - 1.0) > 1e-2:
                raise ValueError(f"loaded pub[{name!r}] is {w.tolist()}: with "
                                 "weight_norm='sum' the weights sum to 1 (or are all 0)")
            weights.append(w)
        reusable = pub.get("weights_reusable", True)  # absent from older checkpoints
        if not isinstance(reusable, (bool, np.bool_)):
            raise TypeError(f"loaded pub['weights_reusable'] is {reusable!r} "
                            f"({type(reusable).__name__}), expected a bool")
        reusable = bool(reusable)
        return {"k": k, "step": step, "shared": shared, "decisions": decisions,
                "weights": tuple(weights), "weights_reusable": reusable}

    def _load_checked(self, state_dict: dict[str, Any], loaded: dict[str, Any]) -> None:
        """Loads a state dict that ``_check_loaded`` found right (torch's part without its
        hooks, which ``load_state_dict`` runs itself)."""
        pre, post = (self._optimizer_load_state_dict_pre_hooks,
                     self._optimizer_load_state_dict_post_hooks)
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        before = self.param_groups
        try:
            super().load_state_dict({k_: v for k_, v in state_dict.items() if k_ != "pub"})
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre
            self._optimizer_load_state_dict_post_hooks = post
        # torch's load puts the saved groups in place of the optimizer's (new dicts). A group's
        # "shared" flag that the saved group lacks (a checkpoint of torch's optimizer) stays, as
        # torch keeps the "param_names" a saved group lacks.
        for old, saved, group in zip(before, state_dict["param_groups"], self.param_groups):
            if "shared" in old and "shared" not in saved:
                group["shared"] = old["shared"]
        id_map, known = loaded["id_map"], loaded["known"]
        # torch keeps the loaded tensors themselves where no cast is needed, and casts floating
        # state to the parameter's dtype. The kernels write state in place and keep float32
        # state for 16-bit parameters: own a copy of every entry they read (loading one state
        # dict into two optimizers must not couple them), taking 16-bit parameters' entries
        # again from the source in float32.
        for key, st in state_dict.get("state", {}).items():
            p = id_map.get(key)
            if p is None:
                continue
            mine = self.state[p]
            for name, v in st.items():
                if not isinstance(v, torch.Tensor) or not _read_by_step(name, known[id(p)]):
                    continue
                if (name != "step" and v.is_floating_point()
                        and p.dtype in (torch.bfloat16, torch.float16)):
                    mine[name] = v.detach().to(device=p.device, dtype=torch.float32).clone()
                elif mine.get(name) is v:
                    mine[name] = v.detach().clone()  # (a leaf: copy.deepcopy takes no other)
        params = self._all_params()
        pub = loaded["pub"]
        grads, views, present, decided = (self._grads, self._grad_views, self._present,
                                          self._decided)
        pending, unfit = self._pending, self._unfit_pending
        keep = (self._explicit_shared, self.options, self.backend, self._dp, self._dp_resolved)
        self._reset_pub()
        (self._explicit_shared, self.options, self.backend, self._dp,
         self._dp_resolved) = keep
        decisions = None
        if pub is not None:
            self._k = pub["k"]
            self._t = pub["step"]
            decisions = pub["decisions"]
            # Every decision the saved optimizer had made, a param group's "shared" flag's
            # included (add_param_group decides at once; the next backward balances them).
            for i, shared in (decisions or {}).items():
                self._decided[id(params[i])] = shared
            if pub["shared"] is not None:
                shared_set = set(pub["shared"])
                # The parameters its last backward balanced, as the saved optimizer had them (a
                # plain step refuses them under AdaTask, whose state for them is per task).
                self._shared = [p for i, p in enumerate(params)
                                if i in shared_set and self._decided.get(id(p))]
            self._solved = pub["weights"][0] is not None and pub["weights_reusable"]
            self._seed_weights = pub["weights"]
        if not pending:
            # Task gradients an earlier load found unfit stay unfit (they were not kept).
            self._unfit_pending = unfit
            return
        # backward(losses) ran before this load: its task gradients stay for the next step
        # where they fit what was loaded (the same K, and the checkpoint decided every parameter
        # it decided as this optimizer did; this optimizer's decisions stay for the others), as
        # torch keeps .grad.
        if decisions is None or all(shared == decided.get(id(params[i]), False)
                                    for i, shared in decisions.items()):
            self._decided = {**decided, **self._decided}
            self._k = grads.k
            self._shared = list(grads.params)
            self._grads, self._grad_views, self._present = grads, views, present
            self._pending = True
        else:
            self._unfit_pending = True

    def _check_explicit_shared(self, params: list, decisions: dict[int, bool]) -> None:
        """Raises where a checkpoint decided a parameter otherwise than this optimizer, which
        was given ``shared``, does (its ``shared`` argument, or a param group's ``"shared"`` flag
        that ``add_param_group`` applied): loading it would silently balance the checkpoint's
        set. ``decisions``: the checkpoint's, by parameter index (those it decided)."""
        explicit = {id(p) for p in self._explicit_shared}
        mine = [self._decided.get(id(p), id(p) in explicit) for p in params]
        only_saved = [i for i, shared in decisions.items() if shared and not mine[i]]
        only_mine = [i for i, shared in decisions.items() if not shared and mine[i]]
        if not only_saved and not only_mine:
            return
        # Decided otherwise than shared= says: by a param-group flag (add_param_group).
        flagged = any(m != (id(p) in explicit) for p, m in zip(params, mine))
        whose = ("this optimizer's shared= argument and param-group 'shared' flags name"
                 if flagged else "the shared= argument of this optimizer names")
        parts = []
        for which, what in ((only_saved, ("shared in the checkpoint but not here" if flagged
                                          else "shared in the checkpoint but not in shared=")),
                            (only_mine, ("shared here but not in the checkpoint" if flagged
                                         else "in shared= but not shared in the checkpoint"))):
            names = [self._param_name(params[i]) for i in which]
            if names:
                parts.append(f"{what}: {', '.join(names[:3])}"
                             + (f" and {len(names) - 3} more" if len(names) > 3 else ""))
        raise ValueError(
            f"loaded state dict balances {sum(decisions.values())} shared parameter(s), "
            f"{whose} {sum(mine)} ({'; '.join(parts)}): build the optimizer with the "
            "checkpoint's shared parameters, or without shared= to take them from the "
            "checkpoint")


def _shape(p: torch.Tensor) -> list[int] | None:
    """p's shape as a list, or None for a lazy module's parameter before its first forward."""
    return None if torch.nn.parameter.is_lazy(p) else list(p.shape)
