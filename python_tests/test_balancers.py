"""pub_native.balancers: each balancer's weights and combined gradient on hand-made gradients,
against its closed form or its definition; shared-parameter detection; the .grad contract."""

from __future__ import annotations

import copy
import io
import math
import warnings

import numpy as np
import pytest
import torch
from helpers import LOSS_VECTORS, JoinedHeads, joined_losses

import pub_native
from pub_native import balancers as B
from pub_native.demo.data import Batch
from pub_native.demo.models import PLE, MMoE

TOL = {
    # float64 parameters: closed forms and K×K float64 math, rounding only.
    "exact": 1e-10,
    # Iterative simplex solvers (projected gradient, bisection), stopped at 1e-12 steps.
    "iterative": 1e-7,
    # NashMTL: the native solver's residual target (SPEC section 4).
    "nash_residual": 1e-9,
}


pytestmark = pytest.mark.usefixtures("one_thread")


class Linear:
    """K tasks with given gradients on a shared θ: L_i = ⟨g_i, θ⟩ + c_i·b_i, where b_i is a
    task-specific scalar (∂L_i/∂b_i = c_i)."""

    def __init__(self, grads, specific=None):
        self.g = torch.as_tensor(np.asarray(grads, dtype=np.float64))
        k, p = self.g.shape
        self.theta = torch.zeros(p, dtype=torch.float64, requires_grad=True)
        self.b = [torch.zeros((), dtype=torch.float64, requires_grad=True) for _ in range(k)]
        self.c = torch.arange(1.0, k + 1, dtype=torch.float64) if specific is None else \
            torch.as_tensor(specific, dtype=torch.float64)

    @property
    def params(self):
        return [self.theta, *self.b]

    def losses(self):
        return [self.g[i] @ self.theta + self.c[i] * self.b[i] for i in range(len(self.g))]

    def run(self, bal):
        bal.backward(self.losses())
        return self.theta.grad.clone(), torch.stack([b.grad for b in self.b])


def rand_grads(k, p, seed):
    return np.random.default_rng(seed).normal(size=(k, p))


# -- LS ------------------------------------------------------------------------------------------

def test_ls_is_the_sum():
    t = Linear(rand_grads(3, 5, 0))
    grad, spec = t.run(B.LS(t.params))
    torch.testing.assert_close(grad, t.g.sum(0), rtol=0, atol=TOL["exact"])
    torch.testing.assert_close(spec, t.c, rtol=0, atol=0)


# -- MGDA-UB -------------------------------------------------------------------------------------

def test_mgda_orthogonal_equal_norms_gives_halves():
    t = Linear([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    bal = B.MGDAUB(t.params)
    grad, spec = t.run(bal)
    torch.testing.assert_close(bal.weights, torch.tensor([0.5, 0.5], dtype=torch.float64),
                               rtol=0, atol=TOL["exact"])
    torch.testing.assert_close(grad, torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64),
                               rtol=0, atol=TOL["exact"])
    # As published, the weights also scale each task's own parameters.
    torch.testing.assert_close(spec, 0.5 * t.c, rtol=0, atol=TOL["exact"])


def test_mgda_two_tasks_closed_form():
    g = np.array([[3.0, 1.0], [-1.0, 2.0]])
    G = g @ g.T
    gamma = (G[0, 0] - G[0, 1]) / (G[0, 0] + G[1, 1] - 2 * G[0, 1])
    np.testing.assert_allclose(B.min_norm_weights(G), [1 - gamma, gamma], atol=TOL["exact"])
    # One gradient inside the other's half space: the shorter one is the min-norm point.
    np.testing.assert_allclose(B.min_norm_weights([[1.0, 1.0], [1.0, 4.0]]), [1.0, 0.0],
                               atol=TOL["exact"])


@pytest.mark.parametrize("k", [3, 5])
def test_mgda_min_norm_kkt(k):
    g = rand_grads(k, 8, k)
    G = g @ g.T
    w = B.min_norm_weights(G)
    assert w.min() >= 0 and abs(w.sum() - 1) < TOL["exact"]
    # Optimality on the simplex: (Gw)_i ≥ wᵀGw for all i, with equality where w_i > 0.
    Gw, val = G @ w, w @ G @ w
    assert (Gw >= val - TOL["iterative"] * np.trace(G)).all()
    assert np.abs(Gw[w > 1e-6] - val).max() <= TOL["iterative"] * np.trace(G)


@pytest.mark.parametrize("case", ["duplicate", "opposing", "rank1", "random"])
@pytest.mark.parametrize("k", [3, 6])
def test_min_norm_is_optimal_on_degenerate_gradients(case, k):
    """Wolfe's algorithm: KKT holds to rounding, and the minimum is the one projected gradient
    descent reaches when run to convergence."""
    g = rand_grads(k, 4, 30 + k)
    if case == "duplicate":
        g[1] = g[0]
    elif case == "opposing":
        g[2] = -0.5 * g[0]
    elif case == "rank1":
        g = np.outer(np.arange(1.0, k + 1) * np.array([1, -1] * k)[:k], g[0])
    G = g @ g.T
    w = B.min_norm_weights(G)
    assert w.min() >= 0 and abs(w.sum() - 1) < TOL["exact"]
    Gw, val = G @ w, w @ G @ w
    scale = np.trace(G)
    assert (Gw >= val - TOL["exact"] * scale).all()
    assert np.abs(Gw[w > 1e-9] - val).max() <= TOL["exact"] * scale
    Gs = G / (scale / k)

    def fun(x):
        gx = Gs @ x
        return x @ gx, 2 * gx

    ref = B._minimize_on_simplex(fun, np.full(k, 1.0 / k), max_iter=5000, tol=1e-14)
    assert w @ Gs @ w <= ref @ Gs @ ref + 1e-12


def test_mgda_normalizations():
    t = Linear([[4.0, 0.0], [0.0, 1.0]])
    bal = B.MGDAUB(t.params, normalization="l2")
    t.run(bal)
    # Normalized gradients are orthonormal -> ½, ½, applied to the raw losses.
    torch.testing.assert_close(bal.weights, torch.tensor([0.5, 0.5], dtype=torch.float64),
                               rtol=0, atol=TOL["exact"])
    with pytest.raises(ValueError, match="normalization"):
        B.MGDAUB(t.params, normalization="max")


# -- IMTL-G --------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 3, 4])
def test_imtl_g_equal_projections(k):
    t = Linear(rand_grads(k, 7, 10 + k))
    bal = B.IMTLG(t.params)
    grad, spec = t.run(bal)
    w = bal.weights
    assert abs(float(w.sum()) - 1) < TOL["exact"]
    torch.testing.assert_close(grad, w @ t.g, rtol=0, atol=TOL["exact"])
    units = t.g / t.g.norm(dim=1, keepdim=True)
    proj = units @ grad
    assert float(proj.max() - proj.min()) < TOL["exact"] * float(proj.abs().max())
    torch.testing.assert_close(spec, w * t.c, rtol=0, atol=TOL["exact"])


def test_imtl_g_two_tasks_closed_form():
    g = np.array([[1.0, 0.0], [1.0, 1.0]])
    u = g / np.linalg.norm(g, axis=1, keepdims=True)
    # w_2 = g_1·(u_1 − u_2) / ((g_1 − g_2)·(u_1 − u_2)), w_1 = 1 − w_2.
    w2 = g[0] @ (u[0] - u[1]) / ((g[0] - g[1]) @ (u[0] - u[1]))
    np.testing.assert_allclose(B.imtl_g_weights(g @ g.T), [1 - w2, w2], atol=TOL["exact"])


def test_imtl_g_zero_gradient_task():
    w = B.imtl_g_weights(np.diag([4.0, 0.0, 1.0]))
    assert w[1] == 0.0
    g = np.diag([2.0, 1.0])
    d = w[[0, 2]] @ g
    assert abs(d @ [1, 0] - d @ [0, 1]) < TOL["exact"]


# -- PCGrad --------------------------------------------------------------------------------------

def test_pcgrad_removes_conflict_two_tasks():
    g1, g2 = np.array([1.0, 0.0]), np.array([-1.0, 1.0])
    t = Linear([g1, g2])
    bal = B.PCGrad(t.params)
    grad, spec = t.run(bal)
    # Definition: each gradient loses its component along the other (they conflict).
    pc1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    pc2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    np.testing.assert_allclose(grad.numpy(), pc1 + pc2, atol=TOL["exact"])
    assert float(grad @ t.g[0]) >= 0 and float(grad @ t.g[1]) >= 0
    torch.testing.assert_close(grad, bal.weights @ t.g, rtol=0, atol=TOL["exact"])
    torch.testing.assert_close(spec, t.c, rtol=0, atol=0)  # ordinary task gradients


def test_pcgrad_no_conflict_is_the_sum():
    t = Linear([[1.0, 0.2], [0.3, 1.0]])
    grad, _ = t.run(B.PCGrad(t.params))
    torch.testing.assert_close(grad, t.g.sum(0), rtol=0, atol=TOL["exact"])


def test_pcgrad_matches_vector_definition_and_seed():
    g = rand_grads(4, 6, 3)
    w = B.pcgrad_weights(g @ g.T, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    total = np.zeros(6)
    for i in range(4):
        gi = g[i].copy()
        for j in rng.permutation(4):
            if j != i and gi @ g[j] < 0:
                gi -= (gi @ g[j]) / (g[j] @ g[j]) * g[j]
        total += gi
    np.testing.assert_allclose(w @ g, total, atol=TOL["exact"])


# -- CAGrad --------------------------------------------------------------------------------------

def test_cagrad_c0_is_the_sum_of_gradients():
    t = Linear(rand_grads(3, 5, 4))
    grad, spec = t.run(B.CAGrad(t.params, c=0.0))
    # c = 0: d = g_0 (the mean gradient); θ.grad = K·d, the LS gradient.
    torch.testing.assert_close(grad, 3 * t.g.mean(0), rtol=0, atol=TOL["exact"])
    torch.testing.assert_close(spec, t.c, rtol=0, atol=0)


@pytest.mark.parametrize("k", [2, 3])
def test_cagrad_solves_its_dual(k):
    g = rand_grads(k, 4, 20 + k)
    g[1] = -0.5 * g[0] + 0.2 * g[1]  # conflicting tasks
    G = g @ g.T
    c = 0.5
    g0 = g.mean(0)
    phi = c * np.linalg.norm(g0)

    def dual(w):
        gw = w @ g
        return gw @ g0 + phi * np.linalg.norm(gw)

    # Brute force over a grid of the simplex.
    grid = np.linspace(0, 1, 401)
    if k == 2:
        cands = [np.array([a, 1 - a]) for a in grid]
    else:
        cands = [np.array([a, b, 1 - a - b]) for a in grid[::4] for b in grid[::4] if a + b <= 1]
    best = min(cands, key=dual)
    w = B.cagrad_weights(G, c)
    # Recover the dual solution from the returned weights: K·(g0 + λ g_w)/(1 + c²).
    lam_w = w * (1 + c * c) / k - 1.0 / k
    w_star = lam_w / lam_w.sum()
    assert dual(w_star) <= dual(best) + 1e-9
    d = (w @ g) / k * (1 + c * c)
    # The primal constraint is active: ‖d − g_0‖ = c‖g_0‖.
    assert abs(np.linalg.norm(d - g0) - phi) < TOL["iterative"] * np.linalg.norm(g0)


@pytest.mark.parametrize("dim", [12, 3])  # full rank; fewer dimensions than tasks (low rank)
def test_cagrad_matches_the_primal_optimum_on_ill_conditioned_tasks(dim):
    # Task gradients whose sizes differ by up to e^6 (cond(G) up to ~1e6 and beyond): CAGrad's
    # direction must reach the optimum of its primal problem, max_d min_i ⟨g_i, d⟩ subject to
    # ‖d − g_0‖ ≤ c‖g_0‖, solved independently by cvxpy.
    cp = pytest.importorskip("cvxpy")
    rng = np.random.default_rng(7 + dim)
    for _ in range(30):
        k = int(rng.integers(3, 7))
        g = rng.standard_normal((k, dim)) * np.exp(rng.uniform(-3, 3, (k, 1)))
        g0 = g.mean(0)
        for c in (0.1, 0.5, 0.9):
            d_var, t_var = cp.Variable(dim), cp.Variable()
            prob = cp.Problem(cp.Maximize(t_var),
                              [g @ d_var >= t_var, cp.norm(d_var - g0) <= c * np.linalg.norm(g0)])
            prob.solve(solver="CLARABEL")
            w = B.cagrad_weights(g @ g.T, c)
            d = (w @ g) / k * (1 + c * c)  # the direction before CAGrad's 1/(1 + c²) rescale
            assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + 1e-9)
            scale = np.abs(g @ d).max()
            assert (g @ d).min() >= prob.value - 1e-6 * scale, (k, c, (g @ d).min(), prob.value)


@pytest.mark.parametrize("case", ["zero task", "opposite tasks"])
def test_cagrad_when_the_hull_holds_the_origin(case):
    # A task with zero gradient, or two opposite ones (K = 3): the hull of the gradients holds
    # the origin, so no direction improves every task; the optimum of the primal problem is 0,
    # reached by the plain mean (w = K/(1 + c²)·(1/K)), within CAGrad's ball.
    g = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]) if case == "zero task" else \
        np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    c = 0.5
    w = B.cagrad_weights(g @ g.T, c)
    d = (w @ g) / 3 * (1 + c * c)
    g0 = g.mean(0)
    assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + 1e-9)
    assert (g @ d).min() >= -1e-9


# -- NashMTL -------------------------------------------------------------------------------------

def test_nashmtl_weights_solve_the_bargaining_equation():
    t = Linear(rand_grads(3, 6, 5))
    bal = B.NashMTL(t.params, max_norm=0.0)
    grad, spec = t.run(bal)
    G = (t.g @ t.g.T).numpy()
    Gn = G / np.linalg.norm(G)  # Frobenius normalization, as published
    Gn += 1e-8 * np.diag(np.diag(Gn))  # the solver's default ridge ρ·diag(G) (SPEC section 4)
    a = bal.weights.numpy()
    assert (a > 0).all()
    res = np.linalg.norm(Gn @ a - 1 / a) / np.linalg.norm(1 / a)
    assert res < TOL["nash_residual"]
    torch.testing.assert_close(grad, bal.weights @ t.g, rtol=0, atol=TOL["exact"])
    torch.testing.assert_close(spec, bal.weights * t.c, rtol=0, atol=TOL["exact"])
    assert bal.stats["status"] == pub_native.SolveStatus.CONVERGED
    assert bal.stats["solve_time"] > 0


@pytest.mark.parametrize("magnitude", [300.0, 1e-4])  # float16: squares overflow; underflow
@pytest.mark.parametrize("name", ["MGDAUB", "IMTLG", "CAGrad", "NashMTL"])
def test_gram_of_half_precision_gradients_is_float64(name, magnitude):
    # G is formed with float64 products and sums (SPEC section 4), whatever the parameters'
    # dtype: float16 gradients of a few hundred (squares past float16's 65504) or of 1e-4
    # (squares below its subnormals) give the weights of the float64 Gram of the same values.
    k, p = 3, 64
    g16 = (magnitude * torch.as_tensor(rand_grads(k, p, 40))).to(torch.float16)
    theta = torch.zeros(p, dtype=torch.float16, requires_grad=True)
    bal = getattr(B, name)([theta], **({"max_norm": 0.0} if name == "NashMTL" else {}))
    bal.backward([(g16[i] * theta).sum() for i in range(k)])
    G = (g16.double() @ g16.double().T).numpy()
    if name == "MGDAUB":
        expected = B.min_norm_weights(G)
    elif name == "IMTLG":
        expected = B.imtl_g_weights(G)
    elif name == "CAGrad":
        expected = B.cagrad_weights(G, 0.5)
    else:
        expected = pub_native.solve_weights(G / np.linalg.norm(G)).weights
    np.testing.assert_allclose(bal.weights.numpy(), expected, rtol=1e-6)
    assert bal.weights.abs().sum() > 0


