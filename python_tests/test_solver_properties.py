"""Mathematical properties of pub_native.solve_weights (SPEC section 4), for both methods:
the optimality condition G α = 1/α, scale invariance, permutation equivariance, batched ==
looped, warm start == cold start, degenerate inputs, float32 and torch inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TOL
from grams import FAMILIES, ill_conditioned_gram, opposing_gram, random_gram, zero_task_gram

import pub_native
from pub_native import SolveStatus, solve_weights

METHODS = ["newton", "ccp"]
KS = [1, 2, 3, 5, 10, 20, 40, 64]


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def true_residual(G, alpha, ridge=1e-8):
    """Relative residual recomputed here, independently of the native one."""
    act = alpha > 0
    Ga = G[np.ix_(act, act)]
    Ga = Ga + ridge * np.diag(np.diag(Ga))
    a = alpha[act]
    return np.linalg.norm(Ga @ a - 1 / a) / np.linalg.norm(1 / a)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("K", KS)
def test_residual_random(method, K):
    rng = np.random.default_rng(K)
    for _ in range(5):
        G = random_gram(rng, K)
        r = solve_weights(G, method=method)
        assert r.status == SolveStatus.CONVERGED
        assert np.all(r.weights > 0)
        assert r.residual <= TOL["residual_f64"]
        assert true_residual(G, r.weights) <= TOL["residual_f64"]
        assert abs(r.residual - true_residual(G, r.weights)) <= 1e-12


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("K", [2, 5, 10, 20])
def test_residual_ill_conditioned(method, K):
    rng = np.random.default_rng(100 + K)
    G = ill_conditioned_gram(rng, K, cond=1e8)
    r = solve_weights(G, method=method)
    assert r.status == SolveStatus.CONVERGED
    assert true_residual(G, r.weights) <= TOL["residual_f64_ill"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("K", [2, 3, 5, 10])
def test_methods_agree(family, K):
    rng = np.random.default_rng(K * 7 + len(family))
    G = FAMILIES[family](rng, K)
    a = solve_weights(G, method="newton")
    # The CCP can need ~130 outer iterations on opposing tasks (NashMTL's too): allow 200.
    b = solve_weights(G, method="ccp", max_iter=200)
    assert a.status == SolveStatus.CONVERGED
    assert b.status == SolveStatus.CONVERGED
    hard = family in ("ill_conditioned", "opposing")
    tol = TOL["property_f64_ill"] if hard else TOL["methods_agree"]
    assert rel_err(b.weights, a.weights) <= tol


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("c", [1e-12, 1e-3, 7.5, 1e9])
def test_scale_invariance(method, c):
    rng = np.random.default_rng(1)
    for K in (1, 2, 5, 20):
        G = random_gram(rng, K)
        a = solve_weights(G, method=method).weights
        b = solve_weights(c * G, method=method).weights
        assert rel_err(b * np.sqrt(c), a) <= TOL["property_f64"]


@pytest.mark.parametrize("method", METHODS)
def test_scale_invariance_up_to_the_largest_double(method):
    # A power of two scales exactly: G·2^e has the weights of G times 2^(-e/2), bit for bit,
    # up to entries near the largest double (whose symmetrized sum overflowed: "not positive
    # definite", and the optimizer fell back to uniform weights).
    rng = np.random.default_rng(2)
    for K in (1, 2, 5):
        G = random_gram(rng, K)
        G = G / np.abs(G).max() * 3.0  # 3·2^1022: twice it overflows
        a = solve_weights(G, method=method)
        for e in (0, 200, 1022):
            b = solve_weights(G * 2.0**e, method=method)
            assert b.status == SolveStatus.CONVERGED, (K, e, b.status)
            np.testing.assert_array_equal(b.weights * 2.0 ** (e / 2), a.weights)

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("K", KS)
def test_per_task_scale_equivariance(method, K, device):
    # SPEC section 4: scaling task i's update by s_i scales α_i by exactly 1/s_i (G → SGS,
    # α → S⁻¹α), ridge included, over scales 1e-4 ... 1e4; on the CPU solver and the CUDA warp
    # solver alike.
    def solve(G):
        if device == "cpu":
            return solve_weights(G, method=method, max_iter=200)
        r = solve_weights(torch.tensor(G, device="cuda"), method=method, max_iter=200)
        return type(r)(r.weights.cpu().numpy(), SolveStatus(int(r.status)), r.iterations,
                       r.residual)

    rng = np.random.default_rng(100 + K)
    G = random_gram(rng, K)
    base = solve(G)
    scales = [10.0 ** rng.uniform(-4, 4, K) for _ in range(3)]
    scales.append(np.where(np.arange(K) % 2 == 0, 1e-4, 1e4))  # the corners of the range
    for s in scales:
        r = solve(s[:, None] * G * s[None, :])
        assert r.status == SolveStatus.CONVERGED
        assert rel_err(r.weights * s, base.weights) <= TOL["equivariance"]


@pytest.mark.parametrize("method", METHODS)
def test_permutation_equivariance(method):
    rng = np.random.default_rng(2)
    for K in (2, 3, 8, 20):
        G = random_gram(rng, K)
        perm = rng.permutation(K)
        a = solve_weights(G, method=method).weights
        b = solve_weights(G[np.ix_(perm, perm)], method=method).weights
        assert rel_err(b, a[perm]) <= TOL["property_f64"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_batched_equals_looped(method, dtype):
    rng = np.random.default_rng(3)
    K, B = 5, 33
    Gs = np.stack([FAMILIES[f](rng, K) for f in sorted(FAMILIES) for _ in range(6)][:B])
    Gs = Gs.astype(dtype)
    warm = rng.uniform(0.5, 2.0, size=(B, K)).astype(dtype)
    rb = solve_weights(Gs, method=method, warm_start=warm)
    assert rb.weights.shape == (B, K) and rb.weights.dtype == dtype
    assert rb.status.shape == rb.iterations.shape == rb.residual.shape == (B,)
    for b in range(B):
        r = solve_weights(Gs[b], method=method, warm_start=warm[b])
        # Same code on the same input: identical bits.
        np.testing.assert_array_equal(rb.weights[b], r.weights)
        assert rb.status[b] == r.status and rb.iterations[b] == r.iterations
        assert rb.residual[b] == r.residual


@pytest.mark.parametrize("method", METHODS)
def test_warm_start_same_result(method):
    rng = np.random.default_rng(4)
    for K in (2, 5, 10, 40):
        G = random_gram(rng, K)
        cold = solve_weights(G, method=method)
        # A nearby start (the previous step's weights) and a poor one reach the same root.
        for warm in (cold.weights * rng.uniform(0.9, 1.1, K), rng.uniform(0.01, 100.0, K)):
            r = solve_weights(G, method=method, warm_start=warm)
            assert r.status == SolveStatus.CONVERGED
            assert rel_err(r.weights, cold.weights) <= TOL["property_f64"]
    # The warm start is used: starting at the answer takes at most one Newton step.
    G = random_gram(rng, 10)
    a = solve_weights(G).weights
    assert solve_weights(G, warm_start=a).iterations <= 1 < solve_weights(G).iterations


@pytest.mark.parametrize("method", METHODS)
def test_a_warm_start_far_out_of_scale_reaches_the_root(method):
    # One entry 1e-16 … 1e-300 or 1e20 … 1e300 of the others' (in the equilibrated
    # coordinates): Newton spent its 50 iterations coming back (MAX_ITER, weights off by up to
    # 150%) and ccp reported NOT_POSITIVE_DEFINITE for a positive definite G. A start worse
    # than the cold one (f larger at the best multiple of each) is dropped.
    rng = np.random.default_rng(7)
    for K in (2, 3, 6):
        G = random_gram(rng, K)
        cold = solve_weights(G, method=method)
        for ratio in (1e-16, 1e-40, 1e-300, 1e-320, 1e20, 1e300):
            warm = cold.weights.copy()
            warm[K // 2] *= ratio
            r = solve_weights(G, method=method, warm_start=warm)
            assert r.status == SolveStatus.CONVERGED, (K, ratio, r)
            assert rel_err(r.weights, cold.weights) <= TOL["property_f64"], (K, ratio)
            assert np.isfinite(r.residual)


@pytest.mark.parametrize("method", METHODS)
def test_the_residual_of_weights_far_from_one_is_finite(method):
    # G of subnormal entries gives weights of 1e155, whose squares overflowed in the residual:
    # CONVERGED with a NaN residual. Now the relative residual of the rounded weights, as for
    # any scale (it is scale invariant: the same as for G scaled to 1).
    for c in (1e-310, 1e-300, 1e300):
        G = c * np.array([[2.0, 0.5], [0.5, 1.0]])
        r = solve_weights(G, method=method)
        unit = solve_weights(G / c, method=method)
        assert r.status == SolveStatus.CONVERGED and np.isfinite(r.residual)
        assert r.residual <= 1e-12
        assert rel_err(r.weights * np.sqrt(c), unit.weights) <= 1e-6


def test_the_reference_solver_stops_on_a_matrix_that_is_no_gram():
    # An indefinite symmetric matrix: the reference's Newton left b > 0 and never returned.
    from pub_native.reference import nash_weights

    for G in ([[1.0, -2.0], [-2.0, 1.0]], [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0]]):
        alpha, converged = nash_weights(np.array(G))
        assert not converged and not alpha.any()
    alpha, converged = nash_weights(np.array([[2.0, 0.5], [0.5, 1.0]]))
    assert converged and rel_err(alpha, solve_weights(np.array([[2.0, 0.5], [0.5, 1.0]]))
                                 .weights) <= 1e-9


@pytest.mark.parametrize("method", METHODS)
def test_k1_closed_form(method):
    for g in (1e-20, 0.25, 3.0, 1e20):
        r = solve_weights(np.array([[g]]), method=method)
        assert r.weights[0] == pytest.approx(1 / np.sqrt(g * (1 + 1e-8)), rel=1e-14)


@pytest.mark.parametrize("method", METHODS)
def test_orthogonal_closed_form(method):
    # Orthogonal updates: G diagonal, α_i = 1/‖u_i‖ (each task gets a unit-norm contribution).
    d = np.array([1e-4, 2.0, 9.0, 1e4])
    r = solve_weights(np.diag(d), method=method, ridge=0.0)
    np.testing.assert_allclose(r.weights, 1 / np.sqrt(d), rtol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_zero_task_excluded(method):
    rng = np.random.default_rng(5)
    for K in (2, 3, 10):
        G = zero_task_gram(rng, K)
        r = solve_weights(G, method=method)
        assert r.status == SolveStatus.CONVERGED
        assert r.weights[0] == 0.0 and np.all(r.weights[1:] > 0)
        sub = solve_weights(G[1:, 1:], method=method).weights
        assert rel_err(r.weights[1:], sub) <= TOL["property_f64"]
    # "Zero" is relative: 1e-13 of the largest update norm counts as zero.
    G = np.diag([1e-26, 1.0, 4.0])
    assert solve_weights(G).weights[0] == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_all_zero(method):
    r = solve_weights(np.zeros((3, 3)), method=method)
    assert r.status == SolveStatus.ALL_ZERO
    np.testing.assert_array_equal(r.weights, np.zeros(3))


@pytest.mark.parametrize("method", METHODS)
def test_opposing_tasks_ridge_path(method):
    # u_1 = −u_0: no positive root without the ridge; with it the root exists and the
    # balanced update Σ α_i u_i (of norm² αᵀGα) is ~0 next to the individual ones.
    rng = np.random.default_rng(6)
    u = rng.standard_normal(20)
    U = np.stack([u, -u])
    G = U @ U.T
    r = solve_weights(G, method=method, max_iter=200)
    assert r.status == SolveStatus.CONVERGED
    a = r.weights
    assert np.linalg.norm(a @ U) <= 1e-6 * np.linalg.norm(a[:, None] * U, axis=1).max()
    # Ridge strength sets the scale: α_i ≈ 1/√(ρ G_ii) (equal norms here).
    np.testing.assert_allclose(a, 1 / np.sqrt(1e-8 * np.diag(G)), rtol=1e-6)
    # The general opposing family (with noise) also converges, to the ridged root.
    G = opposing_gram(rng, 5)
    r = solve_weights(G, method=method, max_iter=200)
    assert r.status == SolveStatus.CONVERGED
    assert true_residual(G, r.weights) <= TOL["residual_f64_ill"]


@pytest.mark.parametrize("method", METHODS)
def test_float32_input(method):
    rng = np.random.default_rng(7)
    for K in (1, 2, 5, 10):
        G = random_gram(rng, K).astype(np.float32)
        r = solve_weights(G, method=method)
        assert r.weights.dtype == np.float32
        ref = solve_weights(G.astype(np.float64), method=method).weights
        assert rel_err(r.weights, ref) <= 1e-6  # same float64 math, one final rounding
        # The float32 weights solve the float32 matrix up to their own rounding, and the
        # residual reported is that of the weights returned (rounded), not of the float64 ones.
        residual = true_residual(G.astype(np.float64), r.weights.astype(np.float64))
        assert residual <= TOL["f32_vs_f64"]
        assert abs(r.residual - residual) <= 1e-3 * residual + 1e-15


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_cpu_input(dtype):
    rng = np.random.default_rng(8)
    G = random_gram(rng, 4)
    Gt = torch.tensor(G, dtype=dtype)
    r = solve_weights(Gt)
    assert isinstance(r.weights, torch.Tensor) and r.weights.dtype == dtype
    assert r.weights.device.type == "cpu"
    ref = solve_weights(G.astype(np.float32 if dtype == torch.float32 else np.float64)).weights
    np.testing.assert_array_equal(r.weights.numpy(), ref)
    # Non-contiguous (transposed) and batched tensors.
    r2 = solve_weights(Gt.t())
    np.testing.assert_array_equal(r2.weights.numpy(), ref)
    rb = solve_weights(torch.stack([Gt, 2 * Gt]))
    assert isinstance(rb.status, torch.Tensor) and rb.status.shape == (2,)
    torch.testing.assert_close(rb.weights[1], rb.weights[0] / np.sqrt(2), rtol=1e-6, atol=0)


@pytest.mark.cuda
def test_a_cuda_matrix_with_the_negative_bit_is_read_as_its_values():
    # The CUDA path read its memory (minus the values) where the CPU path resolved the bit.
    rng = np.random.default_rng(22)
    G = torch.tensor(random_gram(rng, 3), dtype=torch.float64, device="cuda")
    neg = torch._neg_view(-G)
    assert neg.is_neg() and torch.equal(neg, G)
    torch.testing.assert_close(solve_weights(neg).weights, solve_weights(G).weights,
                               rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_views_read_as_their_values(dtype):
    """A CPU tensor is read from its memory with its strides (the fast path of one matrix): every
    kind of view gives the weights of its values, bitwise those of a contiguous numpy copy."""
    rng = np.random.default_rng(21)
    G = torch.tensor(random_gram(rng, 3), dtype=dtype)
    # Inside a larger, non-symmetric tensor: a wrong stride or offset reads its other entries.
    parent = torch.randn(9, 11, dtype=dtype, generator=torch.Generator().manual_seed(0)) * 50
    parent[1:7:2, 4:7] = G
    parent_t = torch.randn(11, 9, dtype=dtype, generator=torch.Generator().manual_seed(1)) * 50
    parent_t[4:7, 1:7:2] = G.t()
    views = {
        "strided slice": parent[1:7:2, 4:7],
        "transposed slice": parent_t[4:7, 1:7:2].t(),
        "expanded": torch.tensor([[3.0]], dtype=dtype).expand(2, 2),
        "requires grad": G.clone().requires_grad_(),
        "negative view": torch._neg_view(-G),
        "parameter": torch.nn.Parameter(G.clone()),
    }
    for name, view in views.items():
        values = view.detach().resolve_neg().contiguous().numpy()
        ref = solve_weights(values)
        r = solve_weights(view)
        assert type(r.weights) is torch.Tensor and r.weights.dtype == dtype, name
        np.testing.assert_array_equal(r.weights.numpy(), ref.weights, err_msg=name)
        assert (r.status, r.iterations, r.residual) == (ref.status, ref.iterations,
                                                        ref.residual), name
        # The weights are memory of their own.
        assert r.weights.untyped_storage().data_ptr() != view.untyped_storage().data_ptr()


def test_torch_without_the_fast_path_objects_is_taken_as_it_is():
    """On a torch that lacks an object the native tensor path reads through, the refs are not
    handed over (tensors take the general path) and importing does not fail."""
    import types

    from pub_native import solver

    stripped = types.SimpleNamespace(float32=torch.float32, float64=torch.float64,
                                     strided=torch.strided, from_numpy=torch.from_numpy,
                                     _C=types.SimpleNamespace())
    assert solver._give_torch_refs(stripped) is None
    G = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    np.testing.assert_array_equal(solve_weights(G).weights.numpy(),
                                  solve_weights(G.numpy()).weights)


def test_result_fields():
    r = solve_weights(np.eye(2))
    assert r._fields == ("weights", "status", "iterations", "residual")
    assert isinstance(r.status, SolveStatus) and isinstance(r.iterations, int)
    assert isinstance(r.residual, float)
    assert pub_native.METHODS.keys() == {"newton", "ccp"}


@pytest.mark.parametrize("kind", ["array", "tensor"])
def test_default_call_gives_what_the_general_path_gives(kind):
    """The default call (answered natively, result built there) against the same options
    spelled so that they take the general path: the same result, of the same types; and the
    result behaves as a SolveResult (pickles, unpacks, survives a collection)."""
    import gc
    import pickle

    class Str(str):
        pass

    rng = np.random.default_rng(11)
    G = random_gram(rng, 3)
    if kind == "tensor":
        G = torch.from_numpy(G)
    fast = solve_weights(G)
    gc.collect()
    for spelled in ({"method": Str("newton")}, {"ridge": np.float64(1e-8)},
                    {"tol": pub_native.METHODS["newton"][1]},
                    {"max_iter": pub_native.METHODS["newton"][2]}):
        general = solve_weights(G, **spelled)
        assert type(fast) is type(general) is pub_native.SolveResult, spelled
        assert type(fast.weights) is type(general.weights) and type(fast.status) is SolveStatus
        np.testing.assert_array_equal(np.asarray(fast.weights), np.asarray(general.weights))
        assert fast[1:] == general[1:], spelled
        assert type(fast.iterations) is int and type(fast.residual) is float
    w, status, iterations, residual = pickle.loads(pickle.dumps(fast))
    np.testing.assert_array_equal(np.asarray(w), np.asarray(fast.weights))
    assert (status, iterations, residual) == fast[1:]


def test_solve_weights_inside_a_compiled_function():
    """torch.compile traces around the native entry (a builtin it looks up by module name) and
    the compiled function gives the eager results, for a tensor and for an array."""
    import warnings

    import torch._dynamo

    G = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)

    def weights_of(M):
        return solve_weights(M).weights * 2

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Dynamo's note that it does not trace into a builtin
        compiled = torch.compile(weights_of, backend="eager")
        torch.testing.assert_close(compiled(G), weights_of(G), rtol=0, atol=0)
        np.testing.assert_array_equal(torch.compile(lambda M: solve_weights(M).weights,
                                                    backend="eager")(G.numpy()),
                                      solve_weights(G.numpy()).weights)
    torch._dynamo.reset()


def test_max_iter_reports_status():
    rng = np.random.default_rng(9)
    G = ill_conditioned_gram(rng, 10, cond=1e8)
    r = solve_weights(G, max_iter=1)
    assert r.status == SolveStatus.MAX_ITER and r.iterations == 1
    assert r.residual > TOL["residual_f64"]


def test_not_psd_reported():
    # Symmetric but indefinite, with a'Ga < 0 along the start: no positive root.
    G = np.array([[1.0, -3.0], [-3.0, 1.0]])
    r = solve_weights(G, ridge=0.0)
    assert r.status == SolveStatus.NOT_POSITIVE_DEFINITE
    r = solve_weights(np.array([[-1.0]]))
    assert r.status == SolveStatus.NOT_POSITIVE_DEFINITE


@pytest.mark.parametrize("family", ["random", "scaled", "near_duplicate", "zero_task"])
@pytest.mark.parametrize("method", METHODS)
def test_agrees_with_the_independent_reference_solver(family, method):
    from pub_native.reference import nash_weights

    rng = np.random.default_rng(11)
    for K in (1, 2, 3, 8, 20):
        G = FAMILIES[family](rng, K)
        ref, converged = nash_weights(G)
        assert converged
        r = solve_weights(G, method=method, max_iter=200)
        if not ref.any():  # K = 1 with a zero update: nothing to balance
            np.testing.assert_array_equal(r.weights, ref)
            continue
        assert rel_err(r.weights, ref) <= TOL["vs_reference_solver"], (K, family)
