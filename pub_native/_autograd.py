"""Per-task gradients for multi-task training: shared-parameter detection and the K×P buffer.

Python layer shared by the PUB optimizers and the gradient balancers in ``pub_native.balancers``.
A parameter is *shared* when the autograd graphs of two or more task losses reach it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import torch

from . import _native
from ._caller import user_stacklevel

__all__ = ["DTYPES", "NothingReached", "REENTRANT_CHECKPOINT", "as_loss_list",
           "compiled_graph", "named_pair", "other_leaves", "reached_by_gradients",
           "reached_parameters",
           "reentrant_checkpoint", "run_post_accumulate_grad_hooks", "sink_edge", "split_shared",
           "task_reach",
           "split_shared_by_gradients", "sum_into", "sum_rows", "task_roots", "TaskGradients",
           "walk_graph", "walked_reach"]


def as_loss_list(losses, expected_k: int | None = None, allow_absent: bool = False,
                 owner: str = "this optimizer") -> list[torch.Tensor | None]:
    """Validate ``losses`` (a list/tuple of K scalar tensors or a 1-D tensor) into a list.

    With ``allow_absent``, a loss that does not require grad (no graph: a task with no labels in
    this batch) becomes None instead of an error.
    """
    if isinstance(losses, torch.Tensor):
        if losses.dim() != 1:
            raise ValueError(
                "losses must be a list of scalar tensors or a 1-D tensor of K losses, got a "
                f"tensor of shape {tuple(losses.shape)}"
            )
        items = list(losses.unbind(0))
    elif isinstance(losses, Sequence) and not isinstance(losses, (str, bytes)):
        items = list(losses)
    else:
        raise ValueError(
            f"losses must be a list of scalar tensors or a 1-D tensor, got {type(losses).__name__}"
        )
    if not items:
        raise ValueError("losses must hold at least one task loss, got 0")
    out: list[torch.Tensor | None] = []
    for i, loss in enumerate(items):
        if not isinstance(loss, torch.Tensor):
            raise ValueError(f"losses[{i}] must be a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:  # as loss.backward(): any shape of one element
            raise ValueError(f"losses[{i}] must be a scalar, got shape {tuple(loss.shape)}")
        if loss.is_complex():
            raise ValueError(f"losses[{i}] is complex ({loss.dtype}): a task loss is a real "
                             "number to minimize")
        if not loss.requires_grad:
            if allow_absent:
                out.append(None)
                continue
            raise ValueError(f"losses[{i}] does not require grad (it is not connected to any "
                             "parameter)")
        out.append(loss if loss.dim() == 0 else loss.reshape(()))
    if expected_k is not None and len(items) != expected_k:
        raise ValueError(
            f"losses has {len(items)} tasks, but {owner} was built for K = {expected_k}"
        )
    return out


def task_roots(losses, items: list[torch.Tensor]) -> list:
    """Where each task's graph starts, for shared-parameter detection: an autograd edge (node,
    the output of it that the task's loss is), or the loss itself where it is a leaf.

    For a list of losses, each loss's own. A 1-D tensor's elements all lead back through the
    whole tensor; when it was built by ``torch.stack`` (also where DistributedDataParallel's
    output node passed it on), the stack's inputs separate the tasks again, otherwise every
    task counts as reaching every parameter (with a warning).
    """
    if not isinstance(losses, torch.Tensor):
        return [(loss.grad_fn, loss.output_nr) if loss.grad_fn is not None else loss
                for loss in items]
    fn, nr = losses.grad_fn, losses.output_nr
    if fn is not None and fn.name() == "_DDPSinkBackward":
        edge = sink_edge(fn, nr)
        if edge is not None and edge >= 0:
            fn, nr = fn.next_functions[edge]
    if fn is not None and fn.name().startswith("StackBackward") \
            and len(fn.next_functions) == len(items):
        return list(fn.next_functions)
    if len(items) > 1:
        warnings.warn(
            "losses is a 1-D tensor not built by torch.stack, so every parameter it depends on "
            "counts as reached by every task; pass a list of losses (list(losses.unbind()) "
            "for a vector of per-task losses) or shared= to detect the shared parameters "
            "exactly",
            stacklevel=user_stacklevel(),
        )
    root = losses if losses.grad_fn is None else (losses.grad_fn, losses.output_nr)
    return [root] * len(items)


def walk_graph(starts, leaf_tensors: dict | None = None, routes: dict | None = None,
               followed: list | None = None) -> tuple[set, set[int]]:
    """The autograd nodes reachable from ``starts`` (nodes, (node, output number) pairs, or
    tensors: a leaf, or its own output of its node; None allowed) and the ids of the leaf
    tensors their AccumulateGrad nodes hold (the walk stops at those); ``leaf_tensors``, when
    given, receives those tensors by id. ``routes``: for some nodes, which of their inputs to
    follow (see :func:`task_reach`); every input of the others. ``followed``, when given,
    receives each edge the walk follows as (node, the node it leads to, the output of that
    node it reads, its index among the node's inputs).

    DistributedDataParallel with ``find_unused_parameters`` or ``static_graph`` passes every
    output of the model through one node (``_DDPSinkBackward``, output j's gradient going to
    the input it passed through alone, see :func:`sink_edge`): entered through output j, the
    walk follows that input only, or every task would reach every parameter of the model."""
    nodes: set = set()
    sinks: set = set()
    leaves: set[int] = set()
    stack: list = []
    for start in starts:
        if isinstance(start, torch.Tensor):  # a loss: its own output of its node, or a leaf
            if start.grad_fn is not None:
                start = (start.grad_fn, start.output_nr)
            elif start.requires_grad:
                leaves.add(id(start))
                if leaf_tensors is not None:
                    leaf_tensors[id(start)] = start
                continue
            else:
                continue
        stack.append(start if isinstance(start, tuple) else (start, None))
    while stack:
        node, output_nr = stack.pop()
        if node is None:
            continue
        edges = node.next_functions
        edge = None if output_nr is None or node.name() != "_DDPSinkBackward" else \
            sink_edge(node, output_nr)
        if edge is not None:
            if (node, output_nr) in sinks:
                continue
            sinks.add((node, output_nr))
            nodes.add(node)
            if edge >= 0:
                stack.append(edges[edge])
                if followed is not None and edges[edge][0] is not None:
                    followed.append((node, *edges[edge], edge))
            continue
        if node in nodes:
            continue
        nodes.add(node)
        var = getattr(node, "variable", None)
        if var is not None:
            leaves.add(id(var))
            if leaf_tensors is not None:
                leaf_tensors[id(var)] = var
            continue
        follow = routes.get(node) if routes else None
        taken = [(fn, nr, j) for j, (fn, nr) in enumerate(edges)
                 if fn is not None and (follow is None or follow[j])]
        stack.extend((fn, nr) for fn, nr, _ in taken)
        if followed is not None:
            followed.extend((node, *edge) for edge in taken)
    return nodes, leaves


def other_leaves(losses: list, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The leaf tensors requiring grad that ``losses`` (None entries skipped) reach and that
    are not in ``params``: the parameters of another optimizer (an embedding table on a sparse
    optimizer, a temperature), to which ``loss.backward()`` would give a gradient."""
    found: dict[int, torch.Tensor] = {}
    walk_graph([loss.grad_fn for loss in losses if loss is not None], found)
    own = {id(p) for p in params}
    return [t for i, t in found.items() if i not in own and t.requires_grad]


def run_post_accumulate_grad_hooks(tensors) -> None:
    """The hooks ``Tensor.register_post_accumulate_grad_hook`` registered on each tensor, in
    the order they were registered: what ``loss.backward()`` runs once it has accumulated a
    tensor's gradient into ``.grad``."""
    for t in tensors:
        hooks = getattr(t, "_post_accumulate_grad_hooks", None)
        if hooks:
            for hook in tuple(hooks.values()):
                hook(t)


def _live_sink_edges(node) -> tuple[list[bool], list[int]] | None:
    """For DistributedDataParallel's output node: per output, whether it passed a tensor that
    requires grad through (its forward takes the module's weak reference, then every flattened
    output, non-tensors too, returning each as it came), and the indices of its inputs that
    take a gradient (``next_functions`` lists the tensor arguments alone); None where they do
    not agree (another torch version)."""
    try:
        flags = [bool(f) for f in tuple(node.needs_input_grad)[1:]]
    except (AttributeError, TypeError, RuntimeError):
        return None
    live = [e for e, (fn, _) in enumerate(node.next_functions) if fn is not None]
    return (flags, live) if sum(flags) == len(live) else None


def sink_edge(node, output_nr: int) -> int | None:
    """The index in ``next_functions`` of the input that DistributedDataParallel's output node
    passed through as its output ``output_nr`` (the model's outputs flattened, None and other
    non-tensors included, which ``next_functions`` skips); -1 where that output takes no
    gradient; None where it cannot be told (the walk then follows every input)."""
    known = _live_sink_edges(node)
    if known is None or output_nr >= len(known[0]):
        return None
    flags, live = known
    return live[sum(flags[:output_nr])] if flags[output_nr] else -1


def _sink_output(node, edge: int) -> int | None:
    """The output of DistributedDataParallel's output node that passes its input ``edge``
    through (the inverse of :func:`sink_edge`); None where it cannot be told."""
    known = _live_sink_edges(node)
    if known is None or edge not in known[1]:
        return None
    flags, live = known
    return [j for j, f in enumerate(flags) if f][live.index(edge)]


def reached_parameters(root, routes: dict | None = None) -> set[int]:
    """ids of the leaf tensors that the autograd graph below ``root`` (a loss tensor, an
    autograd node or a (node, output number) pair) accumulates gradient into; ``routes``: see
    :func:`walk_graph`."""
    return walk_graph([root], routes=routes)[1]


def _starts(roots: list, losses: list[torch.Tensor]) -> list:
    """Where each task's walk starts: an edge (node, output) as :func:`task_roots` gives it
    (DistributedDataParallel's output node passes each output on alone; a loss may be one
    output of an unbind), a loss tensor's own output of its node, or a node given alone,
    entered through the loss's output where it is the loss's own node."""
    starts = []
    for root, loss in zip(roots, losses, strict=True):
        if isinstance(root, torch.Tensor) and root.grad_fn is not None:
            root = (root.grad_fn, root.output_nr)
        elif root is not None and loss is not None and root is loss.grad_fn:
            root = (root, loss.output_nr)
        starts.append(root)  # (a leaf loss stays the tensor: walk_graph reaches itself)
    return starts


def walked_reach(roots: list, losses: list[torch.Tensor]) -> list[set[int]]:
    """For each task: ids of the leaf tensors a walk of its graph reaches (every input of every
    join: see :func:`task_reach`)."""
    return [walk_graph([start])[1] for start in _starts(roots, losses)]


def task_reach(roots: list, losses: list[torch.Tensor]) -> list[set[int]]:
    """For each task: ids of the leaf tensors its graph reaches. ``roots``: one loss tensor or
    autograd node per task (see :func:`task_roots`); ``losses``: the K scalar losses.

    A walk of the autograd structure, except where a task takes one slice of a join: a
    ``torch.stack`` node, or a ``torch.cat`` of inputs one index wide along a dimension other
    than the first (the heads' outputs joined into one tensor), that a task reads at a single
    index along the join's dimension (``out[:, i]``, also twice, ``out.unbind(1)[i]``,
    ``out.split(1, 1)[i]``), with only element-wise operations of that tensor alone between
    them (``sigmoid``, a cast, a product with a constant, an element-wise loss against
    constant targets), squeezes and unsqueezes, and sums or means over other dimensions
    (``bce(out, y, reduction="none").mean(0)[i]``). That index lies in one input, whatever
    the data: the task follows that input alone, found by one backward pass per task that
    stops at the joins' inputs (the input its loss sends a non-zero gradient to; where it
    sends none, no labels in this batch, it follows them all). A task that reads a join
    otherwise (two columns, an index tensor, torch.where, a layer) follows every input, since
    a zero gradient there may be the data's (gates, masks, a zero-initialized block)."""
    starts = _starts(roots, losses)
    followed: list[list] = [[] for _ in roots]
    walks = [walk_graph([start], followed=edges)[0] for start, edges in zip(starts, followed)]

    def reach(i: int, routes: dict | None = None) -> set[int]:
        return walk_graph([starts[i]], routes=routes)[1]

    counts: dict = {}
    for nodes in walks:
        for node in nodes:
            counts[node] = counts.get(node, 0) + 1
    # (Also a join that one task alone reaches: each task joining the heads' outputs anew.)
    joins = [node for node in counts
             if _base_name(node) in ("CatBackward", "StackBackward")
             and sum(fn is not None for fn, _ in node.next_functions) >= 2]
    if not joins:
        return [reach(i) for i in range(len(roots))]
    # Per task: node -> [(its parent in the task's graph, the output of node it reads, the
    # index of that edge among the parent's inputs)].
    # (The edges the walk followed: through DistributedDataParallel's output node, the one
    # the task's output takes.)
    tasks_parents = []
    for edges, start in zip(followed, starts, strict=True):
        parents: dict = {}
        for node, fn, nr, e in edges:
            parents.setdefault(fn, []).append((node, nr, e))
        if isinstance(start, tuple):
            # The loss itself is one output of its node (list(vec.unbind())[i]): the edge
            # it is read by, from no node.
            parents.setdefault(start[0], []).append((None, start[1], None))
        tasks_parents.append(parents)
    # Measured only where some task may read one index (dimensions aside, which the
    # measurement gives): not the experts' stack of a mixture, a skip connection's cat, ...
    joins = [join for join in joins
             if any(_one_index_of(join, None, parents) for parents in tasks_parents)]
    measured = _join_gradients(joins, losses, counts) if joins else None
    if measured is None:
        return [reach(i) for i in range(len(roots))]
    routes = [{join: flags for join, (flags, ndim) in sent.items()
               if sum(flags) == 1 and ndim is not None and _one_index_of(join, ndim, parents)}
              for sent, parents in zip(measured, tasks_parents)]
    return [reach(i, r) for i, r in enumerate(routes)]


def _base_name(node) -> str:
    """An autograd node's name without its version digits (``SelectBackward0`` ->
    ``SelectBackward``)."""
    return node.name().rstrip("0123456789")


# Element-wise operations of one tensor (any other operand a constant): a position of their
# output depends on the same position of their input alone.
_POINTWISE = frozenset(name + "Backward" for name in (
    "Sigmoid", "Tanh", "Relu", "Exp", "Log", "Neg", "Softplus", "LogSigmoid", "Gelu", "Elu",
    "LeakyRelu", "Silu", "Hardtanh", "Hardsigmoid", "Clamp", "Abs", "Pow", "Mul", "Div", "Add",
    "Sub", "Sqrt", "Rsqrt", "Clone", "ToCopy"))
# Element-wise losses against constant targets, with reduction="none" (saved as 0).
_LOSSES = frozenset(name + "Backward" for name in (
    "BinaryCrossEntropyWithLogits", "BinaryCrossEntropy", "MseLoss", "L1Loss", "SmoothL1Loss",
    "HuberLoss"))
# Those of them that may take a second operand (a constant), which may broadcast.
_BINARY = frozenset(name + "Backward" for name in ("Mul", "Div", "Add", "Sub", "Pow", "Clamp")) \
    | _LOSSES
# Sums and means over given dimensions (the node's saved dimensions; without them, over all).
_REDUCTIONS = frozenset(("SumBackward1", "MeanBackward1"))


def _signed(dim: int, ndim: int) -> int:
    """A dimension saved by an autograd node (a negative one reads back as 2⁶⁴ + dim) as an
    index in 0..ndim-1."""
    if dim >= 1 << 63:
        dim -= 1 << 64
    return dim + ndim if dim < 0 else dim


def _one_index_of(join, ndim: int | None, parents: dict) -> bool:
    """Whether a task (``parents``: its graph's nodes above each node) reads the output of
    ``join`` (of ``ndim`` dimensions) through exactly one selection of one index along the
    join's dimension, with only element-wise operations of that tensor alone (or full slices,
    sums or means over other dimensions, or DistributedDataParallel's output node) between
    them; ``ndim`` None: the same, the dimensions unchecked. False where a node does not hold
    what this reads (another torch version): the walk then goes through every input."""
    try:
        return _reads_one_index(join, ndim, parents)
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return False


def _along(node, nd: int | None, d: int | None) -> bool:
    """Whether ``node`` (a selection) works along dimension ``d`` of its input of ``nd``
    dimensions (True where they are unknown)."""
    return nd is None or _signed(node._saved_dim, nd) == d


def _reads_one_index(join, ndim: int | None, parents: dict) -> bool:
    if ndim is not None and _base_name(join) == "CatBackward" \
            and _signed(join._saved_dim, ndim) == 0:
        # Tensors concatenated along their first dimension are usually slices of a batch,
        # whose sizes, and so the input that holds a given index, may change with the data.
        return False
    tops: set = set()
    # node (or, for DistributedDataParallel's output node, (node, the output read)) ->
    # (whether an operation with another operand that may add leading dimensions lies between
    # it and the join since the dimensions were last checked; the number of dimensions of its
    # output and the position of the join's dimension in it, None where ndim is)
    seen: dict = {join: (False, ndim, None if ndim is None else _signed(join._saved_dim, ndim))}
    todo: list = [join]
    while todo:
        key = todo.pop()
        child, via = key if isinstance(key, tuple) else (key, None)
        broadcast, nd, d = seen[key]
        for node, nr, edge in parents.get(child, ()):
            if via is not None and nr != via:
                continue  # a reader of another of the output node's outputs
            if node is None:
                continue  # the task's loss itself: read whole
            name = _base_name(node)
            if name == "_DDPSinkBackward":
                out = _sink_output(node, edge)
                if out is None:
                    return False
                if (node, out) not in seen:
                    seen[(node, out)] = (broadcast, nd, d)
                    todo.append((node, out))
                continue
            if isinstance(node, torch.autograd.function.BackwardCFunction):
                return False  # a user's autograd.Function, whatever its name
            if name == "SelectBackward":
                sizes = node._saved_self_sym_sizes
                if nd is not None and len(sizes) != nd or not _along(node, nd, d):
                    return False
                tops.add(_signed(node._saved_index, sizes[_signed(node._saved_dim, len(sizes))]))
                continue
            if name in ("UnbindBackward", "SplitBackward"):
                # The outputs the task takes: the edges into the node from its own graph.
                taken = {n for _, n, _ in parents.get(node, ())}
                if len(taken) != 1 or not _along(node, nd, d):
                    return False
                if name == "SplitBackward":
                    if node._saved_split_size != 1 or (
                            nd is not None and len(node._saved_self_sym_sizes) != nd):
                        return False
                elif broadcast:
                    return False  # (unbind keeps no shape to check the dimensions against)
                tops.add(taken.pop())
                continue
            if sum(fn is not None for fn, _ in node.next_functions) != 1:
                return False  # another operand that requires grad: not this tensor's alone
            state = (broadcast or name in _BINARY and _may_add_dims(node, nd), nd, d)
            if node.name() in _REDUCTIONS:
                if nd is not None:
                    reduced = {_signed(x, nd) for x in node._saved_dim}
                    if len(node._saved_self_sym_sizes) != nd or not reduced or d in reduced:
                        return False  # (leading dimensions added, or the join's reduced)
                    if not node._saved_keepdim:
                        state = (False, nd - len(reduced), d - sum(x < d for x in reduced))
                # Its input's dimensions are checked (where they are known): what is above
                # it has the dimensions computed here.
                state = (False, *state[1:])
            elif name == "SqueezeBackward":
                if nd is not None:
                    sizes = node._saved_self_sym_sizes
                    if len(sizes) != nd:
                        return False
                    kind = node.name()[-1]  # 0: every size-1 dimension; 1: one; 2: several
                    named = range(nd) if kind == "0" else {_signed(x, nd) for x in (
                        [node._saved_dim] if kind == "1" else node._saved_dim)}
                    gone = {x for x in named if sizes[x] == 1}
                    if d in gone:
                        return False
                    state = (False, nd - len(gone), d - sum(x < d for x in gone))
                else:
                    state = (False, nd, d)
            elif name == "UnsqueezeBackward":
                if nd is not None:
                    if broadcast:
                        return False  # (it keeps no shape to check the dimensions against)
                    new = _signed(node._saved_dim, nd + 1)
                    state = (False, nd + 1, d + (new <= d))
            elif name in _LOSSES:
                if node._saved_reduction != 0:
                    return False  # a mean or a sum over every element
            elif not (name in _POINTWISE or name == "AliasBackward"
                      or name == "SliceBackward" and node._saved_start == 0
                      and node._saved_step == 1 and node._saved_end >= node._saved_self_sym_sizes[
                          _signed(node._saved_dim, len(node._saved_self_sym_sizes))]):
                return False
            if node not in seen:
                seen[node] = state
                todo.append(node)
    # The indices read along the join's dimension (the same one read twice is one; without
    # the dimensions, the selections may yet turn out to be along it).
    return bool(tops) if ndim is None else len(tops) == 1


# What an element-wise node with a second operand saves of it (a tensor, or a number).
_OPERANDS = ("_saved_other", "_saved_self", "_saved_exponent", "_saved_min", "_saved_max",
             "_saved_target", "_saved_weight", "_saved_pos_weight")


def _may_add_dims(node, nd: int | None) -> bool:
    """Whether an element-wise node of a tensor of ``nd`` dimensions and constants may have
    broadcast it to more dimensions (leading ones, which move the join's dimension): where
    some constant it saved has more, or where it saved none that tells. Its own tensor, which
    it may save too, has ``nd``. Not known yet (``nd`` None): False, the check with the
    dimensions decides."""
    if nd is None:
        return False
    told = False
    for attr in _OPERANDS:
        value = getattr(node, attr, None)
        if isinstance(value, torch.Tensor):
            if value.dim() > nd:
                return True
            told = True
        elif isinstance(value, (int, float, bool)):
            told = True
    return not told


def _join_gradients(joins: list, losses: list[torch.Tensor], nodes) -> list[dict] | None:
    """For each task, for each node of ``joins`` its backward pass runs: which inputs its loss
    sends a non-zero gradient to, and the number of dimensions of the join's output, or None
    where the join is a cat of an input that spans several indices along its dimension (which
    input holds a given index then depends on their sizes, which may be the data's: a sequence
    of any length, a batch's rows). None
    where this cannot be measured without side effects: a DistributedDataParallel built with
    ``static_graph`` (its output node starts the gradient averaging at the first backward
    pass), or a backward pass that raises (the task's own backward raises the same error
    later)."""
    from torch.autograd.graph import GradientEdge
    # (Also the nodes between the losses and where the tasks' walks start: a stacked tensor
    # of losses that DistributedDataParallel's output node passed on.)
    between: set = set()
    stack = [loss.grad_fn for loss in losses if loss is not None]
    while stack:
        node = stack.pop()
        if node is None or node in nodes or node in between:
            continue
        between.add(node)
        stack.extend(fn for fn, _ in node.next_functions)
    for node in [*nodes, *between]:
        if node.name() == "_DDPSinkBackward":
            ref = getattr(node, "ddp_weakref", None)
            ddp = ref() if callable(ref) else None
            if ddp is None or getattr(ddp, "static_graph", True):
                return None
    edges = list(dict.fromkeys((fn, nr) for node in joins for fn, nr in node.next_functions
                               if fn is not None))
    inputs = [GradientEdge(fn, nr) for fn, nr in edges]

    def record(seen: dict, node):
        def hook(grad_inputs, grad_outputs):
            out = grad_outputs[0]
            if out is not None:
                dim = _signed(node._saved_dim, out.dim())
                # (a stack's inputs lack its dimension: one index each)
                single = _base_name(node) == "StackBackward" or all(
                    g is not None and g.dim() == out.dim() and g.shape[dim] == 1
                    for g in grad_inputs)
                seen[node] = ([g is not None and bool(g.count_nonzero()) for g in grad_inputs],
                              out.dim() if single else None)
        return hook

    sent: list[dict] = []
    for loss in losses:
        seen: dict = {}
        handles = [node.register_hook(record(seen, node)) for node in joins]
        try:
            torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        except RuntimeError:
            return None
        finally:
            for h in handles:
                h.remove()
        sent.append(seen)
    return sent


def split_shared(roots: list, losses: list[torch.Tensor], params: list[torch.Tensor]
                 ) -> list[bool]:
    """For each parameter: is it reached by two or more tasks? ``roots``: one loss tensor or
    autograd node per task (see :func:`task_roots`); ``losses``: the K losses (see
    :func:`task_reach`)."""
    reach = task_reach(roots, losses)
    return [sum(id(p) in r for r in reach) >= 2 for p in params]


def _holds_node(roots: list, match) -> bool:
    """Whether the autograd graph below ``roots`` (loss tensors or nodes) holds a node whose
    name ``match`` accepts."""
    seen: set = set()
    stack = [r[0] if isinstance(r, tuple) else r.grad_fn if isinstance(r, torch.Tensor) else r
             for r in roots]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if match(node.name()):
            return True
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)
    return False