def test_gram_is_exactly_symmetric_float64():
    rows = torch.randn(5, 272, generator=torch.Generator().manual_seed(0))
    G = B._gram_float64(rows)
    assert G.dtype == torch.float64 and torch.equal(G, G.t())
    torch.testing.assert_close(G, rows.double() @ rows.double().T, rtol=1e-14, atol=0)
    # NashMTL on a float32 model of five tasks: the solver accepts G at every seed (a Gram in
    # float32 was not exactly symmetric, which it refused on some).
    for seed in range(20):
        torch.manual_seed(seed)
        trunk = torch.nn.Linear(16, 16)
        heads = [torch.nn.Linear(16, 1) for _ in range(5)]
        bal = B.NashMTL([*trunk.parameters(), *(q for h in heads for q in h.parameters())])
        z = torch.tanh(trunk(torch.randn(64, 16)))
        bal.backward([h(z).square().mean() for h in heads])
        assert bal.stats["status"] == pub_native.SolveStatus.CONVERGED


def test_a_step_that_raises_is_taken_again_as_the_same_kind():
    # update_weights_every = 2: a weight update that raises (NaN) does not count, so the next
    # call computes the weights again instead of reusing the old ones.
    t = Linear(rand_grads(2, 4, 8))
    bal = B.NashMTL(t.params, max_norm=0.0, update_weights_every=2)
    t.run(bal)
    assert bal.stats["updated"] and bal.steps == 1
    t.run(bal)
    assert not bal.stats["updated"] and bal.steps == 2
    bad = t.losses()
    bad[1] = bad[1] * float("nan")
    with pytest.raises(FloatingPointError):
        bal.backward(bad)
    assert bal.steps == 2
    t.run(bal)
    assert bal.stats["updated"] and bal.steps == 3


def test_nashmtl_clips_the_shared_gradient():
    t = Linear(10 * rand_grads(2, 4, 6))
    bal = B.NashMTL(t.params, max_norm=1.0)
    grad, _ = t.run(bal)
    unclipped = bal.weights @ t.g
    assert float(unclipped.norm()) > 1
    torch.testing.assert_close(grad, unclipped / unclipped.norm(), rtol=1e-6, atol=0)


@pytest.mark.parametrize(("name", "every"), [("NashMTL", 1), ("NashMTL", 2), ("FAMO", 1)])
def test_clipping_sees_the_gradient_of_the_call_alone(name, every):
    # .grad already holding a large gradient (an auxiliary loss, an earlier micro-batch) is
    # neither clipped nor counted in the norm: each call adds its own clipped gradient, as the
    # published code clips right after zero_grad() and one backward.
    def make():
        t = Linear(10 * rand_grads(2, 4, 6))
        bal = B.NashMTL(t.params, max_norm=1.0, update_weights_every=every) \
            if name == "NashMTL" else B.FAMO(t.params, n_tasks=2, max_norm=1.0)
        return t, bal

    fresh, bal = make()
    alone = [fresh.run(bal)[0]]
    if name == "FAMO":  # (.grad kept: FAMO takes the second call for a micro-batch of the step)
        alone.append(fresh.run(bal)[0] - alone[0])
        assert float(alone[1].norm()) == pytest.approx(1.0, rel=1e-6)
    else:
        fresh.theta.grad = None
        alone.append(fresh.run(bal)[0])  # a reuse step where every = 2
    assert float(alone[0].norm()) == pytest.approx(1.0, rel=1e-6)  # torch's clip: ε = 1e-6
    t, bal = make()
    held = 100 * torch.arange(1.0, 5.0, dtype=torch.float64)
    t.theta.grad = held.clone()
    for call in range(2):
        grad, _ = t.run(bal)
        torch.testing.assert_close(grad, held + sum(alone[:call + 1]), rtol=1e-12, atol=1e-12)
    assert bal.steps == (1 if name == "FAMO" else 2) and bal.stats["updated"] is (every == 1)


@pytest.mark.slow
def test_clipping_under_ddp_with_gradient_buckets_and_accumulation(tmp_path):
    # DDP's gradient_as_bucket_view makes .grad its bucket, which its reducer writes into:
    # taking .grad off for the clipping let the second micro-batch overwrite the first, a
    # gradient 0.15 off the one without clipping. Two gloo processes, a max_norm that never
    # clips: .grad equals that of max_norm = 0 to rounding, with and without bucket views.
    import json
    import subprocess
    import sys
    from pathlib import Path

    from helpers import free_port

    out = tmp_path / "diffs.json"
    script = Path(__file__).with_name("ddp_accumulate.py")
    subprocess.run([sys.executable, str(script), str(free_port()), str(out)], check=True,
                   timeout=120, capture_output=True)
    diffs = json.loads(out.read_text())
    assert set(diffs) == {"bucket_view=False", "bucket_view=True"}
    assert all(d < 1e-6 for d in diffs.values()), diffs


def test_nashmtl_update_weights_every_reuses_weights():
    t = Linear(rand_grads(2, 4, 8))
    bal = B.NashMTL(t.params, max_norm=0.0, update_weights_every=2)
    t.run(bal)
    w1 = bal.weights.clone()
    assert bal.stats["updated"]
    t.theta.grad = None
    for b in t.b:
        b.grad = None
    t.g = t.g.flip(0)  # new gradients; the weights must not change on step 2
    grad, spec = t.run(bal)
    assert not bal.stats["updated"]
    torch.testing.assert_close(bal.weights, w1, rtol=0, atol=0)
    torch.testing.assert_close(grad, w1 @ t.g, rtol=0, atol=TOL["exact"])
    torch.testing.assert_close(spec, w1 * t.c, rtol=0, atol=TOL["exact"])


# -- the .grad contract and errors ---------------------------------------------------------------

def test_gradients_accumulate_like_backward():
    t = Linear(rand_grads(2, 3, 9))
    t.theta.grad = torch.ones(3, dtype=torch.float64)
    t.b[0].grad = torch.tensor(5.0, dtype=torch.float64)
    grad, spec = t.run(B.PCGrad(t.params))
    pure = Linear(t.g.numpy())
    ref_grad, ref_spec = pure.run(B.PCGrad(pure.params))
    torch.testing.assert_close(grad, ref_grad + 1, rtol=0, atol=TOL["exact"])
    torch.testing.assert_close(spec, ref_spec + torch.tensor([5.0, 0.0], dtype=torch.float64))


def test_works_with_any_optimizer():
    t = Linear([[1.0, 0.0], [0.0, 1.0]])
    opt = torch.optim.SGD(t.params, lr=0.1)
    bal = B.MGDAUB(t.params)
    opt.zero_grad()
    bal.backward(t.losses())
    opt.step()
    torch.testing.assert_close(t.theta.detach(), torch.tensor([-0.05, -0.05],
                                                              dtype=torch.float64))


def test_non_finite_gradient_raises_and_keeps_grads():
    t = Linear([[1.0, 0.0], [math.nan, 1.0]])
    t.b[0].grad = torch.tensor(2.0, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match=r"task\(s\) \[1\]"):
        B.NashMTL(t.params).backward(t.losses())
    assert t.theta.grad is None
    assert float(t.b[0].grad) == 2.0 and t.b[1].grad is None


def test_argument_errors():
    t = Linear([[1.0, 0.0], [0.0, 1.0]])
    other = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="not in params"):
        B.NashMTL(t.params, shared=[other])
    with pytest.raises(ValueError, match="update_weights_every"):
        B.NashMTL(t.params, update_weights_every=0)
    with pytest.raises(TypeError):
        B.PCGrad(t.params, update_weights_every=2)  # its weights depend on the conflicts
    with pytest.raises(ValueError, match="solver must be one of"):
        B.NashMTL(t.params, solver="simplex")
    with pytest.raises(ValueError, match="c must be"):
        B.CAGrad(t.params, c=-1)
    with pytest.raises(ValueError, match="params is empty"):
        B.LS([])
    bal = B.IMTLG(t.params)
    bal.backward(t.losses())
    with pytest.raises(ValueError, match="K = 2"):
        bal.backward(t.losses()[:1] * 3)


def test_options_given_as_numpy_numbers_are_taken_and_bad_ones_named():
    t = Linear(rand_grads(2, 3, 1))
    bal = B.NashMTL(t.params, update_weights_every=np.int64(2), max_norm=np.float32(0.5))
    assert bal.update_weights_every == 2 and type(bal.update_weights_every) is int
    assert B.MultiBalance(t.params, ema=np.float32(0.5)).ema == 0.5
    assert B.FAMO(t.params, np.int64(2)).k == 2
    for make, match in [(lambda: B.NashMTL(t.params, solver="x"), "solver must be one of"),
                        (lambda: B.NashMTL(t.params, max_norm=True), "max_norm"),
                        (lambda: B.PCGrad(t.params, seed="a"), "seed must be"),
                        (lambda: B.PCGrad(t.params, seed=-1), "seed must be"),
                        (lambda: B.CAGrad(t.params, c=np.bool_(True)), "c must be")]:
        with pytest.raises(ValueError, match=match):
            make()


def test_options_set_as_attributes_are_checked_as_the_constructor_checks_them():
    # weight_task_specific="no" was taken as True; update_weights_every = 0 set after the
    # constructor passed, and the next backward raised ZeroDivisionError; min_losses of
    # strings raised "too many dimensions 'str'", naming nothing.
    t = Linear(rand_grads(2, 3, 1))
    for make, match in [(lambda: B.NashMTL(t.params, weight_task_specific="no"),
                         "weight_task_specific must be a bool"),
                        (lambda: B.PCGrad(t.params, weight_task_specific=2),
                         "weight_task_specific must be a bool"),
                        (lambda: B.FAMO(t.params, 2, min_losses=["a", "b"]), "min_losses")]:
        with pytest.raises(ValueError, match=match):
            make()
    nash, cagrad, famo = B.NashMTL(t.params), B.CAGrad(t.params), B.FAMO(t.params, 2)
    for bal, name, value in [(nash, "update_weights_every", 0), (nash, "max_norm", -1.0),
                             (nash, "solver", "adam"), (nash, "weight_task_specific", "no"),
                             (cagrad, "c", float("nan")), (famo, "w_lr", -0.1),
                             (famo, "gamma", "0.1")]:
        before = getattr(bal, name)
        with pytest.raises(ValueError, match=f"^{name} must be"):
            setattr(bal, name, value)
        assert getattr(bal, name) == before
    nash.update_weights_every = np.int64(3)
    assert nash.update_weights_every == 3 and type(nash.update_weights_every) is int
    with pytest.raises(ValueError, match="does not reuse weights"):
        cagrad.update_weights_every = 2


def test_famo_w_lr_and_gamma_set_as_attributes_are_what_its_logits_adam_steps_with():
    # The logits' Adam was built with the constructor's values: setting f.w_lr or f.gamma, or
    # loading them from state_dict['options'], changed the attribute and what state_dict
    # saved, not the steps.
    def run(make, then=None):
        torch.manual_seed(0)
        m = _Heads()
        bal = make(list(m.parameters()))
        if then is not None:
            then(bal)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        for _ in range(3):
            opt.zero_grad()
            m.run(bal)
            opt.step()
            with torch.no_grad():
                z = torch.tanh(m.trunk(m.x))
                bal.update([((h(z).squeeze(1) - m.y[:, i]) ** 2).mean()
                            for i, h in enumerate(m.heads)])
        return bal

    built = run(lambda ps: B.FAMO(ps, 2, w_lr=0.5, gamma=0.1))
    default = run(lambda ps: B.FAMO(ps, 2))
    assert not torch.equal(built.logits, default.logits)  # not vacuous
    set_later = run(lambda ps: B.FAMO(ps, 2), lambda b: (setattr(b, "w_lr", 0.5),
                                                         setattr(b, "gamma", 0.1)))
    torch.testing.assert_close(set_later.logits, built.logits, rtol=0, atol=0)
    state = set_later.state_dict()
    assert state["options"]["w_lr"] == 0.5 and state["options"]["gamma"] == 0.1
    fresh = B.FAMO(list(_Heads().parameters()), 2)
    fresh.load_state_dict(state)
    assert (fresh.w_lr, fresh.gamma) == (0.5, 0.1)
    group = fresh._logit_opt.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.5, 0.1)


def test_a_process_group_that_is_not_one_is_named_at_construction():
    t = Linear(rand_grads(2, 3, 1))
    for make in (lambda: B.IMTLG(t.params, process_group=5),
                 lambda: pub_native.Adam(t.params, process_group="world")):
        with pytest.raises(TypeError, match="process_group must be 'auto', None or a torch"):
            make()


def test_a_wrong_number_of_losses_names_the_balancer():
    t = Linear(rand_grads(2, 3, 1))
    bal = B.IMTLG(t.params)
    t.run(bal)
    with pytest.raises(ValueError, match="this IMTLG was built for K = 2"):
        bal.backward(t.losses()[:1])


def test_a_loss_of_one_element_in_any_shape_is_taken_as_loss_backward_takes_it():
    t = Linear(rand_grads(2, 3, 1))
    ref = Linear(t.g.numpy())
    bal, ref_bal = B.IMTLG(t.params), B.IMTLG(ref.params)
    bal.backward([loss.reshape(1, 1) for loss in t.losses()])
    ref.run(ref_bal)
    torch.testing.assert_close(t.theta.grad, ref.theta.grad, rtol=0, atol=0)


def test_famo_update_twice_after_one_backward_raises():
    t = Linear(rand_grads(2, 3, 1), specific=[1.0, 1.0])
    famo = B.FAMO(t.params, 2)
    famo.backward([loss + 2.0 for loss in t.losses()])
    famo.update([loss.detach() + 1.5 for loss in t.losses()])
    logits = famo.logits.detach().clone()
    with pytest.raises(RuntimeError, match="already called"):
        famo.update([loss.detach() + 1.0 for loss in t.losses()])
    assert torch.equal(famo.logits.detach(), logits)


def test_explicit_shared():
    t = Linear([[1.0, 0.0], [0.0, 1.0]])
    bal = B.MGDAUB(t.params, shared=[t.theta])
    t.run(bal)
    assert bal.shared == [t.theta]


@pytest.mark.parametrize("name", ["NashMTL", "MGDAUB", "IMTLG"])  # they weight task-specific ones
def test_an_explicitly_shared_parameter_of_one_task_gets_the_combined_gradient_once(name):
    # b_0 is task 0's alone but named shared: Σ w_i g_i, not also weighted as task 0's own.
    t = Linear(rand_grads(2, 5, 11))
    bal = getattr(B, name)(t.params, shared=[t.theta, t.b[0]],
                           **({"max_norm": 0.0} if name == "NashMTL" else {}))
    grad, spec = t.run(bal)
    w = bal.weights
    torch.testing.assert_close(grad, w @ t.g, rtol=0, atol=TOL["exact"])
    torch.testing.assert_close(spec[0], w[0] * t.c[0], rtol=0, atol=TOL["exact"])
    torch.testing.assert_close(spec[1], w[1] * t.c[1], rtol=0, atol=TOL["exact"])


# -- shared detection on the models --------------------------------------------------------------

def _batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randint(0, 3, (n, 2), generator=g), torch.randn(n, 3, generator=g),
                 torch.randint(0, 2, (n, 2), generator=g).float())


