"""The K×K balancing-weight solver (SPEC section 4), Python front of the native core.

``solve_weights`` finds α > 0 with G α = 1/α, the Nash bargaining weights of PUB and NashMTL,
for one (K, K) Gram matrix or a batch (B, K, K), from numpy arrays or torch tensors.
"""

from __future__ import annotations

import math
import sys
from typing import Any, NamedTuple

import numpy as np

from ._native import _C, SYMMETRY_TOL, SolveMethod, SolveStatus, cuda_module
from ._numbers import is_integer, is_real

__all__ = ["SolveResult", "SolveStatus", "solve_weights", "METHODS"]


class SolveResult(NamedTuple):
    """Result of :func:`solve_weights`.

    ``weights`` has the input's type, dtype and device. For one problem on the CPU, ``status``,
    ``iterations`` and ``residual`` are Python scalars (``status`` a :class:`SolveStatus`); for a
    batch they are arrays (numpy input) or tensors (torch input); for CUDA input they are device
    tensors, so nothing waits for the GPU.
    """

    weights: Any
    status: Any
    iterations: Any
    residual: Any


# method name -> (native code, default tol, default max_iter)
METHODS = {
    # Newton: stop when the Newton decrement λ²/2 ≤ tol·K; quadratic convergence makes 1e-12
    # cost one extra step over 1e-6 and leaves the residual at rounding level.
    "newton": (int(SolveMethod.NEWTON), 1e-12, 50),
    # CCP: stop when the relative residual ‖Gα − 1/α‖/‖1/α‖ ≤ tol, after at most 20 outer
    # (convexified) iterations as in the paper.
    "ccp": (int(SolveMethod.CCP), 1e-10, 20),
}

_STATUS = tuple(SolveStatus)
assert all(int(s) == code for code, s in enumerate(_STATUS)), "status codes moved"
_ndarray = np.ndarray
_new_result = tuple.__new__  # a NamedTuple built without its Python-level __new__
# solve_weights' default call is answered by _C.solve_default, which builds the SolveResult
# itself (of the class given here, once); a CPU tensor is read there by comparing with torch's
# own objects, given to the native module here (without torch loaded, tensors take the general
# path).
_C.set_result_refs(SolveResult, _STATUS, METHODS["newton"][1], METHODS["newton"][2])
_solve_default = _C.solve_default


def _give_torch_refs(torch) -> None:
    """Hand the native side torch's objects and the C descriptors it reads a tensor through;
    on a torch that lacks one of them, tensors take the general path."""
    try:
        base, storage = torch._C.TensorBase.__dict__, torch._C.StorageBase.__dict__
        refs = {
            "float32": torch.float32, "float64": torch.float64, "strided": torch.strided,
            "Tensor": torch.Tensor, "from_numpy": torch.from_numpy,
            "mode_enabled": torch._C._is_torch_function_mode_enabled,
            **{name: base[name] for name in ("dtype", "layout", "is_cpu", "shape", "is_neg",
                                             "stride", "untyped_storage", "data_ptr")},
            "storage_data_ptr": storage["data_ptr"], "storage_nbytes": storage["nbytes"],
        }
        _C.set_torch_refs(refs)  # TypeError when an attribute is not a C descriptor
    except (AttributeError, KeyError, TypeError):
        return


if "torch" in sys.modules:
    _give_torch_refs(sys.modules["torch"])


_OPTIONS_CACHE: dict = {}


def _options(method, ridge, tol, max_iter):
    # Types are part of the key: True == 1 and 1 == 1.0 must not share a validation result.
    key = (method, ridge, tol, max_iter, type(ridge), type(tol), type(max_iter))
    try:
        return _OPTIONS_CACHE[key]
    except (KeyError, TypeError):
        pass
    opts = _check_options(method, ridge, tol, max_iter)
    if len(_OPTIONS_CACHE) < 256:
        _OPTIONS_CACHE[key] = opts
    return opts