def compiled_graph(roots: list) -> bool:
    """Whether a task's graph passes through a compiled region (``torch.compile``): one opaque
    node that reaches every parameter of the region, whichever outputs a task uses."""
    return _holds_node(roots, lambda name: "CompiledFunction" in name)


REENTRANT_CHECKPOINT = (
    "the losses' autograd graph holds a torch.utils.checkpoint made with use_reentrant=True: "
    "its node runs a backward pass of its own, which hides the parameters inside it from the "
    "graph (they would get no gradient) and which torch refuses under autograd.grad and "
    "backward(inputs=...); checkpoint with use_reentrant=False (Hugging Face: "
    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
    "{'use_reentrant': False}))")


def reentrant_checkpoint(roots: list) -> bool:
    """Whether a task's graph passes through a reentrant ``torch.utils.checkpoint``
    (``use_reentrant=True``, the ``CheckpointFunctionBackward`` node): a walk of the graph does
    not see the parameters inside it, and a backward pass restricted to some tensors
    (``autograd.grad``, ``backward(inputs=...)``) either skips it (the parameters inside get
    no gradient, silently) or raises. :data:`REENTRANT_CHECKPOINT` is the error to give."""
    return _holds_node(roots, lambda name: name == "CheckpointFunctionBackward")


def reached_by_gradients(losses: list[torch.Tensor], params: list[torch.Tensor]
                         ) -> list[set[int]]:
    """For each task: ids of the parameters (of those requiring grad) to which its loss gives a
    non-zero gradient. What a task reaches where the autograd structure cannot tell (compiled
    regions compute every parameter's gradient, exact zeros for parameters a task does not
    use). One backward pass per task, keeping the graph."""
    candidates = [p for p in params if p.requires_grad]
    reach = []
    for loss in losses:
        grads = torch.autograd.grad(loss, candidates, retain_graph=True, allow_unused=True)
        reach.append({id(p) for p, g in zip(candidates, grads)
                      if g is not None and bool(g.count_nonzero())})
    return reach


