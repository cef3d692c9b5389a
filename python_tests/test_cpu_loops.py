"""The CPU step's compiled loops: for every path that the task count, the element type and the
options select (single sweeps for 2-4 and 8 tasks, tiled loops otherwise and for Clippy at 8,
Clippy, AdaTask, L2 weight decay), the results are bitwise independent of the number of threads,
and on x86-64 the AVX2 version equals the baseline version (PUB_NATIVE_CPU_BASELINE=1) up to
float rounding. Each run is a subprocess, since the version and the thread team are fixed at
load.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import BF16, F16, F32, F64, TOL
from helpers import Problem, assert_close, assert_states_close, run_pub

import pub_native
from pub_native._autograd import padded_row_length

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (K, dtype, optimizer, options)
CASES = [
    (2, "float32", "Adam", {}),
    (3, "float32", "Adam", {"umm": "clippy", "clippy_preset": "tfrs"}),
    (4, "float32", "Adam", {"weight_decay": 0.01}),
    (4, "float32", "Adam", {"umm": "adatask"}),
    (5, "float32", "Adam", {}),
    (8, "float32", "Adam", {"amsgrad": True}),
    (8, "float32", "Adam", {"umm": "clippy", "clippy_preset": "tfrs"}),
    (2, "float32", "RMSprop", {"momentum": 0.9, "centered": True}),
    (8, "float32", "Adagrad", {}),
    (2, "bfloat16", "Adam", {}),
    # float16: shared parameters take the baseline version in both runs (K ≥ 2), the heads'
    # base steps the AVX2 one.
    (3, "float16", "RMSprop", {"momentum": 0.9}),
    (8, "float64", "Adam", {}),
]

SCRIPT = """
import sys, torch, pub_native
sys.path.insert(0, "python_tests")
from helpers import Problem, run_pub
CASES = {cases!r}
out = []
for k, dtype, name, opts in CASES:
    # 300001 elements: five work items, and enough work for two threads at K = 2 and three
    # from K = 3 (the team grows with elements × tasks, see team_size in pub_step_cpu_impl.h).
    p = Problem([(300001,), (3, 1001), (17,)], k, dtype=getattr(torch, dtype), seed=11)
    o = run_pub(getattr(pub_native, name), p, 3, **opts)
    out.append([o.task_weights.clone()] + [t.detach().clone() for t in p.params()])
torch.save(out, sys.argv[1])
"""


def run_cases(tmp_path, tag, **env):
    path = tmp_path / f"{tag}.pt"
    full_env = dict(os.environ)
    full_env.pop("PUB_NATIVE_CPU_BASELINE", None)
    full_env.update(env)
    subprocess.run([sys.executable, "-c", SCRIPT.format(cases=CASES), str(path)], cwd=ROOT,
                   env=full_env, check=True, capture_output=True, text=True, timeout=300)
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def case_runs(tmp_path_factory):
    """run_cases(tag, **env), each tag run once per module: the one-thread run serves both
    tests below (about 5 s a run)."""
    done = {}

    def get(tag, **env):
        if tag not in done:
            done[tag] = run_cases(tmp_path_factory.mktemp(tag), tag, **env)
        return done[tag]
    return get


@pytest.mark.slow  # a run of every case on three threads (CI runs it)
def test_every_loop_is_bitwise_independent_of_thread_count(case_runs):
    one = case_runs("one", OMP_NUM_THREADS="1")
    three = case_runs("three", OMP_NUM_THREADS="3")
    for case, a, b in zip(CASES, one, three):
        for x, y in zip(a, b):
            assert torch.equal(x, y), case


@pytest.mark.slow  # two runs of every case (CI runs it)
@pytest.mark.skipif(os.uname().machine not in ("x86_64", "AMD64"), reason="one version only")
def test_avx2_loops_equal_baseline_loops(case_runs):
    # (The AVX2 version on one thread: any other thread count gives the same bits, above.)
    fast = case_runs("one", OMP_NUM_THREADS="1")
    base = case_runs("base", OMP_NUM_THREADS="2", PUB_NATIVE_CPU_BASELINE="1")
    dtypes = {"float32": F32, "bfloat16": BF16, "float16": F16, "float64": F64}
    for case, a, b in zip(CASES, fast, base):
        # Same equations in another order (fused multiply-adds, Gram sums in other lanes):
        # the float32 difference of native and reference runs bounds it.
        tol = TOL[("reference", dtypes[case[1]])]
        assert_close(a[0], b[0], tol, f"{case} weights")
        for j, (x, y) in enumerate(zip(a[1:], b[1:])):
            assert_close(x, y, tol, f"{case} param {j}")


def _first_adam_gram(k: int, lr: float = 1e-3, dtype=F32):
    """The Gram matrix a first Adam step solved with, on gradients from far below ε to far
    above it (updates lr·g/(|g| + ε) of every magnitude), the float64 Gram of the exact updates
    of the gradients as given, and Σ_j |u_ij·u_kj| (the scale of the error bound)."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(300001,), (3, 1001), (17,), (129,)]
    shared = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in shapes]
    grads = [[(torch.randn(s, generator=gen, dtype=F64)
               * torch.exp(4 * torch.randn(s, generator=gen, dtype=F64)) * 1e-8).to(dtype)
              for s in shapes] for _ in range(k)]
    opt = pub_native.Adam(shared, lr=lr, shared=shared)
    opt.zero_grad()
    opt.backward([sum((w * d).sum() for w, d in zip(shared, task)) for task in grads])
    opt.step()
    G = torch.from_numpy(opt._backend._stepper.G.copy())  # the Gram the step solved with
    # Adam's first step from zero state, in float64: u = lr·(m/bc1)/(sqrt(v/bc2) + ε).
    b1, b2, eps = 0.9, 0.999, 1e-8
    U = torch.stack([torch.cat([
        (lr * ((1 - b1) * g.to(F64) / (1 - b1))
         / (((1 - b2) * g.to(F64) ** 2 / (1 - b2)).sqrt() + eps)).reshape(-1) for g in task])
        for task in grads])
    return G, U @ U.T, U.abs() @ U.abs().T


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8])
def test_float32_gram_sums_stay_within_their_error_bound(k):
    # The Gram pass sums float64 products of the float32 task updates (single sweep for K ≤ 4
    # and 8, tiles for 5). Bound per entry: |G − G₆₄| ≤ c·2⁻²⁴·Σ_j |u_ij·u_kj|, with G₆₄ the
    # float64 Gram of the exact updates: c = 8 leaves room for the updates' own rounding.
    G, exact, scale = _first_adam_gram(k)
    err = (G - exact).abs() / scale
    assert err.max().item() <= 8 * 2.0 ** -24, err