def _check_options(method, ridge, tol, max_iter):
    try:
        code, default_tol, default_iter = METHODS[method]
    except (KeyError, TypeError):
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}") from None
    # (numpy's scalars too: np.float32, np.int64; not bools.)
    if not (is_real(ridge) and 0.0 <= ridge < math.inf):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    if tol is None:
        tol = default_tol
    elif not (is_real(tol) and 0.0 < tol < math.inf):
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    if max_iter is None:
        max_iter = default_iter
    elif not (is_integer(max_iter) and 1 <= max_iter < 2**31):
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    return code, float(ridge), float(tol), int(max_iter)


def solve_weights(
    G, *, method="newton", warm_start=None, ridge=1e-8, tol=None, max_iter=None
) -> SolveResult:
    r"""Solve G α = 1/α (elementwise reciprocal) for the balancing weights α > 0.

    The solution is the minimizer of the strictly convex f(α) = ½ αᵀGα − Σᵢ log αᵢ; it scales
    as α(cG) = α(G)/√c, permutes with the tasks, and is equivariant to per-task scaling:
    α(SGS) = S⁻¹α(G) for a positive diagonal S. Tasks whose update is zero
    (√G_ii ≤ 1e-12·maxⱼ √G_jj) are excluded and get weight 0. The system actually solved is
    G + ridge·diag(G) on the m remaining tasks (a ridge relative to each task's own squared
    update norm, which keeps the per-task equivariance), with a unique root even when some
    non-negative combination of updates vanishes. Both methods run on the equilibrated
    D G D, D = diag(G)^(-1/2). Weights are returned unnormalized.

    Args:
        G: Gram matrix of the task updates, (K, K), or a batch (B, K, K); numpy array or torch
            tensor (CPU, or CUDA when the CUDA module is built), float32 or float64. It must
            be finite and symmetric. Computation is in float64 whatever the input dtype.
        method: ``"newton"`` (damped Newton with backtracking, Cholesky on K×K) or ``"ccp"``
            (the paper's concave–convex procedure, each subproblem solved by a log-barrier
            interior-point method).
        warm_start: starting weights, shape (K,) or (B, K), finite and ≥ 0. Only the direction
            matters: the start is rescaled to the best multiple of it. Entries of 0 (excluded
            tasks) make that problem start cold.
        ridge: ρ ≥ 0 of the ridge ρ·diag(G).
        tol: newton: stop when λ²/2 ≤ tol·m (λ the Newton decrement), default 1e-12;
            ccp: stop when the relative residual ≤ tol, default 1e-10.
        max_iter: newton steps (default 50) or ccp outer iterations (default 20).

    Returns:
        :class:`SolveResult` ``(weights, status, iterations, residual)`` where ``residual`` is
        ‖Gα − 1/α‖ / ‖1/α‖ on the active, ridged problem, for the weights as returned (rounded
        to float32 for float32 input).

    Raises:
        ValueError: G not (K, K) / (B, K, K), not square, K = 0, non-finite or non-symmetric;
            bad ``method``, ``ridge``, ``tol``, ``max_iter`` or ``warm_start``.
        TypeError: G of another dtype or type.
    """
    # The call a training step makes (one matrix, default options) is answered by the native
    # side in one call: option checks and building the result in Python cost as much as a
    # K = 2 solve. A CPU tensor is checked and read from its memory there (its numpy view alone
    # would cost half a solve, and each attribute read from Python ~0.1 µs); the weights come
    # back as a tensor over the solver's array. Anything else (None) takes the general path,
    # which checks the arguments and says what is wrong.
    result = _solve_default(G, method, warm_start, ridge, tol, max_iter)
    if result is not None:
        return result
    code, ridge, tol, max_iter = _options(method, ridge, tol, max_iter)
    if type(G) is not _ndarray and isinstance(G, _ndarray):  # np.memmap, other subclasses
        if isinstance(G, np.ma.MaskedArray):
            _refuse_masked(G, "G")
        G = G.view(_ndarray)
    if isinstance(warm_start, np.ma.MaskedArray):
        _refuse_masked(warm_start, "warm_start")
        warm_start = warm_start.view(_ndarray)
    if type(G) is _ndarray:
        warm_start = _warm_array(sys.modules.get("torch"), warm_start)
        w, st, it, res = _C.solve_weights(G, warm_start, code, ridge, tol, max_iter)
        if G.ndim == 2:
            return _new_result(SolveResult, (w, _STATUS[st], it, res))
        return _new_result(SolveResult, (w, st, it, res))
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(G, torch.Tensor):
        return _solve_torch(torch, G, warm_start, code, ridge, tol, max_iter)
    if isinstance(G, (list, tuple)):
        return solve_weights(
            np.asarray(G, dtype=np.float64), method=method, warm_start=warm_start, ridge=ridge,
            tol=tol, max_iter=max_iter,
        )
    raise TypeError(f"G must be a numpy array or a torch tensor, got {type(G).__name__}")