@pytest.mark.parametrize("cls", [MMoE, PLE])
def test_shared_detection_on_models(cls):
    torch.manual_seed(0)
    model = cls([3, 3], 3, 2, embed_dim=4, expert_dim=8, tower_dims=(4,))
    names = {id(p): n for n, p in model.named_parameters()}
    bal = B.NashMTL(model.parameters())
    bal.backward(model.task_losses(_batch()))
    shared = {names[id(p)] for p in bal.shared}
    if cls is MMoE:
        assert shared == {"embedding.embedding.weight", "embedding.numerical.weight",
                          "embedding.numerical.bias", "experts.linear.weight",
                          "experts.linear.bias"}
    else:
        assert "levels.0.task_experts.1.linear.weight" in shared  # feeds the shared gate
        assert "levels.1.task_experts.1.linear.weight" not in shared
        assert "levels.0.shared_gate.0.weight" in shared
    for k in range(2):
        own = {n for n in names.values() if n.startswith(f"towers.{k}.")}
        assert own <= {names[id(p)] for p in bal._specific[k]}
        assert not own & shared
    # Every parameter got a gradient; towers got α_k × their ordinary gradient.
    assert all(p.grad is not None for p in model.parameters())
    tower = model.towers[1][-1].weight
    ordinary = torch.autograd.grad(model.task_losses(_batch())[1], tower)[0]
    torch.testing.assert_close(tower.grad, float(bal.weights[1]) * ordinary,
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["nashmtl", "pcgrad", "imtl-g"])
@pytest.mark.parametrize("cls", [MMoE, PLE])
def test_stacked_losses_equal_the_list(cls, name):
    """A 1-D tensor built by torch.stack is split back into its tasks at the stack, as the
    optimizers do: the same shared set and the same gradients as the list of losses."""
    grads, shared = [], []
    for stacked in (False, True):
        torch.manual_seed(0)
        model = cls([3, 3], 3, 2, embed_dim=4, expert_dim=8, tower_dims=(4,))
        names = {id(p): n for n, p in model.named_parameters()}
        bal = B.BALANCERS[name](model.parameters())
        losses = model.task_losses(_batch())
        bal.backward(torch.stack(losses) if stacked else losses)
        shared.append({names[id(p)] for p in bal.shared})
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert shared[0] == shared[1]
    assert not any(n.startswith("towers.") for n in shared[1])  # not "everything is shared"
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-6, atol=1e-8, msg=n)


def test_the_outputs_join_is_measured_on_the_first_call_only():
    # One backward pass per task down to the heads' joined outputs, on the first call; a
    # parameter no loss reaches keeps later calls deciding, which took those K passes again at
    # every call (a hook on the joined outputs counts the passes through it).
    torch.manual_seed(0)
    model = JoinedHeads("cat")
    unused = torch.nn.Linear(2, 2)
    bal = B.PCGrad([*model.parameters(), *unused.parameters()])
    calls = []
    for _ in range(3):
        z = torch.relu(model.trunk(torch.randn(8, 5)))
        out = torch.cat([h(z) for h in model.heads], 1)
        out.register_hook(lambda g: calls.append(1))
        before = len(calls)
        bal.backward([out[:, i].pow(2).mean() for i in range(3)])
        calls.append(len(calls) - before)
        del calls[before:-1]
    assert calls == [6, 3, 3]
    assert {id(p) for p in bal.shared} == {id(p) for p in model.trunk.parameters()}


def test_old_module_name_is_the_same_module():
    import importlib
    import sys

    sys.modules.pop("pub_native.baselines", None)
    with pytest.warns(DeprecationWarning, match="pub_native.balancers"):
        old = importlib.import_module("pub_native.baselines")
    assert old is B and old.NashMTL is B.NashMTL


