"""Checkpoints of a PUB optimizer: ``state_dict``/``load_state_dict`` in torch's format plus a
``"pub"`` entry, the full state gathered from the shards under sharded data parallelism, and
pickling/deepcopy of the PUB state.

A mixin of :class:`pub_native.optim._pub.PUBOptimizer`; it reads and resets the attributes that
class owns.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._distributed import all_gather
from ._compile import register as register_for_compile
from ._plan import state_dtype

__all__ = ["Checkpoints"]


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
            # Frozen at detection (so in no graph yet): decided once unfrozen, after a reload too.
            "undecided": [i for p, i in index.items() if p not in self._decided],
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

        Raises ValueError, leaving the optimizer unchanged, when the number of tasks, the UMM,
        the shared parameters (where this optimizer was given ``shared``) or any state tensor's
        shape does not match. State of 16-bit parameters stays float32.
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
                if self._explicit_shared is not None:
                    self._check_explicit_shared(params, shared_idx)
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
                if isinstance(v, torch.Tensor) and v.is_meta:
                    raise TypeError(f"loaded state {name!r} of {self._param_name(p)} is a meta "
                                    "tensor: it holds no values")
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
            undecided = {i for i in pub.get("undecided") or () if isinstance(i, int)}
            for i, p in enumerate(params):
                if i not in undecided:
                    self._decided[id(p)] = i in shared_set
        weights = tuple(None if pub.get(n) is None
                        else pub[n].detach().cpu().double().numpy().copy()
                        for n in ("task_weights", "warm_start"))
        self._solved = weights[0] is not None
        self._seed_weights = weights

    def _check_explicit_shared(self, params: list, shared_idx: list[int]) -> None:
        """Raises where a checkpoint balanced other parameters than the ``shared`` argument of
        this optimizer names: loading it would silently balance the checkpoint's set."""
        index = {id(p): i for i, p in enumerate(params)}
        mine = set(index[id(p)] for p in self._explicit_shared)
        if mine == set(shared_idx):
            return
        only_saved = [self._param_name(params[i]) for i in sorted(set(shared_idx) - mine)]
        only_mine = [self._param_name(params[i]) for i in sorted(mine - set(shared_idx))]
        parts = []
        if only_saved:
            parts.append(f"shared in the checkpoint but not in shared=: {', '.join(only_saved[:3])}"
                         + (f" and {len(only_saved) - 3} more" if len(only_saved) > 3 else ""))
        if only_mine:
            parts.append(f"in shared= but not shared in the checkpoint: {', '.join(only_mine[:3])}"
                         + (f" and {len(only_mine) - 3} more" if len(only_mine) > 3 else ""))
        raise ValueError(
            f"loaded state dict balances {len(shared_idx)} shared parameter(s), the shared= "
            f"argument of this optimizer names {len(mine)} ({'; '.join(parts)}): build the "
            "optimizer with the checkpoint's shared parameters, or without shared= to take them "
            "from the checkpoint")
