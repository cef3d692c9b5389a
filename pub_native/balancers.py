"""Gradient balancers for multi-task learning, usable with any torch optimizer: LS, NashMTL,
MGDA-UB, IMTL-G, PCGrad and CAGrad — the baselines PUB is compared with (arXiv 2410.05806,
section VI).

Python layer over ``pub_native._autograd`` (per-task gradients, shared-parameter detection) and
the native K×K weight solver. Every balancer has the same interface::

    bal = pub_native.balancers.NashMTL(model.parameters())
    opt = torch.optim.Adam(model.parameters())
    opt.zero_grad(); bal.backward(losses); opt.step(); bal.weights

``backward`` computes g_i = ∂L_i/∂θ on the shared parameters θ (reached by two or more task
losses; detected from the autograd graph on the first call unless ``shared=`` is given), turns
them into one gradient Σ_i w_i g_i (the method's w, computed from the K×K Gram matrix
G_ij = ⟨g_i, g_j⟩) and accumulates it into ``.grad`` of θ, as ``loss.backward()`` would.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import numpy as np
import torch

from ._autograd import (
    TaskGradients,
    as_loss_list,
    layout_view,
    reached_parameters,
    split_shared,
    task_roots,
)
from .solver import SolveStatus, solve_weights

__all__ = [
    "BALANCERS",
    "CAGrad",
    "GradientBalancer",
    "IMTLG",
    "LS",
    "MGDAUB",
    "NashMTL",
    "PCGrad",
    "cagrad_weights",
    "imtl_g_weights",
    "min_norm_weights",
    "pcgrad_weights",
]


class GradientBalancer:
    """Base class: per-task gradients of the shared parameters -> one gradient in ``.grad``.

    Args:
        params: the parameters to give gradients to (tensors or torch param groups); only these
            receive ``.grad``, frozen ones (``requires_grad=False``) are skipped.
        shared: the shared parameters; by default, those reached by two or more task losses
            in the autograd graph of the first :meth:`backward` (kept for later calls).
        weight_task_specific: whether a parameter reached by task i alone gets w_i·∂L_i/∂p
            (the method weights the losses) or ∂L_i/∂p. ``None``: what the method's published
            code does (see each class).

    Attributes:
        weights: the K task weights w of the last :meth:`backward` (float64 tensor), or None.
        stats: ``weights_time`` (seconds spent computing w from G at the last weight
            update), ``solve_time`` (the same, except for NashMTL: the native solver call
            alone, as ``pub_native.Adam`` reports it), ``updated`` (whether the last call
            computed new weights); NashMTL adds the
            solver's ``status`` (:class:`pub_native.SolveStatus`), ``iterations`` and
            ``residual`` — the keys of ``pub_native.Adam().stats``.
    """

    #: Published behaviour for task-specific parameters (loss-weighting methods: True).
    weight_task_specific_default = False
    #: Whether the method's weights may be reused on later steps (``update_weights_every``).
    _reusable = False

    def __init__(self, params, *, shared=None, weight_task_specific: bool | None = None,
                 update_weights_every: int = 1):
        self.params = _param_list(params, "params")
        if not self.params:
            raise ValueError("params is empty (no tensor requires grad)")
        ids = {id(p) for p in self.params}
        self._shared_given = None
        if shared is not None:
            self._shared_given = _param_list(shared, "shared")
            for i, p in enumerate(self._shared_given):
                if id(p) not in ids:
                    raise ValueError(f"shared[{i}] (shape {tuple(p.shape)}) is not in params")
        if weight_task_specific is None:
            weight_task_specific = self.weight_task_specific_default
        self.weight_task_specific = bool(weight_task_specific)
        if isinstance(update_weights_every, bool) or not isinstance(update_weights_every, int) \
                or update_weights_every < 1:
            raise ValueError(f"update_weights_every must be an integer >= 1, got "
                             f"{update_weights_every!r}")
        if update_weights_every > 1 and not self._reusable:
            raise ValueError(f"{type(self).__name__} does not reuse weights: "
                             "update_weights_every must be 1")
        self.update_weights_every = update_weights_every
        self.k: int | None = None
        self.shared: list[torch.Tensor] | None = None
        self.weights: torch.Tensor | None = None
        self.stats: dict = {}
        self.steps = 0
        self._grads: TaskGradients | None = None
        self._solve_time: float | None = None

    # -- set-up -------------------------------------------------------------------------------

    def _setup(self, raw_losses, losses: list[torch.Tensor]) -> None:
        # The optimizers' detection (pub_native._autograd): a stacked 1-D tensor of losses is
        # split back into its tasks at the stack, so its tasks reach what the list's would.
        roots = task_roots(raw_losses, losses)
        reach = [reached_parameters(root) for root in roots]
        counts = [sum(id(p) in r for r in reach) for p in self.params]
        if self._shared_given is not None:
            shared_ids = {id(p) for p in self._shared_given}
            self.shared = [p for p in self.params if id(p) in shared_ids]
        else:
            is_shared = split_shared(roots, self.params)
            self.shared = [p for p, s in zip(self.params, is_shared, strict=True) if s]
            shared_ids = {id(p) for p in self.shared}
        # specific[i]: non-shared parameters task i reaches; a non-shared parameter reached by
        # several tasks (possible only with an explicit ``shared``) gets the plain sum.
        self._specific = [[p for p in self.params if id(p) not in shared_ids and id(p) in r]
                          for r in reach]
        single_ids = {id(p) for p, c in zip(self.params, counts, strict=True) if c == 1}
        self._single = [[p for p in spec if id(p) in single_ids] for spec in self._specific]
        specific_ids = {id(p) for spec in self._specific for p in spec}
        self._specific_all = [p for p in self.params if id(p) in specific_ids]
        self._multi = [p for p in self._specific_all if id(p) not in single_ids]
        self._grads = TaskGradients(self.shared, len(losses))
        self.k = len(losses)

    # -- the step -----------------------------------------------------------------------------

    def backward(self, losses) -> None:
        """Per-task gradients -> weights -> combined gradient in ``.grad`` (accumulated)."""
        raw, losses = losses, as_loss_list(losses, self.k)
        if self.k is None:
            self._setup(raw, losses)
        reuse = self.weights is not None and self.steps % self.update_weights_every != 0
        self.steps += 1
        if reuse:
            self._backward_fixed(losses, self.weights)
            self.stats["updated"] = False
            self._finish()
            return
        specific = self._specific_all
        stash = [p.grad for p in specific]
        for p in specific:
            p.grad = None
        try:
            self._grads.compute(losses, self._specific)
            buf = self._grads.buffer
            # Gram in the buffer's dtype (BLAS accumulates in blocks), then float64 for the
            # K×K math; all methods are invariant or equivariant to G's scale.
            G = torch.mm(buf, buf.t()).to(torch.float64)
            if not bool(torch.isfinite(G).all()):
                bad = [i for i in range(self.k) if not math.isfinite(float(G[i, i]))]
                raise FloatingPointError(
                    f"non-finite gradient of the shared parameters in task(s) {bad}")
            t0 = time.perf_counter()
            self._solve_time = None
            if self._grads.size == 0:
                w = torch.ones(self.k, dtype=torch.float64)
            else:
                w = torch.as_tensor(self._compute_weights(G.numpy(), losses), dtype=torch.float64)
            elapsed = time.perf_counter() - t0
            self.stats["weights_time"] = elapsed
            self.stats["solve_time"] = elapsed if self._solve_time is None else self._solve_time
        except BaseException:
            for p, g in zip(specific, stash, strict=True):
                p.grad = g
            raise
        self.stats["updated"] = True
        self.weights = w
        if self._grads.size:
            combined = torch.mv(buf.t(), w.to(buf.dtype))
            _accumulate(self.shared, torch.split(combined, self._grads.numels))
        if self.weight_task_specific:
            for wi, spec in zip(w.tolist(), self._single, strict=True):
                for p in spec:
                    if p.grad is not None:
                        p.grad.mul_(wi)
        for p, g in zip(specific, stash, strict=True):
            if g is not None:
                p.grad = g.add_(p.grad) if p.grad is not None else g
        self._finish()

    def _backward_fixed(self, losses: list[torch.Tensor], w: torch.Tensor) -> None:
        """A step that reuses the weights w: one backward of Σ w_i L_i (two without weighting
        of the task-specific parameters)."""
        weighted = sum(float(wi) * loss
                       for wi, loss in zip(w.tolist(), losses, strict=True))
        if self.weight_task_specific:
            weighted_inputs = self.shared + [p for spec in self._single for p in spec]
            plain_inputs = self._multi
        else:
            weighted_inputs, plain_inputs = self.shared, self._specific_all
        if weighted_inputs:
            torch.autograd.backward(weighted, inputs=weighted_inputs,
                                    retain_graph=bool(plain_inputs))
        if plain_inputs:
            torch.autograd.backward(sum(losses), inputs=plain_inputs)

    def _compute_weights(self, G: np.ndarray, losses: list[torch.Tensor]) -> np.ndarray:
        raise NotImplementedError

    def _finish(self) -> None:
        """Hook after the combined gradient is in ``.grad`` (NashMTL clips it)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LS(GradientBalancer):
    """Linear scalarization: the gradient of Σ_i L_i, w = 1 (one ordinary backward pass)."""

    def backward(self, losses) -> None:
        losses = as_loss_list(losses, self.k)
        self.k = len(losses)
        self.steps += 1
        torch.autograd.backward(sum(losses), inputs=self.params)
        self.weights = torch.ones(self.k, dtype=torch.float64)
        self.stats = {"weights_time": 0.0, "solve_time": 0.0, "updated": True}


