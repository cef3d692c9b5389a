"""``torch.compile`` support (Python layer): the PUB step as an opaque custom op.

A training step compiled with ``torch.compile`` that calls ``opt.step()`` reaches
``pub_native::optimizer_step``, registered with ``torch.library``: the compiler neither traces
into the step (plan building, raw pointers, native calls) nor breaks the graph on it, and runs
the optimizer's ordinary step when the compiled code runs. The op's schema says what the step
reads and writes, so that the compiler orders the graph's own reads and writes around it as
around torch.optim's traced step: it mutates the parameters and the optimizer state entries the
step keeps (``step`` and the rule's tensors, e.g. ``exp_avg``), and reads the gradients and the
options given as tensors (a tensor ``lr``). The compiler functionalizes these: it hands the op
the values as the graph made them (a parameter clamped, a state entry reset, ``lr.fill_``,
``clip_grad_norm_`` before the step), which may be copies, and writes the copies back to the
tensors only after the graph. The op therefore gives the step those values first, steps the
optimizer's own tensors, and puts the new values in the copies, so that reads after the step
in the same graph see them (see ``_run``). Where the compiler hands over the tensors
themselves (inductor, when nothing earlier in the graph wrote them), nothing is copied; an
eager step is never affected.

torch 2.4 compiles ops that mutate single tensors only, not a list of them: there the step is
``pub_native::optimizer_step_<n>``, one op per number n ≤ 60 of parameters with one tensor
argument each, the list of gradients and the list of tensor options (torch's limit is 64
arguments), made when an optimizer with n parameters is built, restored or given a parameter
group. One argument per state tensor would pass that limit: on torch 2.4 the op does not
declare the optimizer state, so that a change to it made in the compiled function before the
step, or a read of it after the step in the same graph, needs torch 2.5 or later. With more
parameters, torch 2.4 runs the step outside the compiled graph (a graph break).
"""

import re
import sys
import typing
import weakref

import torch

__all__ = ["compiled_step", "outside_graph", "prepare", "register"]

_OPTIMIZERS: dict[int, weakref.ref] = {}


def register(opt) -> int:
    """A handle by which the custom op finds ``opt`` (held weakly). Called when the optimizer
    is built or restored, outside any compiled code."""
    handle = id(opt)
    ref = _OPTIMIZERS.get(handle)
    if ref is None or ref() is not opt:
        _OPTIMIZERS[handle] = weakref.ref(opt)
    prepare(opt)
    return handle


def _params(opt) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


def _swap_in_graph_grads(params, grads) -> list:
    """Give each parameter, for the step, the gradient that the compiled code passed to the op;
    returns (parameter, .grad before) for each one changed. Where that code changed a gradient
    before the step (``clip_grad_norm_``, an in-place scaling, ``p.grad = ...``), the compiler
    hands the op the new value and sets ``.grad`` only after the graph: the step must see it
    now, as an eager step would. It is put in place of ``.grad``, never written into it: the
    compiler's own write after the graph is then the only one, whether it writes into the old
    tensor (an in-place change) or replaces it, and gradients that alias each other (swapped,
    transposed) stay as they are. An unchanged gradient arrives as the same view of the same
    memory, and is left alone."""
    changed = [(p, g) for p, g in zip(params, grads) if g is not p.grad and (
        g is None or p.grad is None or not _same_view(g, p.grad))]
    swapped = [(p, p.grad) for p, _ in changed]
    for p, g in changed:
        p.grad = g
    return swapped


def _state_keys(opt, group) -> list[str]:
    """The state entries a step of ``group``'s parameters may read and write: its counter and
    the rule's tensors (per task under AdaTask)."""
    names = opt._state_names(group)
    return ["step", *names, *["task_" + n for n in names]]


def _option_keys(opt) -> tuple[str, ...]:
    return (*opt._NUMBER_OPTIONS, *opt._PAIR_OPTIONS)


def _graph_inputs(opt) -> tuple[list, list, list, list, list, list]:
    """What the op is given (traced by the compiler, which reads the optimizer as it is when it
    compiles and guards on what it read): the parameters, their gradients, the state tensors
    the step keeps with where each is (``state_at``: parameter index, key index in
    ``_state_keys``), and the options given as tensors with where each is (``options_at``:
    group, key index in ``_option_keys``, element of a pair or -1 for the whole value)."""
    params, grads, state, state_at, options, options_at = [], [], [], [], [], []
    option_keys = _option_keys(opt)
    for gi, group in enumerate(opt.param_groups):
        keys = _state_keys(opt, group)
        for p in group["params"]:
            i = len(params)
            params.append(p)
            grads.append(p.grad)
            st = opt.state.get(p)
            if not st:
                continue
            for k, key in enumerate(keys):
                value = st.get(key)
                if isinstance(value, torch.Tensor):
                    state.append(value)
                    state_at += [i, k]
        for k, key in enumerate(option_keys):
            value = group.get(key)
            if isinstance(value, torch.Tensor):
                options.append(value)
                options_at += [gi, k, -1]
            elif isinstance(value, (tuple, list)):
                for j, v in enumerate(value):
                    if isinstance(v, torch.Tensor):
                        options.append(v)
                        options_at += [gi, k, j]
    return params, grads, state, state_at, options, options_at


