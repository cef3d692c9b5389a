"""The step plan (Python layer): which tensors the next step touches, each checked against the
dtype, device, layout and size the kernels will read, and the int64 tables of their addresses.

This is the only place where tensors become raw pointers. A parameter's state is made to match
what the kernels read (float32 for 16-bit parameters, the parameter's device and memory order,
a float32 step counter); entries that are missing or do not match are built *prospectively*:
they become the optimizer's state only when the step is applied, so a step that raises or is
skipped leaves the state as it was.
"""

from __future__ import annotations

import functools
import math
import numbers
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._autograd import DTYPES, dense_strides, not_dense, same_layout
from .._native import Algorithm, BaseCol, SegmentKind, TableCol, Umm

__all__ = ["DTYPES", "PlanSegment", "StepPlan", "build_plan", "check_param", "mark_written",
           "state_dtype"]

_HALF = (torch.bfloat16, torch.float16)
_N_COLS = int(TableCol.COLS)


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype of the state the kernels keep for p: float32 for 16-bit parameters."""
    return torch.float32 if p.dtype in _HALF else p.dtype


@dataclass
class PlanSegment:
    """Tensors that share one kernel configuration, one table row each."""

    kind: SegmentKind
    algo: Algorithm
    amsgrad: bool
    centered: bool
    momentum: bool
    maximize: bool
    umm: Umm
    dtype: torch.dtype
    k: int
    grad_stride: int  # elements between two tasks' gradients of a tensor
    clippy: tuple[float, float]
    has_l2: bool = False
    params: list[torch.Tensor] = field(default_factory=list)
    # Shared: (K, *shape) in p's layout; plain: p's .grad (p's shape and layout).
    grads: list[torch.Tensor] = field(default_factory=list)
    grad_sums: list[torch.Tensor | None] = field(default_factory=list)  # shared: .grad to check
    states: list[list[torch.Tensor]] = field(default_factory=list)
    state_names: list[list[str]] = field(default_factory=list)
    steps: list[torch.Tensor] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    table: np.ndarray | None = None

    @functools.cached_property
    def key(self) -> tuple:
        """What selects the native kernel (cached configurations are keyed by it). Taken once
        the segment is built, whose configuration a kept plan never changes."""
        return (int(self.kind), int(self.algo), self.amsgrad, self.centered, self.momentum,
                self.maximize, int(self.umm), self.dtype, self.k, self.grad_stride,
                self.clippy, self.has_l2)


@dataclass
class StepPlan:
    """Everything one step reads and writes, checked."""

    segments: list[PlanSegment]
    base: np.ndarray  # (n_groups, BaseCol.COLS) float64
    k: int  # tasks of the shared segments (1 for a plain step)
    device: torch.device
    pending_state: dict[torch.Tensor, dict[str, Any]]  # committed when the step is applied
    owners: dict[int, torch.Tensor]  # id(piece) -> its parameter (data parallelism)
    # Data parallelism with sharded state: entries of the shards' state to commit, and the full
    # state entries a shard was cut from (removed once the shard holds them).
    pending_shard_state: dict[torch.Tensor, dict[str, Any]] = field(default_factory=dict)
    sharded: bool = False
    # The shared segments' task gradients are known to be finite (checked as their sum was formed
    # in backward, unwritten since): a step without a Gram pass may skip their finiteness pass.
    shared_finite: bool = False

    @property
    def has_shared(self) -> bool:
        return any(s.kind == SegmentKind.SHARED for s in self.segments)

    @functools.cached_property
    def written(self) -> list[torch.Tensor]:
        """The parameters (or their pieces, views that share their version counter) that an
        applied step writes."""
        return [p for seg in self.segments for p in seg.params]

    def release_grads(self) -> None:
        """Let go of the ``.grad`` tensors (the plain parameters', and the shared ones' that a
        rescan compared) once the step has read them: a plan kept for the next step must not
        keep them alive past ``zero_grad``."""
        for seg in self.segments:
            if seg.kind == SegmentKind.PLAIN:
                seg.grads = [None] * len(seg.grads)
            seg.grad_sums = [None] * len(seg.grad_sums)


class LazyName:
    """How errors name a parameter, worked out only when an error is raised. It holds the
    optimizer weakly: the plan an optimizer keeps holds these, and must not keep it alive."""

    __slots__ = ("opt", "p")

    def __init__(self, opt, p):
        self.opt, self.p = weakref.ref(opt), p

    def __str__(self) -> str:
        opt = self.opt()
        return f"a parameter of shape {tuple(self.p.shape)}" if opt is None else \
            opt._param_name(self.p)


def _increments_lists() -> bool:
    try:  # a list of tensors in one call since torch 2.5; one tensor before (RuntimeError)
        torch.autograd.graph.increment_version([torch.zeros(())])
    except (TypeError, RuntimeError):
        return False
    return True


_INCREMENT_LIST = _increments_lists()


def mark_written(tensors: list[torch.Tensor]) -> None:
    """Tell autograd that the native core wrote these tensors in place: their version counters
    go up as torch's own in-place operations (and torch.optim's steps) make them, so a graph
    that saved a parameter before the step refuses to differentiate through the new values."""
    if _INCREMENT_LIST:
        torch.autograd.graph.increment_version(tensors)
    else:
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _storage_holds(t: torch.Tensor) -> bool:
    """Whether t's storage holds every element of its view (a storage shrunk in place, by
    ``untyped_storage().resize_`` as FSDP does, would send the kernels past its end)."""
    if t.numel() == 0:
        return True
    if t.is_contiguous():
        last = t.storage_offset() + t.numel() - 1
    else:
        last = t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size() <= t.untyped_storage().nbytes()


def _short_storage(t: torch.Tensor) -> str:
    return (f"its storage ({t.untyped_storage().nbytes()} bytes) is smaller than its shape "
            f"{tuple(t.shape)} needs")


def _fail(exc, name: str, what: str):
    raise exc(f"{name}: {what}")


def not_dense_message(p: torch.Tensor) -> str:
    """The refusal of a parameter that is not dense (:func:`dense_strides`)."""
    return (f"{not_dense(p)}; PUB steps dense parameters (contiguous, channels_last, "
            "transposed, ...) as one block of memory: make it one, e.g. "
            "torch.nn.Parameter(t.contiguous())")


def check_param(p: torch.Tensor, name: str, device: torch.device | None) -> None:
    """What every parameter the kernels touch must be."""
    if p.is_complex():
        _fail(TypeError, name, "complex parameters are not supported")
    if p.layout != torch.strided:
        _fail(TypeError, name, f"{p.layout} parameters are not supported")
    if torch._C._dispatch_keys(p).has(torch._C.DispatchKey.Python):
        _fail(TypeError, name, f"a {type(p).__name__}, a tensor subclass that computes its "
                               "values in Python (__torch_dispatch__), whose memory the native "
                               "step cannot read; PUB steps plain dense tensors")
    if p.is_neg():
        _fail(TypeError, name, "has torch's negative bit set (made by _neg_view(): its memory "
                               "holds minus its values); give the optimizer p.resolve_neg()")
    if p.dtype not in DTYPES:
        _fail(TypeError, name, f"dtype {p.dtype} is not supported (float32, float64, bfloat16, "
                               "float16)")
    if p.device.type not in ("cpu", "cuda"):
        _fail(NotImplementedError, name, f"the PUB step runs on the CPU and on CUDA devices, "
                                         f"not on {p.device}")
    if device is not None and p.device != device:
        _fail(NotImplementedError, name, f"is on {p.device} while other parameters stepped "
                                         f"together are on {device}; use one optimizer per "
                                         "device")
    if not dense_strides(p):
        _fail(NotImplementedError, name, not_dense_message(p))
    if not _storage_holds(p):
        _fail(ValueError, name, _short_storage(p))


def _state_like(p: torch.Tensor, k: int | None, dtype: torch.dtype) -> torch.Tensor:
    """An empty state tensor in p's layout; with k, (k, *shape) with task i at i·numel."""
    if k is None:
        return torch.empty_strided(p.shape, p.stride(), dtype=dtype, device=p.device)
    return torch.empty_strided((k, *p.shape), (p.numel(), *p.stride()), dtype=dtype,
                               device=p.device)