class NashMTL(GradientBalancer):
    r"""Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022), as in
    the published code (github.com/AvivNavon/nash-mtl, ``methods/weight_methods.py``).

    Ĝ = G / ‖G‖_F (Frobenius normalization, as published); α > 0 solves Ĝ α = 1/α (the Nash
    bargaining solution, :func:`pub_native.solve_weights` with ``solver`` and a warm start from
    the previous α, where the published code runs up to 20 cvxpy/ECOS CCP iterations and stops
    at a residual of 1e-3); the losses are weighted: θ.grad += Σ_i α_i g_i and each task's own
    parameters get α_i ∂L_i/∂p; then, if ``max_norm`` > 0, the shared gradient is clipped,
    ``torch.nn.utils.clip_grad_norm_(shared, max_norm)``. With ``update_weights_every`` = n,
    α is recomputed on steps 1, n + 1, 2n + 1, ... and the steps between do one backward pass
    of Σ α_i L_i (as published).
    """

    weight_task_specific_default = True
    _reusable = True

    def __init__(self, params, *, shared=None, update_weights_every: int = 1,
                 max_norm: float = 1.0, solver: str = "newton",
                 weight_task_specific: bool | None = None):
        super().__init__(params, shared=shared, weight_task_specific=weight_task_specific,
                         update_weights_every=update_weights_every)
        if not (isinstance(max_norm, (int, float)) and 0 <= max_norm < math.inf):
            raise ValueError(f"max_norm must be a finite number >= 0, got {max_norm!r}")
        self.max_norm = float(max_norm)
        solve_weights(np.eye(1), method=solver)  # validates ``solver`` now, not at step 1
        self.solver = solver
        self._prev_alpha: np.ndarray | None = None

    def _compute_weights(self, G, losses):
        scale = float(np.linalg.norm(G))
        if scale == 0.0:
            self.stats.update(status=SolveStatus.ALL_ZERO, iterations=0, residual=0.0)
            return np.zeros(len(G))
        warm = self._prev_alpha
        if warm is not None and not (warm > 0).any():
            warm = None
        t0 = time.perf_counter()
        r = solve_weights(G / scale, method=self.solver, warm_start=warm)
        self._solve_time = time.perf_counter() - t0
        self.stats.update(status=r.status, iterations=int(r.iterations),
                          residual=float(r.residual))
        alpha = np.asarray(r.weights, dtype=np.float64)
        if np.isfinite(alpha).all():
            self._prev_alpha = alpha
        return alpha

    def _finish(self):
        if self.max_norm > 0 and self.shared:
            torch.nn.utils.clip_grad_norm_(self.shared, self.max_norm)

    def __repr__(self):
        return (f"NashMTL(update_weights_every={self.update_weights_every}, "
                f"max_norm={self.max_norm}, solver={self.solver!r})")


