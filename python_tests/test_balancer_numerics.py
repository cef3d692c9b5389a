"""pub_native.balancers at the edges of floating point: 16-bit models (the combination of the
task gradients, Uncertainty's log-variances), task gradients of very different sizes (the
min-norm point of MGDA-UB, CAGrad and MultiBalance), parallel gradients (IMTL-G). Each result is
checked against an independent float64 reference or a mathematical property."""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pytest
import torch

from pub_native import balancers as B

TOL = {
    # float64 K×K math on well-posed problems: rounding only.
    "exact": 1e-10,
    # The min-norm point of gradients whose sizes differ by up to 1e8: Wolfe's affine solves run
    # on a Gram whose entries span 16 orders of magnitude, and the reference's least squares on
    # the gradients round too (the two differ by up to ~2e-9 relative here).
    "min_norm_wide": 1e-8,
    # A weight 1e16 times smaller than the largest: the float64 Gram of (rotated) orthogonal
    # gradients of sizes 1 and 1e8 holds rounding ε·‖g_i‖‖g_j‖ off the diagonal (2e-8 of
    # √(G_ii G_jj)), which moves that weight by as much, relative.
    "tiny_weight": 1e-6,
    # float32 log-variances: one float32 rounding of ½(1 − e^{−s}L).
    "f32": 1e-6,
    # IMTL-G from G on gradients 1e-3 from parallel: D Uᵀ ~ 1e-6, so G's rounding (~1e-16)
    # reaches the weights at ~1e-10; the bound leaves two orders of margin.
    "imtl_near_parallel": 1e-8,
}

#: The unit roundoff of the 16-bit types: |RN(x) − x| ≤ u·|x| for one rounding to nearest.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}

pytestmark = pytest.mark.usefixtures("one_thread")


def _linear_losses(g: torch.Tensor, theta: torch.Tensor) -> list[torch.Tensor]:
    """L_i = ⟨g_i, θ⟩: task i's gradient of θ is g_i, exactly, in θ's dtype."""
    return [(g[i] * theta).sum() for i in range(len(g))]


def _assert_rounded_once(grad: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    """grad is exact (float64) rounded once to dtype: within its unit roundoff, elementwise
    (plus 1e-6 relative for the float32 sum it was rounded from)."""
    bound = (UNIT_ROUNDOFF[dtype] + 1e-6) * exact.abs()
    assert bool(torch.isfinite(grad).all())
    err = (grad.double() - exact).abs()
    assert bool((err <= bound).all()), float((err / exact.abs()).max())


# -- combining 16-bit task gradients --------------------------------------------------------------

@pytest.mark.parametrize("name", ["NashMTL", "CAGrad", "PCGrad"])
def test_float16_weights_beyond_its_range_give_the_combined_gradient(name):
    # A task gradient ~1e6 times smaller than the other's, in conflict with it, gets a weight
    # above float16's largest number (65504); the weighted sum is ~100, well inside it. Weights
    # cast to float16 before the product made .grad Inf, without an error.
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(2, 16))
    g = torch.tensor(np.stack([100 * a, 2e-4 * (b - a)])).half()
    theta = torch.zeros(16, dtype=torch.float16, requires_grad=True)
    bal = getattr(B, name)([theta], **({"max_norm": 0.0} if name == "NashMTL" else {}))
    bal.backward(_linear_losses(g, theta))
    assert float(bal.weights.max()) > torch.finfo(torch.float16).max
    _assert_rounded_once(theta.grad, bal.weights @ g.double(), torch.float16)
    if name == "NashMTL":  # the weights themselves: Ĝα = 1/α on the float64 Gram
        G = (g.double() @ g.double().T).numpy()
        G /= np.linalg.norm(G)
        alpha = bal.weights.numpy()
        G += 1e-8 * np.diag(np.diag(G))  # the solver's ridge (SPEC section 4)
        np.testing.assert_allclose(G @ alpha, 1 / alpha, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["MGDAUB", "IMTLG", "NashMTL", "CAGrad", "PCGrad"])