def _refuse_masked(a, name: str) -> None:
    """A masked array's mask would be dropped with its class: refused where it masks any
    entry (the entries behind it are not values)."""
    if np.ma.getmaskarray(a).any():
        raise ValueError(f"{name} is a masked array with masked entries: its mask would be "
                         f"ignored; pass the values to use (e.g. {name}.filled(...))")


def _warm_array(torch, warm_start):
    """A torch warm start as the numpy array the native solver reads (its values: the negative
    bit resolved; float64 where numpy has no such dtype, as bfloat16), or the error for one
    that holds no real weights or whose memory cannot be read."""
    if torch is None or not isinstance(warm_start, torch.Tensor):
        return warm_start
    _check_real_warm(torch, warm_start)
    if warm_start.numel() and warm_start.layout is torch.strided:
        problem = _unreadable(warm_start, sum((n - 1) * s for n, s in
                                              zip(warm_start.shape, warm_start.stride())) + 1,
                              warm_start.element_size(), "warm_start")
        if problem is not None:
            raise problem[0](problem[1])
    warm = warm_start.detach().to("cpu").resolve_neg()
    if warm.dtype not in (torch.float16, torch.float32, torch.float64):
        warm = warm.to(torch.float64)
    return warm.numpy()


def _check_real_warm(torch, warm_start) -> None:
    if isinstance(warm_start, torch.Tensor):
        if warm_start.is_meta or warm_start.is_complex():
            raise TypeError(f"warm_start must be real weights, got a "
                            f"{'meta' if warm_start.is_meta else str(warm_start.dtype)} tensor")
    elif np.iscomplexobj(warm_start):
        raise TypeError("warm_start must be real weights, got a complex array")


def _unreadable(G, extent: int, size: int, name: str = "G"):
    """Why the memory of tensor G (``extent`` elements of ``size`` bytes from its offset)
    cannot be read, as (exception type, message naming it as ``name``), or None when it can.
    A storage resized to 0 (as FSDP frees parameters) or shrunk keeps its views, and some
    tensors have no memory of their own: wrappers of torch.func and vmap, ZeroTensors,
    tensors under functionalize.
    (The native fast path, ``readable_matrix`` in module_cpu.cpp, refuses the same tensors;
    this names the reason.)"""
    try:
        storage = G.untyped_storage()
    except (NotImplementedError, RuntimeError):
        return TypeError, (f"{name} is a wrapper tensor without memory of its own (inside "
                           "torch.func or vmap?); solve outside the transform")
    if storage.nbytes() < (G.storage_offset() + extent) * size:
        return ValueError, (f"{name}'s storage is smaller than its view (was it resized or "
                            "freed?)")
    try:
        if storage.data_ptr():
            return None
    except RuntimeError:  # a ZeroTensor's storage refuses to give its (null) address
        pass
    return TypeError, (f"{name} has no memory behind it (a ZeroTensor or a functionalized "
                       "tensor)")