class MGDAUB(GradientBalancer):
    r"""MGDA (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS
    2018): w is the min-norm point of the convex hull of the (normalized) task gradients,

        w = argmin_{w ≥ 0, Σw = 1} ‖Σ_i w_i ĝ_i‖²,   ĝ_i = g_i / n_i,

    with n_i = 1 (``normalization="none"``, the default of the NashMTL/FAMO code the paper
    used), ‖g_i‖ (``"l2"``), L_i (``"loss"``) or L_i‖g_i‖ (``"loss+"``). The weights are applied
    to the raw losses (as published): θ.grad += Σ_i w_i g_i, task parameters get w_i ∂L_i/∂p.
    "UB" (upper bound) in the paper means the gradients are taken with respect to the shared
    representation; here they are taken with respect to the shared *parameters*, the
    ``params="shared"`` default of that code. K = 2 has the closed form
    w_2 = clip((G_11 − G_12) / (G_11 + G_22 − 2 G_12), 0, 1); K > 2 is solved by projected
    gradient descent on the simplex (see :func:`min_norm_weights`). Weights sum to 1 (the
    NashMTL code multiplies them by K, which Adam does not see).
    """

    weight_task_specific_default = True
    _reusable = True
    NORMALIZATIONS = ("none", "l2", "loss", "loss+")

    def __init__(self, params, *, shared=None, normalization: str = "none",
                 update_weights_every: int = 1, weight_task_specific: bool | None = None):
        super().__init__(params, shared=shared, weight_task_specific=weight_task_specific,
                         update_weights_every=update_weights_every)
        if normalization not in self.NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {self.NORMALIZATIONS}, got "
                             f"{normalization!r}")
        self.normalization = normalization

    def _compute_weights(self, G, losses):
        norms = np.sqrt(np.maximum(np.diag(G), 0.0))
        loss_values = np.array([abs(float(loss.detach())) for loss in losses])
        n = {"none": np.ones(len(G)), "l2": norms, "loss": loss_values,
             "loss+": loss_values * norms}[self.normalization]
        n = np.where(n > 0, n, 1.0)
        return min_norm_weights(G / np.outer(n, n))

    def __repr__(self):
        return f"MGDAUB(normalization={self.normalization!r})"


