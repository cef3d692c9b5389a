"""``torch.compile`` support (Python layer): the PUB step as an opaque custom op.

A training step compiled with ``torch.compile`` that calls ``opt.step()`` reaches
``pub_native::optimizer_step``, registered with ``torch.library``: the compiler neither traces
into the step (plan building, raw pointers, native calls) nor breaks the graph on it. The op is
declared to mutate the parameters and to read their gradients, and runs the optimizer's ordinary
step when the compiled code runs; the optimizer state is the optimizer's own, outside the graph.
The gradients are arguments so that a change the compiled code makes to them before the step
(``clip_grad_norm_``) reaches the step: the compiler writes such a change to ``.grad`` only after
the graph, and hands the op the new values.

torch 2.4 compiles ops that mutate single tensors only, not a list of them: there the step is
``pub_native::optimizer_step_<n>``, one op per number n ≤ 62 of parameters with one tensor
argument each and the list of gradients (torch's limit is 64 arguments), made when an optimizer
with n parameters is built, restored or given a parameter group. With more parameters, torch 2.4
runs the step outside the compiled graph (a graph break).
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


def _run(handle: int, params, grads) -> None:
    """The body of the op: the optimizer's eager step."""
    ref = _OPTIMIZERS.get(handle)
    opt = None if ref is None else ref()
    if opt is None:
        raise RuntimeError("pub_native::optimizer_step: the optimizer no longer exists")
    swapped = _swap_in_graph_grads(_params(opt), grads)
    # If the step raises, the graph stops here and never writes its gradients back: they stay
    # in .grad, as after an eager step that raised.
    opt._take_step()
    for p, old in swapped:
        p.grad = old
    # Where the compiler functionalized the op, `params` are copies that it writes back to the
    # parameters afterwards: they must hold the new values too. (Reinplaced, they are the
    # parameters themselves and nothing is copied.)
    for arg, p in zip(params, _params(opt)):
        if arg.data_ptr() != p.data_ptr():
            arg.copy_(p)


_LIST_MUTATION = tuple(int(v) for v in re.findall(r"\d+", torch.__version__)[:2]) >= (2, 5)

# The op's signature is read by torch.library: its annotations must be real types (no
# ``from __future__ import annotations``), and torch 2.4 knows typing.List but not list[...].
_Tensors = typing.List[torch.Tensor]  # noqa: UP006
_OptionalTensors = typing.List[typing.Optional[torch.Tensor]]  # noqa: UP006, UP045

if _LIST_MUTATION:

    @torch.library.custom_op("pub_native::optimizer_step", mutates_args=("params",))
    def _optimizer_step(handle: int, params: _Tensors, grads: _OptionalTensors) -> None:
        _run(handle, params, grads)

    @_optimizer_step.register_fake
    def _(handle: int, params: _Tensors, grads: _OptionalTensors) -> None:
        return None


_OPS_BY_COUNT: dict[int, typing.Any] = {}
_MAX_OP_ARGS = 64  # torch's limit on the arguments of an op (n parameters, the handle, the grads)


def _op_for(n: int):
    """torch 2.4: the op for n parameters, ``(int handle, Tensor(a0!) p0, ..., Tensor?[] grads)
    -> ()``; None where there is none (too many parameters, or torch refused it: the step then
    breaks the graph, and eager training is never stopped by a compile op)."""
    op = _OPS_BY_COUNT.get(n)
    if op is None and n + 2 <= _MAX_OP_ARGS:
        names = [f"p{i}" for i in range(n)]
        schema = "(" + ", ".join(["int handle"] + [f"Tensor(a{i}!) {x}"
                                                   for i, x in enumerate(names)]
                                 + ["Tensor?[] grads"]) + ") -> ()"

        def step(handle, *args):
            _run(handle, args[:-1], args[-1])

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
    # torch 2.4 with 63 parameters or more (no op can take them), or parameters appended to a
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
    params = _params(opt)
    if _LIST_MUTATION:
        _optimizer_step(opt._compile_handle, params, [p.grad for p in params])
    elif len(params) in _OPS_BY_COUNT:
        _OPS_BY_COUNT[len(params)](opt._compile_handle, *params, [p.grad for p in params])
    else:
        outside_graph(_eager_step)(opt)
