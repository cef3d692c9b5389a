"""Data parallelism (SPEC section 10), the parts the PUB optimizers and the gradient balancers
share (Python layer): which process group a model's parameters are replicated over, and the
set-ups that cannot be kept exact, refused with an error that names the supported ones.

``torch.autograd.grad`` — how per-task gradients are taken — bypasses the gradient
synchronization of ``DistributedDataParallel``, so PUB and the balancers reduce the per-task
gradients themselves over the DDP module's process group.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import warnings
import weakref

import torch

from ._caller import user_stacklevel

__all__ = ["SUPPORTED", "DDPRef", "average_gradients", "data_parallel_group",
           "differs_between_processes", "is_distributed", "own_averaging_checks"]

SUPPORTED = (
    "supported: a model wrapped in torch.nn.parallel.DistributedDataParallel (pass "
    "ddp_model.parameters()), or a single process; with process_group=<group> the parameters "
    "are taken as replicated over that group without a DDP wrapper, with process_group=None "
    "every process trains on its own")


def is_distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def checked_process_group(value):
    """``value`` of a ``process_group`` argument: ``"auto"``, None or a torch.distributed
    process group; anything else is a TypeError naming the argument at construction (it was
    accepted there and failed at the first call, with a message about torch.distributed)."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    group_type = getattr(torch.distributed, "ProcessGroup", None)
    if group_type is None or not isinstance(value, group_type):
        raise TypeError(f"process_group must be 'auto', None or a torch.distributed process "
                        f"group, got {value!r}")
    return value


def _is_sharded_parameter(p: torch.Tensor) -> bool:
    if getattr(p, "_is_flat_param", False):  # FSDP (version 1)
        return True
    try:
        from torch.distributed.tensor import DTensor  # FSDP2, tensor parallelism
    except ImportError:  # pragma: no cover - older torch
        return False
    return isinstance(p, DTensor)


def data_parallel_group(params: list[torch.Tensor], process_group="auto"):
    """(group, ddp): the process group over which ``params`` are replicated and their gradients
    must be averaged, or None (one process, or processes that train on their own), and the
    DistributedDataParallel module that holds them, if any (its ``no_sync`` state matters).

    ``process_group``: ``"auto"`` finds the DistributedDataParallel module that holds the
    parameters; ``None`` means no data parallelism; a group is taken as given. With ``"auto"``,
    parameters that are sharded (FSDP, DTensor), split over several DDP modules, or replicated
    over processes without a DDP wrapper raise, naming the supported set-ups. With a DDP module
    or a given group, the processes check that they hold the same parameters (one fixed-size
    all-reduce, :func:`_check_same_parameters`): an optimizer inside ZeroRedundancyOptimizer,
    which holds each process's own partition, raises on every process.
    """
    if process_group is None:
        return None, None
    if not is_distributed():
        if process_group != "auto":
            raise RuntimeError("process_group was given but torch.distributed is not initialized")
        return None, None
    for p in params:
        if _is_sharded_parameter(p):
            raise NotImplementedError(
                f"a parameter of shape {tuple(p.shape)} is sharded (FSDP or DTensor): PUB keeps "
                f"per-task gradients exact under data parallelism only with whole parameters; "
                f"{SUPPORTED}")
    if process_group != "auto":
        _check_same_parameters(process_group, params, None)
        return process_group, None
    if torch.distributed.get_world_size() == 1:
        return None, None
    ids = {id(p) for p in params}
    holders = ddp_holders(ids)
    if len(holders) > 1:
        raise NotImplementedError(several_holders(len(holders)))
    if holders:
        ddp, mine = holders[0]
        positions = {id(p): j for j, p in enumerate(ddp.module.parameters())}
        if not ids <= mine:
            # The others' check is joined first, so that they raise too instead of waiting in
            # it (this process's fingerprint differs from theirs unless they hold the same).
            with contextlib.suppress(NotImplementedError):
                _check_same_parameters(ddp.process_group, params, positions)
            raise NotImplementedError(
                "some parameters are inside a DistributedDataParallel module and some are not: "
                f"PUB cannot tell how the others are replicated; {SUPPORTED}")
        _check_same_parameters(ddp.process_group, params, positions)
        return ddp.process_group, ddp
    if _replicated(params):
        raise RuntimeError(
            f"torch.distributed is initialized with {torch.distributed.get_world_size()} "
            "processes and the parameters are identical on all of them, but they are not "
            "wrapped in DistributedDataParallel: PUB would balance each process's local "
            f"gradients and the replicas would drift apart; {SUPPORTED}")
    return None, None