def _state_tensors(opt, params, state_at) -> list:
    """The optimizer's own state tensors at ``state_at`` now (None where there is none: an
    entry dropped since the compiler read the state, by an earlier step in the same graph;
    ``_copy_into`` also passes over one of another shape)."""
    keys = {}
    for group in opt.param_groups:
        names = _state_keys(opt, group)
        for p in group["params"]:
            keys[id(p)] = names
    found = []
    for n in range(0, len(state_at), 2):
        i, k = state_at[n], state_at[n + 1]
        st = opt.state.get(params[i]) if i < len(params) else None
        names = keys.get(id(params[i])) if i < len(params) else None
        value = st.get(names[k]) if st and names and k < len(names) else None
        found.append(value if isinstance(value, torch.Tensor) else None)
    return found


def _copy_into(targets, sources) -> None:
    """``target.copy_(source)`` for each pair of tensors that are not the same memory."""
    for target, source in zip(targets, sources):
        if (target is not None and source is not None and target.shape == source.shape
                and not _same_view(target, source)):
            target.copy_(source)


def _swap_in_graph_options(opt, options, options_at) -> list:
    """Put each option tensor that the compiled code passed to the op in place of the group's
    (the step reads the group; an earlier ``lr.fill_`` in the graph is in the argument only);
    returns (group, key, value before, the group's tensor, the argument) for each one put, to
    undo in reverse order (two elements of one pair are two). An option is only read by the
    step: nothing is written to it."""
    swapped = []
    option_keys = _option_keys(opt)
    for n, arg in enumerate(options):
        gi, k, j = options_at[3 * n: 3 * n + 3]
        if gi >= len(opt.param_groups) or k >= len(option_keys):
            continue
        group, key = opt.param_groups[gi], option_keys[k]
        value = group.get(key)
        if j < 0:
            new = arg
            real = value
        elif isinstance(value, (tuple, list)) and j < len(value):
            new = type(value)(arg if m == j else v for m, v in enumerate(value))
            real = value[j]
        else:
            continue
        if isinstance(real, torch.Tensor) and real is not arg and real.shape == arg.shape:
            swapped.append((group, key, value, real, arg))
            group[key] = new
    return swapped


def _run(handle: int, params, grads, state=(), state_at=(), options=(), options_at=()) -> None:
    """The body of the op: the optimizer's eager step, on the values the compiled code made.

    Where the compiler functionalized the op, ``params`` and ``state`` are copies that hold
    what the graph wrote to the parameters and state before the step, and that it writes back
    to them after the graph: their values are put in the optimizer's own tensors (the native
    step reads memory), the step is taken on those, and its results are put back in the
    copies. Gradients and options are read-only: the step is given them in place of ``.grad``
    and of the group's entries, for its duration. (Reinplaced by inductor, the arguments are
    the tensors themselves and nothing is copied.)"""
    ref = _OPTIMIZERS.get(handle)
    opt = None if ref is None else ref()
    if opt is None:
        raise RuntimeError("pub_native::optimizer_step: the optimizer no longer exists")
    mine = _params(opt)
    _copy_into(mine, params)
    if state:
        _copy_into(_state_tensors(opt, mine, state_at), state)
    swapped_options = _swap_in_graph_options(opt, options, options_at)
    swapped = _swap_in_graph_grads(mine, grads)
    try:
        opt._take_step()
    except BaseException:
        # The graph stops here and never writes its values back: the gradients stay in .grad
        # and the parameters and state hold what the graph made of them (the step changed
        # nothing), as after an eager step that raised; so must the options.
        for group, key, value, real, arg in reversed(swapped_options):
            group[key] = value
            real.copy_(arg)
        raise
    for group, key, value, _, _ in reversed(swapped_options):
        group[key] = value
    for p, old in swapped:
        p.grad = old
    _copy_into(params, mine)
    if state:
        _copy_into(state, _state_tensors(opt, mine, state_at))


