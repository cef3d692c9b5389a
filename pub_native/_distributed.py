"""Data parallelism (SPEC section 10), the parts the PUB optimizers and the gradient balancers
share (Python layer): which process group a model's parameters are replicated over, and the
set-ups that cannot be kept exact, refused with an error that names the supported ones.

``torch.autograd.grad`` — how per-task gradients are taken — bypasses the gradient
synchronization of ``DistributedDataParallel``, so PUB and the balancers reduce the per-task
gradients themselves over the DDP module's process group.
"""

from __future__ import annotations

import gc

import torch

__all__ = ["SUPPORTED", "average_gradients", "data_parallel_group", "is_distributed"]

SUPPORTED = (
    "supported: a model wrapped in torch.nn.parallel.DistributedDataParallel (pass "
    "ddp_model.parameters()), or a single process; with process_group=<group> the parameters "
    "are taken as replicated over that group without a DDP wrapper, with process_group=None "
    "every process trains on its own")


def is_distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


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
    over processes without a DDP wrapper raise, naming the supported set-ups.
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
        return process_group, None
    if torch.distributed.get_world_size() == 1:
        return None, None
    ids = {id(p) for p in params}
    holders = ddp_holders(ids)
    if len(holders) > 1:
        raise NotImplementedError(
            f"the parameters belong to {len(holders)} DistributedDataParallel modules; "
            f"{SUPPORTED}")
    if holders:
        ddp, mine = holders[0]
        if not ids <= mine:
            raise NotImplementedError(
                "some parameters are inside a DistributedDataParallel module and some are not: "
                f"PUB cannot tell how the others are replicated; {SUPPORTED}")
        return ddp.process_group, ddp
    if _replicated(params):
        raise RuntimeError(
            f"torch.distributed is initialized with {torch.distributed.get_world_size()} "
            "processes and the parameters are identical on all of them, but they are not "
            "wrapped in DistributedDataParallel: PUB would balance each process's local "
            f"gradients and the replicas would drift apart; {SUPPORTED}")
    return None, None


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
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend(group) == "nccl" else torch.device("cpu")

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
    """Whether the parameters hold the same values on every process (one all-reduce)."""
    if not params:
        return False
    with torch.no_grad():
        sums = torch.stack([p.detach().double().sum() for p in params]).cpu()
        both = torch.cat([sums, -sums])
        if torch.distributed.get_backend() == "nccl":
            both = both.cuda()
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
        both = both.cpu()
    return bool(torch.equal(both[:len(sums)], sums) and torch.equal(-both[len(sums):], sums))


def average_gradients(params: list[torch.Tensor], group, extra: list[float] | None = None
                      ) -> list[float]:
    """Average ``p.grad`` over the processes of ``group`` for every p, in one all-reduce per
    dtype, with a presence flag per parameter: a parameter with a gradient on some process gets
    the average (zeros where it had none), one with a gradient on none keeps None. ``extra``
    (numbers) are summed over the processes in the same flags' all-reduce and returned.
    Returns the summed extras. The bytes sent, by the ring model, are added to
    ``average_gradients.bytes_sent``."""
    dist = torch.distributed
    world = dist.get_world_size(group)
    extra = list(extra or [])
    flags = torch.tensor(extra + [float(p.grad is not None) for p in params],
                         dtype=torch.float64)
    device = params[0].device if params else torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        flags = flags.to(device)
    ring = 2 * (world - 1) / world
    average_gradients.bytes_sent += ring * flags.numel() * 8
    dist.all_reduce(flags, group=group)
    flags = flags.cpu()
    n_extra = len(extra)
    present = {id(p): bool(flags[n_extra + j] > 0) for j, p in enumerate(params)}
    by_dtype: dict = {}
    for p in params:
        if present[id(p)]:
            by_dtype.setdefault(p.dtype, []).append(p)
    for group_params in by_dtype.values():
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in group_params]).div_(world)
        average_gradients.bytes_sent += ring * flat.numel() * flat.element_size()
        dist.all_reduce(flat, group=group)
        offset = 0
        for p in group_params:
            n = p.numel()
            values = flat[offset:offset + n].view_as(p)
            if p.grad is None:
                p.grad = values.clone(memory_format=torch.preserve_format)
            else:
                p.grad.copy_(values)
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