@pytest.mark.parametrize("k, lr, dtype", [
    (2, 1e-25, F32), (2, 1e25, F32), (3, 1e-30, F32), (4, 1e-25, BF16), (5, 1e-30, F32),
    (5, 1e25, BF16), (8, 1e-25, F32), (8, 1e25, F32), (9, 1e-30, F32)])
def test_gram_keeps_its_error_bound_for_updates_of_any_magnitude(k, lr, dtype):
    # Updates so small that their float32 products would fall into the subnormals or to zero
    # (a tiny lr), or so large that they would overflow: the products are float64, so the
    # bound above holds at any scale where the updates themselves are normal float32 numbers
    # (the weights do not depend on the updates' scale), in the single sweeps (K = 2, 3, 8) and
    # the tiled loops (K = 5, 9; bfloat16 everywhere).
    G, exact, scale = _first_adam_gram(k, lr, dtype)
    err = (G - exact).abs() / scale
    assert err.max().item() <= 8 * 2.0 ** -24, err


@pytest.mark.parametrize("name", ["Adam", "AdaGrad", "RMSProp"])
@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_gram_of_nearly_dependent_updates_is_positive_semidefinite(name, k):
    # Tasks within 1e-3 … 1e-6 of a Pareto-stationary point: gradients nearly equal or nearly
    # opposed, so their updates span almost a line and G's smallest eigenvalues are tiny. The
    # Gram the step solves with is the float64 Gram of the float32 updates it applies, positive
    # semidefinite to float64 rounding, so the solve of G + 1e-8·diag(G) converges. With
    # float32 products summed in float32 it was indefinite by ~1e-7 of its diagonal, ten times
    # the ridge: the Cholesky failed and the step applied weights that solved nothing. Single
    # sweeps (K = 2, 3, 8, each with a tiled tail) and tiled loops (K = 5), two steps.
    cls = getattr(pub_native, name)
    shapes = [(1000,), (3, 45)]
    for seed in range(4):
        for delta in (1e-3, 1e-4, 1e-5, 1e-6):
            gen = torch.Generator().manual_seed(seed)
            shared = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
            base = [torch.randn(s, generator=gen) for s in shapes]
            dirs = [[b * (1 + 0.1 * i) * (-1) ** i + delta * torch.randn(s, generator=gen)
                     for b, s in zip(base, shapes)] for i in range(k)]
            opt = cls(shared, lr=1e-3, shared=shared)
            for _ in range(2):
                opt.zero_grad()
                opt.backward([sum((w * d).sum() for w, d in zip(shared, task))
                              for task in dirs])
                opt.step()
                G = torch.from_numpy(opt._backend._stepper.G.copy())
                d = G.diagonal().sqrt()
                least = torch.linalg.eigvalsh(G / d[:, None] / d[None, :])[0].item()
                assert least >= -1e-13, (seed, delta, least)
                assert opt.stats["status"] == pub_native.SolveStatus.CONVERGED, (seed, delta)
                assert opt.stats["residual"] <= 1e-6, (seed, delta, opt.stats["residual"])