_LIST_MUTATION = tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2]) >= (2, 5)

# The op's signature is read by torch.library: its annotations must be real types (no
# ``from __future__ import annotations``), and torch 2.4 knows typing.List but not list[...].
_Tensors = typing.List[torch.Tensor]  # noqa: UP006
_OptionalTensors = typing.List[typing.Optional[torch.Tensor]]  # noqa: UP006, UP045

_Ints = typing.List[int]  # noqa: UP006

if _LIST_MUTATION:

    @torch.library.custom_op("pub_native::optimizer_step", mutates_args=("params", "state"))
    def _optimizer_step(handle: int, params: _Tensors, grads: _OptionalTensors, state: _Tensors,
                        state_at: _Ints, options: _Tensors, options_at: _Ints) -> None:
        _run(handle, params, grads, state, state_at, options, options_at)

    @_optimizer_step.register_fake
    def _(handle: int, params: _Tensors, grads: _OptionalTensors, state: _Tensors,
          state_at: _Ints, options: _Tensors, options_at: _Ints) -> None:
        return None


_OPS_BY_COUNT: dict[int, typing.Any] = {}
# torch's limit on the arguments of an op (torch 2.4: n parameters, the handle, the gradients,
# the options and where they are)
_MAX_OP_ARGS = 64


def _op_for(n: int):
    """torch 2.4: the op for n parameters, ``(int handle, Tensor(a0!) p0, ..., Tensor?[] grads,
    Tensor[] options, int[] options_at) -> ()``; None where there is none (too many parameters,
    or torch refused it: the step then breaks the graph, and eager training is never stopped by
    a compile op)."""
    op = _OPS_BY_COUNT.get(n)
    if op is None and n + 4 <= _MAX_OP_ARGS:
        names = [f"p{i}" for i in range(n)]
        schema = "(" + ", ".join(["int handle"] + [f"Tensor(a{i}!) {x}"
                                                   for i, x in enumerate(names)]
                                 + ["Tensor?[] grads", "Tensor[] options",
                                    "int[] options_at"]) + ") -> ()"

        def step(handle, *args):
            _run(handle, args[:-3], args[-3], options=args[-2], options_at=args[-1])

        try:
            op = torch.library.custom_op(f"pub_native::optimizer_step_{n}", step,
                                         mutates_args=tuple(names), schema=schema)
            op.register_fake(lambda handle, *args: None)
        except (RuntimeError, ValueError):  # e.g. the name taken (this module reloaded)
            return None
        _OPS_BY_COUNT[n] = op
    return op


def prepare(opt) -> None:
    """Make what compiled code calls, outside compiled code: the op of ``compiled_step(opt)``
    (torch 2.4), and the ``outside_graph`` wrappers once torch's compiler is loaded."""
    if not _LIST_MUTATION:
        _op_for(len(_params(opt)))
    if "torch._dynamo" in sys.modules:
        for fn in (_eager_step, type(opt).zero_grad, type(opt).backward):
            outside_graph(fn)


def _eager_step(opt) -> None:
    # torch 2.4 with 61 parameters or more (no op can take them), or parameters appended to a
    # group by hand since the last prepare() (none can be made while compiling): the step runs
    # outside the graph (a graph break).
    opt._take_step()


_OUTSIDE: dict[typing.Any, typing.Any] = {}


def outside_graph(fn):
    """``fn`` under ``torch.compiler.disable``: called from compiled code, it runs outside the
    graph (a graph break; with ``fullgraph=True`` the compiler raises), as torch.optim's
    ``zero_grad`` and ``loss.backward()`` do. ``torch.compiler.disable`` imports torch._dynamo,
    which would add over a second to ``import pub_native``: the wrappers are made when an
    optimizer is built or restored after torch's compiler was loaded, else on first use, from
    compiled code (then a ``fullgraph=True`` error names torch's ``disable`` instead of the
    function)."""
    wrapped = _OUTSIDE.get(fn)
    if wrapped is None:
        wrapped = _OUTSIDE[fn] = torch.compiler.disable(fn)
    return wrapped


def compiled_step(opt) -> None:
    """The step of ``opt`` as the custom op (what ``step()`` calls under torch.compile)."""
    params, grads, state, state_at, options, options_at = _graph_inputs(opt)
    if _LIST_MUTATION:
        _optimizer_step(opt._compile_handle, params, grads, state, state_at, options,
                        options_at)
    elif len(params) in _OPS_BY_COUNT:
        _OPS_BY_COUNT[len(params)](opt._compile_handle, *params, grads, options, options_at)
    else:
        outside_graph(_eager_step)(opt)