class IMTLG(GradientBalancer):
    r"""IMTL-G (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021): the combined
    gradient g = Σ_i w_i g_i, Σ_i w_i = 1, has equal projections on every unit task gradient
    u_i = g_i / ‖g_i‖. Closed form, with D = [g_1 − g_2, ..., g_1 − g_K] and
    U = [u_1 − u_2, ..., u_1 − u_K]: (w_2..w_K) = g_1 Uᵀ (D Uᵀ)⁻¹, w_1 = 1 − Σ_{i≥2} w_i,
    computed from G. Tasks with a zero gradient get weight 0. Applied to the losses (as in
    the NashMTL/FAMO code): θ.grad += Σ w_i g_i, task parameters get w_i ∂L_i/∂p.
    """

    weight_task_specific_default = True
    _reusable = True

    def __init__(self, params, *, shared=None, update_weights_every: int = 1,
                 weight_task_specific: bool | None = None):
        super().__init__(params, shared=shared, weight_task_specific=weight_task_specific,
                         update_weights_every=update_weights_every)

    def _compute_weights(self, G, losses):
        return imtl_g_weights(G)

    def __repr__(self):
        return "IMTLG()"


class PCGrad(GradientBalancer):
    r"""PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020).

    For each task i, g_i^PC starts at g_i and, for every other task j in a random order,
    loses its conflicting component: if ⟨g_i^PC, g_j⟩ < 0, g_i^PC −= ⟨g_i^PC, g_j⟩/‖g_j‖² g_j.
    θ.grad += Σ_i g_i^PC (the sum, as in the NashMTL code; ``reduction="mean"`` divides by K).
    Each g_i^PC is a linear combination of the g_j, so the whole procedure runs on G and
    ``weights`` holds w with Σ_i g_i^PC = Σ_j w_j g_j. The orders come from
    ``numpy.random.default_rng(seed)``. Task parameters get their ordinary gradient.
    """

    def __init__(self, params, *, shared=None, seed: int | None = 0, reduction: str = "sum",
                 weight_task_specific: bool | None = None):
        super().__init__(params, shared=shared, weight_task_specific=weight_task_specific)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def _compute_weights(self, G, losses):
        w = pcgrad_weights(G, self.rng)
        return w / len(G) if self.reduction == "mean" else w

    def __repr__(self):
        return f"PCGrad(seed={self.seed!r}, reduction={self.reduction!r})"