def test_16bit_task_gradients_are_combined_with_one_rounding(name, dtype):
    # Conflicting tasks, so that the combination cancels: a sum formed in the 16-bit type
    # rounded every weight and every partial sum (28-44 roundings off); .grad must be the float64
    # combination of the same task gradients and weights, rounded once, as loss.backward()
    # rounds the gradient of a sum.
    rng = np.random.default_rng(3)
    g = torch.tensor(np.stack([np.ones(16), -0.9 * np.ones(16) + 0.05 * rng.normal(size=16)])
                     ).to(dtype)
    theta = torch.zeros(16, dtype=dtype, requires_grad=True)
    bal = getattr(B, name)([theta], **({"max_norm": 0.0} if name == "NashMTL" else {}))
    bal.backward(_linear_losses(g, theta))
    _assert_rounded_once(theta.grad, bal.weights @ g.double(), dtype)
    # Accumulated into a .grad that holds a gradient: that sum is rounded once too.
    before = theta.grad.clone()
    bal.backward(_linear_losses(g, theta))
    _assert_rounded_once(theta.grad, before.double() + bal.weights @ g.double(), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("solver", ["min-norm", "nash"])
def test_multibalance_combines_16bit_representation_gradients_with_one_rounding(solver, dtype):
    # z = W (elementwise), so the trunk's gradient is Σ_i w_i ∂L_i/∂z itself; and a head
    # parameter reached by both tasks gets Σ_i w_i ∂L_i/∂φ.
    rng = np.random.default_rng(3)
    A = torch.tensor(np.stack([np.ones(16), -0.9 * np.ones(16) + 0.05 * rng.normal(size=16)])
                     ).to(dtype)
    c = torch.tensor([1.0, -0.93]).to(dtype)  # ∂L_i/∂φ, exact in dtype
    W = torch.ones(16, dtype=dtype, requires_grad=True)
    head = torch.ones(1, dtype=dtype, requires_grad=True)
    z = W * 1.0
    losses = [(A[i] * z).sum() + (c[i] * head).sum() for i in range(2)]
    bal = B.MultiBalance([W, head], normalization="none", solver=solver, ema=0.0)
    bal.backward(losses, z)
    _assert_rounded_once(W.grad, bal.weights @ A.double(), dtype)
    _assert_rounded_once(head.grad, (bal.weights @ c.double()).reshape(1), dtype)


# -- Uncertainty's log-variances ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_uncertainty_log_variances_of_a_16bit_model_are_float32(dtype):
    # A float16 model with a float32 loss of 3e5 (a loss computed in float32, as
    # F.mse_loss(pred.float(), y) gives): with log_vars in float16, ∂L/∂s_1 = ½(1 − L_1) was
    # −Inf and one optimizer step made s NaN. Reference (float64): at s = 0,
    # ∂L/∂s_i = ½(1 − L_i) and ∂L/∂θ = ½ Σ_i ∂L_i/∂θ.
    theta = torch.zeros(4, dtype=dtype, requires_grad=True)
    bal = B.Uncertainty([theta], n_tasks=2)
    assert bal.log_vars.dtype == torch.float32
    x = torch.tensor([10.0, 20.0, 30.0, 40.0])
    losses = [((theta.float() - x) ** 2).sum() * 100, ((theta.float() + x) ** 2).sum() * 1e-3]
    values = [float(loss.detach()) for loss in losses]
    bal.backward(losses)
    expected = torch.tensor([0.5 * (1 - v) for v in values], dtype=torch.float64)
    torch.testing.assert_close(bal.log_vars.grad.double(), expected, rtol=TOL["f32"], atol=0)
    # (each task's gradient reaches θ through its own cast to float32 and back: autograd
    # rounds the two to dtype and their sum again)
    theta_exact = 0.5 * (-2 * 100 * x.double() + 2 * 1e-3 * x.double())
    torch.testing.assert_close(theta.grad.double(), theta_exact,
                               rtol=2 * UNIT_ROUNDOFF[dtype], atol=0)
    opt = torch.optim.Adam(bal.parameters(), lr=0.025)
    opt.step()
    assert bool(torch.isfinite(bal.log_vars).all()) and bool(torch.isfinite(bal.weights).all())


def test_uncertainty_loads_a_state_dict_with_16bit_log_variances():
    # A checkpoint of a float16 model saved while log_vars were float16 loads into the float32
    # ones, with the values it holds, and the balancer goes on.
    theta = torch.zeros(3, dtype=torch.float16, requires_grad=True)
    bal = B.Uncertainty([theta], n_tasks=2)
    state = bal.state_dict()
    state["log_vars"] = torch.tensor([0.3, -1.2], dtype=torch.float16)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    bal.load_state_dict(torch.load(buf, weights_only=True))
    assert bal.log_vars.dtype == torch.float32 and bal.log_vars.requires_grad
    torch.testing.assert_close(bal.log_vars.detach(),
                               torch.tensor([0.3, -1.2], dtype=torch.float16).float(),
                               rtol=0, atol=0)
    bal.backward([(theta.float() * 2).sum() + 1, (theta.float() * 3).sum() + 2])
    torch.testing.assert_close(bal.weights, 0.5 * torch.exp(-bal.log_vars.detach().double()),
                               rtol=TOL["f32"], atol=0)


# -- the min-norm point of gradients of very different sizes -----------------------------------

def _min_norm_reference(g: np.ndarray) -> np.ndarray:
    """argmin over the simplex of ‖Σ w_i g_i‖, from the gradients themselves: of the affine
    min-norm points of every support (least squares on the gradients, accurate whatever their
    sizes) with weights ≥ 0, the shortest."""
    k = len(g)
    best, best_norm = None, math.inf
    for m in range(1, k + 1):
        for support in itertools.combinations(range(k), m):
            s = list(support)
            y = np.linalg.lstsq((g[s[1:]] - g[s[0]]).T, -g[s[0]], rcond=None)[0] if m > 1 \
                else np.zeros(0)
            ws = np.concatenate([[1.0 - y.sum()], y])
            norm = np.linalg.norm(ws @ g[s])
            if (ws >= 0).all() and norm < best_norm:
                best, best_norm = np.zeros(k), norm
                best[s] = ws
    return best


def _rotated(sizes, dim: int, seed: int) -> np.ndarray:
    """Orthogonal gradients of the given sizes, in a random orientation."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return np.asarray(sizes, dtype=np.float64)[:, None] * q[:len(sizes)]


@pytest.mark.parametrize("ratio", [1e3, 1e6, 1e8])
def test_mgda_weights_of_tasks_a_million_times_smaller_than_another(ratio):
    # Orthogonal gradients: the min-norm point has w_i ∝ 1/‖g_i‖². With g_3 = ratio·e_3, tasks 1
    # and 2 (squared norms 1e-12 of the largest and below) got (1, 0, 0): task 2's gradient
    # dropped, its head without a gradient.
    g = _rotated([1.0, 1.0, ratio], 5, seed=1)
    expected = 1 / np.linalg.norm(g, axis=1) ** 2
    expected /= expected.sum()
    theta = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    heads = [torch.zeros((), dtype=torch.float64, requires_grad=True) for _ in range(3)]
    bal = B.MGDAUB([theta, *heads])
    gt = torch.tensor(g)
    bal.backward([gt[i] @ theta + heads[i] for i in range(3)])
    np.testing.assert_allclose(bal.weights.numpy(), expected, rtol=TOL["tiny_weight"], atol=0)
    np.testing.assert_allclose([float(h.grad) for h in heads], expected,
                               rtol=TOL["tiny_weight"], atol=0)
    np.testing.assert_allclose(theta.grad.numpy(), expected @ g, rtol=0,
                               atol=TOL["exact"] * np.linalg.norm(expected @ g))


def test_min_norm_weights_at_any_ratio_of_gradient_sizes():
    # Random gradients (linearly independent: the hull does not hold the origin) whose sizes
    # span up to e^±9 (a ratio of 6e7): the min-norm point is the reference's, the optimality
    # condition ⟨x, g_j⟩ ≥ ‖x‖² holds relative to ‖x‖², and it is the same at any scale of G.
    rng = np.random.default_rng(11)
    for _ in range(12):
        k = int(rng.integers(3, 6))
        g = rng.standard_normal((k, 8)) * np.exp(rng.uniform(-9, 9, (k, 1)))
        G = g @ g.T
        w = B.min_norm_weights(G)
        ref = _min_norm_reference(g)
        x, x_ref = w @ g, ref @ g
        assert w.min() >= 0 and abs(w.sum() - 1) < TOL["exact"]
        assert np.linalg.norm(x - x_ref) <= TOL["min_norm_wide"] * np.linalg.norm(x_ref)
        assert (g @ x >= (x @ x) * (1 - TOL["min_norm_wide"])).all()
        np.testing.assert_allclose(B.min_norm_weights(G * 1e-30), w, rtol=0, atol=TOL["exact"])


@pytest.mark.parametrize("ratio", [1e6, 1e8])
def test_cagrad_direction_with_one_task_far_larger_than_the_others(ratio):
    # Tasks a·e_1, a·e_2, b·e_3 (rotated): tasks 1 and 2 are symmetric, so the dual minimizer
    # has w_1 = w_2 and d improves them equally. Reference: the dual on that segment,
    # w = (t/2, t/2, 1 − t), minimized by golden-section search in float64. The library's
    # min-norm steps stopped early and gave task 2 an improvement 1e5 times smaller.
    c = 0.5
    g = _rotated([1.0, 1.0, ratio], 4, seed=2)
    g0 = g.mean(0)
    phi = c * np.linalg.norm(g0)

    def dual(t):
        gw = np.array([t / 2, t / 2, 1 - t]) @ g
        return gw @ g0 + phi * np.linalg.norm(gw)

    lo, hi = 0.0, 1.0
    for _ in range(200):
        m1, m2 = lo + (hi - lo) * 0.382, lo + (hi - lo) * 0.618
        lo, hi = (lo, m2) if dual(m1) < dual(m2) else (m1, hi)
    t = 0.5 * (lo + hi)
    gw = np.array([t / 2, t / 2, 1 - t]) @ g
    d_ref = 3 * (g0 + phi * gw / np.linalg.norm(gw)) / (1 + c * c)
    theta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    gt = torch.tensor(g)
    B.CAGrad([theta], c=c).backward([gt[i] @ theta for i in range(3)])
    gains, gains_ref = g @ theta.grad.numpy(), g @ d_ref
    np.testing.assert_allclose(gains, gains_ref, rtol=TOL["min_norm_wide"], atol=0)


@pytest.mark.parametrize("normalization", ["none", "loss"])
def test_multibalance_min_norm_weights_do_not_depend_on_the_scale_of_the_gradients(normalization):
    # Every representation gradient times the same c (the loss values kept): the min-norm
    # point of the normalized gradients is scale-free, and so are the weights. With c ≤ 1e-6
    # the Gram's entries fell under an absolute tolerance and the weights became (1, 1, 1).
    # Reference at every c: MGDA's min-norm point of the normalized representation gradients
    # (from the gradients, not the Gram), w_i = w'_i·Σ_j n_j/n_i.
    A = np.array([[1.0, 0.0, 0.3], [-0.6, 0.8, 0.0], [0.1, 0.2, 0.7]])
    values = np.array([1.0, 2.0, 0.5])
    n = values if normalization == "loss" else np.ones(3)
    wp = _min_norm_reference(A / n[:, None])
    expected = wp * n.sum() / n
    At = torch.tensor(A)
    for c in (1.0, 1e-3, 1e-6, 1e-9, 1e-12):
        W = torch.eye(3, dtype=torch.float64, requires_grad=True)
        z = W @ torch.ones(3, dtype=torch.float64)
        # L_i = c·⟨A_i, z − z_0⟩ + values_i: ∂L_i/∂z = c·A_i, L_i = values_i.
        losses = [c * (At[i] @ (z - z.detach())) + values[i] for i in range(3)]
        bal = B.MultiBalance([W], normalization=normalization, ema=0.0)
        bal.backward(losses, z)
        np.testing.assert_allclose(bal.weights.numpy(), expected, rtol=TOL["min_norm_wide"],
                                   atol=0, err_msg=f"c = {c}")


# -- IMTL-G on parallel gradients ------------------------------------------------------------------

@pytest.mark.parametrize("s", [0.3, 2.0, 10.0])
def test_imtl_g_of_parallel_gradients_takes_the_weights_nearest_uniform(s):
    # g_2 = s·g_1: u_1 = u_2, so every w with Σw = 1 gives equal projections, and the documented
    # choice is the one nearest the uniform weights, (½, ½): .grad descends both tasks. The
    # rounding of G decided before (e.g. (−1, 2), against both tasks, on one of 40 g_1).
    for seed in range(40):
        v = torch.tensor(np.random.default_rng(seed).normal(size=7))
        theta = torch.zeros(7, dtype=torch.float64, requires_grad=True)
        bal = B.IMTLG([theta])
        bal.backward([v @ theta, s * (v @ theta)])
        np.testing.assert_allclose(bal.weights.numpy(), [0.5, 0.5], rtol=0, atol=TOL["exact"])
        assert float(theta.grad @ v) > 0


def test_imtl_g_with_two_parallel_tasks_among_three_is_nearest_uniform():
    # g_2 = 3·g_1, g_3 independent: the equal-projection conditions are one equation (u_1 = u_2)
    # with Σw = 1. Reference from the gradients: of the w solving
    # Σ_i w_i⟨g_i, u_1 − u_3⟩ = 0 and Σ_i w_i = 1, the one nearest (⅓, ⅓, ⅓).
    rng = np.random.default_rng(5)
    v, h = rng.normal(size=6), rng.normal(size=6)
    g = np.stack([v, 3.0 * v, h])
    u1, u3 = v / np.linalg.norm(v), h / np.linalg.norm(h)
    eqs = np.stack([np.ones(3), g @ (u1 - u3)])
    even = np.full(3, 1 / 3)
    expected = even + np.linalg.lstsq(eqs, np.array([1.0, 0.0]) - eqs @ even, rcond=None)[0]
    w = B.imtl_g_weights(g @ g.T)
    np.testing.assert_allclose(w, expected, rtol=0, atol=TOL["exact"])
    d = w @ g
    proj = [d @ u1, d @ u3]
    assert abs(proj[0] - proj[1]) <= TOL["exact"] * max(map(abs, proj))


def test_imtl_g_of_nearly_parallel_gradients_is_still_its_closed_form():
    # 1e-3 from parallel, well above rounding: not the fallback. For two tasks the closed form
    # does not depend on the angle: w = (‖g_2‖, ‖g_1‖)/(‖g_1‖ + ‖g_2‖).
    rng = np.random.default_rng(6)
    for s in (0.3, 5.0):
        v = rng.normal(size=5)
        perp = rng.normal(size=5)
        perp -= (perp @ v) / (v @ v) * v
        perp *= np.linalg.norm(v) / np.linalg.norm(perp)
        g = np.stack([v, s * v + 1e-3 * perp])
        n = np.linalg.norm(g, axis=1)
        np.testing.assert_allclose(B.imtl_g_weights(g @ g.T), [n[1], n[0]] / n.sum(),
                                   rtol=TOL["imtl_near_parallel"], atol=0)


def test_imtl_g_keeps_its_closed_form_down_to_where_rounding_decides():
    # Angles of 1e-5 and 3e-6 rad: 1 − cos is 1e-10 and 1e-11, far above the rounding of G,
    # which still gives the two-task closed form w = (‖g_2‖, ‖g_1‖)/(‖g_1‖ + ‖g_2‖) to 1e-3.
    # With three such tasks the weights do not depend on the order the tasks come in.
    rng = np.random.default_rng(0)
    v, noise = rng.standard_normal(20), rng.standard_normal((3, 20))
    for d in (1e-5, 3e-6):
        g = np.stack([v + d * noise[0], 0.3 * v + d * noise[1]])
        n = np.linalg.norm(g, axis=1)
        np.testing.assert_allclose(B.imtl_g_weights(g @ g.T), [n[1], n[0]] / n.sum(),
                                   rtol=1e-3, atol=0)
    g = np.array([1.0, 0.05, 20.0])[:, None] * v + 1e-5 * noise
    G = g @ g.T
    first = B.imtl_g_weights(G)
    for perm in itertools.permutations(range(3)):
        p = list(perm)
        back = np.empty(3)
        back[p] = B.imtl_g_weights(G[np.ix_(p, p)])
        np.testing.assert_allclose(back, first, rtol=1e-3, atol=1e-6)