@pytest.mark.parametrize("k", [2, 5, 8])
@pytest.mark.parametrize("scale", [1e-24, 1e-21, 1.0, 1e19, 1e30])
def test_step_gradient_norms_at_every_float32_magnitude(k, scale):
    # stats["task_grad_norms"] from the Gram pass equals torch's float64 norm of the task's
    # gradient, also where float32 squares would overflow (|g| ≳ 1e19) or fall into the
    # subnormal range (|g| ≲ 1e-19): single sweeps (K = 2 and 8, with a tail) and tiled loop
    # (K = 5).
    gen = torch.Generator().manual_seed(9)
    shapes = [(70001,), (300,), (1,)]
    shared = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    dirs = [[torch.randn(s, generator=gen) * (scale if i == 0 else 1.0) for s in shapes]
            for i in range(k)]
    opt = pub_native.Adam(shared, lr=1e-3, shared=shared)
    opt.zero_grad()
    opt.backward([sum((w * d).sum() for w, d in zip(shared, task)) for task in dirs])
    opt.step()
    exact = torch.stack([torch.cat([d.to(F64).reshape(-1) for d in task]).norm()
                         for task in dirs])
    got = opt.stats["task_grad_norms"]
    assert ((got - exact).abs() <= 1e-6 * exact).all(), (scale, got, exact)  # each task alone


@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=["f32", "bf16", "f64"])
def test_task_rows_span_an_odd_number_of_cache_lines(dtype):
    # A row length of a power of two would put element j of every task row into one cache set
    # (eight rows overflow its eight ways); the optimizer pads its rows to an odd number of
    # 64-byte lines, and the padded rows give the reference's step.
    problem = Problem([(64, 64), (32, 32)], 8, dtype=dtype, seed=17)  # 5120 = 5·2^10 elements
    twin = problem.clone()
    opt = run_pub(pub_native.Adam, problem, 3)
    ref = run_pub(pub_native.Adam, twin, 3, backend="reference")
    line = 64 // torch.empty((), dtype=dtype).element_size()
    rows = opt._grads.row_length
    assert rows >= 5120 and rows % line == 0 and (rows // line) % 2 == 1, rows
    assert opt._grads.buffer.stride(0) == rows
    assert_states_close(opt, problem.params(), ref, twin.params(), TOL[("reference", dtype)])


@pytest.mark.parametrize("dtype", [F32, BF16, F64], ids=["f32", "bf16", "f64"])
def test_large_task_rows_are_skewed_by_an_odd_number_of_pages(dtype):
    # Rows of 4 MiB or more also shift by 37 pages (rows a power of two apart shared the
    # address bits above the page); the line count stays odd, and small rows are not skewed.
    size = torch.empty((), dtype=dtype).element_size()
    line, page = 64 // size, 4096 // size
    for n in [1, 1000, (4 << 20) // size - line, (4 << 20) // size, 16 << 20, (16 << 20) + 3]:
        rows = padded_row_length(n, dtype)
        assert rows >= n and rows % line == 0 and (rows // line) % 2 == 1, (n, rows)
        unskewed = -(-n // line)
        unskewed = (unskewed + 1 - unskewed % 2) * line
        if unskewed * size < 4 << 20:
            assert rows == unskewed, (n, rows)
        else:
            assert rows == unskewed + 37 * page, (n, rows)
            assert (rows * size // 4096) % 2 == 1  # an odd number of whole pages apart, too
    # A model whose shared rows are skewed steps as the reference does.
    problem = Problem([(1 << 19, 2), (3,)], 2, dtype=dtype, seed=19)
    twin = problem.clone()
    opt = run_pub(pub_native.Adam, problem, 2)
    ref = run_pub(pub_native.Adam, twin, 2, backend="reference")
    assert opt._grads.row_length == padded_row_length((1 << 20) + 3, dtype)
    assert opt._grads.row_length * size >= 4 << 20 or size == 2
    assert_states_close(opt, problem.params(), ref, twin.params(), TOL[("reference", dtype)])


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
@pytest.mark.parametrize("decay", [1.0, 0.5, 0.75, 0.7, 1 - 2.0**-12, -2.0])
def test_16bit_rounding_of_the_step_equals_torch(dtype, decay):
    # Every 16-bit value θ (all 65536 bit patterns) through one step whose float32 result is
    # θ·d exactly once rounded: Adam with decoupled weight decay, d = 1 − lr·wd, and zero
    # gradients (u = 0). The stored 16-bit value must be torch's conversion (round to nearest
    # even, subnormals, overflow to Inf, Inf and NaN kept) of the same float32 product.
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    theta = bits.view(dtype).clone().requires_grad_()
    lr = 1.0
    opt = pub_native.Adam([theta], lr=lr, weight_decay=1.0 - decay, decoupled_weight_decay=True)
    d32 = torch.tensor(1.0 - lr * (1.0 - decay), dtype=F64).to(F32)
    expected = (bits.view(dtype).to(F32) * d32).to(dtype)
    theta.grad = torch.zeros_like(theta)
    opt.step()
    got = theta.detach()
    nan = expected.isnan()
    assert torch.equal(got.isnan(), nan)
    mismatch = (got.view(torch.int16) != expected.view(torch.int16)) & ~nan
    assert not mismatch.any(), (bits[mismatch][:8], got[mismatch][:8], expected[mismatch][:8])