def split_shared_by_gradients(losses: list[torch.Tensor], params: list[torch.Tensor]
                              ) -> list[bool]:
    """For each parameter: do two or more tasks give it a non-zero gradient? The detection for
    graphs that the autograd structure cannot split (see :func:`compiled_graph`), on the first
    batch only."""
    reach = reached_by_gradients(losses, params)
    return [sum(id(p) in r for r in reach) >= 2 for p in params]


def dense_strides(t: torch.Tensor) -> bool:
    """Whether ``t`` covers exactly ``numel`` consecutive elements in some order of its
    dimensions (contiguous, channels_last, transposed, ...): what a flat kernel loop may read.
    Size-1 dimensions are ignored, since their strides address nothing, and a tensor of no
    elements (``nn.Linear(0, 3).weight``) addresses nothing at all."""
    if t.numel() == 0:
        return True
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def not_dense(t: torch.Tensor) -> str:
    """What ``t``, for which :func:`dense_strides` is False, is: a phrase for an error."""
    # Overlapping where the elements span fewer addresses than there are elements (expanded,
    # unfold); else with gaps between them (a slice of columns).
    span = 1 + sum((sz - 1) * abs(st) for st, sz in zip(t.stride(), t.shape))
    overlap = span < t.numel()
    what = ("a view whose elements overlap in memory (expanded or unfolded" if overlap
            else "a strided view with gaps (not dense")
    return f"is {what}; strides {tuple(t.stride())})"


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and the same memory order (strides equal on every dimension of size > 1)."""
    if a.shape != b.shape:
        return False
    return a.stride() == b.stride() or all(
        sa == sb for sa, sb, sz in zip(a.stride(), b.stride(), a.shape) if sz != 1)


def layout_view(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A view of the 1-D ``flat`` (``like.numel()`` elements) with ``like``'s shape and memory
    order, so that element j of ``flat`` is element j of ``like`` in memory."""
    return flat.as_strided(like.shape, like.stride(), flat.storage_offset())


