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
import typing
import weakref

import torch

from ._plan import mark_written

__all__ = ["compiled_step", "eager_zero_grad", "prepare", "register"]

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


def _take_graph_grads(params, grads) -> None:
    """Give each parameter the gradient that the compiled code passed to the op. Where that code
    changed a ``.grad`` before the step (``clip_grad_norm_``, an in-place scaling), the compiler
    hands the op the new value and writes it to ``.grad`` only after the graph: the step must
    see it now, as an eager step would. An unchanged ``.grad`` arrives as itself (same memory),
    and is left alone."""
    copied = []
    for p, g in zip(params, grads):
        if g is None:
            if p.grad is not None:
                p.grad = None
        elif p.grad is None:
            p.grad = g.detach().clone()
        elif g.data_ptr() != p.grad.data_ptr():
            p.grad.copy_(g)
            copied.append(p.grad)
    # The step notices a changed .grad by its version; torch 2.4 does not count writes made
    # inside a custom op in a compiled graph.
    mark_written(copied)


def _run(handle: int, params, grads) -> None:
    """The body of the op: the optimizer's eager step."""
    ref = _OPTIMIZERS.get(handle)
    opt = None if ref is None else ref()
    if opt is None:
        raise RuntimeError("pub_native::optimizer_step: the optimizer no longer exists")
    _take_graph_grads(_params(opt), grads)
    opt._take_step()
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
    """Make the op that ``compiled_step(opt)`` calls, outside compiled code (torch 2.4)."""
    if not _LIST_MUTATION:
        _op_for(len(_params(opt)))


def _eager_step(opt) -> None:
    # torch 2.4 with 63 parameters or more (no op can take them), or parameters appended to a
    # group by hand since the last prepare() (none can be made while compiling): the step runs
    # outside the graph (a graph break).
    opt._take_step()


def _zero_grad(opt, set_to_none: bool) -> None:
    opt.zero_grad(set_to_none=set_to_none)


_OUTSIDE: dict[typing.Any, typing.Any] = {}


def _outside_graph(fn):
    """``fn`` under ``torch.compiler.disable``: called from compiled code, it runs outside the
    graph (a graph break; with ``fullgraph=True`` the compiler raises). Made on first use, from
    compiled code: ``torch.compiler.disable`` imports torch._dynamo, which would add over a
    second to ``import pub_native``."""
    wrapped = _OUTSIDE.get(fn)
    if wrapped is None:
        wrapped = _OUTSIDE[fn] = torch.compiler.disable(fn)
    return wrapped


def eager_zero_grad(opt, set_to_none: bool) -> None:
    """``opt.zero_grad()`` called from compiled code: run outside the graph, as torch.optim's."""
    _outside_graph(_zero_grad)(opt, set_to_none)


def compiled_step(opt) -> None:
    """The step of ``opt`` as the custom op (what ``step()`` calls under torch.compile)."""
    params = _params(opt)
    if _LIST_MUTATION:
        _optimizer_step(opt._compile_handle, params, [p.grad for p in params])
    elif len(params) in _OPS_BY_COUNT:
        _OPS_BY_COUNT[len(params)](opt._compile_handle, *params, [p.grad for p in params])
    else:
        _outside_graph(_eager_step)(opt)