@pytest.mark.parametrize("name", sorted(B.BALANCERS))
def test_every_balancer_trains_a_model(name):
    torch.manual_seed(1)
    model = MMoE([3, 3], 3, 2, embed_dim=4, expert_dim=8, tower_dims=(4,))
    kwargs = {"n_tasks": 2} if name in ("famo", "uncertainty") else {}
    bal = B.BALANCERS[name](model.parameters(), **kwargs)
    extra = bal.parameters() if name == "uncertainty" else []
    opt = torch.optim.Adam([*model.parameters(), *extra], lr=1e-2)
    batch = _batch(256, seed=2)
    first = None
    for _ in range(30):
        losses, z = model.task_losses(batch, with_representation=True)
        total = float(sum(losses).detach())
        first = total if first is None else first
        opt.zero_grad()
        if name == "multibalance":
            bal.backward(losses, z)
        else:
            bal.backward(losses)
        opt.step()
    assert total < first
    assert bal.weights.shape == (2,) and bool(torch.isfinite(bal.weights).all())
    assert repr(bal).startswith(type(bal).__name__ + "(")


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("name", sorted(B.BALANCERS))
def test_backward_under_no_grad_or_inference_mode_works_as_loss_backward_does(name, context):
    # loss.backward() works under torch.no_grad() and torch.inference_mode() on a graph built
    # before them. LS, Uncertainty and FAMO raised torch's "element 0 of tensors does not require
    # grad" (their weighted sum was built inside the context), and under inference_mode the others
    # kept inference tensors (the task-gradient buffer, .grad, FAMO's logit state) that the next
    # call outside could not update in place. The first call (and FAMO's update) under the
    # context gives what it gives outside; later calls outside accumulate and train on.
    kwargs = {"n_tasks": 2} if name in ("famo", "uncertainty") else {}
    batch = _batch(64, seed=3)
    runs = []
    for inside in (False, True):
        torch.manual_seed(1)
        model = MMoE([3, 3], 3, 2, embed_dim=4, expert_dim=8, tower_dims=(4,))
        bal = B.BALANCERS[name](model.parameters(), **kwargs)
        extra = bal.parameters() if name == "uncertainty" else []
        opt = torch.optim.Adam([*model.parameters(), *extra], lr=1e-2)

        def call(bal=bal, model=model):
            losses, z = model.task_losses(batch, with_representation=True)
            bal.backward(*((losses, z) if name == "multibalance" else (losses,)))

        for step in range(3):
            losses, z = model.task_losses(batch, with_representation=True)
            args = (losses, z) if name == "multibalance" else (losses,)
            if step == 0 and inside:
                with context():
                    bal.backward(*args)
            else:
                bal.backward(*args)
            if step == 0:
                runs.append([p.grad.clone() for p in [*model.parameters(), *extra]])
            call()  # a second micro-batch, outside the context: accumulated in place
            opt.step()
            if name == "famo":
                after = [loss.detach() for loss in model.task_losses(batch)]
                if step == 0 and inside:
                    with context():
                        bal.update(after)
                else:
                    bal.update(after)
            opt.zero_grad()
        runs[-1].append([p.detach().clone() for p in model.parameters()])
    outside, inside = runs
    for a, b in zip(outside[:-1], inside[:-1], strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    for a, b in zip(outside[-1], inside[-1], strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_shared_given_as_names_is_refused_saying_it_takes_the_tensors():
    # shared=["trunk.weight"] or shared=model.named_parameters() must name the argument and say
    # what it takes (a list of names was refused as "not in params" / "must hold tensors").
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    named = list(model[0].named_parameters())
    for shared, item in ((["0.weight"], r"shared\[0\] is a parameter name \('0\.weight'\)"),
                         (named, r"shared\[0\] is a \(name, tensor\) pair"),
                         ("0.weight", r"shared is a parameter name")):
        for make in (lambda s: B.NashMTL(model.parameters(), shared=s),
                     lambda s: B.FAMO(model.parameters(), n_tasks=2, shared=s)):
            with pytest.raises(TypeError, match=item + r".*shared= takes the parameter tensors "
                                                       r"themselves.*named_parameters\(\)"):
                make(shared)
    B.NashMTL(model.parameters(), shared=model[0].parameters())  # the tensors: taken


@pytest.mark.parametrize("name", sorted(B.BALANCERS))
def test_params_given_as_named_parameters_are_taken_as_torch_optimizers_take_them(name):
    # model.named_parameters() (torch's optimizers take it) raised "params must hold tensors,
    # got tuple"; the balancer now takes the tensors: the same gradients as parameters().
    grads = []
    for named in (False, True):
        torch.manual_seed(0)
        model = JoinedHeads("list")
        kwargs = {"n_tasks": 3} if name in ("famo", "uncertainty") else {}
        bal = B.BALANCERS[name](model.named_parameters() if named else model.parameters(),
                                **kwargs)
        assert [id(p) for p in bal.params] == [id(p) for p in model.parameters()]
        torch.manual_seed(1)
        x, y = torch.randn(8, 5), torch.rand(8, 3)
        if name == "multibalance":
            z = torch.relu(model.trunk(x))
            bal.backward([((torch.sigmoid(h(z)).squeeze(1) - y[:, i]) ** 2).mean()
                          for i, h in enumerate(model.heads)], z)
        else:
            bal.backward(joined_losses(model, x, y))
        grads.append([p.grad for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_a_sparse_shared_gradient_is_refused_naming_the_parameter_and_the_balancer():
    # It said "sparse gradient for a shared parameter of shape (20, 4): PUB needs dense
    # gradients": a shape, not the parameter, and an optimizer the user did not call.
    model = _SparseRec()
    bal = B.NashMTL(model.parameters(), max_norm=0.0)
    with pytest.raises(TypeError, match=r"^params\[0\] \(shape \(20, 4\)\) is shared and gets a "
                                        r"sparse gradient.*this NashMTL needs dense"):
        bal.backward(model.losses())
    assert all(p.grad is None for p in model.parameters())


def test_channels_last_shared_parameter_gets_its_gradient_in_its_layout():
    # The per-task buffer follows each parameter's memory order; the combined gradient must land
    # in .grad element for element. Two identical tasks never conflict, so PCGrad's gradient is
    # their sum.
    torch.manual_seed(0)
    w = torch.randn(2, 3, 2, 2).contiguous(memory_format=torch.channels_last).requires_grad_()
    x = torch.randn(2, 3, 2, 2)
    head = torch.randn(1, requires_grad=True)

    def loss(p):
        return ((p * x).sum() * head).sum() ** 2 + (p * p * x).sum()

    B.PCGrad([w, head], shared=[w]).backward([loss(w), loss(w)])
    w2 = w.detach().clone(memory_format=torch.preserve_format).requires_grad_()
    (2 * loss(w2)).backward()
    assert w.grad.stride() == w.stride()
    torch.testing.assert_close(w.grad, w2.grad)


@pytest.mark.parametrize("change", ["channels_last", "float64"])
@pytest.mark.parametrize("cls", [B.IMTLG, B.MGDAUB])
def test_shared_parameter_changed_between_steps_gets_the_weighted_gradient(cls, change):
    # model.to(...) between steps changes a shared parameter's memory order or dtype: the
    # per-task buffer is laid out again, and .grad is still Σ_i w_i ∂L_i/∂θ (element for element,
    # against torch.autograd.grad) in the parameter's new layout.
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    heads = torch.nn.ModuleList(torch.nn.Linear(4 * 16, 1) for _ in range(2))
    x = torch.randn(5, 3, 4, 4)
    ys = [torch.randn(5), torch.randn(5)]
    bal = cls(list(conv.parameters()) + list(heads.parameters()))
    for step in range(2):
        if step == 1:
            if change == "channels_last":
                conv.to(memory_format=torch.channels_last)
            else:
                conv.double()
                heads.double()
                x = x.double()
                ys = [y.double() for y in ys]
        for p in [*conv.parameters(), *heads.parameters()]:
            p.grad = None
        h = conv(x).relu().flatten(1)
        losses = [((hd(h).squeeze(1) - y) ** 2).mean() for hd, y in zip(heads, ys)]
        task_grads = [torch.autograd.grad(loss, conv.weight, retain_graph=True)[0]
                      for loss in losses]
        bal.backward(losses)
        expected = sum(float(w) * g for w, g in zip(bal.weights, task_grads))
        assert conv.weight.grad.stride() == conv.weight.stride()
        assert conv.weight.grad.dtype == conv.weight.dtype
        torch.testing.assert_close(conv.weight.grad, expected)


_GRADIENT_BALANCERS = ["NashMTL", "MGDAUB", "IMTLG", "PCGrad", "CAGrad"]


@pytest.mark.parametrize("join", ["cat", "stack", "stack0", "split", "per-task-cat", *LOSS_VECTORS])
@pytest.mark.parametrize("name", _GRADIENT_BALANCERS)
def test_heads_joined_into_one_output_are_not_shared(name, join):
    """Heads whose outputs are concatenated (or stacked) into one tensor, each task reading its
    own column, are task-specific, as they are when the model returns a list: the same shared
    set and the same gradients, on the first call and the next, without a warning."""
    torch.manual_seed(0)
    models = [JoinedHeads(join), JoinedHeads("list")]
    models[1].load_state_dict(models[0].state_dict())
    bals = [getattr(B, name)(m.parameters()) for m in models]
    for _ in range(2):
        x, y = torch.randn(16, 5), torch.rand(16, 3)
        for m, bal in zip(models, bals):
            m.zero_grad()
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                bal.backward(joined_losses(m, x, y))
        for m, bal in zip(models, bals):
            assert {id(p) for p in bal.shared} == {id(p) for p in m.trunk.parameters()}
        for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=n)


def _gappy_problem(second_shared):
    """A shared parameter that is a strided view with gaps (P(x[:, ::2]): strides (6, 2)), two
    task-specific ones and, with ``second_shared``, another shared tensor after it in the
    per-task buffer (whose rows its view overran: the task rows overwrote each other)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 6)[:, ::2])
    v = torch.nn.Parameter(torch.randn(40))
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4, 3))
    params = [w, v, a, b] if second_shared else [w, a, b]

    def losses():
        s = v.sum() if second_shared else 0.0
        return [((w * a).sum() - 1) ** 2 + 0.1 * s, ((w * b).sum() + 1) ** 2 + 0.1 * s ** 2]
    return w, params, losses


@pytest.mark.parametrize("second_shared", [False, True])
@pytest.mark.parametrize("name", _GRADIENT_BALANCERS)
def test_a_shared_parameter_with_gaps_is_refused_naming_it_and_nothing_changes(name,
                                                                               second_shared):
    # The per-task buffer lays each shared parameter out as numel consecutive elements in its
    # memory order: a view with gaps reached past its row (torch's "setStorage ... out of
    # bounds", naming nothing) or, with another shared tensor after it, silently wrote the task
    # rows over each other (a wrong .grad). Refused as the PUB optimizers refuse it.
    w, params, losses = _gappy_problem(second_shared)
    assert not w.is_contiguous()
    held = [torch.full_like(p, 0.5) for p in params]
    for p, g in zip(params, held):
        p.grad = g.clone()
    bal = getattr(B, name)(params, **({"max_norm": 0.0} if name == "NashMTL" else {}))
    before = copy.deepcopy(bal.state_dict())
    with pytest.raises(NotImplementedError, match=r"params\[0\] \(shape \(4, 3\).*gaps"):
        bal.backward(losses())
    for p, g in zip(params, held):
        assert torch.equal(p.grad, g)
    assert _same_state(bal.state_dict(), before)
    assert bal.k is None and bal.shared is None and bal.steps == 0 and bal.weights is None
    # The same tensors made dense are balanced: .grad is Σ_i w_i ∂L_i/∂w (plus what it held).
    w.data = w.data.contiguous()
    task_grads = [torch.autograd.grad(loss, w)[0] for loss in losses()]
    bal.backward(losses())
    expected = held[0] + sum(float(wi) * g for wi, g in zip(bal.weights, task_grads))
    torch.testing.assert_close(w.grad, expected)


def test_a_shared_parameter_given_gaps_after_the_first_call_is_refused_on_the_next():
    # .data replaced by a view with gaps after the buffer was laid out: the buffer is laid
    # out again on the next call, which refuses it with .grad and the state as they were.
    w, params, losses = _gappy_problem(True)
    w.data = w.data.contiguous()
    bal = B.NashMTL(params)
    bal.backward(losses())
    w.data = torch.randn(4, 6)[:, ::2]
    grads = [p.grad.clone() for p in params]
    before = copy.deepcopy(bal.state_dict())
    with pytest.raises(NotImplementedError, match=r"params\[0\].*strided view with gaps"):
        bal.backward(losses())
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    assert _same_state(bal.state_dict(), before) and bal.steps == 1


@pytest.mark.parametrize("name", _GRADIENT_BALANCERS)
def test_a_task_specific_parameter_with_gaps_gets_its_gradient(name):
    # Only the shared parameters go through the per-task buffer: a head that is a view with
    # gaps gets its (weighted) gradient as from autograd.
    torch.manual_seed(0)
    theta = torch.nn.Parameter(torch.randn(3))
    head = torch.nn.Parameter(torch.randn(3, 4)[:, ::2])  # strides (4, 2)
    other = torch.nn.Parameter(torch.randn(3, 2))

    def losses():
        return [((theta[:, None] * head).sum() - 1) ** 2,
                ((theta[:, None] * other).sum() + 1) ** 2]
    bal = getattr(B, name)([theta, head, other], weight_task_specific=False)
    expected = torch.autograd.grad(losses()[0], head)[0]
    bal.backward(losses())
    assert bal.shared == [theta]
    torch.testing.assert_close(head.grad, expected)


# -- under a GradScaler ---------------------------------------------------------------------------

def _scaled_model(seed):
    torch.manual_seed(seed)
    trunk = torch.nn.Linear(6, 8)
    heads = [torch.nn.Linear(8, 1) for _ in range(2)]
    params = [*trunk.parameters(), *(q for h in heads for q in h.parameters())]
    x = torch.randn(32, 6)

    def losses(scale=(30.0, 30.0)):
        z = torch.tanh(trunk(x))
        return [s * h(z).square().mean() for s, h in zip(scale, heads)]
    return trunk, params, losses


@pytest.mark.parametrize("name", ["NashMTL", "FAMO"])
def test_clipping_under_a_grad_scaler_clips_the_unscaled_gradient(name):
    # With backward(..., scaler=scaler), max_norm applies to the gradient as it is once
    # unscaled: after scaler.unscale_ it equals the run without a scaler (max_norm = 1 bites).
    grads = []
    for use_scaler in (False, True):
        trunk, params, losses = _scaled_model(0)
        bal = B.NashMTL(params) if name == "NashMTL" else B.FAMO(params, n_tasks=2)
        opt = torch.optim.SGD(params, lr=0.1)
        if use_scaler:
            scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
            bal.backward([scaler.scale(loss) for loss in losses()], scaler=scaler)
            scaler.unscale_(opt)
        else:
            bal.backward(losses())
        grads.append(torch.cat([p.grad.reshape(-1) for p in trunk.parameters()]))
    assert abs(float(grads[0].norm()) - 1.0) < 1e-5  # clipped
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["NashMTL", "FAMO"])
@pytest.mark.parametrize("init_scale", [2.0 ** 15, 2.0 ** 16])
def test_a_clip_that_does_not_bite_leaves_float16_scaled_gradients_as_they_are(name, init_scale):
    # The clip unscaled float16 .grad in place and scaled it back: small gradients lost bits
    # as float16 subnormals (trunk .grad up to 29% off), and a scale of 2**16, GradScaler's
    # default, is inf in float16, so every finite gradient became inf and the scaler skipped
    # the step. A max_norm that does not bite must give max_norm = 0's gradients, bit for bit.
    torch.manual_seed(0)
    x = torch.randn(64, 8, dtype=torch.float16)
    y = torch.randn(64, dtype=torch.float16)
    grads = {}
    for max_norm in (1e9, 0.0):
        torch.manual_seed(8)
        trunk = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU()).half()
        heads = [torch.nn.Linear(16, 1).half() for _ in range(2)]
        params = [*trunk.parameters(), *(q for h in heads for q in h.parameters())]
        bal = (B.NashMTL(params, max_norm=max_norm) if name == "NashMTL"
               else B.FAMO(params, n_tasks=2, max_norm=max_norm))
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        z = trunk(x)
        losses = [c * ((h(z).squeeze(-1).float() - y.float()) ** 2).mean()
                  for c, h in zip((1e-4, 3e-4), heads)]
        bal.backward([scaler.scale(loss) for loss in losses], scaler=scaler)
        grads[max_norm] = [p.grad.clone() for p in params]
    for a, b in zip(grads[1e9], grads[0.0]):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["NashMTL", "MGDAUB", "CAGrad", "FAMO"])
def test_an_overflow_under_a_grad_scaler_is_skipped_and_backs_off(name):
    # An overflow of the scaled losses: no error with scaler=, the scaler skips the step
    # (parameters unchanged) and halves its scale; the balancer's weights stay as they were.
    trunk, params, losses = _scaled_model(1)
    bal = getattr(B, name)(params, **({"n_tasks": 2} if name == "FAMO" else {}))
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for overflow in (False, True, False):
        opt.zero_grad()
        ls = losses((30.0, float("inf") if overflow else 30.0))
        before = [p.detach().clone() for p in params]
        weights = bal.weights
        scale = scaler.get_scale()
        bal.backward([scaler.scale(loss) for loss in ls], scaler=scaler)
        scaler.step(opt)
        scaler.update()
        moved = any(not torch.equal(p.detach(), b) for p, b in zip(params, before))
        assert moved != overflow
        assert (scaler.get_scale() < scale) == overflow
        if overflow:
            assert not bal.stats["updated"] and bal.weights is weights
    with pytest.raises(FloatingPointError):  # FAMO's too (it raised ValueError)
        getattr(B, name)(params, **({"n_tasks": 2} if name == "FAMO" else {})).backward(
            losses((30.0, float("inf"))))


@pytest.mark.parametrize("name", sorted(B.BALANCERS))
def test_a_gradscaler_whose_scale_grows_every_step_trains_as_without_one(name):
    # The scale doubles after every step: a balancer that kept anything of the scaled
    # gradients across steps (MultiBalance's Gram average did) trains differently.
    def run(enabled):
        m = _Heads()
        params = list(m.parameters())
        bal = _make(name, params)
        opt = torch.optim.SGD(params, lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=1,
                                      enabled=enabled)
        for _ in range(4):
            opt.zero_grad()
            z = torch.tanh(m.trunk(m.x))
            losses = [scaler.scale(((h(z).squeeze(1) - m.y[:, i]) ** 2).mean())
                      for i, h in enumerate(m.heads)]
            args = (losses, z) if isinstance(bal, B.MultiBalance) else (losses,)
            bal.backward(*args, scaler=scaler if enabled else None)
            scaler.step(opt)
            scaler.update()
        assert scaler.get_scale() == (256.0 if enabled else 1.0)
        return params, bal.weights

    # Powers of two scale and unscale exactly: the same bits.
    (plain, w_plain), (scaled, w_scaled) = run(False), run(True)
    assert torch.equal(w_scaled, w_plain)
    for p, q in zip(scaled, plain):
        assert torch.equal(p, q)


class _Heads(torch.nn.Module):
    """A trunk and two heads, float64, with the representation the heads read."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.trunk = torch.nn.Linear(4, 6).double()
        self.heads = torch.nn.ModuleList([torch.nn.Linear(6, 1).double() for _ in range(2)])
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        self.x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        self.y = torch.randn(8, 2, generator=g, dtype=torch.float64)

    def run(self, bal):
        z = torch.tanh(self.trunk(self.x))
        if isinstance(bal, B.MultiBalance) and not z.requires_grad:
            z.requires_grad_()  # the trunk frozen: what MultiBalance's error message asks for
        losses = [((h(z).squeeze(1) - self.y[:, i]) ** 2).mean()
                  for i, h in enumerate(self.heads)]
        if isinstance(bal, B.MultiBalance):
            bal.backward(losses, z)
        else:
            bal.backward(losses)


def _make(name, params):
    cls = B.BALANCERS[name]
    return cls(params, 2) if name in ("uncertainty", "famo") else cls(params)


@pytest.mark.parametrize("name", sorted(B.BALANCERS))
def test_a_first_call_that_raises_decides_nothing(name):
    # SPEC section 7: it fixed K, the shared parameters and the step count (LS), so that the
    # next call, with another number of tasks, raised; now it is made again from scratch and
    # gives what a balancer that never saw the failed call gives.
    model, twin = _Heads(), _Heads()
    bal, ref = _make(name, list(model.parameters())), _make(name, list(twin.parameters()))
    z = torch.tanh(model.trunk(model.x))
    losses = [((h(z).squeeze(1) - model.y[:, i]) ** 2).mean()
              for i, h in enumerate(model.heads)]
    if name not in ("uncertainty", "famo"):  # built for K = 2
        losses.append(losses[0] * losses[1])
    sum(losses).backward()  # the graph is freed: the balancer's backward raises
    for p in model.parameters():
        p.grad = None
    with pytest.raises(RuntimeError):
        bal.backward(losses, z) if name == "multibalance" else bal.backward(losses)
    assert bal.k == ref.k and bal.steps == 0 and bal.weights is None and bal.stats == {}
    assert getattr(bal, "shared", None) is None
    model.run(bal)
    twin.run(ref)
    torch.testing.assert_close(bal.weights, ref.weights, rtol=0, atol=0)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(B.BALANCERS))
def test_gradients_a_tensor_hook_kept_are_never_written_to(name):
    # As with loss.backward(): a hook that keeps the gradient it was given (gradient logging)
    # finds it unchanged after the call and after a second one that accumulates. The
    # balancers took a task-specific parameter's gradient as its .grad and scaled it or
    # accumulated into it in place, and MultiBalance scaled ∂L_i/∂z in place.
    model = _Heads()
    bal = _make(name, list(model.parameters()))
    kept = []

    def keep(g):
        kept.append((g, g.clone()))

    model.heads[0].weight.register_hook(keep)
    model.trunk.weight.register_hook(keep)
    run = model.run
    if name == "multibalance":
        def run(bal):
            z = torch.tanh(model.trunk(model.x))
            z.register_hook(keep)
            bal.backward([((h(z).squeeze(1) - model.y[:, i]) ** 2).mean() * 10.0 ** i
                          for i, h in enumerate(model.heads)], z)
    run(bal)
    run(bal)
    assert kept
    for g, seen in kept:
        assert torch.equal(g, seen)


@pytest.mark.parametrize("name", sorted(B.BALANCERS))
def test_a_balancer_of_tensors_no_loss_reaches_says_so(name):
    # Built on another copy of the model (or one restored with torch.load, which copies the
    # tensors it holds), a balancer left .grad empty on every call without a word.
    model, copied = _Heads(), _Heads()
    bal = _make(name, list(copied.parameters()))
    with pytest.raises(ValueError, match="no task loss reaches any tensor in params"):
        model.run(bal)
    assert all(p.grad is None for p in [*model.parameters(), *copied.parameters()])
    assert bal.steps == 0 and bal.weights is None


@pytest.mark.parametrize("name", ["nashmtl", "pcgrad"])
def test_a_balancer_that_ran_and_is_then_given_losses_of_another_model_says_so(name):
    model = _Heads()
    bal = _make(name, list(model.parameters()))
    model.run(bal)
    steps, weights = bal.steps, bal.weights
    with pytest.raises(ValueError, match="no task loss reaches any tensor in params"):
        _Heads().run(bal)
    assert bal.steps == steps and torch.equal(bal.weights, weights)


def _same_state(a, b) -> bool:
    """Whether two state dicts (nested dicts, lists and tensors) hold the same values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            _same_state(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(
            _same_state(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("copy_by", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("name", ["ls", "uncertainty", "famo"])
def test_a_balancer_copied_after_its_first_call_and_given_the_models_losses_says_so(name,
                                                                                 copy_by):
    # A copy holds copies of the parameters; the check that the losses reach them ran on the
    # first call only, and its flag was copied: the copy left the model without .grad (while
    # Uncertainty's log-variances and FAMO's logits moved). Every call now sees it, and
    # changes nothing: .grad (log_vars' too) and the balancer's state stay as they were.
    model = _Heads()
    bal = _make(name, list(model.parameters()))
    model.run(bal)
    if copy_by == "deepcopy":
        other = copy.deepcopy(bal)
    else:
        buffer = io.BytesIO()
        torch.save(bal, buffer)
        buffer.seek(0)
        other = torch.load(buffer, weights_only=False)
    grads = [p.grad.clone() for p in model.parameters()]
    if name == "uncertainty":
        other.log_vars.grad = torch.ones_like(other.log_vars)
    state = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="no task loss reaches any tensor in params"):
        model.run(other)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)
    assert _same_state(other.state_dict(), state)
    if name == "uncertainty":
        assert torch.equal(other.log_vars.grad, torch.ones_like(other.log_vars))
    model.run(bal)  # (the original goes on)


@pytest.mark.parametrize("name", sorted(B.BALANCERS))
def test_a_tensor_computed_from_parameters_is_refused_as_a_parameter(name):
    # As torch.optim refuses it: it is not a leaf, so it never gets a .grad.
    w = torch.randn(3, 3, requires_grad=True)
    with pytest.raises(ValueError, match="not a leaf"):
        _make(name, [w * 2.0, torch.zeros(3, requires_grad=True)])


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("name,every", [("pcgrad", 1), ("imtl-g", 1), ("imtl-g", 2),
                                        ("nashmtl", 1), ("nashmtl", 2), ("mgda-ub", 1),
                                        ("mgda-ub", 2)])
def test_a_task_that_reaches_a_parameter_of_another_only_later_adds_its_gradient(name, stacked,
                                                                                 every):
    # Data-dependent routing: the first call found the expert reached by task 0 alone; when
    # task 1 reaches it too, its gradient was dropped. Now it is added (not balanced, with a
    # warning that says how to balance it), as the PUB optimizers and compiled models do;
    # where task-specific parameters are weighted, each task's gradient by its own weight, on
    # a step that solves for the weights as on one that reuses them (task 1's gradient had
    # task 0's weight on the first kind).
    torch.manual_seed(0)
    trunk, expert = torch.nn.Linear(4, 4).double(), torch.nn.Linear(4, 4).double()
    heads = [torch.nn.Linear(4, 1).double() for _ in range(2)]
    params = [*trunk.parameters(), *expert.parameters(), *heads[0].parameters(),
              *heads[1].parameters()]
    x = torch.randn(8, 4, dtype=torch.float64)

    def losses(routed):
        z = torch.tanh(trunk(x))
        return [heads[0](expert(z)).pow(2).mean(),
                heads[1](expert(z) if routed else z).pow(2).mean()]

    options = {} if name == "pcgrad" else {"update_weights_every": every}  # (no weights)
    bal = B.BALANCERS[name](params, max_norm=0.0, **options) if name == "nashmtl" else \
        B.BALANCERS[name](params, **options)
    give = (lambda ls: torch.stack(ls)) if stacked else (lambda ls: ls)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bal.backward(give(losses(False)))
    for p in params:
        p.grad = None
    # (A stacked tensor gives every task a zero gradient of every head: no warning there, nor
    # on a step that reuses the weights, which takes no task's gradient alone.)
    with pytest.warns(UserWarning, match=r"task\(s\) \[0\] alone .* task 1 gives it") \
            if not stacked and every == 1 else warnings.catch_warnings():
        bal.backward(give(losses(True)))
    g = [torch.autograd.grad(loss, expert.weight)[0] for loss in losses(True)]
    w = bal.weights.tolist() if bal.weight_task_specific else [1.0, 1.0]
    if bal.weight_task_specific:
        assert bal.stats["updated"] == (every == 1)
        assert abs(w[0] - w[1]) > 0.05  # (the weights differ enough to tell them apart)
    torch.testing.assert_close(expert.weight.grad, w[0] * g[0] + w[1] * g[1], rtol=1e-12,
                               atol=1e-14)
    for p in params:
        p.grad = None
    with warnings.catch_warnings() if stacked or every == 1 else \
            pytest.warns(UserWarning, match="task 1 gives it"):
        if stacked or every == 1:
            warnings.simplefilter("error")  # once per parameter
        bal.backward(give(losses(True)))
    w = bal.weights.tolist() if bal.weight_task_specific else [1.0, 1.0]
    torch.testing.assert_close(expert.weight.grad, w[0] * g[0] + w[1] * g[1], rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("specific", [True, False])
@pytest.mark.parametrize("name,every", [("nashmtl", 1), ("nashmtl", 2), ("mgda-ub", 2),
                                        ("imtl-g", 2), ("pcgrad", 1), ("cagrad", 1)])
def test_a_parameter_several_tasks_use_but_shared_leaves_out_gets_their_weighted_sum(
        name, every, specific):
    # A PLE-like expert of tasks 0 and 1, with shared= naming the trunk only: where the
    # task-specific parameters are weighted, the published code's backward of Σ w_i L_i gives
    # it w_0·g_0 + w_1·g_1, on a step that solves for the weights as on one that reuses them.
    # It had the plain sum g_0 + g_1 while the heads had w_i·g_i.
    torch.manual_seed(0)
    trunk, expert = torch.nn.Linear(5, 6).double(), torch.nn.Linear(6, 6).double()
    heads = [torch.nn.Linear(6, 1).double() for _ in range(3)]
    params = [*trunk.parameters(), *expert.parameters(),
              *(p for h in heads for p in h.parameters())]
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)

    def losses():
        z = torch.tanh(trunk(x))
        e = torch.tanh(expert(z))
        return [((heads[i](e if i < 2 else z)[:, 0] - y[:, i]) ** 2).mean() for i in range(3)]

    options = {"update_weights_every": every} if every > 1 else {}
    bal = B.BALANCERS[name](params, shared=list(trunk.parameters()),
                            weight_task_specific=specific, **options)
    for call in range(2):
        for p in params:
            p.grad = None
        bal.backward(losses())
        assert bal.stats["updated"] == (call == 0 or every == 1)
        w = bal.weights.tolist() if specific else [1.0] * 3
        if specific and name != "pcgrad":
            assert max(w[:2]) - min(w[:2]) > 0.05  # (weights that differ enough to tell)
        gs = [torch.autograd.grad(loss, [expert.weight, heads[0].weight], retain_graph=True,
                                  allow_unused=True) for loss in losses()]
        torch.testing.assert_close(expert.weight.grad, w[0] * gs[0][0] + w[1] * gs[1][0],
                                   rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(heads[0].weight.grad, w[0] * gs[0][1], rtol=1e-12,
                                   atol=1e-14)


def _twins_after_one_call(name, frozen, frozen_first):
    """Two models and balancers (of ``name``), the parameters named in ``frozen`` frozen
    before the balancer is built where ``frozen_first`` says so, after one call each."""
    models, bals = [], []
    for first in frozen_first:
        m = _Heads()
        for n, p in m.named_parameters():
            p.requires_grad_(not (first and n in frozen))
        bals.append(_make(name, m.parameters()))
        models.append(m)
    for m, bal in zip(models, bals):
        m.run(bal)
    return models, bals


@pytest.mark.parametrize("name", sorted(B.BALANCERS))
def test_parameters_frozen_after_the_balancer_was_built_get_no_gradient(name):
    # As loss.backward() leaves them: no .grad (so no optimizer moves them), while the others
    # get what a balancer built with them frozen from the start gives. Before, LS, Uncertainty
    # and FAMO raised torch's error, and the others gave a frozen shared parameter zeros.
    frozen = ("trunk.bias", "heads.0.bias")
    # First call: detection (the frozen ones are shared / specific in models[0]).
    models, bals = _twins_after_one_call(name, frozen, (False, True))
    named = dict(models[0].named_parameters())
    for n in frozen:
        named[n].requires_grad_(False)
    for m, bal in zip(models, bals):
        m.zero_grad(set_to_none=True)
        m.run(bal)
    late, early = (dict(m.named_parameters()) for m in models)
    for n, p in late.items():
        if n in frozen:
            assert p.grad is None, n
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            torch.testing.assert_close(p.grad, early[n].grad, rtol=1e-6, atol=1e-9, msg=n)


@pytest.mark.parametrize("name", sorted(B.BALANCERS))
@pytest.mark.parametrize("frozen", [("trunk.bias", "heads.0.bias"), ("trunk.weight", "trunk.bias")],
                         ids=["some", "trunk"])
def test_parameters_unfrozen_after_the_first_call_are_trained_from_the_next(name, frozen):
    # Gradual unfreezing: a parameter frozen when the balancer was built and at its first call
    # (so in no autograd graph then) gets, once unfrozen, what a balancer that never saw it
    # frozen gives; a shared one joins the balanced parameters. Before, it never got .grad.
    models, bals = _twins_after_one_call(name, frozen, (True, False))
    late = dict(models[0].named_parameters())
    for n in frozen:
        assert late[n].grad is None, n
        late[n].requires_grad_(True)
    for m, bal in zip(models, bals):
        m.zero_grad(set_to_none=True)
        m.run(bal)
    early = dict(models[1].named_parameters())
    for n, p in late.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        torch.testing.assert_close(p.grad, early[n].grad, rtol=1e-6, atol=1e-9, msg=n)
    if hasattr(bals[0], "shared") and bals[0].shared is not None and name != "famo":
        assert [p.shape for p in bals[0].shared] == [p.shape for p in bals[1].shared]


@pytest.mark.parametrize("name", sorted(B.BALANCERS))
def test_a_parameter_the_first_call_does_not_reach_is_trained_once_reached(name):
    # An expert no example was routed to in the first batch: it was in no graph then, and
    # every balancer but LS and its loss-weighting kin left it without .grad for good.
    torch.manual_seed(0)
    m = _Heads()
    spare = torch.nn.Linear(4, 6).double()  # a second expert, unused in the first batch
    params = [*m.parameters(), *spare.parameters()]

    def call(bal, with_spare):
        z = torch.tanh(m.trunk(m.x) + (spare(m.x) if with_spare else 0.0))
        losses = [((h(z).squeeze(1) - m.y[:, i]) ** 2).mean() for i, h in enumerate(m.heads)]
        for p in params:
            p.grad = None
        bal.backward(*((losses, z) if isinstance(bal, B.MultiBalance) else (losses,)))

    bal = _make(name, params)
    call(bal, False)
    assert all(p.grad is None for p in spare.parameters())
    call(bal, True)
    got = [p.grad.clone() for p in spare.parameters()]
    fresh = _make(name, params)
    call(fresh, True)
    for g, p in zip(got, spare.parameters()):
        assert torch.isfinite(g).all() and g.abs().sum() > 0
        if name not in ("famo", "uncertainty", "multibalance"):  # (their state moved)
            torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-9)


def test_multibalance_on_a_frozen_trunk_asks_for_a_representation_that_requires_grad():
    m = _Heads()
    for p in m.trunk.parameters():
        p.requires_grad_(False)
    z = torch.tanh(m.trunk(m.x))
    losses = [((h(z).squeeze(1) - m.y[:, i]) ** 2).mean() for i, h in enumerate(m.heads)]
    with pytest.raises(ValueError, match=r"representation\[0\].*requires_grad_\(\)"):
        B.MultiBalance(m.parameters()).backward(losses, z)


def test_a_balancer_whose_shared_parameters_are_all_frozen_sums_the_tasks():
    # Nothing left to balance: the heads get their plain gradients (w = 1), not w = 0.
    m = _Heads()
    bal = B.NashMTL(m.parameters())
    m.run(bal)
    for p in m.trunk.parameters():
        p.requires_grad_(False)
    m.zero_grad(set_to_none=True)
    m.run(bal)
    assert bal.weights.tolist() == [1.0, 1.0]
    ref = _Heads()
    for p in ref.trunk.parameters():
        p.requires_grad_(False)
    B.LS(list(ref.heads.parameters())).backward(
        [((h(torch.tanh(ref.trunk(ref.x))).squeeze(1) - ref.y[:, i]) ** 2).mean()
         for i, h in enumerate(ref.heads)])
    for p, q in zip(m.heads.parameters(), ref.heads.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0)


def _trunk_two_heads(name: str):
    """A tanh trunk and two linear heads, a batch, and the balancer ``name`` on them."""
    torch.manual_seed(1)
    trunk = torch.nn.Linear(6, 8)
    heads = [torch.nn.Linear(8, 1) for _ in range(2)]
    params = [*trunk.parameters(), *(q for h in heads for q in h.parameters())]
    x = torch.randn(32, 6)
    bal = B.BALANCERS[name](params, 2) if name in ("uncertainty", "famo") else \
        B.BALANCERS[name](params)
    return trunk, heads, params, x, bal


@pytest.mark.parametrize("name", sorted(B.BALANCERS))
def test_every_balancer_takes_the_grad_scaler_and_skips_an_overflow(name):
    # bal.backward(scaled losses, scaler=scaler) as the README shows, for every balancer: an
    # overflow is skipped by scaler.step and backs the scale off, the weights stay as they were,
    # and the steps before and after move the parameters (LS, Uncertainty and MultiBalance did
    # not take scaler=; MultiBalance raised on the overflow).
    trunk, heads, params, x, bal = _trunk_two_heads(name)
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for overflow in (False, True, False):
        opt.zero_grad()
        z = torch.tanh(trunk(x))
        ls = [s * h(z).square().mean()
              for s, h in zip((30.0, float("inf") if overflow else 30.0), heads)]
        scaled = [scaler.scale(loss) for loss in ls]
        before = [p.detach().clone() for p in params]
        weights, steps, scale = bal.weights, bal.steps, scaler.get_scale()
        if name == "multibalance":
            bal.backward(scaled, z, scaler=scaler)
        else:
            bal.backward(scaled, scaler=scaler)
        scaler.step(opt)
        scaler.update()
        moved = any(not torch.equal(p.detach(), b) for p, b in zip(params, before))
        assert moved != overflow
        assert (scaler.get_scale() < scale) == overflow
        if overflow and name not in ("ls", "uncertainty", "famo"):  # (no state: ls, uncertainty)
            assert bal.weights is weights and bal.steps == steps
    if name == "famo":  # (the overflowed step counts until the next call sees the skip)
        assert bal.steps == 2


@pytest.mark.parametrize("name", sorted(B.BALANCERS))
def test_a_disabled_grad_scaler_is_no_scaler_and_a_wrong_one_is_named(name):
    # GradScaler(enabled=use_amp) with use_amp False skips no step: a NaN loss must raise as
    # without a scaler (it was taken for an overflow: .grad got the NaN sum and the disabled
    # scaler's step wrote it into the parameters). Anything else than a scaler is a TypeError
    # naming the argument (it was an AttributeError), and either leaves .grad as it was.
    trunk, heads, params, x, bal = _trunk_two_heads(name)
    for p in params:
        p.grad = torch.full_like(p, 0.5)

    def call(scale, scaler):
        z = torch.tanh(trunk(x))
        ls = [s * h(z).square().mean() for s, h in zip((1.0, scale), heads)]
        if name == "multibalance":
            bal.backward(ls, z, scaler=scaler)
        else:
            bal.backward(ls, scaler=scaler)

    with pytest.raises(TypeError, match="scaler must be the torch.amp.GradScaler"):
        call(1.0, "fp16")
    if name not in ("ls", "uncertainty"):  # (they add the NaN in, as loss.backward() does)
        with pytest.raises(FloatingPointError):
            call(float("nan"), torch.amp.GradScaler("cpu", enabled=False))
    for p in params:
        assert torch.equal(p.grad, torch.full_like(p, 0.5))
    call(2.0, torch.amp.GradScaler("cpu", enabled=False))  # and a finite step goes through
    assert all(bool(torch.isfinite(p.grad).all()) for p in params)


def test_uncertainty_under_a_grad_scaler_gives_the_unscaled_gradients():
    # The s_i terms are scaled with the losses: after scaler.unscale_, log_vars' gradient and
    # the parameters' are those of the run without a scaler (log_vars' was off by the scale).
    grads = []
    for use_scaler in (False, True):
        torch.manual_seed(0)
        lin = torch.nn.Linear(3, 2)
        x = torch.randn(16, 3)
        bal = B.Uncertainty(lin.parameters(), 2)
        with torch.no_grad():
            bal.log_vars.copy_(torch.tensor([0.3, -0.7]))
        opt = torch.optim.SGD([*lin.parameters(), bal.log_vars], lr=0.1)
        out = lin(x)
        losses = [out[:, 0].square().mean(), out[:, 1].abs().mean()]
        if use_scaler:
            scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
            bal.backward([scaler.scale(loss) for loss in losses], scaler=scaler)
            scaler.unscale_(opt)
        else:
            bal.backward(losses)
        grads.append([bal.log_vars.grad.clone()] + [p.grad.clone() for p in lin.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("name", ["mgda-ub", "imtl-g", "multibalance"])
def test_identical_tasks_share_the_weight_evenly(name, k):
    # K identical task gradients: every weight vector on the simplex gives the same combined
    # gradient, and the even one is taken, so every head is trained (MultiBalance: exactly LS,
    # as its documentation says). Before, K ≥ 3 (IMTL-G: any K) put all weight on task 0.
    g = torch.Generator().manual_seed(k)
    v = torch.randn(6, generator=g, dtype=torch.float64)
    results = []
    for bal_name in (name, "ls"):
        theta = torch.zeros(6, dtype=torch.float64, requires_grad=True)
        heads = [torch.ones(2, dtype=torch.float64, requires_grad=True) for _ in range(k)]
        z = theta * 1.0
        losses = [(v * z).sum() + (h ** 2).sum() for h in heads]
        bal = B.BALANCERS[bal_name]([theta, *heads])
        if bal_name == "multibalance":
            bal.backward(losses, z)
        else:
            bal.backward(losses)
        results.append((bal.weights, [h.grad for h in heads], theta.grad))
    weights, head_grads, shared = results[0]
    even = 1.0 if name == "multibalance" else 1.0 / k
    torch.testing.assert_close(weights, torch.full((k,), even, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    for h in head_grads:  # every head trained, all alike
        torch.testing.assert_close(h, head_grads[0], rtol=1e-12, atol=0)
        assert h.abs().sum() > 0
    if name == "multibalance":
        for a, b in zip(head_grads + [shared], results[1][1] + [results[1][2]]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_famo_call_that_raises_leaves_famo_as_it_was():
    # The implicit update of the logits (no update() since the last step) came before the
    # backward pass that failed, and a NaN loss counted a step.
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(8, 3)

    def losses():
        out = lin(x)
        return [out[:, 0].square().mean(), out[:, 1].square().mean() + 1.0]

    famo = B.FAMO(lin.parameters(), 2)
    famo.backward(losses())
    before = (famo.logits.detach().clone(), famo.steps, copy.deepcopy(famo._logit_opt.state_dict()))
    ls = losses()
    sum(ls).backward(retain_graph=False)  # frees the graph: FAMO's backward pass fails
    with pytest.raises(RuntimeError):
        famo.backward(ls)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        famo.backward([losses()[0], torch.tensor(float("nan"), requires_grad=True)])
    assert torch.equal(famo.logits.detach(), before[0]) and famo.steps == before[1]
    state = famo._logit_opt.state_dict()["state"]
    assert state.keys() == before[2]["state"].keys()  # (no logit step yet: none taken)
    famo.backward(losses())  # and the next call updates once, as without the failures
    assert famo.steps == 2 and famo._logit_opt.state_dict()["state"][0]["step"] == 1


def test_famo_update_after_a_step_the_grad_scaler_skipped_does_nothing():
    # The README loop calls update() after every step: after an overflow no step was taken,
    # and the update applied the last step's loss change a second time.
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(8, 3)
    famo = B.FAMO(lin.parameters(), 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    def losses(bad=False):
        out = lin(x)
        return [out[:, 0].square().mean() + 0.5,
                out[:, 1].square().mean() + (float("inf") if bad else 0.5)]

    for bad in (False, True):
        opt.zero_grad()
        famo.backward([scaler.scale(loss) for loss in losses(bad)], scaler=scaler)
        scaler.step(opt)
        scaler.update()
        logits = famo.logits.detach().clone()
        with torch.no_grad():
            famo.update(losses())
        if bad:
            assert torch.equal(famo.logits.detach(), logits)
            assert famo.stats["update"] == "skipped"
        else:
            assert not torch.equal(famo.logits.detach(), logits)


@pytest.mark.parametrize("bad", ["loss", "gradient"])
@pytest.mark.parametrize("name", ["nashmtl", "mgda-ub", "imtl-g"])
def test_a_non_finite_loss_or_gradient_on_a_step_that_reuses_the_weights_raises(name, bad):
    # As on the steps that compute the weights (there the Gram sees it): a FloatingPointError,
    # .grad and the step count as they were. Before, the NaN went into .grad. A NaN loss names
    # its task; √(θ₀ − θ₀) is a finite loss (0) with an infinite gradient, whose task the
    # weighted sum of the tasks that this step takes does not tell.
    t = Linear(rand_grads(2, 4, 8))
    bal = B.BALANCERS[name](t.params, update_weights_every=3)
    t.run(bal)
    grads = [p.grad.clone() for p in t.params]
    steps, weights = bal.steps, bal.weights
    losses = t.losses()
    if bad == "loss":
        losses[1] = losses[1] * float("nan")
    else:
        losses[1] = losses[1] + torch.sqrt(t.theta[0] - t.theta[0].detach())
        assert math.isfinite(float(losses[1].detach()))
    match = r"task\(s\) \[1\]" if bad == "loss" else "non-finite gradient of the shared"
    with pytest.raises(FloatingPointError, match=match):
        bal.backward(losses)
    assert bal.steps == steps and bal.weights is weights
    for p, g in zip(t.params, grads):
        assert torch.equal(p.grad, g)
    t.run(bal)  # the reuse step, taken again
    assert not bal.stats["updated"] and bal.steps == steps + 1


@pytest.mark.parametrize(("name", "kind"), [
    *((name, "weights") for name in ("nashmtl", "mgda-ub", "imtl-g", "pcgrad", "cagrad")),
    *((name, "reuse") for name in ("nashmtl", "mgda-ub", "imtl-g"))])
def test_an_infinite_loss_with_a_finite_gradient_raises_on_every_kind_of_step(name, kind):
    # A loss whose value is Inf while its gradient is finite (a cross-entropy whose target
    # class is masked with −inf): a step that computes the weights took it (MGDA-UB's
    # normalization="loss" divided by it) and the next step, reusing them, raised. Both raise
    # now, before any backward pass: .grad, the weights and the step count as they were.
    t = Linear(rand_grads(2, 4, 8))
    options = {"update_weights_every": 2} if kind == "reuse" else {}
    if name == "mgda-ub":
        options["normalization"] = "loss"
    bal = B.BALANCERS[name](t.params, **options)
    if kind == "reuse":
        t.run(bal)
    grads = [None if p.grad is None else p.grad.clone() for p in t.params]
    steps, weights = bal.steps, bal.weights
    losses = t.losses()
    losses[0] = losses[0] + float("inf")
    with pytest.raises(FloatingPointError, match=r"non-finite loss in task\(s\) \[0\]"):
        bal.backward(losses)
    assert bal.steps == steps and bal.weights is weights
    for p, g in zip(t.params, grads, strict=True):
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)
    t.run(bal)  # the step, taken again with finite losses
    assert bal.stats["updated"] == (kind == "weights") and bal.steps == steps + 1


@pytest.mark.parametrize("name", ["nashmtl", "mgda-ub", "imtl-g", "pcgrad", "cagrad"])
def test_an_infinite_loss_under_a_grad_scaler_is_an_overflow(name):
    # Under a GradScaler a non-finite loss is an overflow of the scaled losses, as a non-finite
    # Gram is: no error, .grad gets the plain sum of the task gradients, and the weights and
    # the step count stay as they were.
    t = Linear(rand_grads(2, 4, 8))
    bal = B.BALANCERS[name](t.params, **({"max_norm": 0.0} if name == "nashmtl" else {}))
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    losses = [scaler.scale(loss) for loss in t.losses()]
    losses[1] = losses[1] + float("inf")
    bal.backward(losses, scaler=scaler)
    assert bal.steps == 0 and bal.weights is None and not bal.stats["updated"]
    torch.testing.assert_close(t.theta.grad, 4.0 * t.g.sum(0), rtol=0, atol=TOL["exact"])


@pytest.mark.parametrize(("name", "every"), [(name, 1) for name in sorted(B.BALANCERS)]
                         + [("nashmtl", 2)])
def test_retain_graph_keeps_the_graph_for_another_backward_as_in_torch(name, every):
    # backward(..., retain_graph=True) as Tensor.backward and pub_native.Adam.backward take
    # it: the graph of the losses survives the call (on a step that reuses the weights too:
    # NashMTL with update_weights_every=2, whose second call is one), and the gradients are
    # those of a call without it; by default the graph is freed, and a pass through it raises
    # as torch's does.
    model, twin = _Heads(), _Heads()
    options = {"update_weights_every": every} if every > 1 else {}
    bal = B.BALANCERS[name](list(model.parameters()), 2, **options) \
        if name in ("uncertainty", "famo") else \
        B.BALANCERS[name](list(model.parameters()), **options)
    ref = B.BALANCERS[name](list(twin.parameters()), 2, **options) \
        if name in ("uncertainty", "famo") else \
        B.BALANCERS[name](list(twin.parameters()), **options)
    z = torch.tanh(model.trunk(model.x))
    losses = [((h(z).squeeze(1) - model.y[:, i]) ** 2).mean() for i, h in enumerate(model.heads)]
    params = list(model.parameters())
    for retain in (True, True, False):
        if name == "multibalance":
            bal.backward(losses, z, retain_graph=retain)
        else:
            bal.backward(losses, retain_graph=retain)
        twin.run(ref)
        for p, q in zip(params, twin.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
        if retain:
            torch.autograd.grad(sum(losses), params, retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(sum(losses), params)


def test_multibalance_representation_outside_the_graph_raises_on_every_call():
    # A detached copy as the representation: the trunk would get no gradient. It raised on the
    # first call only, and that call kept the split it made from the wrong tensor (the trunk
    # counted as head parameters).
    torch.manual_seed(0)
    trunk = torch.nn.Linear(5, 4)
    heads = [torch.nn.Linear(4, 1) for _ in range(2)]
    params = [*trunk.parameters(), *(q for h in heads for q in h.parameters())]
    x = torch.randn(8, 5)

    def call(bal, detached):
        z = torch.tanh(trunk(x))
        losses = [h(z).square().mean() for h in heads]
        rep = z.detach().requires_grad_() if detached else z
        for p in params:
            p.grad = None
        bal.backward(losses, rep)

    first_wrong = B.MultiBalance(params)
    with pytest.raises(ValueError, match="no task loss depends on representation"):
        call(first_wrong, True)
    assert first_wrong.k is None  # the failed call decided nothing (it kept K = 2 before)
    call(first_wrong, False)
    later_wrong = B.MultiBalance(params)
    call(later_wrong, False)
    with pytest.raises(ValueError, match="no task loss depends on representation"):
        call(later_wrong, True)
    assert first_wrong.trunk == later_wrong.trunk == list(trunk.parameters())
    call(later_wrong, False)
    call(first_wrong, False)
    assert all(p.grad is not None for p in trunk.parameters())


# -- torch.compile -------------------------------------------------------------------------------

class _Compilable(torch.nn.Module):
    """Embedding + trunk shared, one head per task; ``forward`` returns (z, outputs). With
    ``spare``, a second trunk layer adds to z (an expert that only some batches use)."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(10, 6)
        self.trunk = torch.nn.Linear(6, 8)
        self.spare = torch.nn.Linear(6, 8)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(2))

    def forward(self, idx, spare: bool = False):
        x = self.embedding(idx).mean(1)
        h = self.trunk(x)
        if spare:
            h = h + self.spare(x)
        z = torch.relu(h)
        return z, [head(z).squeeze(-1) for head in self.heads]


def _compilable_losses(net, seed, spare=False):
    g = torch.Generator().manual_seed(seed)
    idx, y = torch.randint(0, 10, (16, 3), generator=g), torch.randn(16, generator=g)
    z, outs = net(idx, spare)
    return [((o - y) ** 2).mean() * c for o, c in zip(outs, (1.0, 3.0))], z


@pytest.mark.parametrize("name", sorted(set(B.BALANCERS) - {"multibalance"}))
def test_a_compiled_model_is_split_and_trained_as_in_eager_mode(name):
    # A compiled region is one autograd node that reaches all its parameters from every task:
    # the balancers found every parameter shared (heads too) and balanced the wrong gradients.
    torch.manual_seed(0)
    model = _Compilable()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    bals = []
    for m, net in ((twin, twin), (model, compiled)):
        bal = _make(name, m.parameters())
        extra = list(bal.parameters()) if name == "uncertainty" else []
        opt = torch.optim.Adam([*m.parameters(), *extra], lr=1e-2)
        for step in range(3):
            losses, _ = _compilable_losses(net, step)
            opt.zero_grad()
            detects = net is compiled and step == 0 and name not in ("ls", "uncertainty")
            with pytest.warns(UserWarning, match="compiled") if detects else _quiet() as got:
                bal.backward(losses)
            if detects:  # (the user's line, not pub_native's)
                assert {w.filename for w in got if "compiled" in str(w.message)} == {__file__}
            opt.step()
            if name == "famo":
                bal.update(_compilable_losses(net, step)[0])
        bals.append(bal)
    if bals[0].shared is not None:
        names = {id(p): n for n, p in twin.named_parameters()}
        assert {names[id(p)] for p in bals[0].shared} == {"embedding.weight", "trunk.weight",
                                                          "trunk.bias"}
        names = {id(p): n for n, p in model.named_parameters()}
        assert {names[id(p)] for p in bals[1].shared} == {"embedding.weight", "trunk.weight",
                                                          "trunk.bias"}
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n


def test_a_compiled_parameter_no_task_reaches_at_first_is_decided_when_reached_as_in_eager():
    # Every task's gradient of the spare expert is zero on the first batch (it is not used):
    # it was decided then, for good (the plain sum; a first batch of zero gradients everywhere
    # decided that nothing is shared). Now it is looked for again, as in eager mode, where no
    # graph reaches it, and found shared when two tasks use it.
    torch.manual_seed(0)
    model = _Compilable()
    twin = copy.deepcopy(model)
    grads = []
    for m, net in ((twin, twin), (model, torch.compile(model, backend="aot_eager"))):
        bal = B.NashMTL(m.parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the compiled model's
            bal.backward(_compilable_losses(net, 0)[0])
        assert all(p.grad is None for p in m.spare.parameters())
        assert not {id(p) for p in m.spare.parameters()} & {id(p) for p in bal.shared}
        m.zero_grad(set_to_none=True)
        with _quiet():
            bal.backward(_compilable_losses(net, 1, spare=True)[0])
        assert {id(p) for p in m.spare.parameters()} <= {id(p) for p in bal.shared}
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)  # float32 sums, any order


def test_a_compiled_model_whose_first_batch_gives_no_gradient_trains_from_the_next():
    torch.manual_seed(0)
    model = _Compilable()
    compiled = torch.compile(model, backend="aot_eager")
    bal = B.NashMTL(model.parameters())
    losses, _ = _compilable_losses(compiled, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bal.backward([loss * 0.0 for loss in losses])  # a batch without labels
    assert not bal.shared
    bal.backward(_compilable_losses(compiled, 1)[0])
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in bal.shared} == {"embedding.weight", "trunk.weight",
                                                  "trunk.bias"}


class _quiet:
    """No warning may be raised inside."""

    def __enter__(self):
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")
        return self

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


@pytest.mark.parametrize("name", ["NashMTL", "MGDAUB", "IMTLG"])
def test_shared_parameters_of_several_dtypes_get_the_weighted_gradient_in_their_own(name):
    # A bfloat16 model with float32 (and float64) parameters in its trunk: the buffer takes the
    # type they promote to; each .grad keeps its parameter's dtype. It was a TypeError.
    rng = np.random.default_rng(4)
    dtypes = [torch.bfloat16, torch.float32, torch.float64]
    thetas = [torch.zeros(n, dtype=d, requires_grad=True) for n, d in zip((5, 7, 3), dtypes)]
    g = [torch.as_tensor(rng.normal(size=(2, t.numel()))) for t in thetas]
    heads = [torch.zeros((), dtype=torch.float64, requires_grad=True) for _ in range(2)]

    def losses():
        return [sum(gj[i] @ t.double() for gj, t in zip(g, thetas)) + (i + 1.0) * heads[i]
                for i in range(2)]

    bal = getattr(B, name)(thetas + heads, **({"max_norm": 0.0} if name == "NashMTL" else {}))
    bal.backward(losses())
    assert [id(p) for p in bal.shared] == [id(t) for t in thetas]
    # Each task's gradient as autograd hands it to its parameter (rounded to its dtype).
    task = [torch.cat([gj[i].to(t.dtype).double() for gj, t in zip(g, thetas)])
            for i in range(2)]
    w = bal.weights
    for t, gj in zip(thetas, g):
        assert t.grad.dtype == t.dtype
        want = (w[0] * gj[0].to(t.dtype).double() + w[1] * gj[1].to(t.dtype).double())
        tol = {torch.bfloat16: 8e-3, torch.float32: 1e-6, torch.float64: 1e-12}[t.dtype]
        torch.testing.assert_close(t.grad.double(), want, rtol=tol, atol=0)
    if name == "NashMTL":
        G = torch.stack(task) @ torch.stack(task).T
        Gn = (G / torch.linalg.norm(G)).numpy()
        Gn += 1e-8 * np.diag(np.diag(Gn))
        a = w.numpy()
        assert np.linalg.norm(Gn @ a - 1 / a) / np.linalg.norm(1 / a) < TOL["nash_residual"]


@pytest.mark.parametrize("name", ["NashMTL", "PCGrad"])
def test_a_compiled_task_whose_first_gradient_is_zero_still_adds_its_gradient(name):
    # Task 1 has no labels in the first batch (a masked loss, still in the graph): its gradient
    # is exactly zero then, so the trunk was taken as task 0's alone, and task 1's gradient of
    # it was dropped from every later batch.
    torch.manual_seed(0)
    model = _Compilable()
    compiled = torch.compile(model, backend="aot_eager")
    bal = getattr(B, name)(model.parameters())

    def losses(seed, labelled):
        g = torch.Generator().manual_seed(seed)
        idx, y = torch.randint(0, 10, (16, 3), generator=g), torch.randn(16, generator=g)
        _, outs = compiled(idx)
        return [((outs[0] - y) ** 2).mean(), ((outs[1] - y) ** 2 * labelled).mean()]

    with pytest.warns(UserWarning, match="compiled"):
        bal.backward(losses(0, 0.0))
    assert not bal.shared  # the first batch's gradients: nothing shared
    model.zero_grad(set_to_none=True)
    batch = losses(1, 1.0)
    want = [sum(torch.autograd.grad(loss, p, retain_graph=True)[0] for loss in batch)
            for p in model.trunk.parameters()]
    with _quiet():
        bal.backward(batch)
    w = bal.weights.tolist()
    scale = w[0] if bal.weight_task_specific else 1.0  # a single task's parameter: its weight
    for p, g in zip(model.trunk.parameters(), want):
        torch.testing.assert_close(p.grad, scale * g, rtol=1e-5, atol=1e-7)


# -- checkpoints ---------------------------------------------------------------------------------

def _resumable(name, seed, every):
    torch.manual_seed(seed)
    model = MMoE([3, 3], 3, 2, embed_dim=4, expert_dim=8, tower_dims=(4,))
    kwargs = {"n_tasks": 2} if name in ("famo", "uncertainty") else {}
    if every > 1:
        kwargs["update_weights_every"] = every
    bal = B.BALANCERS[name](model.parameters(), **kwargs)
    extra = bal.parameters() if name == "uncertainty" else []
    opt = torch.optim.Adam([*model.parameters(), *extra], lr=1e-2)
    return model, bal, opt


def _train(model, bal, opt, steps):
    for step in steps:
        losses, z = model.task_losses(_batch(128, seed=step), with_representation=True)
        opt.zero_grad()
        bal.backward(losses, z) if isinstance(bal, B.MultiBalance) else bal.backward(losses)
        opt.step()


@pytest.mark.parametrize(("name", "every"), [(name, 1) for name in sorted(B.BALANCERS)]
                         + [("nashmtl", 2), ("imtl-g", 2)])
def test_a_run_resumed_from_state_dicts_goes_on_bit_for_bit(name, every):
    # The balancer's state (warm start, random generator, FAMO's logits and their Adam,
    # Uncertainty's log-variances, MultiBalance's Gram average, the step count that says when
    # the weights are due) saved beside the model's and the optimizer's, loaded with
    # weights_only=True into a fresh run: it goes on as the saved run does. Resumed after an
    # odd step, every = 2 resumes on a step that reuses the loaded weights.
    model, bal, opt = _resumable(name, 0, every)
    _train(model, bal, opt, range(3))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "bal": bal.state_dict()}, buffer)
    _train(model, bal, opt, range(3, 6))
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin, twin_bal, twin_opt = _resumable(name, 1, every)  # other initial values
    twin.load_state_dict(saved["model"])
    twin_opt.load_state_dict(saved["opt"])
    twin_bal.load_state_dict(saved["bal"])
    _train(twin, twin_bal, twin_opt, range(3, 6))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    torch.testing.assert_close(twin_bal.weights, bal.weights, rtol=0, atol=0)
    assert twin_bal.steps == bal.steps == 6