class CAGrad(GradientBalancer):
    r"""CAGrad (Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS
    2021), as in its published code (``rescale=1``) and the NashMTL/FAMO code.

    g_0 = (1/K) Σ_i g_i, φ = c‖g_0‖. Dual: w* = argmin_{w ≥ 0, Σw = 1} g_wᵀ g_0 + φ‖g_w‖ with
    g_w = Σ_i w_i g_i; then d = (g_0 + φ/‖g_w*‖ · g_w*) / (1 + c²), and θ.grad += K·d (the
    NashMTL code's "match the sum loss" factor, so c = 0 gives exactly the LS gradient
    Σ_i g_i). ``weights``: w with K·d = Σ_i w_i g_i. The dual is solved on G normalized to
    unit mean diagonal (scale-free; the published code adds absolute 1e-8 terms instead) by
    bisection for K = 2 and projected gradient descent on the simplex for K > 2, replacing
    scipy's SLSQP. Task parameters get their ordinary gradient.
    """

    def __init__(self, params, *, shared=None, c: float = 0.5,
                 weight_task_specific: bool | None = None):
        super().__init__(params, shared=shared, weight_task_specific=weight_task_specific)
        if not (isinstance(c, (int, float)) and 0 <= c < math.inf):
            raise ValueError(f"c must be a finite number >= 0, got {c!r}")
        self.c = float(c)

    def _compute_weights(self, G, losses):
        return cagrad_weights(G, self.c)

    def __repr__(self):
        return f"CAGrad(c={self.c})"


BALANCERS = {"ls": LS, "nashmtl": NashMTL, "mgda-ub": MGDAUB, "imtl-g": IMTLG,
             "pcgrad": PCGrad, "cagrad": CAGrad}


# -- the K×K math (float64 numpy; G is the Gram matrix of the task gradients) ---------------

def min_norm_weights(G: np.ndarray, *, max_iter: int = 1000, tol: float = 1e-12
                     ) -> np.ndarray:
    """argmin over the simplex of wᵀGw: the min-norm point of the gradients' convex hull."""
    G = _as_gram(G)
    k = len(G)
    if k == 1:
        return np.ones(1)
    scale = np.trace(G) / k
    if scale <= 0:
        return np.full(k, 1.0 / k)
    G = G / scale
    if k == 2:
        denom = G[0, 0] + G[1, 1] - 2 * G[0, 1]
        gamma = 0.5 if denom <= 0 else min(max((G[0, 0] - G[0, 1]) / denom, 0.0), 1.0)
        return np.array([1 - gamma, gamma])

    def fun(w):
        gw = G @ w
        return w @ gw, 2 * gw

    return _minimize_on_simplex(fun, np.full(k, 1.0 / k), max_iter=max_iter, tol=tol)


def imtl_g_weights(G: np.ndarray) -> np.ndarray:
    """IMTL-G's closed form, from G alone (see :class:`IMTLG`)."""
    G = _as_gram(G)
    k = len(G)
    norms = np.sqrt(np.maximum(np.diag(G), 0.0))
    active = norms > 1e-12 * norms.max() if norms.max() > 0 else np.zeros(k, dtype=bool)
    w = np.zeros(k)
    idx = np.flatnonzero(active)
    if len(idx) == 0:
        return np.full(k, 1.0 / k)
    if len(idx) == 1:
        w[idx] = 1.0
        return w
    n = norms[idx]
    M = G[np.ix_(idx, idx)] / (n[0] * n[None, :])  # M_ij = ⟨g_i, u_j⟩ / ‖g_1‖ (scale-free)
    first = M[0, 0] - M[0, 1:]  # g_1 · (u_1 − u_j)
    DU = M[0, 0] - M[0, 1:][None, :] - M[1:, 0][:, None] + M[1:, 1:]  # (g_1 − g_r)·(u_1 − u_s)
    try:
        rest = np.linalg.solve(DU.T, first)
    except np.linalg.LinAlgError:
        rest = np.linalg.lstsq(DU.T, first, rcond=None)[0]
    w[idx[1:]] = rest
    w[idx[0]] = 1.0 - rest.sum()
    return w