def _matches(t, p: torch.Tensor, k: int | None, dtype: torch.dtype) -> bool:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.device != p.device \
            or t.layout != torch.strided or t.is_neg() or not _storage_holds(t):
        return False  # (a tensor with the negative bit holds minus its values: converted)
    if k is None:
        return same_layout(t, p)
    return (t.shape == (k, *p.shape) and (k == 1 or t.stride(0) == p.numel())
            and same_layout(t[0], p))


def _converted(value, p, k, dtype, name, key):
    """``value`` (a state entry made elsewhere: torch's own step, a checkpoint, a different
    layout or dtype) as the kernels read it, converted once. A wrong size (the parameter's
    shape changed since the state was made, or the state belongs to another model) is a
    RuntimeError naming the parameter."""
    want = (k, *p.shape) if k is not None else tuple(p.shape)
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != want:
        # (Also for a shape with as many elements: torch's step raises there too, and reading
        # the entry in another shape would give each element another element's state.)
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise RuntimeError(f"{name}: optimizer state {key!r} has shape {shape}, expected "
                           f"{want}; was the parameter resized after its state was made?")
    if value.is_meta:
        raise TypeError(f"{name}: optimizer state {key!r} is a meta tensor: it holds no values")
    if value.layout != torch.strided:
        value = value.to_dense()  # a sparse entry: converted once, as any other layout
    elif not _storage_holds(value):
        raise RuntimeError(f"{name}: optimizer state {key!r}: {_short_storage(value)}")
    out = _state_like(p, k, dtype)
    out.copy_(value.detach())
    return out