def _same_state(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            _same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", sorted(B.BALANCERS))
def test_a_state_dict_that_does_not_fit_raises_and_loads_nothing(name):
    model, bal, opt = _resumable(name, 0, 1)
    _train(model, bal, opt, range(2))
    good = bal.state_dict()
    other = "LS" if name != "ls" else "NashMTL"
    bad_cases = [
        ({**good, "method": other}, ValueError, "this balancer is"),
        ({**good, "num_tasks": 3}, ValueError, "K = 3"),
        ({**good, "steps": -1}, ValueError, "steps"),
        ({**good, "weights": torch.tensor([float("nan"), 1.0], dtype=torch.float64)},
         ValueError, "weights"),
        ({**good, "weights": torch.ones(3, dtype=torch.float64)}, ValueError, "weights"),
        ([good], TypeError, "must be a dict"),
    ]
    special = {"nashmtl": ("warm_start", torch.tensor([1.0, float("inf")])),
               "pcgrad": ("rng", {"bit_generator": "MT19937"}),
               "famo": ("logit_optimizer", {"state": {}, "param_groups": []}),
               "uncertainty": ("log_vars", torch.zeros(3)),
               "multibalance": ("gram_average", [[1.0, 0.0], [0.0]])}
    if name in special:
        key, value = special[name]
        bad_cases.append(({**good, key: value}, (ValueError, TypeError), key))
    for bad, error, match in bad_cases:
        with pytest.raises(error, match=match):
            bal.load_state_dict(bad)
        assert _same_state(bal.state_dict(), good), match
    _train(model, bal, opt, range(2, 3))  # still trains


def _through_torch_save(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(("name", "every"), [(name, 1) for name in sorted(B.BALANCERS)]
                         + [("nashmtl", 2)])
def test_a_state_dict_saved_again_before_the_first_call_loads_and_resumes_bit_for_bit(name,
                                                                                      every):
    # A job that checkpoints right after resuming (or is pre-empted again before its first
    # step): the balancer's K was the loaded one, not yet self.k, and the state dict it saved
    # held the weights without num_tasks, which no balancer could load.
    model, bal, opt = _resumable(name, 0, every)
    _train(model, bal, opt, range(3))
    saved = _through_torch_save({"model": model.state_dict(), "opt": opt.state_dict(),
                                 "bal": bal.state_dict()})
    _train(model, bal, opt, range(3, 6))
    resumed = _resumable(name, 1, every)[1]
    resumed.load_state_dict(saved["bal"])
    again = _through_torch_save(resumed.state_dict())  # before any call
    assert again["num_tasks"] == 2
    assert _same_state(again, saved["bal"])
    twin, twin_bal, twin_opt = _resumable(name, 2, every)  # other initial values
    twin.load_state_dict(saved["model"])
    twin_opt.load_state_dict(saved["opt"])
    twin_bal.load_state_dict(again)
    _train(twin, twin_bal, twin_opt, range(3, 6))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    torch.testing.assert_close(twin_bal.weights, bal.weights, rtol=0, atol=0)
    assert twin_bal.steps == bal.steps == 6


@pytest.mark.parametrize(("option", "value"), [
    ("lr", "fast"), ("lr", "0.025"), ("lr", -0.1), ("lr", float("nan")), ("lr", None),
    ("weight_decay", "0.01"), ("weight_decay", -1.0), ("weight_decay", float("inf")),
    ("eps", -1e-8), ("betas", (1.0, 0.999)), ("betas", "0.9"), ("amsgrad", "no"),
    ("capturable", True),  # an option torch loads, whose step on the CPU raises
])
def test_famo_refuses_a_bad_option_of_its_saved_logit_adam_and_loads_nothing(option, value):
    # The logits' Adam took the saved options as they were: a string lr loaded (breaking every
    # later call), or one that float() refused was found after the steps, the weights, the
    # logits and the logits' Adam state had been replaced.
    model, other, other_opt = _resumable("famo", 0, 1)
    _train(model, other, other_opt, range(4))
    bad = copy.deepcopy(other.state_dict())
    bad["logit_optimizer"]["param_groups"][0][option] = value
    model, bal, opt = _resumable("famo", 1, 1)
    _train(model, bal, opt, range(1))
    before = copy.deepcopy(bal.state_dict())
    with pytest.raises(ValueError, match=r"state_dict\['logit_optimizer'\]"):
        bal.load_state_dict(bad)
    assert _same_state(bal.state_dict(), before)
    assert (bal.w_lr, bal.gamma) == (0.025, 0.01)
    _train(model, bal, opt, range(1, 2))  # still trains
    assert bal.steps == 2 and bool(torch.isfinite(bal.logits).all())


def test_pcgrad_resumed_from_its_state_dict_draws_the_same_orders():
    # With three tasks each projects onto the others in a random order: the generator's state
    # is what a resumed run needs to draw the same orders.
    t = Linear([[1.0, 0.0, 0.0], [-0.5, 1.0, 0.0], [-0.5, -0.3, 1.0]])  # 0 conflicts with 1, 2
    bal = B.PCGrad(t.params, seed=3)
    for _ in range(2):
        t.run(bal)
    state = bal.state_dict()
    twin = B.PCGrad(t.params, seed=4)
    twin.load_state_dict(state)
    for _ in range(4):
        t.theta.grad = None
        ours = t.run(bal)[0]
        t.theta.grad = None
        theirs = t.run(twin)[0]
        torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    # Not vacuous: the two seeds draw different orders on these gradients.
    draws = []
    for seed in (3, 4):
        fresh = B.PCGrad(t.params, seed=seed)
        for _ in range(6):
            t.theta.grad = None
            draws.append(t.run(fresh)[0])
    assert any(not torch.equal(a, b) for a, b in zip(draws[:6], draws[6:]))


@pytest.mark.parametrize("name", ["uncertainty", "famo"])
def test_a_loaded_balancer_still_checks_that_the_losses_reach_its_parameters(name):
    # The check of the first call was keyed on the step count, which a loaded state sets.
    model, bal, opt = _resumable(name, 0, 1)
    if name == "famo":
        bal = B.FAMO(model.parameters(), 2, max_norm=0.0)  # one backward pass, no detection
    _train(model, bal, opt, range(2))
    fresh = B.BALANCERS[name](list(_resumable(name, 0, 1)[0].parameters()), n_tasks=2,
                              **({"max_norm": 0.0} if name == "famo" else {}))
    fresh.load_state_dict(bal.state_dict())
    with pytest.raises(ValueError, match="no task loss reaches"):
        _train(model, fresh, opt, range(2, 3))


# Options other than the defaults, per balancer: a state dict saves them and a balancer built
# with the defaults takes them back on loading, as torch's optimizers take their groups' back.
_OTHER_OPTIONS = {
    "nashmtl": {"update_weights_every": 2, "weight_task_specific": False, "max_norm": 0.05,
                "solver": "ccp"},
    "mgda-ub": {"update_weights_every": 2, "weight_task_specific": False,
                "normalization": "l2"},
    "imtl-g": {"update_weights_every": 2, "weight_task_specific": False},
    "pcgrad": {"weight_task_specific": True, "seed": 7, "reduction": "mean"},
    "cagrad": {"weight_task_specific": True, "c": 0.9},
    "uncertainty": {"form": "classification"},
    "famo": {"gamma": 0.1, "w_lr": 0.5, "max_norm": 0.05,
             "min_losses": torch.tensor([0.01, 0.02], dtype=torch.float64)},
    "multibalance": {"normalization": "none", "solver": "nash", "ema": 0.5},
}


def _with_options(name, seed, options):
    torch.manual_seed(seed)
    model = MMoE([3, 3], 3, 2, embed_dim=4, expert_dim=8, tower_dims=(4,))
    kwargs = {"n_tasks": 2} if name in ("famo", "uncertainty") else {}
    bal = B.BALANCERS[name](model.parameters(), **kwargs, **options)
    extra = bal.parameters() if name == "uncertainty" else []
    opt = torch.optim.Adam([*model.parameters(), *extra], lr=1e-2)
    return model, bal, opt


def _option_values(bal, names):
    return {n: getattr(bal, n).tolist() if isinstance(getattr(bal, n), torch.Tensor)
            else getattr(bal, n) for n in names}


@pytest.mark.parametrize("name", sorted(_OTHER_OPTIONS))
def test_a_state_dict_restores_the_options_it_was_saved_with(name):
    options = _OTHER_OPTIONS[name]
    model, bal, opt = _with_options(name, 0, options)
    _train(model, bal, opt, range(3))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "bal": bal.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    _train(model, bal, opt, range(3, 6))
    twin, twin_bal, twin_opt = _with_options(name, 1, {})  # the defaults
    defaults = _option_values(twin_bal, options)
    assert defaults != _option_values(bal, options)  # not vacuous
    twin.load_state_dict(saved["model"])
    twin_opt.load_state_dict(saved["opt"])
    twin_bal.load_state_dict(saved["bal"])
    assert _option_values(twin_bal, options) == _option_values(bal, options)
    _train(twin, twin_bal, twin_opt, range(3, 6))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    torch.testing.assert_close(twin_bal.weights, bal.weights, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(_OTHER_OPTIONS))
def test_a_state_dict_without_options_keeps_the_constructors(name):
    # What an earlier version saved: the constructor's options stay (FAMO's w_lr and gamma
    # excepted, which its logits' saved Adam holds).
    options = _OTHER_OPTIONS[name]
    model, bal, opt = _with_options(name, 0, {})
    _train(model, bal, opt, range(2))
    old = {k: v for k, v in bal.state_dict().items() if k != "options"}
    other = _with_options(name, 0, options)[1]
    other.load_state_dict(old)
    expected = _option_values(_with_options(name, 0, options)[1], options)
    if name == "famo":
        expected.update(w_lr=bal.w_lr, gamma=bal.gamma)
    assert _option_values(other, options) == expected
    assert other.steps == 2


@pytest.mark.parametrize("name", sorted(_OTHER_OPTIONS))
def test_bad_saved_options_are_named_and_load_nothing(name):
    model, bal, opt = _with_options(name, 0, {})
    _train(model, bal, opt, range(2))
    good = bal.state_dict()
    first = next(iter(_OTHER_OPTIONS[name]))
    bad_value = {"update_weights_every": 0, "weight_task_specific": "yes", "max_norm": -1.0,
                 "solver": "adam", "normalization": "max", "seed": -3, "reduction": "max",
                 "c": float("inf"), "form": 3, "gamma": float("nan"),
                 "ema": 1.0}[first]
    cases = [
        ({**good, "options": [1]}, TypeError, r"state_dict\['options'\] must be a dict"),
        ({**good, "options": {**good["options"], "lr": 0.1}}, ValueError, "'lr'"),
        ({**good, "options": {**good["options"], first: bad_value}}, ValueError,
         rf"state_dict\['options'\]\['{first}'\]"),
    ]
    for bad, error, match in cases:
        with pytest.raises(error, match=match):
            bal.load_state_dict(bad)
        assert _same_state(bal.state_dict(), good), match


def test_a_non_reusable_balancer_refuses_a_saved_update_weights_every_above_one():
    model, bal, opt = _with_options("pcgrad", 0, {})
    _train(model, bal, opt, range(1))
    state = bal.state_dict()
    bal._OPTIONS = ("update_weights_every", *bal._OPTIONS)  # as if PCGrad saved it
    with pytest.raises(ValueError, match=r"PCGrad does not reuse weights: state_dict"):
        bal.load_state_dict({**state, "options": {"update_weights_every": 2}})
    assert bal.update_weights_every == 1


def test_famo_refuses_saved_min_losses_of_another_shape():
    model, bal, opt = _with_options("famo", 0, {})
    _train(model, bal, opt, range(1))
    state = bal.state_dict()
    for value, error in ((torch.zeros(3, dtype=torch.float64), ValueError),
                         (torch.tensor([0.0, float("nan")], dtype=torch.float64), ValueError),
                         ([0.0, 0.0], TypeError)):
        with pytest.raises(error, match=r"state_dict\['options'\]\['min_losses'\]"):
            bal.load_state_dict({**state, "options": {**state["options"], "min_losses": value}})
        assert torch.equal(bal.min_losses, torch.zeros(2, dtype=torch.float64))


def test_famo_state_dict_checks_its_logit_adam_and_takes_its_options():
    model, bal, opt = _resumable("famo", 0, 1)
    _train(model, bal, opt, range(2))
    state = copy.deepcopy(bal.state_dict())
    bad = copy.deepcopy(state)
    bad["logit_optimizer"]["state"][0]["exp_avg"] = torch.zeros(5, dtype=torch.float64)
    other = B.FAMO(model.parameters(), 2, w_lr=0.5, gamma=0.0)
    with pytest.raises(ValueError, match="logit_optimizer"):
        other.load_state_dict(bad)
    other.load_state_dict(state)
    assert (other.w_lr, other.gamma) == (bal.w_lr, bal.gamma)  # the saved Adam's, as in torch


def test_the_finiteness_check_of_a_reused_step_takes_huge_finite_gradients():
    # Sums of float32 gradients of 1e38 overflow: the elements are checked then, not refused.
    assert B._all_finite([torch.full((10,), 3e38), None])
    assert B._all_finite([torch.full((10**5,), 6e4, dtype=torch.float16)])
    assert not B._all_finite([torch.ones(3), torch.tensor([1.0, float("inf")])])
    assert not B._all_finite([torch.tensor([float("nan"), 0.0], dtype=torch.float64)])


# -- a reentrant activation checkpoint ---------------------------------------------------------

class _Checkpointed(torch.nn.Module):
    """A block for torch.utils.checkpoint, at the bottom of the model (its input requiring
    grad, as Hugging Face's enable_input_require_grads makes it) or in the middle."""

    def __init__(self, bottom: bool):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.bottom, self.reentrant = bottom, True
        self.pre = torch.nn.Linear(4, 4).double()
        self.block = torch.nn.Linear(4, 6).double()
        self.heads = torch.nn.ModuleList([torch.nn.Linear(6, 1).double() for _ in range(2)])
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        self.x = torch.randn(8, 4, generator=g, dtype=torch.float64)

    def run(self, bal):
        from torch.utils.checkpoint import checkpoint

        h = self.x.clone().requires_grad_() if self.bottom else torch.tanh(self.pre(self.x))
        z = checkpoint(lambda t: torch.tanh(self.block(t)), h, use_reentrant=self.reentrant)
        if self.bottom:
            z = z + 0.0 * self.pre.weight.sum()  # (pre in the graph, outside the checkpoint)
        losses = [hd(z).square().mean() * (i + 1) for i, hd in enumerate(self.heads)]
        if isinstance(bal, B.MultiBalance):
            bal.backward(losses, z)
        else:
            bal.backward(losses)


@pytest.mark.parametrize("bottom", [True, False])
@pytest.mark.parametrize("name", sorted(B.BALANCERS))
def test_a_reentrant_checkpoint_is_refused_naming_use_reentrant_false(name, bottom):
    # The walk of the graph does not see the parameters inside CheckpointFunctionBackward:
    # every balancer left the checkpointed block without .grad (at the bottom of the model),
    # or torch raised part-way through a restricted backward (in the middle). Refused before
    # anything is computed; with use_reentrant=False the same balancer gives the block its
    # gradient.
    model = _Checkpointed(bottom)
    bal = _make(name, list(model.parameters()))
    with pytest.raises(NotImplementedError, match="use_reentrant=False"):
        model.run(bal)
    assert all(p.grad is None for p in model.parameters())
    assert bal.steps == 0 and bal.weights is None
    model.reentrant = False
    model.run(bal)
    assert all(p.grad is not None for p in model.block.parameters())


# -- sparse gradients ----------------------------------------------------------------------------

class _SparseRec(torch.nn.Module):
    """A shared embedding with sparse gradients (nn.Embedding(sparse=True)) and two heads."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(20, 4, sparse=True)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(4, 1) for _ in range(2))
        self.ids = torch.randint(0, 20, (8, 3))

    def losses(self):
        z = self.emb(self.ids).mean(1)
        return [h(z).square().mean() for h in self.heads]


def test_famo_clipping_a_sparse_shared_gradient_is_refused_and_loses_nothing():
    # torch's clip_grad_norm_ raised NotImplementedError outside FAMO's rollback: the .grad
    # accumulated before the call (a first micro-batch) was lost. Refused naming the
    # parameter, with every .grad (the sparse one too) and FAMO's state as they were.
    model = _SparseRec()
    famo = B.FAMO(model.parameters(), n_tasks=2)
    sum(model.losses()).backward()
    grads = [p.grad.to_dense().clone() for p in model.parameters()]
    state = copy.deepcopy(famo.state_dict())
    with pytest.raises(TypeError, match=r"params\[0\] \(shape \(20, 4\)\).*sparse"):
        famo.backward(model.losses())
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad.to_dense(), g)
    assert model.emb.weight.grad.is_sparse
    assert _same_state(famo.state_dict(), state)
    famo.max_norm = 0.0  # unclipped, FAMO takes it as loss.backward() does
    famo.backward(model.losses())
    assert model.emb.weight.grad.is_sparse and famo.steps == 1


# -- steps a GradScaler skips --------------------------------------------------------------------

class _Overflow(torch.autograd.Function):
    """The identity, whose gradient overflows (to Inf) where ``on``: a finite loss whose
    gradient is not, the usual float16 overflow."""

    @staticmethod
    def forward(ctx, x, on):
        ctx.on = on
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return (g + math.inf if ctx.on else g), None


def _overflow_run(name, where, calls, every=1):
    """A balancer under a GradScaler for ``calls`` steps, a gradient overflowing at the calls
    in ``where`` (dict call -> "head" or "trunk"); the state dict and the scale at each."""
    torch.manual_seed(0)
    trunk = torch.nn.Linear(6, 8)
    heads = [torch.nn.Linear(8, 1) for _ in range(3)]
    params = [*trunk.parameters(), *(q for h in heads for q in h.parameters())]
    kwargs = {"update_weights_every": every} if every > 1 else {}
    bal = (B.BALANCERS.get(name) or getattr(B, name))(params, **kwargs)
    opt = torch.optim.SGD(params, lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(16, 6)
    states = []
    for call in range(calls):
        opt.zero_grad()
        z = _Overflow.apply(torch.tanh(trunk(x)), where.get(call) == "trunk")
        losses = []
        for i, h in enumerate(heads):
            weight = _Overflow.apply(h.weight, where.get(call) == "head" and i == 2)
            losses.append((i + 1.0) * torch.nn.functional.linear(z, weight, h.bias)
                          .square().mean())
        bal.backward([scaler.scale(loss) for loss in losses], scaler=scaler)
        scaler.step(opt)
        scaler.update()
        states.append((copy.deepcopy(bal.state_dict()), scaler.get_scale()))
    return states


@pytest.mark.parametrize("name", _GRADIENT_BALANCERS)
def test_an_overflow_in_a_head_gradient_alone_leaves_the_balancer_as_it_was(name):
    # The Gram of the shared gradients is finite, so the step was counted and the weights,
    # NashMTL's warm start and PCGrad's random generator moved while the scaler skipped the
    # step. The balancer now goes on as if the skipped call had not been made.
    states = _overflow_run(name, {2: "head"}, 4)
    assert states[2][1] < states[1][1]  # (the scaler skipped that step)
    assert _same_state(states[2][0], states[1][0])
    assert states[3][0]["steps"] == 3


@pytest.mark.parametrize("every", [2, 3])
@pytest.mark.parametrize("name", ["nashmtl", "mgda-ub", "imtl-g"])
def test_a_step_the_scaler_skips_counts_on_neither_kind_of_step(name, every):
    # With update_weights_every > 1 a gradient overflow on a step that reuses the weights
    # counted it (the next weight update came a step early) while one on a weight-update step
    # did not: neither counts now. Calls 0-4, the overflow at call 1 (reuses the weights for
    # both every=2 and 3) and at call 3 (reuses for every=3, updates for every=2).
    states = _overflow_run(name, {1: "trunk", 3: "trunk"}, 5, every)
    assert [s["steps"] for s, _ in states] == [1, 1, 2, 2, 3]
    assert all(b < a for (_, a), (_, b) in ((states[0], states[1]), (states[2], states[3])))


@pytest.mark.parametrize("mode", ["explicit", "next batch"])
def test_famo_is_not_moved_by_a_step_the_scaler_skipped_for_a_gradient_overflow(mode):
    # The losses are finite, the gradient overflows (the usual float16 case): the scaler
    # skips the step, but only a non-finite loss stopped FAMO's update, so the logits moved
    # on a decrease that no step made. FAMO now trains as a twin that never saw that call.
    def run(overflow_at):
        torch.manual_seed(0)
        trunk = torch.nn.Linear(6, 8)
        heads = [torch.nn.Linear(8, 1) for _ in range(2)]
        params = [*trunk.parameters(), *(q for h in heads for q in h.parameters())]
        famo = B.FAMO(params, n_tasks=2)
        opt = torch.optim.SGD(params, lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        x = torch.randn(16, 6)

        def losses(on=False):
            z = _Overflow.apply(torch.tanh(trunk(x)), on)
            return [(i + 1.0) * h(z).square().mean() + 0.1 for i, h in enumerate(heads)]

        for call in range(5):
            if overflow_at is None and call == 3:
                continue  # the twin: no such call
            opt.zero_grad()
            famo.backward([scaler.scale(loss) for loss in losses(call == overflow_at)],
                          scaler=scaler)
            scaler.step(opt)
            scaler.update()
            if mode == "explicit":
                with torch.no_grad():
                    famo.update(losses())
            if call == overflow_at and mode == "explicit":
                assert famo.stats["update"] == "skipped"
            if call == 4 and mode == "next batch" and overflow_at is not None:
                assert famo.stats["update"] == "skipped"
        return famo, params

    (famo, params), (twin, twin_params) = run(3), run(None)
    assert famo.steps == twin.steps == 4
    assert torch.equal(famo.logits.detach(), twin.logits.detach())
    assert _same_state(famo._logit_opt.state_dict()["state"],
                       twin._logit_opt.state_dict()["state"])
    for p, q in zip(params, twin_params, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("zeroed", [[1], [0, 1]], ids=["one", "all"])
@pytest.mark.parametrize("name", ["nashmtl", "imtl-g", "mgda-ub"])
def test_a_head_initialized_to_zero_gets_its_plain_gradient_and_trains(name, zeroed):
    # A zero head makes its task's shared gradient zero: NashMTL and IMTL-G gave the task
    # weight 0 and, weighting the task-specific parameters, its head a zero gradient, so that
    # the head never left zero (every head: nothing ever trained). Such a task takes no part
    # in the balancing and its head gets its plain gradient, on a step that solves for the
    # weights, on one that reuses them, and after a state dict in between.
    def build():
        m = _Heads()
        with torch.no_grad():
            for i in zeroed:
                for p in m.heads[i].parameters():
                    p.zero_()
        return m

    def losses(m):
        z = torch.tanh(m.trunk(m.x))
        return [((h(z).squeeze(-1) - m.y[:, i]) ** 2).mean() for i, h in enumerate(m.heads)]

    model = build()
    bal = B.BALANCERS[name](list(model.parameters()), update_weights_every=2)
    for call in range(2):  # the first solves for the weights, the second reuses them
        if call == 1:
            twin = build()
            resumed = B.BALANCERS[name](list(twin.parameters()), update_weights_every=7)
            resumed.load_state_dict(bal.state_dict())
        model.zero_grad(set_to_none=True)
        bal.backward(losses(model))
        assert bal.stats["updated"] == (call == 0)
        w = bal.weights.tolist()
        for i, head in enumerate(model.heads):
            plain = torch.autograd.grad(losses(model)[i], list(head.parameters()))
            factor = 1.0 if i in zeroed else w[i]
            for p, g in zip(head.parameters(), plain, strict=True):
                torch.testing.assert_close(p.grad, factor * g, rtol=1e-12, atol=1e-15)
            assert any(bool(p.grad.abs().max() > 1e-3) for p in head.parameters()) \
                or i not in zeroed
    resumed.backward(losses(twin))
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    # And it trains: the zero heads move, and their tasks' shared gradients are no longer 0.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        bal.backward(losses(model))
        opt.step()
    for i in zeroed:
        assert float(model.heads[i].weight.detach().abs().max()) > 1e-3


class _Refuses(torch.autograd.Function):
    """The identity, whose backward raises."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("refused in backward")


def _trunk_and_two_heads():
    """(trunk, head 0, head 1, their parameters, a batch), float32, seeded."""
    torch.manual_seed(0)
    trunk, h0, h1 = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    return trunk, h0, h1, [*trunk.parameters(), *h0.parameters(), *h1.parameters()], \
        torch.randn(8, 3)


@pytest.mark.parametrize("name", ["nashmtl", "mgda-ub", "imtl-g"])
def test_an_overflow_in_a_routed_gradient_skips_the_step_under_a_scaler(name):
    # Task 1 reaches task 0's head after the first call, with an overflowing gradient: kept
    # apart from .grad until the weights were known, it escaped the scaler's check, and the
    # balancer counted a step (and moved its weights) that the scaler skips.
    trunk, h0, h1, params, x = _trunk_and_two_heads()

    def losses(route):
        z = torch.tanh(trunk(x))
        l0, l1 = h0(z).pow(2).mean(), h1(z).pow(2).mean() * 2
        return [l0, l1 + 1e-3 * _Overflow.apply(h0.weight, True).sum() if route else l1]

    bal = B.BALANCERS[name](params)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    bal.backward([scaler.scale(loss) for loss in losses(False)], scaler=scaler)
    state = copy.deepcopy(bal.state_dict())
    for p in params:
        p.grad = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the routing warning)
        bal.backward([scaler.scale(loss) for loss in losses(True)], scaler=scaler)
    assert not bool(torch.isfinite(h0.weight.grad).all())  # the scaler will skip the step
    assert bal.stats["updated"] is False
    assert _same_state(bal.state_dict(), state)


@pytest.mark.parametrize("name,specific", [("nashmtl", True), ("nashmtl", False),
                                           ("mgda-ub", True)])
def test_a_dense_gradient_added_to_a_sparse_one_sums_as_loss_backward_does(name, specific):
    # A sparse embedding found task 0's alone; later task 1 reaches it through a dense op:
    # torch's sparse add_ of a dense tensor raised (after .grad had been changed, where the
    # gradient was kept apart). loss.backward() sums them into a dense gradient; so does the
    # balancer, each task's part weighted as its weights say.
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 4).double()
    emb = torch.nn.Embedding(10, 4, sparse=True).double()
    head = torch.nn.Linear(4, 1).double()
    params = [*trunk.parameters(), emb.weight, *head.parameters()]
    x, idx = torch.randn(8, 4, dtype=torch.float64), torch.tensor([1, 2, 3])

    def losses(route):
        z = torch.tanh(trunk(x))
        l0, l1 = (z @ emb(idx).t()).pow(2).mean(), head(z).sub(1).pow(2).mean()
        return [l0, l1 + 0.1 * emb.weight.pow(2).sum() if route else l1]

    bal = B.BALANCERS[name](params, weight_task_specific=specific)
    bal.backward(losses(False))
    before = emb.weight.grad.to_dense().clone()  # (accumulated into)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bal.backward(losses(True))
    w = bal.weights.tolist() if specific else [1.0, 1.0]
    parts = [torch.autograd.grad(loss, emb.weight)[0].to_dense() for loss in losses(True)]
    torch.testing.assert_close(emb.weight.grad.to_dense(),
                               before + w[0] * parts[0] + w[1] * parts[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["nashmtl", "imtl-g", "mgda-ub"])
def test_a_reuse_step_that_raises_under_a_scaler_leaves_grad_as_it_was(name):
    # On a step that reuses the weights under a GradScaler, .grad was not set aside: a backward
    # pass that raised part-way left the shared parameters' gradients written.
    trunk, h0, h1, params, x = _trunk_and_two_heads()

    def losses(refuse):
        z = torch.tanh(trunk(x))
        out1 = h1(_Refuses.apply(z) if refuse else z)
        return [h0(z).pow(2).mean(), out1.pow(2).mean()]

    options = {"max_norm": 0.0} if name == "nashmtl" else {}
    bal = B.BALANCERS[name](params, update_weights_every=2, **options)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    bal.backward([scaler.scale(loss) for loss in losses(False)], scaler=scaler)
    kept = [p.grad.clone() for p in params]
    state = copy.deepcopy(bal.state_dict())
    with pytest.raises(RuntimeError, match="refused in backward"):
        bal.backward([scaler.scale(loss) for loss in losses(True)], scaler=scaler)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, kept, strict=True))
    assert _same_state(bal.state_dict(), state)