def pcgrad_weights(G: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """w with Σ_i g_i^PC = Σ_j w_j g_j (see :class:`PCGrad`)."""
    G = _as_gram(G)
    k = len(G)
    C = np.eye(k)  # row i: g_i^PC = Σ_j C_ij g_j
    for i in range(k):
        for j in rng.permutation(k):
            if j == i or G[j, j] <= 0:
                continue
            dot = C[i] @ G[:, j]
            if dot < 0:
                C[i, j] -= dot / G[j, j]
    return C.sum(axis=0)


def cagrad_weights(G: np.ndarray, c: float = 0.5, *, max_iter: int = 1000,
                   tol: float = 1e-12) -> np.ndarray:
    """w with K·d = Σ_i w_i g_i for CAGrad's direction d (see :class:`CAGrad`)."""
    G = _as_gram(G)
    k = len(G)
    scale = np.trace(G) / k
    if scale <= 0:
        return np.full(k, 1.0 / (1 + c * c))
    A = G / scale
    b = np.full(k, 1.0 / k)
    Ab = A @ b
    phi = c * math.sqrt(max(b @ Ab, 0.0))
    if phi == 0.0:
        return np.full(k, 1.0 / (1 + c * c))

    def fun(w):
        Aw = A @ w
        norm = math.sqrt(max(w @ Aw, 1e-30))
        return w @ Ab + phi * norm, Ab + phi * Aw / norm

    if k == 2:
        w = _bisect_pair(fun)
    else:
        w = _minimize_on_simplex(fun, b.copy(), max_iter=max_iter, tol=tol)
    gw_norm = math.sqrt(max(w @ A @ w, 0.0))
    lam = phi / gw_norm if gw_norm > 0 else 0.0
    return k * (b + lam * w) / (1 + c * c)


def _bisect_pair(fun) -> np.ndarray:
    """Minimize a convex f on the segment w = (t, 1 − t), t ∈ [0, 1], by bisection on f'."""
    e = np.array([1.0, -1.0])

    def slope(t):
        return fun(np.array([t, 1 - t]))[1] @ e

    lo, hi = 0.0, 1.0
    if slope(lo) >= 0:
        return np.array([0.0, 1.0])
    if slope(hi) <= 0:
        return np.array([1.0, 0.0])
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if slope(mid) > 0:
            hi = mid
        else:
            lo = mid
    t = 0.5 * (lo + hi)
    return np.array([t, 1 - t])


def _minimize_on_simplex(fun, w: np.ndarray, *, max_iter: int, tol: float) -> np.ndarray:
    """Projected gradient descent with backtracking on {w ≥ 0, Σw = 1}; ``fun`` -> (f, ∇f)."""
    f, g = fun(w)
    step = 1.0
    for _ in range(max_iter):
        while True:
            w_new = _project_simplex(w - step * g)
            d = w_new - w
            f_new, g_new = fun(w_new)
            if f_new <= f + g @ d + (0.5 / step) * (d @ d) + 1e-15 * abs(f) or step < 1e-20:
                break
            step *= 0.5
        w, f, g = w_new, f_new, g_new
        if np.abs(d).sum() <= tol:
            break
        step *= 2.0
    return w


def _project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex (sort-based)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    ind = np.arange(1, len(v) + 1)
    rho = np.nonzero(u - css / ind > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1), 0.0)


def _as_gram(G) -> np.ndarray:
    G = np.asarray(G, dtype=np.float64)
    if G.ndim != 2 or G.shape[0] != G.shape[1] or G.shape[0] == 0:
        raise ValueError(f"G must be a non-empty square (K, K) matrix, got shape {G.shape}")
    if not np.isfinite(G).all():
        raise ValueError("G contains NaN or Inf")
    return G


def _accumulate(params: list[torch.Tensor], grads: Iterable[torch.Tensor]) -> None:
    """p.grad += g for flat g laid out in p's memory order (as TaskGradients lays them out)."""
    for p, g in zip(params, grads, strict=True):
        g = layout_view(g, p)
        if p.grad is None:
            p.grad = g.clone(memory_format=torch.preserve_format)
        else:
            p.grad.add_(g)


def _param_list(params, name: str) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        params = [params]
    out, seen = [], set()
    for item in params:
        group = item["params"] if isinstance(item, dict) else [item]
        if isinstance(group, torch.Tensor):
            group = [group]
        for p in group:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{name} must hold tensors, got {type(p).__name__}")
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out