def prepare_state(state: dict, p: torch.Tensor, names: list[str], init: list[float],
                  adatask_k: int | None, name: str) -> tuple[list[torch.Tensor], torch.Tensor,
                                                               dict[str, Any]]:
    """The state tensors (in the rule's order) and step counter the kernels will use for p,
    and the entries that must be written to the optimizer state once the step is applied
    (None marks an entry to remove)."""
    dtype = state_dtype(p)
    new: dict[str, Any] = {}
    step = state.get("step")
    if isinstance(step, torch.Tensor) and step.is_meta:
        raise TypeError(f"{name}: optimizer state 'step' is a meta tensor: it holds no value")
    if isinstance(step, torch.Tensor) and (step.numel() != 1 or (
            step.layout == torch.strided and not _storage_holds(step))):
        what = (f"has shape {tuple(step.shape)}, expected one number" if step.numel() != 1
                else f"is not readable: {_short_storage(step)}")
        raise RuntimeError(f"{name}: optimizer state 'step' {what}")
    if not (isinstance(step, torch.Tensor) and step.dtype == torch.float32
            and step.device == p.device and step.numel() == 1 and step.dim() == 0):
        value = 0.0 if step is None else float(step)
        step = torch.tensor(value, dtype=torch.float32, device=p.device)
        new["step"] = step
    tensors = []
    for key, fill in zip(names, init):
        if adatask_k is not None:
            task_key = "task_" + key
            value = state.get(task_key)
            if value is None:
                base = state.get(key)
                value = _state_like(p, adatask_k, dtype)
                if base is None:
                    value.fill_(fill)
                else:
                    # The plain entry (torch's Adagrad makes `sum` at construction; plain steps
                    # make the others) starts every task's copy.
                    value.copy_(_converted(base, p, None, dtype, name, key).expand_as(value))
                    new[key] = None
                new[task_key] = value
            elif not _matches(value, p, adatask_k, dtype):
                value = _converted(value, p, adatask_k, dtype, name, task_key)
                new[task_key] = value
        else:
            value = state.get(key)
            if value is None:
                value = _state_like(p, None, dtype).fill_(fill)
                new[key] = value
            elif not _matches(value, p, None, dtype):
                value = _converted(value, p, None, dtype, name, key)
                new[key] = value
        tensors.append(value)
    return tensors, step, new


def plain_grad(p: torch.Tensor, name: str) -> torch.Tensor:
    """p.grad as the kernels read it: dense, p's dtype and layout (else a copy that is)."""
    g = p.grad
    if g.layout != torch.strided:
        _fail(TypeError, name, "sparse gradients are not supported (use sparse=False in "
                               "nn.Embedding)")
    if g._is_zerotensor():  # torch's zeros without memory: read as zeros, as torch does
        g = torch.zeros_like(p)
    elif g.is_neg():  # memory that holds minus its values: read the values
        g = g.resolve_neg()
    if not _storage_holds(g):
        _fail(ValueError, name, "gradient: " + _short_storage(g))
    if g.dtype != p.dtype or g.device != p.device:
        _fail(TypeError, name, f"gradient of dtype {g.dtype} on {g.device} for a parameter "
                               f"of dtype {p.dtype} on {p.device}")
    if g.shape != p.shape:
        _fail(ValueError, name, f"gradient of shape {tuple(g.shape)} for a parameter of shape "
                                f"{tuple(p.shape)}")
    if not (g.is_contiguous() and p.is_contiguous()) and not same_layout(g, p):
        copy = torch.empty_like(p)
        copy.copy_(g)
        g = copy
    return g


_SENTINELS: dict = {}

# The row layout fill_table writes, in the binding's column order (checked here, once).
assert (TableCol.PARAM, TableCol.NUMEL, TableCol.GRAD, TableCol.BASE, TableCol.STEP,
        TableCol.GRAD_SUM, TableCol.STATE) == tuple(range(7)), "table columns moved"


def _sentinel(device) -> int:
    """A valid address on ``device`` for the pointers of a row of 0 elements (an empty tensor
    reports 0, and the tables hold no null pointer); no kernel reads it."""
    sentinel = _SENTINELS.get(device)
    if sentinel is None:
        sentinel = _SENTINELS[device] = torch.zeros(1, device=device)
    return sentinel.data_ptr()