def _solve_torch(torch, G, warm_start, code, ridge, tol, max_iter):
    if G.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"G must be float32 or float64, got {G.dtype}")
    if G.layout is not torch.strided or G.is_nested:
        raise TypeError(f"G must be a dense (strided) tensor, got "
                        f"{'a nested tensor' if G.is_nested else f'layout {G.layout}'}")
    if G.device.type == "cuda":
        return _solve_cuda(torch, G, warm_start, code, ridge, tol, max_iter)
    if G.device.type != "cpu":
        raise TypeError(f"G must be on the CPU or a CUDA device, got device {G.device}")
    if G.numel():
        problem = _unreadable(G, sum((n - 1) * s for n, s in zip(G.shape, G.stride())) + 1,
                              G.element_size())
        if problem is not None:
            raise problem[0](problem[1])
    warm_start = _warm_array(torch, warm_start)
    w, st, it, res = _C.solve_weights(
        G.detach().resolve_conj().resolve_neg().numpy(), warm_start, code, ridge, tol, max_iter
    )
    if G.ndim == 2:
        return _new_result(SolveResult, (torch.from_numpy(w), _STATUS[st], it, res))
    return _new_result(SolveResult, (torch.from_numpy(w), torch.from_numpy(st),
                                     torch.from_numpy(it), torch.from_numpy(res)))


def _solve_cuda(torch, G, warm_start, code, ridge, tol, max_iter):
    cmod = cuda_module()
    if G.ndim not in (2, 3):
        raise ValueError(
            f"G must be a (K, K) matrix or a (B, K, K) batch of them, got shape {tuple(G.shape)}"
        )
    K = G.shape[-1]
    if G.shape[-2] != K:
        raise ValueError(f"G must be square (K, K), got shape {tuple(G.shape)}")
    if K == 0:
        raise ValueError(f"G must have at least one task (K >= 1), got shape {tuple(G.shape)}")
    batch = G.shape[0] if G.ndim == 3 else 1
    Gc = G.detach().resolve_neg().contiguous()
    # Value checks read the data, so they wait for the GPU once; the optimizers call the
    # native core directly and rely on the kernel's INVALID_INPUT status instead.
    if not bool(torch.isfinite(Gc).all()):
        raise ValueError("G contains NaN or Inf")
    sym_tol = SYMMETRY_TOL["float64" if Gc.dtype == torch.float64 else "float32"]
    if batch and K > 1:
        gmax = Gc.abs().amax()
        if bool((Gc - Gc.transpose(-1, -2)).abs().amax() > sym_tol * gmax):
            raise ValueError("G must be symmetric")
    warm_ptr = 0
    if warm_start is not None:
        _check_real_warm(torch, warm_start)
        warm = torch.as_tensor(warm_start, dtype=Gc.dtype, device=Gc.device).resolve_neg()
        warm = warm.contiguous()
        if tuple(warm.shape) != tuple(G.shape[:-1]):
            raise ValueError(
                f"warm_start must have shape {tuple(G.shape[:-1])}, got {tuple(warm.shape)}"
            )
        if not bool(((warm >= 0) & torch.isfinite(warm)).all()):
            raise ValueError("warm_start must be finite and non-negative")
        warm_ptr = warm.data_ptr()
    dev = Gc.device
    weights = torch.empty(G.shape[:-1], dtype=Gc.dtype, device=dev)
    status = torch.empty(batch, dtype=torch.int32, device=dev)
    iterations = torch.empty(batch, dtype=torch.int32, device=dev)
    residual = torch.empty(batch, dtype=torch.float64, device=dev)
    workspace = torch.empty(batch * _C.workspace_size(K), dtype=torch.float64, device=dev)
    with torch.cuda.device(dev):
        stream = torch.cuda.current_stream(dev).cuda_stream
        cmod.solve_weights(
            Gc.data_ptr(), warm_ptr, weights.data_ptr(), status.data_ptr(),
            iterations.data_ptr(), residual.data_ptr(), workspace.data_ptr(), batch, K,
            Gc.element_size(), code, ridge, tol, max_iter, stream,
        )
    if G.ndim == 2:
        return SolveResult(weights, status[0], iterations[0], residual[0])
    return SolveResult(weights, status, iterations, residual)