def own_averaging_checks(ddp, params: list[torch.Tensor], owner: str) -> None:
    """For a method that averages the gradients of ``params`` itself (the per-task ones, taken
    with ``autograd.grad``, which DDP's reducer does not see) inside the DistributedDataParallel
    module ``ddp``: raises where DDP was told to leave one of them alone
    (``_set_params_and_buffers_to_ignore_for_model``: its gradient stays each process's own,
    which the method's average would mix), and warns where a communication hook is registered
    (``register_comm_hook``: compression, PowerSGD), which the method's own average does not
    run."""
    ignored = set(getattr(ddp, "parameters_to_ignore", None) or ())
    if ignored:
        ids = {id(p) for p in params}
        names = [n for n, p in ddp.module.named_parameters() if n in ignored and id(p) in ids]
        if names:
            raise NotImplementedError(
                f"DistributedDataParallel was told to ignore parameter(s) {names[:5]} (their "
                f"gradients stay each process's own), but {owner} averages the gradients it "
                "takes over the processes itself: give those parameters to another optimizer")
    try:
        hook = ddp._get_ddp_logging_data().get("comm_hook")
    except Exception:  # (a private API: if torch drops it, its Python list of hooks)
        hooks = getattr(ddp, "_comm_hooks", None) or []
        hook = hooks[0][0].__qualname__ if hooks else None
    if hook:
        warnings.warn(
            f"the DistributedDataParallel module has a communication hook ({hook}), which "
            f"{owner} does not run: it averages the gradients it takes itself, exactly, over "
            "the module's process group (DDP's hook applies only to the gradients DDP's own "
            "backward reduces)", stacklevel=user_stacklevel())


class DDPRef:
    """A weak reference to the DistributedDataParallel module that holds some parameters (the
    model is not kept alive by it), for its ``join()`` and ``no_sync()`` states. A model wrapped
    again (after unfreezing a parameter, as DDP asks) is found at the next call once the
    earlier wrapper is gone (while it lives, its states are the ones read); a wrapper found so
    passes ``checks`` (a callable taking it), as does one whose communication hooks changed."""

    def __init__(self, ddp, params: list[torch.Tensor], checks=None):
        self._ids = {id(p) for p in params}
        self._checks = checks
        self._watch(ddp)

    def _watch(self, ddp) -> None:
        self._ref = None if ddp is None else weakref.ref(ddp)
        self._hooks = _hook_count(ddp)

    def __call__(self):
        if self._ref is None:
            return None
        ddp = self._ref()
        if ddp is None:
            holders = ddp_holders(self._ids)  # (a walk of every object: once, not per call)
            ddp = holders[0][0] if len(holders) == 1 else None
            self._watch(ddp)
            if ddp is not None and self._checks is not None:
                self._checks(ddp)
        return ddp

    def refresh(self):
        """Once per backward call: the wrapper in use (see the class), or None."""
        ddp = self()
        if ddp is not None and _hook_count(ddp) != self._hooks:  # a hook registered since
            self._hooks = _hook_count(ddp)
            if self._checks is not None:
                self._checks(ddp)
        return ddp


def _hook_count(ddp) -> int:
    """How many Python communication hooks ``ddp`` (or None) has."""
    return len(getattr(ddp, "_comm_hooks", None) or ()) if ddp is not None else 0