def fill_table(seg: PlanSegment) -> None:
    """The int64 table of the segment's addresses (rows in the order of seg.params)."""
    rows = []
    for p, g, states, step, gi, gsum in zip(seg.params, seg.grads, seg.states, seg.steps,
                                            seg.groups, seg.grad_sums):
        n = p.numel()
        if n:
            row = [p.data_ptr(), n, g.data_ptr(), gi, step.data_ptr(),
                   0 if gsum is None else gsum.data_ptr(), *[t.data_ptr() for t in states]]
        else:
            empty = _sentinel(p.device)
            row = [empty, 0, empty, gi, step.data_ptr(), 0, *[empty for _ in states]]
        row += [0] * (_N_COLS - len(row))
        rows.append(row)
    seg.table = np.array(rows, dtype=np.int64).reshape(len(rows), _N_COLS)


def check_base_row(row: list[float], gi: int) -> list[float]:
    names = {BaseCol.LR: "lr", BaseCol.EPS: "eps", BaseCol.WEIGHT_DECAY: "weight_decay"}
    for col, key in names.items():
        v = row[col]
        if not math.isfinite(v):
            raise ValueError(
                f"param_groups[{gi}]['{key}'] is {v}: the PUB step needs a finite {key} (with "
                f"{key}={v} every update would be non-finite)")
    return row


def _real_elements(value) -> int:
    """How many real numbers ``value`` holds: 1 for a Python or numpy number (bool included, as
    torch takes it), n for a real tensor or numpy array of n elements, 0 for anything else (a
    string, which ``float`` would parse, None, a complex number, a list)."""
    kind = type(value)
    if kind is float or kind is int or kind is bool:
        return 1
    if isinstance(value, torch.Tensor):
        return 0 if value.is_complex() else value.numel()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.size if value.dtype.kind in "biuf" else 0
    return 1 if isinstance(value, numbers.Real) else 0


def _not_finite(value) -> bool:
    """A Python or numpy number that is NaN or infinite (a tensor is read by the step only)."""
    return isinstance(value, (float, np.floating)) and not math.isfinite(value)


def _option(group: dict, gi: int, key: str):
    try:
        return group[key]
    except KeyError:
        raise KeyError(f"param_groups[{gi}] has no {key!r} option") from None


def _check_option(gi: int, key: str, value, ok: bool, kind: str, members) -> None:
    if not ok:
        raise TypeError(f"param_groups[{gi}]['{key}'] must be {kind} (or a real tensor of as "
                        f"many elements), got {type(value).__name__} {value!r:.60}")
    if any(_not_finite(v) for v in members):
        raise ValueError(f"param_groups[{gi}]['{key}'] is {value!r}: the PUB step needs a finite "
                         f"{key} (with {key}={value!r} every update would be non-finite)")


def group_row(opt, group: dict, gi: int) -> list[float]:
    """The constants of ``opt.param_groups[gi]`` in ``BaseCol`` order, as floats, after checking
    the group's options: each number option (``_NUMBER_OPTIONS``) must be a real number or a
    one-element real tensor or array, each pair (``_PAIR_OPTIONS``, Adam's betas) two of them
    or a two-element real tensor or array, and all of them finite (a NaN beta would make every
    update NaN), else a TypeError or ValueError naming it, as torch's own step fails on such a
    value. ``differentiable=True``, refused when a group is made, is refused here too (set in
    the group later, or loaded)."""
    for key in opt._NUMBER_OPTIONS:
        value = _option(group, gi, key)
        kind = type(value)
        if kind is int or (kind is float and value - value == 0.0):  # the usual case, fast
            continue
        _check_option(gi, key, value, _real_elements(value) == 1, "a real number", (value,))
    for key in opt._PAIR_OPTIONS:
        value = _option(group, gi, key)
        if isinstance(value, (tuple, list)):
            if len(value) == 2 and all(type(v) is float and v - v == 0.0 for v in value):
                continue  # the usual case, fast
            ok = len(value) == 2 and all(_real_elements(v) == 1 for v in value)
            _check_option(gi, key, value, ok, "2 real numbers", value)
        else:
            _check_option(gi, key, value, _real_elements(value) == 2, "2 real numbers", ())
    if group.get("differentiable", False):
        raise NotImplementedError(f"param_groups[{gi}]['differentiable'] is "
                                  f"{group['differentiable']!r}: PUB optimizers do not support "
                                  "differentiable=True")
    return [float(v) for v in opt._base_row(group)]


def build_base(rows: list[list[float]]) -> np.ndarray:
    return np.array([check_base_row(r, gi) for gi, r in enumerate(rows)],
                    dtype=np.float64).reshape(len(rows), int(BaseCol.COLS))


def build_plan(opt, pending: bool, rescan: bool = False) -> StepPlan | None:
    """The plan of ``opt``'s next step: after ``backward(losses)`` (``pending``) the shared
    parameters with their K task gradients and every other parameter with a ``.grad`` as a
    plain step; otherwise every parameter with a ``.grad`` as a plain step (K = 1). None when
    nothing would be stepped.

    ``opt`` is a PUB optimizer: it gives the groups, the state, the shared parameters and their
    task gradients, and per group the rule's state names, flags and constants. With ``rescan``
    each shared row names the parameter's current ``.grad``, which the step compares with the
    task gradients' sum (a shared parameter whose ``.grad`` was set to None since backward is
    not stepped, as torch skips it).
    """
    memo = opt._plan_memo
    if memo is not None:
        plan = memo.reuse(opt, pending, rescan)
        if plan is not None:
            return plan
        opt._plan_memo = None
    shared_index = {}
    if pending:
        shared_index = {id(p): j for j, p in enumerate(opt._grads.params)}
    # Data parallelism with sharded state: this process steps its piece of each shared
    # parameter (after backward(losses), and for plain steps alike).
    dp = opt._dp if opt._dp is not None and opt._dp.shard and opt._grads is not None else None
    piece_index = {id(p): j for j, p in enumerate(opt._grads.params)} if dp else {}
    pending_shard_state: dict[torch.Tensor, dict[str, Any]] = {}
    adatask = opt.options.umm == "adatask"
    shared_umm = Umm(opt.options.umm_code)
    device = None
    segments: dict[tuple, PlanSegment] = {}
    pending_state: dict[torch.Tensor, dict[str, Any]] = {}
    owners: dict[int, torch.Tensor] = {}
    base_rows = []
    # What a later step may reuse (PlanMemo): per group its parameters and configuration, per
    # parameter whether it was stepped and with what.
    memo_groups, memo_rows = [], []
    for gi, group in enumerate(opt.param_groups):
        base_row = group_row(opt, group, gi)
        base_rows.append(base_row)
        config = _group_config(opt, group, base_row)
        flags, maximize, l2, state_names, init = config
        memo_groups.append((tuple(map(id, group["params"])), config))
        for p in group["params"]:
            j = shared_index.get(id(p))
            listed = j is not None  # (PlanMemo.reuse tells frozen ones by requires_grad)
            memo_rows.append((p, listed, None))
            if j is not None and not p.requires_grad:
                # Frozen since detection: no task gradient. With a .grad left (zeros, after
                # zero_grad(set_to_none=False)) it takes the ordinary step on it, as torch steps
                # every parameter that has a .grad (under AdaTask its state is per task: not).
                if p.grad is None or adatask:
                    continue
                j = None
            if j is not None:
                if p.grad is None:
                    continue  # its .grad removed (torch's way of leaving it out): not stepped
            elif p.grad is None:
                continue
            name = LazyName(opt, p)
            signature = _readable_signature(p, name)
            if opt._checked.get(id(p)) != signature or (device is not None
                                                        and p.device != device):
                check_param(p, name, device)
                opt._checked[id(p)] = signature
            device = p.device
            grad_sum = None
            piece = piece_index.get(id(p))
            if piece is not None:
                kind, k, stride, umm, target, grad, grad_sum = _piece(
                    opt, dp, p, piece, name, j is not None, rescan)
                owners[id(target)] = p
                states, step, new, new_full = _piece_state(
                    opt, dp, p, piece, target, state_names, init,
                    k if kind == SegmentKind.SHARED and adatask else None, name)
                if new_full:
                    pending_state[p] = new_full
                if new:
                    pending_shard_state[p] = new
            else:
                target = p
                if j is not None:
                    kind, k, stride = SegmentKind.SHARED, opt._k, opt._grads.row_length
                    grad = opt._grads.task_view(j)
                    umm = shared_umm
                    if rescan:
                        grad_sum = plain_grad(p, name)
                else:
                    if adatask and id(p) in opt._shared_ids():
                        raise RuntimeError(
                            f"{name}: umm='adatask' keeps per-task state for the shared "
                            "parameters: call opt.backward(losses) before opt.step()")
                    kind, k, stride, umm = SegmentKind.PLAIN, 1, 0, Umm.NONE
                    grad = plain_grad(p, name)
                states, step, new = _prepared_state(
                    opt, p, signature, state_names, init,
                    k if kind == SegmentKind.SHARED and adatask else None, name)
                if new:
                    pending_state[p] = new
            key = (kind, flags, maximize, p.dtype)
            seg = segments.get(key)
            if seg is None:
                seg = segments[key] = PlanSegment(
                    kind=kind, algo=opt._ALGO, amsgrad=flags[0], centered=flags[1],
                    momentum=flags[2], maximize=maximize, umm=umm, dtype=p.dtype, k=k,
                    grad_stride=stride, clippy=opt.options.clippy_lambdas)
            seg.has_l2 = seg.has_l2 or l2
            seg.params.append(target)
            seg.grads.append(grad)
            seg.grad_sums.append(grad_sum)
            seg.states.append(states)
            seg.state_names.append(state_names)
            seg.steps.append(step)
            seg.groups.append(gi)
            keys = ["task_" + n for n in state_names] if (
                kind == SegmentKind.SHARED and adatask) else state_names
            memo_rows[-1] = (p, listed, (
                name, signature, opt.state.get(p), _state_marks(keys, states, step),
                seg, len(seg.params) - 1, kind))
    if not segments:
        return None
    ordered = sorted(segments.values(), key=lambda s: int(s.kind))  # shared segments first
    for seg in ordered:
        fill_table(seg)
    k = opt._k if pending and opt._k is not None else 1
    plan = StepPlan(ordered, build_base(base_rows), k, device, pending_state, owners,
                    pending_shard_state, dp is not None)
    if dp is None and opt._dp is None and not pending_state and (pending or not adatask):
        opt._plan_memo = PlanMemo(opt, plan, pending, rescan, memo_groups, memo_rows,
                                  base_rows)
    return plan


def _group_config(opt, group, base_row) -> tuple:
    """What a group decides of its parameters' kernels and state: (rule flags, maximize, L2
    weight decay, state names, their initial values)."""
    l2 = base_row[BaseCol.WEIGHT_DECAY] != 0.0 and not group.get("decoupled_weight_decay",
                                                                  False)
    names = opt._state_names(group)
    return (opt._rule_flags(group), bool(group.get("maximize", False)), l2, names,
            [opt._initial_state_value(group, n) for n in names])


class PlanMemo:
    """A plan kept for the steps after it, which mostly step the same tensors in the same way.

    ``reuse`` gives the plan again when nothing it was built from has changed: the optimizer's
    options, task gradients (the K×P buffer) and parameter groups (the same parameters, in the
    same order, with the same configuration), and for every parameter whether it is stepped,
    its storage and layout, and its state entries (``_state_marks``: the same objects, not
    changed since). Only what changes at every step is taken again: the learning rates and other
    constants of the groups, the ``.grad`` of the plain (not shared) parameters, and on steps
    that measure edits of the shared ``.grad`` (``rescan``: clipping, GradScaler unscaling) the
    shared ``.grad``, each checked as a fresh plan checks it. Anything else is a miss and the
    plan is built anew.

    Plans that are to commit new state or that step shards of data parallelism are not kept.
    The memo holds its tensors alive (``StepPlan.release_grads`` lets go of the gradients after
    each step); a new task-gradient buffer and ``_reset_pub`` (checkpoint loading) drop it.
    """

    __slots__ = ("plan", "pending", "rescan", "grads", "buffer_ptr", "k", "options", "groups",
                 "rows", "base_rows", "nonempty")

    def __init__(self, opt, plan: StepPlan, pending: bool, rescan: bool, groups: list,
                 rows: list, base_rows: list[list[float]]):
        self.plan, self.pending, self.rescan, self.rows = plan, pending, rescan, rows
        self.grads = opt._grads if pending else None
        self.buffer_ptr = self.grads.buffer.data_ptr() if self.grads is not None else 0
        self.k = opt._k
        self.options = opt.options
        # Per group: its parameters' ids, its configuration and its options (None where one is
        # not a plain value, e.g. a tensor lr that a scheduler fills in place: such groups are
        # read at every step).
        self.groups = [(ids, config, _options_of(group))
                       for (ids, config), group in zip(groups, opt.param_groups)]
        self.base_rows = base_rows
        # Per segment, its rows with elements (whose .grad addresses are written at each step).
        self.nonempty = {id(seg): np.array([r for r, p in enumerate(seg.params) if p.numel()],
                                           dtype=np.intp) for seg in plan.segments}

    def reuse(self, opt, pending: bool, rescan: bool) -> StepPlan | None:
        if (pending != self.pending or opt._k != self.k
                or opt.options is not self.options or opt._dp is not None):
            return None
        grads = opt._grads if pending else None
        if grads is not self.grads or (
                grads is not None and grads.buffer.data_ptr() != self.buffer_ptr):
            return None
        groups = opt.param_groups
        if len(groups) != len(self.groups):
            return None
        changed = {}  # group index -> (its new base row, its options)
        for gi, (group, (ids, config, options)) in enumerate(zip(groups, self.groups)):
            if tuple(map(id, group["params"])) != ids:
                return None
            now = _options_of(group)
            if options is not None and now == options:
                continue
            base_row = group_row(opt, group, gi)
            if _group_config(opt, group, base_row) != config:
                return None
            changed[gi] = (base_row, now)
        state = opt.state
        fresh = {}  # id(segment) -> (segment, [(row, .grad)]): the .grad read at this step
        adatask = self.options.umm == "adatask"
        for p, shared, entry in self.rows:
            g = p.grad
            frozen = shared and not p.requires_grad  # stepped plain on its .grad (build_plan)
            if entry is None:
                if g is not None and not (frozen and adatask):
                    return None  # stepped now, not then
                continue
            name, signature, st, marks, seg, r, kind = entry
            if g is None or (kind == SegmentKind.SHARED) != (shared and not frozen):
                return None  # not stepped now, or stepped otherwise (frozen or unfrozen since)
            if _signature(p) != signature:
                return None
            if state.get(p) is not st or not _state_holds(st, marks):
                return None
            if kind == SegmentKind.PLAIN or rescan:
                fresh.setdefault(id(seg), (seg, []))[1].append((r, plain_grad(p, name)))
        plan = self.plan
        if changed:
            rows = list(self.base_rows)
            for gi, (base_row, _) in changed.items():
                rows[gi] = base_row
            plan.base = build_base(rows)  # checks them (a non-finite lr raises here)
            self.base_rows = rows
            self.groups = [(ids, config, changed[gi][1] if gi in changed else options)
                           for gi, (ids, config, options) in enumerate(self.groups)]
        for seg, row_grads in fresh.values():
            # plain: the gradient the step applies; shared: the .grad it measures edits of
            held, col = (seg.grads, TableCol.GRAD) if seg.kind == SegmentKind.PLAIN else (
                seg.grad_sums, TableCol.GRAD_SUM)
            ptrs = []
            for r, g in row_grads:
                held[r] = g
                if g.numel():
                    ptrs.append(g.data_ptr())
            seg.table[self.nonempty[id(seg)], col] = ptrs
        if self.rescan and not rescan:  # no .grad of a shared parameter to compare this time
            for seg in plan.segments:
                if seg.kind == SegmentKind.SHARED:
                    seg.table[:, TableCol.GRAD_SUM] = 0
        self.rescan = rescan  # whether the table names the shared .grad
        plan.shared_finite = False
        return plan


def _options_of(group: dict) -> dict | None:
    """A group's options (every entry but its parameters) as values that cannot change in place,
    or None when one is something else (a tensor, which a scheduler may fill in place, or any
    other object): such groups are read again at every step."""
    options = {}
    for key, value in group.items():
        if key != "params":
            value = _frozen(value)
            if value is _UNFROZEN:
                return None
            options[key] = value
    return options


_UNFROZEN = object()
_SCALARS = (bool, int, float, str, type(None))


def _frozen(value):
    if type(value) in _SCALARS:
        return value
    if isinstance(value, (tuple, list)):
        items = tuple(_frozen(v) for v in value)
        return _UNFROZEN if any(v is _UNFROZEN for v in items) else items
    return _UNFROZEN


def _state_marks(keys, states, step) -> list[tuple]:
    """What tells that a parameter's state entries are still those the kernels were given: for
    the step counter, then each state tensor, (key, tensor, its view: address, dtype, shape,
    strides, storage size). A tensor replaced, re-pointed (``set_``; ``.data =``, to other
    memory or to another view of the same memory), reshaped in place (``resize_``, ``t_``,
    ``unsqueeze_``) or whose storage was resized no longer matches. A change of values in
    place needs no check: the kernels read memory. (Versions are not compared: tensors made
    under ``torch.inference_mode`` have none.)"""
    return [("step", step, _view_of(step))] + [(key, t, _view_of(t))
                                              for key, t in zip(keys, states)]


def _view_of(t: torch.Tensor) -> tuple:
    # With the storage's size: one shrunk in place (untyped_storage().resize_, as FSDP does)
    # may keep its address, and the kernels would go past its end.
    return t.data_ptr(), t.dtype, t.shape, t.stride(), t.untyped_storage().nbytes()


def _signature(p: torch.Tensor) -> tuple:
    """A parameter as the kernels read it: its view and its device (checked once per change)."""
    return *_view_of(p), p.device


def _readable_signature(p: torch.Tensor, name) -> tuple:
    """_signature, or the error naming the parameter when its memory cannot be read (a sparse
    parameter, a tensor subclass that holds its values elsewhere)."""
    try:
        signature = _signature(p)
    except (RuntimeError, NotImplementedError, TypeError) as e:
        check_param(p, name, None)  # names what it can
        raise TypeError(f"{name}: a {type(p).__name__} whose memory the native step cannot "
                        f"read ({e}); PUB steps plain dense tensors") from None
    return signature


def _state_holds(st: dict, marks: list[tuple]) -> bool:
    for key, t, view in marks:
        if st.get(key) is not t or _view_of(t) != view:
            return False
    return True


def _prepared_state(opt, p, signature, names, init, adatask_k, name):
    """prepare_state for p, skipped when nothing it checked has changed since: the same
    parameter storage and layout, and the same state entries (``_state_marks``) as the last
    time they were found right."""
    st = opt.state.get(p, {})
    memo = opt._state_memo.get(id(p))
    if memo is not None:
        sig, keys, marks = memo
        if keys == (tuple(names), adatask_k) and signature == sig and _state_holds(st, marks):
            return [t for _, t, _ in marks[1:]], marks[0][1], {}
    states, step, new = prepare_state(st, p, names, init, adatask_k, name)
    keys = [("task_" + n) if adatask_k is not None else n for n in names]
    if not new:
        opt._state_memo[id(p)] = (signature, (tuple(names), adatask_k),
                                  _state_marks(keys, states, step))
    else:
        opt._state_memo.pop(id(p), None)  # remembered once the new entries are committed
    return states, step, new


def _in_layout(value: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``value`` (p's shape) in p's memory order."""
    if same_layout(value, p) and dense_strides(value):
        return value
    out = torch.empty_like(p, dtype=value.dtype)
    out.copy_(value)
    return out


def flat_view(t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Elements lo..hi of a dense tensor in memory order, as a 1-D view."""
    return t.detach().as_strided((hi - lo,), (1,), t.storage_offset() + lo)


def _piece(opt, dp, p, j, name, pending, rescan):
    """A shared parameter's piece on this process: (kind, K, task stride, umm, the piece as a
    1-D view, its gradient rows, its .grad to check or None)."""
    lo, hi, _ = dp.pieces[j]
    target = dp.piece_view(p, j)
    if pending:
        grad_sum = flat_view(plain_grad(p, name), lo, hi) if rescan else None
        return (SegmentKind.SHARED, opt._k, dp.S, Umm(opt.options.umm_code), target,
                dp.piece_rows(j, opt._k), grad_sum)
    if opt.options.umm == "adatask":
        raise RuntimeError(f"{name}: umm='adatask' keeps per-task state for the shared "
                           "parameters: call opt.backward(losses) before opt.step()")
    return (SegmentKind.PLAIN, 1, 0, Umm.NONE, target,
            flat_view(plain_grad(p, name), lo, hi), None)


def _piece_state(opt, dp, p, j, target, names, init, adatask_k, name):
    """The state tensors of a piece (from the shard state, or cut from full state that a
    checkpoint or a plain step left), its step counter, and the entries to commit: the shard's,
    and the full parameter's (its step counter; the full entries a shard was cut from, None)."""
    lo, hi, _ = dp.pieces[j]
    full = opt.state.get(p, {})
    mine = opt._shard_state.get(p)
    cut = {}
    if mine is None:
        mine = {}
        for key in names:
            for stored in (key, "task_" + key):
                value = full.get(stored)
                if not isinstance(value, torch.Tensor):
                    continue
                if stored.startswith("task_") and value.dim() == p.dim() + 1 \
                        and value.shape[1:] == p.shape:
                    mine[stored] = torch.stack([flat_view(_in_layout(v, p), lo, hi)
                                                for v in value.detach()])
                elif value.shape == p.shape:
                    mine[stored] = flat_view(_in_layout(value.detach(), p), lo, hi).clone()
                else:
                    continue
                cut[stored] = None
    source = dict(mine, step=full.get("step"))
    if source["step"] is None:
        del source["step"]
    if target.numel() == 0:
        dummy = dp.dummy(state_dtype(p), p.device)
        states, new = [dummy] * len(names), {}
        step = source.get("step")
        if not (isinstance(step, torch.Tensor) and step.dtype == torch.float32
                and step.device == p.device):
            step = torch.tensor(0.0 if step is None else float(step), dtype=torch.float32,
                                device=p.device)
            new = {"step": step}
    else:
        states, step, new = prepare_state(source, target, names, init, adatask_k, name)
    new_full = dict(cut)
    if "step" in new:
        new_full["step"] = new.pop("step")
    # Entries cut from full state are the shard's state from now on.
    for key in cut:
        new.setdefault(key, mine[key])
    return states, step, new, new_full