# The native core's code of each parameter dtype it steps.
DTYPES = {torch.float32: _native.DType.FLOAT32, torch.float64: _native.DType.FLOAT64,
          torch.bfloat16: _native.DType.BFLOAT16, torch.float16: _native.DType.FLOAT16}


def sum_rows(rows: torch.Tensor, k: int, length: int) -> bool:
    """Row k of the contiguous rows (each ``length`` long) = Σ_{i<k} row i, natively, on the rows'
    device (on CUDA in its current stream); whether every task row was finite (CPU; False on
    CUDA, which does not look)."""
    if rows.device.type == "cuda" and rows.dtype == torch.float64:
        # The CUDA core steps no float64 parameters (the step says so clearly): the sum row
        # that backward forms for .grad comes from torch.
        torch.sum(rows[:k], dim=0, out=rows[k])
        return False
    code = int(DTYPES[rows.dtype])
    if rows.device.type == "cuda":
        with torch.cuda.device(rows.device):
            _native.cuda_module().sum_rows(code, rows.data_ptr(), k, length,
                                           torch.cuda.current_stream(rows.device).cuda_stream)
        return False
    return _native._C.sum_rows(code, rows.data_ptr(), k, length)


# Rows of at least ROW_SKEW_MIN_BYTES are skewed by ROW_SKEW_BYTES (37 pages, odd): see
# padded_row_length.
ROW_SKEW_MIN_BYTES = 4 << 20
ROW_SKEW_BYTES = 37 * 4096


