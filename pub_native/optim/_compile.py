"""``torch.compile`` support (Python layer): the PUB step as an opaque custom op.

A training step compiled with ``torch.compile`` that calls ``opt.step()`` reaches
``pub_native::optimizer_step``, registered with ``torch.library``: the compiler neither traces
into the step (plan building, raw pointers, native calls) nor breaks the graph on it. The op is
declared to mutate the parameters, and runs the optimizer's ordinary step when the compiled code
runs; the optimizer state is the optimizer's own, outside the graph.
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["compiled_step", "register"]

_OPTIMIZERS: dict[int, weakref.ref] = {}


def register(opt) -> int:
    """A handle by which the custom op finds ``opt`` (held weakly). Called when the optimizer
    is built or restored, outside any compiled code."""
    handle = id(opt)
    ref = _OPTIMIZERS.get(handle)
    if ref is None or ref() is not opt:
        _OPTIMIZERS[handle] = weakref.ref(opt)
    return handle


@torch.library.custom_op("pub_native::optimizer_step", mutates_args=("params",))
def _optimizer_step(handle: int, params: list[torch.Tensor]) -> None:
    ref = _OPTIMIZERS.get(handle)
    opt = None if ref is None else ref()
    if opt is None:
        raise RuntimeError("pub_native::optimizer_step: the optimizer no longer exists")
    opt._take_step()
    # Where the compiler functionalized the op, `params` are copies that it writes back to the
    # parameters afterwards: they must hold the new values too. (Reinplaced, they are the
    # parameters themselves and nothing is copied.)
    mine = [p for g in opt.param_groups for p in g["params"]]
    for arg, p in zip(params, mine):
        if arg.data_ptr() != p.data_ptr():
            arg.copy_(p)


@_optimizer_step.register_fake
def _(handle: int, params: list[torch.Tensor]) -> None:
    return None


def compiled_step(opt) -> None:
    """The step of ``opt`` as the custom op (what ``step()`` calls under torch.compile)."""
    _optimizer_step(opt._compile_handle, [p for g in opt.param_groups for p in g["params"]])