def several_holders(n: int) -> str:
    """The error for parameters that ``n`` > 1 DistributedDataParallel modules hold."""
    return (f"the parameters belong to {n} DistributedDataParallel modules (a model wrapped "
            "again while the earlier wrapper is still referenced counts twice: drop that "
            f"reference); {SUPPORTED}")


def refuse_join(ddp) -> None:
    """Raises where ``ddp`` (a DistributedDataParallel module, or None) is inside torch's Join
    context for uneven inputs (``ddp.join()``, ``torch.distributed.algorithms.Join``): a
    process that has run out of batches shadows DDP's own all-reduce only, not the collectives
    PUB takes itself, so the others would wait in them or gloo would abort the interpreter."""
    config = getattr(ddp, "_join_config", None)
    if config is not None and getattr(config, "enable", False):
        raise NotImplementedError(
            "DistributedDataParallel's join() (torch.distributed.algorithms.Join, for uneven "
            "inputs) is not supported: a process that has joined stands in for DDP's own "
            "all-reduce only, not for the collectives that pub_native takes itself (for each "
            "task's gradient or loss values). "
            "Give every process the same number of batches (DistributedSampler with "
            "drop_last=True, or stop every process when one runs out)")


def _collective_device(group) -> torch.device:
    """Where a small tensor for a collective over ``group`` must live (NCCL: this process's
    CUDA device)."""
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _fingerprint(key) -> list[int]:
    """``key`` (a sequence of ints, tuples and strings) hashed into two non-negative 62-bit
    ints, the same in every process: hashlib, not hash(), whose string hashes are salted per
    process; 62 bits, so that their negation cannot overflow an int64."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=16).digest()
    return [int.from_bytes(digest[i:i + 8], "little") >> 2 for i in (0, 8)]


def differs_between_processes(group, key) -> int | None:
    """None where ``key`` (as in :func:`_fingerprint`) is the same on every process of
    ``group``; else one 62-bit int, the same on every process (the highest fingerprint):
    one fixed-size all-reduce."""
    dist = torch.distributed
    mine = _fingerprint(key)[0]
    t = torch.tensor([mine, -mine], dtype=torch.int64).to(_collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    highest, lowest = (int(v) for v in t.cpu().tolist())
    return None if highest == -lowest else highest


def _check_same_parameters(group, params: list[torch.Tensor], positions: dict | None) -> None:
    """That every process of ``group`` holds the same parameters, in the same order: one
    fixed-size all-reduce, once, at set-up, before any collective whose sizes follow the
    parameters (mismatched sizes make gloo abort the interpreter, and equal sizes of different
    parameters would average unrelated gradients). The parameters are compared by a
    fingerprint of their positions in the DistributedDataParallel module's parameter list
    (``positions``, id → position; None without a DDP module) with their shapes and dtypes.
    A difference is an error on every process: each compares the same maxima and minima."""
    dist = torch.distributed
    key = [(-1 if positions is None else positions.get(id(p), -2), tuple(p.shape), str(p.dtype))
           for p in params]
    mine = [len(params), *_fingerprint(key)]
    t = torch.tensor(mine + [-x for x in mine], dtype=torch.int64)
    t = t.to(_collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    t = t.cpu().tolist()
    n = len(mine)
    highest, lowest = t[:n], [-x for x in t[n:]]
    if highest == lowest:
        return
    counts = (f"this process holds {len(params)}" if highest[0] == lowest[0] else
              f"the processes hold between {lowest[0]} and {highest[0]}, this one "
              f"{len(params)}")
    if positions is not None:
        raise NotImplementedError(
            "the processes' optimizers (or balancers) hold different parameters of the "
            f"DistributedDataParallel module ({counts} of its {len(positions)}), as "
            "torch.distributed.optim.ZeroRedundancyOptimizer makes them (each process's "
            "optimizer gets its own partition of the parameters): PUB averages each task's "
            "gradient of every parameter it holds over the processes, so every process must "
            "hold the same ones. Give PUB the whole model's parameters on every process, "
            "without ZeroRedundancyOptimizer: pub_native.Adam(ddp_model.parameters()) already "
            "shards its optimizer state over the processes (shard_state=True, the default); "
            "or give every process the same subset, in the same order")
    raise ValueError(
        f"the processes of process_group hold different parameters ({counts}; their number, "
        "order, shapes or dtypes differ), as an optimizer wrapped in "
        "torch.distributed.optim.ZeroRedundancyOptimizer makes them: process_group=<group> "
        "takes the parameters as replicated over the group, so every process must build the "
        "same model and give the same parameters, in the same order (or process_group=None "
        "where every process trains a model of its own)")


def agree_on(group, k: int, flags: list[bool], failed: bool = False,
             trainable: list[bool] | None = None) -> list[bool]:
    """What the processes of ``group`` decided from their own batches, made one decision: the
    same task count K on every process (else a ValueError on every process, not a hang in a
    later collective), and each flag set where any process set it: two small all-reduces, the
    sizes first. ``failed``: this process could not decide from its batch (it raises its own
    error after this call); every process then raises a ValueError instead of waiting for it.
    ``trainable``: requires_grad of each parameter; one that is frozen on some processes only
    is a ValueError on every process (their gradient buffers would differ in size: gloo
    aborts the interpreter, and the replicas' states drift apart)."""
    dist = torch.distributed
    device = _collective_device(group)

    def reduce_max(values: list[float]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.float64).to(device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
        return t.cpu()

    # First the sizes (a fixed-size call): the flags' call must have one size everywhere.
    # Each trainable flag goes twice, set and negated: a maximum of both means they differ.
    trainable = [] if trainable is None else [bool(t) for t in trainable]
    flags = [bool(f) for f in flags] + trainable + [not t for t in trainable]
    n = len(flags)
    sizes = reduce_max([k, -k, n, -n, float(failed)])
    if sizes[4] > 0:
        raise ValueError("backward(losses) failed on another process, which raised its own "
                         "error (its batch lacked a task whose loss the shared parameters must "
                         "be detected from, for example: pass shared= or param-group 'shared' "
                         "flags); every process stops here instead of waiting for it")
    if sizes[0] != -sizes[1]:
        other = int(sizes[0]) if sizes[0] != k else int(-sizes[1])
        raise ValueError(f"losses: this process has {k} tasks, another {other}; every process "
                         "must pass the same number of losses")
    if sizes[2] != -sizes[3]:
        raise ValueError("the processes hold different numbers of parameters; every process "
                         "must build the same model and optimizer")
    if not n:
        return []
    agreed = [bool(x > 0) for x in reduce_max([float(x) for x in flags])]
    m = len(trainable)
    start = n - 2 * m
    mixed = [j for j in range(m) if agreed[start + j] and agreed[start + m + j]]
    if mixed:
        raise ValueError(f"parameter {mixed[0]} (of {m}, in the order given) requires grad on "
                         "some processes and not on others: freeze or unfreeze parameters on "
                         "every process alike")
    return agreed[:start]


def ddp_holders(ids: set[int]) -> list:
    """(module, ids of its parameters) of every DistributedDataParallel module that holds a
    parameter whose id is in ``ids``."""
    holders = []
    ddp_type = torch.nn.parallel.DistributedDataParallel
    for obj in gc.get_objects():
        # type(obj), not isinstance: isinstance also reads obj.__class__, which some module
        # objects answer with a deprecation warning.
        if issubclass(type(obj), ddp_type):
            mine = {id(p) for p in obj.module.parameters()}
            if ids & mine:
                holders.append((obj, mine))
    return holders


def _replicated(params: list[torch.Tensor]) -> bool:
    """Whether the parameters hold the same values on every process: one all-reduce of a fixed
    size, a fingerprint of their shapes, dtypes and sums, as processes that train models of
    their own may hold different numbers of parameters (an all-reduce of the sums themselves
    would then pair different sizes: gloo aborts the interpreter)."""
    dist = torch.distributed
    with torch.no_grad():
        sums = [p.detach().double().sum() for p in params]
        sums = torch.stack(sums).cpu().tolist() if sums else []
    key = [(tuple(p.shape), str(p.dtype), s) for p, s in zip(params, sums)]
    # The size of _check_same_parameters' all-reduce: a process that takes that check while
    # another takes this one (a DDP module on one process only) pairs equal sizes (mismatched
    # ones make gloo abort the interpreter) and sees a difference.
    mine = [len(params), *_fingerprint(key)]
    both = torch.tensor(mine + [-x for x in mine], dtype=torch.int64)
    both = both.to(_collective_device(None))
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    both = both.cpu().tolist()
    n = len(mine)
    return bool(params) and both[:n] == mine and [-x for x in both[n:]] == mine


def average_gradients(params: list[torch.Tensor], group, extra: list[float] | None = None,
                      grads: list | None = None) -> list[float]:
    """Average ``p.grad`` over the processes of ``group`` for every p, in one all-reduce per
    dtype, with a presence flag per parameter: a parameter with a gradient on some process gets
    the average (zeros where it had none), one with a gradient on none keeps None. ``extra``
    (numbers) are summed over the processes in the same flags' all-reduce and returned.
    ``grads``: gradients (or None) of params' shapes and dtypes to average in place of their
    ``.grad``, the results written back into the list. Returns the summed extras. The bytes
    sent, by the ring model, are added to ``average_gradients.bytes_sent``."""
    dist = torch.distributed
    world = dist.get_world_size(group)
    extra = list(extra or [])
    own = grads is None
    if own:
        grads = [p.grad for p in params]
    # Per gradient, how many processes hold one, and how many a dense one: the average is
    # sparse where every gradient given was (nn.Embedding(sparse=True)), else dense, as
    # AccumulateGrad's sum of a sparse and a dense gradient is.
    flags = torch.tensor(extra + [float(g is not None) for g in grads]
                         + [float(g is not None and not g.is_sparse) for g in grads],
                         dtype=torch.float64)
    device = params[0].device if params else torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        flags = flags.to(device)
    ring = 2 * (world - 1) / world
    average_gradients.bytes_sent += ring * flags.numel() * 8
    dist.all_reduce(flags, group=group)
    flags = flags.cpu()
    n_extra = len(extra)
    by_dtype: dict = {}
    for j, p in enumerate(params):
        if flags[n_extra + j] > 0:
            by_dtype.setdefault(p.dtype, []).append(j)
    for slots in by_dtype.values():
        # (A sparse gradient travels dense: another process's rows are not this one's.)
        flat = torch.cat([(torch.zeros_like(params[j]) if grads[j] is None else
                           grads[j].to_dense() if grads[j].is_sparse else grads[j]).reshape(-1)
                          for j in slots]).div_(world)
        average_gradients.bytes_sent += ring * flat.numel() * flat.element_size()
        dist.all_reduce(flat, group=group)
        offset = 0
        for j in slots:
            p = params[j]
            n = p.numel()
            values = flat[offset:offset + n].view_as(p)
            dense = flags[n_extra + len(params) + j] > 0
            if grads[j] is None or grads[j].is_sparse or not dense:
                grads[j] = values.clone(memory_format=torch.preserve_format) if dense else \
                    values.to_sparse(sparse_dim=min(1, p.dim()))
                if own:
                    p.grad = grads[j]
            else:
                grads[j].copy_(values)
            offset += n
    return flags[:n_extra].tolist()


average_gradients.bytes_sent = 0.0


def reduce_scatter(output, input, *, group, async_op=False):
    """``reduce_scatter_single`` where torch has it (it deprecates ``reduce_scatter_tensor``,
    the name of torch < 2.13), with a sum."""
    import torch.distributed as dist

    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return fn(output, input, group=group, async_op=async_op)


def all_gather(output, input, *, group, async_op=False):
    """``all_gather_single`` where torch has it, else ``all_gather_into_tensor``."""
    import torch.distributed as dist

    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(output, input, group=group, async_op=async_op)