def padded_row_length(n: int, dtype: torch.dtype) -> int:
    """The row length for n elements: an odd number of 64-byte cache lines (0 stays 0), and for
    rows of 4 MiB or more, 37 pages (148 KiB, under 3.6% of such a row) more.

    With a row length of a power of two (a model of 16M shared parameters), element j of every
    task row fell into one cache set, which eight rows or more overflow; rows of an odd number
    of lines fall into different sets (benches/bench_step.py's model at K = 8: apply pass
    34-36 -> 29-30 ms). Rows that far apart still shared the address bits above the page that
    a large allocation keeps (for the DRAM banks, most likely): skewing each row by an odd
    number of pages took the K = 8 passes at P = 16M from 44-50 to 33-36 ms (Gram) and from
    29-33 to 22-27 ms (apply); one page gained a little, three more, 37 the most."""
    if n == 0:
        return 0
    size = torch.empty((), dtype=dtype).element_size()
    line = max(64 // size, 1)
    lines = -(-n // line)
    length = (lines + 1 - lines % 2) * line
    if length * size >= ROW_SKEW_MIN_BYTES:
        length += ROW_SKEW_BYTES // size  # 37·64 lines: the count stays odd
    return length


class TaskGradients:
    """The K×P buffer of per-task gradients of the shared parameters.

    Row i holds ∂L_i/∂θ for the P shared scalars, laid out parameter after parameter in the
    order given, each parameter in its own memory order (a channels_last or transposed parameter
    keeps its layout), so a kernel reads parameter, state and gradient with one flat index. The
    buffer is allocated once and reused; :meth:`compute` fills it with one
    ``torch.autograd.grad`` call per task.

    One ``autograd.grad`` call per task was chosen over a single ``is_grads_batched=True`` call
    by measurement (``benches/bench_backward.py``, 2-core CPU, torch 2.13): the loop was 1.5×
    faster on the MMoE and 1.3× on the PLE model of the demo and equal (±3%) on a 1.3M-parameter
    MLP trunk with K = 2 and K = 8. The batched call runs the backward under vmap, which keeps
    K-times larger intermediates alive and has no batching rule for some operators, so it gains
    nothing here and risks more.
    """

    def __init__(self, shared: list[torch.Tensor], k: int, with_sum: bool = False,
                 row_length: int | None = None, pad_rows: bool = False,
                 dtype: torch.dtype | None = None):
        self.params = shared
        self.k = k
        self.with_sum = with_sum
        self.numels = [p.numel() for p in shared]
        self.offsets = []
        off = 0
        for n in self.numels:
            self.offsets.append(off)
            off += n
        self.size = off
        dtypes = {p.dtype for p in shared}
        devices = {p.device for p in shared}
        if len(dtypes) > 1 and dtype is None:
            raise TypeError(
                f"shared parameters must have one dtype, got {sorted(map(str, dtypes))}"
            )
        if len(devices) > 1:
            raise TypeError(
                f"shared parameters must be on one device, got {sorted(map(str, devices))}"
            )
        # The buffer's dtype: ``dtype`` where given (shared parameters of several dtypes then
        # share one buffer of that type), else the parameters' one dtype.
        self.dtype = dtype if dtype is not None else shared[0].dtype if shared else torch.float32
        self.device = shared[0].device if shared else torch.device("cpu")
        # With a sum row (row K): Σ_i g_i, which the optimizers expose as the shared parameters'
        # .grad (see PUBOptimizer.backward).
        # Rows may be padded past P: to row_length (equal shards under data parallelism), or,
        # with pad_rows, to an odd number of cache lines for the native kernels.
        if row_length is not None:
            self.row_length = max(row_length, self.size)
        elif pad_rows:
            self.row_length = padded_row_length(self.size, self.dtype)
        else:
            self.row_length = self.size
        # Never an inference tensor (a first backward under torch.inference_mode()): the buffer
        # outlives the call, and later calls update it in place and read its version counter.
        with torch.inference_mode(False):
            self.buffer = torch.zeros((k + int(with_sum), self.row_length), dtype=self.dtype,
                                      device=self.device)
        self.sum_version: int | None = None  # buffer._version when the sum row was formed
        # Whether every task row was finite when the sum row was formed (CPU; else False).
        self.sum_finite = False
        # The layout each parameter had when the buffer was laid out: a parameter whose shape,
        # dtype or memory order changed since (model.to, .data =) needs a new buffer.
        self.layouts = [(p.shape, p.stride(), p.dtype, p.device) for p in shared]

    def __getstate__(self):
        state = dict(self.__dict__)
        for cache in ("_task_views", "_row_views"):
            state.pop(cache, None)
        # A copy's buffer starts a new version count: keep only whether the sum was current.
        state["sum_version"] = self.sum_version is not None and \
            self.sum_version == self.buffer._version
        return state

    def __setstate__(self, state):
        current = state.pop("sum_version")
        self.__dict__.update(state)
        self.sum_version = self.buffer._version if current else None

    def matches(self) -> bool:
        """Whether every shared parameter still has the layout this buffer was made for, and
        the buffer is whole (its storage, which the shared ``.grad`` are views of, can be
        shrunk in place through them)."""
        return self.intact() and all((p.shape, p.stride(), p.dtype, p.device) == lay
                                     for p, lay in zip(self.params, self.layouts))

    def intact(self) -> bool:
        """Whether the buffer's storage still holds all of it."""
        return self.buffer.untyped_storage().nbytes() >= self.buffer.nbytes

    def views(self, i: int) -> list[torch.Tensor]:
        """Row i of the buffer as tensors shaped (and laid out) like the shared parameters,
        made once: the buffer lives as long as this object, which serves only while
        :meth:`matches` (its owner lays out a new one when a parameter's layout changes)."""
        cache = self.__dict__.setdefault("_row_views", {})
        views = cache.get(i)
        if views is None:
            row = self.buffer[i]
            views = cache[i] = [layout_view(row[o:o + n], p) for p, o, n in
                                zip(self.params, self.offsets, self.numels)]
        return views

    def sum_view(self, index: int) -> torch.Tensor:
        """The sum row's part for shared parameter ``index``, shaped and laid out like it: a new
        view at every call, since it is handed out as the parameter's ``.grad``, which a user
        may re-point (``p.grad.data = ...``)."""
        p = self.params[index]
        return self.buffer.as_strided(p.shape, p.stride(), self.buffer.storage_offset()
                                      + self.k * self.row_length + self.offsets[index])

    def form_sum(self) -> None:
        """Row K = Σ_i row i (in the math type, task order, one rounding: native sum_rows) and
        remember the buffer's version, so that a later in-place change of it can be told, and
        (CPU) whether the task rows were finite, found in the same pass."""
        self.sum_finite = bool(self.size) and sum_rows(self.buffer, self.k, self.row_length)
        self.sum_version = self.buffer._version

    def task_view(self, index: int) -> torch.Tensor:
        """Every task's gradient of shared parameter ``index``: (K, *shape), in its layout."""
        views = self.__dict__.setdefault("_task_views", {})
        view = views.get(index)
        if view is None:
            p, o = self.params[index], self.offsets[index]
            view = views[index] = self.buffer[:, o:o + self.numels[index]].as_strided(
                (self.k, *p.shape), (self.row_length, *p.stride()), o)
        return view

    def compute(self, losses: list[torch.Tensor], specific: list[list[torch.Tensor]],
                retain_graph: bool = False, accumulate: bool = False, scale: float = 1.0,
                on_task=None, surprise: list[set[int]] | None = None,
                nothing_reached: str | None = None, written: list | None = None,
                apart: list[set[int]] | None = None, name_of=None, owner: str = "PUB") -> int:
        """Fill the buffer with each task's shared gradients; accumulate task-specific gradients.
        Returns how many gradients autograd gave the shared and task-specific tensors (0: no
        loss reached any of them).

        ``specific[i]`` are the non-shared parameters whose gradient from task i is added to
        ``.grad`` as ``loss.backward()`` would (unreached ones are skipped at no cost). With
        ``accumulate`` the shared gradients are added to the buffer instead of replacing it.
        Shared parameters that do not require grad (frozen) are not differentiated; their rows
        hold zeros. ``scale`` multiplies the shared gradients as they are stored (1/N under data
        parallelism); ``on_task(i)`` is called as soon as row i is complete (to start its
        reduction while the next task's backward runs). ``surprise[i]``: ids of task-specific
        parameters that task i is not expected to reach; ``self.surprises`` receives the pairs
        (i, parameter) of those it gave a gradient to. ``nothing_reached``: the message of the
        :class:`NothingReached` error raised, before any ``.grad`` is written, when no loss
        reached a shared or task-specific tensor. ``written`` receives the tensors other than
        the shared ones whose ``.grad`` was written. ``apart[i]``: ids of task-specific
        parameters whose gradient from task i is kept apart, not added to ``.grad``:
        ``self.apart`` receives the triples (i, parameter, a copy of the gradient in its layout).
        A sparse gradient of a shared parameter raises TypeError, naming the parameter by
        ``name_of(parameter)`` (the caller's name for it, e.g. ``params[j] (shape ...)``; its
        shape without one) and ``owner`` (who needs dense gradients).
        """
        active = [j for j, p in enumerate(self.params) if p.requires_grad]
        shared = [self.params[j] for j in active]
        if (len(active) < len(self.params) or any(loss is None for loss in losses)) \
                and not accumulate:
            self.buffer.zero_()
        # autograd may hand one tensor to two parameters (w = a + b gives a and b the same
        # gradient object), or views of one buffer: .grad must own its memory, since later
        # tasks and later backward calls accumulate into it in place. A gradient is taken as it
        # is only when no other parameter got memory of the same storage in this call, and no
        # tensor hook of the parameter saw it (a hook may keep it: torch's AccumulateGrad, too,
        # copies a gradient that something else holds).
        handed_out: set[int] = set()
        # id(parameter) -> [parameter, its gradient or sum, how it goes into .grad]
        staged: dict[int, list] = {}
        self.touched = False  # whether this call wrote to the buffer (before it raised)
        received = 0
        self.surprises: list[tuple[int, torch.Tensor]] = []
        self.apart: list[list] = []
        last = max((i for i, loss in enumerate(losses) if loss is not None), default=-1)
        for i, loss in enumerate(losses):
            inputs = shared + specific[i]
            if loss is None or not inputs:  # a task absent from this batch: zero rows
                if on_task is not None:
                    on_task(i)
                continue
            grads = torch.autograd.grad(
                loss, inputs, retain_graph=retain_graph or i < last, allow_unused=True
            )
            received += sum(g is not None for g in grads)
            self.touched = True  # rows are written from here on
            row = self.views(i)
            for j, g in zip(active, grads[:len(shared)]):
                view = row[j]
                if g is None:
                    if not accumulate:
                        view.zero_()
                    continue
                if g.is_sparse:
                    p = self.params[j]
                    name = f"a parameter of shape {tuple(p.shape)}" if name_of is None \
                        else name_of(p)
                    raise TypeError(
                        f"{name} is shared and gets a sparse gradient (nn.Embedding("
                        f"sparse=True)): {owner} needs dense gradients of the shared "
                        "parameters (use sparse=False in nn.Embedding)"
                    )
                if accumulate:
                    view.add_(g, alpha=scale)
                elif scale != 1.0:
                    torch.mul(g, scale, out=view)
                else:
                    view.copy_(g)
            if on_task is not None:
                on_task(i)
            for p, g in zip(specific[i], grads[len(shared):]):
                if g is None:
                    continue
                if surprise is not None and id(p) in surprise[i]:
                    self.surprises.append((i, p))
                if apart is not None and id(p) in apart[i]:
                    # (a copy: autograd may hand g to a parameter staged below, summed in place)
                    self.apart.append([i, p, _grad_like(g, p)])
                    continue
                entry = staged.get(id(p))
                if entry is None:
                    # Staged tensors are summed in place: one that another staged entry holds
                    # (autograd hands one tensor to two parameters) is copied now.
                    storage = g.untyped_storage().data_ptr() if g.layout == torch.strided \
                        else None
                    taken = storage is None or storage in handed_out
                    handed_out.add(storage)
                    if p.grad is None:  # taken as .grad itself where nothing else holds it
                        if taken or not same_layout(g, p) \
                                or getattr(p, "_backward_hooks", None):
                            g = _grad_like(g, p)
                        kind = "own"
                    else:
                        kind = "add"  # to add to the .grad there is
                        if taken and storage is not None:
                            g = g.clone()
                    staged[id(p)] = [p, g, kind]
                    continue
                if entry[2] == "add":  # .grad + g_0, in a sum of our own
                    entry[1], entry[2] = sum_into(p.grad.clone(), entry[1], p), "replace"
                entry[1] = sum_into(entry[1], g, p)
        if nothing_reached is not None and not received:
            raise NothingReached(nothing_reached)
        # Into .grad once every task's backward has run: one that raises (a freed graph, an
        # error in a custom backward) leaves the task-specific .grad as it was. The sums are
        # those loss.backward() per task makes ((.grad + g_0) + g_1 ...), and a parameter holds
        # at most one gradient of its own size besides .grad meanwhile.
        for p, g, kind in staged.values():
            if kind == "own":
                p.grad = g
            elif kind == "replace":
                if p.grad.is_sparse == g.is_sparse:
                    p.grad.copy_(g)
                else:  # (a sparse .grad that a dense gradient made dense)
                    p.grad = g
            else:
                p.grad.add_(g)
        if written is not None:
            written.extend(p for p, _, _ in staged.values())
        return received


def sum_into(total: torch.Tensor, g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """total + g, in total's memory (which the caller owns) where it can be: a sparse total
    and a dense g give a dense sum (as AccumulateGrad sums them), in p's layout."""
    if total.is_sparse and not g.is_sparse:
        return _grad_like(g, p).add_(total)
    return total.add_(g)


class NothingReached(ValueError):
    """No loss reached any of the tensors :meth:`TaskGradients.compute` differentiates."""


def _grad_like(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A copy of g that owns its memory, in p's memory order when p is dense (torch's gradient
    layout contract for AccumulateGrad)."""
    if g.is_sparse:
        return g.clone()
    out = torch.empty_like(p, dtype=g.dtype) if dense_strides(p) else torch.empty_like(g)
    out.copy_(g)
    return out


def named_pair(item) -> bool:
    """Whether ``item`` is a (name, tensor) pair, as ``model.named_parameters()`` gives."""
    return isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) \
        and isinstance(item[1], torch.Tensor)


def refuse_names(value, name: str) -> None:
    """A TypeError where ``value``, an argument that takes parameter tensors (``shared=``),
    holds parameter names or the (name, tensor) pairs of ``model.named_parameters()``, naming
    the argument and the item: the tensors themselves are needed (a name would otherwise be
    reported as a tensor that is not among the parameters)."""
    single = isinstance(value, str) or named_pair(value)
    items = [value] if single else list(value)
    for i, item in enumerate(items):
        where = name if single else f"{name}[{i}]"
        if isinstance(item, str):
            what = f"a parameter name ({item!r})"
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            what = (f"a (name, tensor) pair ({item[0]!r}, ...), as model.named_parameters() "
                    "gives")
        else:
            continue
        raise TypeError(
            f"{where} is {what}: {name}= takes the parameter tensors themselves, not their "
            f"names, e.g. {name}=[p for n, p in model.named_parameters() if "
            "n.startswith('trunk.')]")


@contextlib.contextmanager
def backward_grad_mode():
    """The grad mode of the library's backward calls: grad enabled and inference mode off,
    whatever the caller's context, as ``loss.backward()`` works on a graph built before
    ``torch.no_grad()`` or ``torch.inference_mode()`` was entered. The losses the library sums
    or weights then have a graph to differentiate, and the tensors it keeps (buffers, state,
    ``.grad``) are ordinary ones, which later calls outside the context update in place (an
    inference tensor refuses that)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield
