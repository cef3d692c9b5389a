"""The PUB step against independent references, parametrized over the backends that can run here.

- K = 1 and K identical tasks: equal to torch.optim for every option combination (7 steps,
  parameters and every state entry), on the native backends and on the reference backend.
- Native (CPU, CUDA) == the float64 plain-PyTorch reference backend for K ∈ {2, 3, 8} over 10
  steps: float32/float64/16-bit, odd sizes, 100+ tensors, several param groups, every UMM, both
  solvers, weights reused, unnormalized weights.
- One step by hand: G = UᵀU of Adam's first-step updates, α from Gα = 1/α, θ ← θ − Σ α̂_i u_i.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BF16, F16, F32, F64, TOL, backends
from helpers import (
    NATIVE,
    SHAPES,
    TORCH,
    Problem,
    assert_close,
    assert_states_close,
    run_pub,
    run_torch,
)

import pub_native

DEVICES = [pytest.param(d, marks=pytest.mark.cuda) if d == "cuda" else d for d in backends()]

OPTION_SETS = {
    "adam": [dict(), dict(weight_decay=0.1), dict(amsgrad=True), dict(maximize=True),
             dict(weight_decay=0.1, decoupled_weight_decay=True),
             dict(amsgrad=True, weight_decay=0.05, maximize=True, betas=(0.8, 0.99))],
    "adagrad": [dict(), dict(lr_decay=0.1), dict(initial_accumulator_value=0.3),
                dict(weight_decay=0.1, maximize=True), dict(eps=1e-6, lr_decay=0.05)],
    "rmsprop": [dict(), dict(momentum=0.9), dict(centered=True),
                dict(momentum=0.5, centered=True, weight_decay=0.01),
                dict(maximize=True, alpha=0.9)],
}


def _ids(v):
    if isinstance(v, str):
        return v
    return ",".join(f"{a}={b}" for a, b in v.items()) or "default"


def _torch_tol(options, dtype):
    """The tolerance against torch.optim (centered RMSProp in float32 has its own)."""
    return TOL[("torch", dtype, "centered")] if options.get("centered") and dtype == F32 \
        else TOL[("torch", dtype)]


def torch_vs_pub(name, options, k, dtype, umm=None, every=1, steps=7, backend="native",
                 device="cpu"):
    problem = Problem(SHAPES["odd"], 1, dtype=dtype, seed=3, identical=True, device=device)
    twin = problem.clone()
    ref = run_torch(TORCH[name](twin.groups(), **options), twin, steps)
    problem.k = k
    problem.heads = problem.heads[:1]
    opt = NATIVE[name](problem.groups(), **options, shared=problem.shared, umm=umm,
                       update_weights_every=every, backend=backend)
    run_pub(None, problem, steps, opt=opt)
    tol = _torch_tol(options, dtype)
    for j, (pa, pb) in enumerate(zip(problem.params(), twin.params())):
        assert_close(pa, pb, tol, f"param {j}")
        for key, value in ref.state[pb].items():
            mine = opt.state[pa]
            if umm == "adatask" and j < len(problem.shared) and key != "step":
                # One task: the single per-task state is torch's state.
                assert_close(mine["task_" + key].reshape(value.shape), value, tol, key)
            else:
                assert_close(mine[key], value, tol, f"param {j} state {key!r}")
    return opt


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name,options",
                         [(n, o) for n, sets in OPTION_SETS.items() for o in sets], ids=_ids)
def test_one_or_identical_tasks_equal_torch(name, options, k, dtype, backend):
    opt = torch_vs_pub(name, options, k, dtype, backend=backend)
    assert torch.allclose(opt.task_weights, torch.full((k,), 1.0 / k, dtype=F64), atol=1e-12)


@pytest.mark.parametrize("name", sorted(NATIVE))
@pytest.mark.parametrize("umm,every", [(None, 3), ("adatask", 1), ("clippy", 1)])
def test_one_task_with_umm_or_reuse_equals_torch(name, umm, every):
    # One task: AdaTask's per-task state is the state, α̂ = 1, and Clippy with huge thresholds
    # never clips, so each is the base optimizer.
    kw = dict(clippy_lambda_rel=1e6, clippy_lambda_abs=1e6) if umm == "clippy" else {}
    problem = Problem(SHAPES["small"], 1, dtype=F64, seed=4, identical=True)
    twin = problem.clone()
    ref = TORCH[name](twin.groups())
    opt = NATIVE[name](problem.groups(), shared=problem.shared, umm=umm,
                       update_weights_every=every, **kw)
    run_torch(ref, twin, 7)
    run_pub(None, problem, 7, opt=opt)
    for pa, pb in zip(problem.params(), twin.params()):
        assert_close(pa, pb, TOL[("torch", F64)])


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_decoupled_weight_decay_is_adamw_in_every_group(backend):
    # On any torch (before 2.6 its Adam has no such option, and the optimizer keeps it in the
    # defaults itself): a group added later inherits it, a group may set its own.
    torch.manual_seed(4)
    a = [torch.randn(6, dtype=F64, requires_grad=True) for _ in range(3)]
    b = [p.detach().clone().requires_grad_() for p in a]
    mine = NATIVE["adam"]([a[0]], lr=0.1, weight_decay=0.2, decoupled_weight_decay=True,
                          backend=backend)
    mine.add_param_group({"params": [a[1]]})
    mine.add_param_group({"params": [a[2]], "decoupled_weight_decay": False})
    theirs = torch.optim.AdamW([{"params": b[:2]}], lr=0.1, weight_decay=0.2)
    plain = torch.optim.Adam([b[2]], lr=0.1, weight_decay=0.2)
    assert [g["decoupled_weight_decay"] for g in mine.param_groups] == [True, True, False]
    for t in range(3):
        for ps, opts in ((a, [mine]), (b, [theirs, plain])):
            for o in opts:
                o.zero_grad()
            sum(((p - t) ** 2).sum() for p in ps).backward()
            for o in opts:
                o.step()
    for pa, pb in zip(a, b):
        assert_close(pa, pb, TOL[("torch", F64)], "param")


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_adagrad_starts_a_later_groups_sum_as_torch_does(backend):
    # torch's Adagrad starts the `sum` of a group added later, at its first step, from the
    # constructor's initial_accumulator_value, not from the group's own (which it keeps in the
    # group, unused, as it does for the groups given at construction). K = 1 is torch's step.
    torch.manual_seed(5)
    a = [torch.randn(6, dtype=F64, requires_grad=True) for _ in range(3)]
    b = [p.detach().clone().requires_grad_() for p in a]
    mine = NATIVE["adagrad"]([{"params": [a[0]], "initial_accumulator_value": 0.7}], lr=0.1,
                             initial_accumulator_value=1.5, backend=backend)
    theirs = torch.optim.Adagrad([{"params": [b[0]], "initial_accumulator_value": 0.7}],
                                 lr=0.1, initial_accumulator_value=1.5)
    mine.add_param_group({"params": [a[1]], "initial_accumulator_value": 3.0})
    mine.add_param_group({"params": [a[2]]})
    theirs.add_param_group({"params": [b[1]], "initial_accumulator_value": 3.0})
    theirs.add_param_group({"params": [b[2]]})
    for t in range(3):
        for ps, o in ((a, mine), (b, theirs)):
            o.zero_grad()
            sum(((p - t) ** 2).sum() for p in ps).backward()
            try:
                o.step()
            except KeyError:  # torch before 2.5 makes no state for a group added later
                assert o is theirs
                pytest.skip("this torch's Adagrad cannot step a group added later")
    for pa, pb in zip(a, b):
        assert_close(pa, pb, TOL[("torch", F64)], "param")
    for pa, pb in zip(a, b):
        assert_close(mine.state[pa]["sum"], theirs.state[pb]["sum"], TOL[("torch", F64)], "sum")


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_plain_backward_step_is_the_base_optimizer(name):
    # step() after loss.backward(), before and after PUB steps, is torch's step (K = 1) on every
    # parameter, shared ones included.
    problem = Problem(SHAPES["small"], 2, dtype=F64, seed=5)
    twin = problem.clone()
    opt = NATIVE[name](problem.groups(), weight_decay=0.01)
    ref = NATIVE[name](twin.groups(), weight_decay=0.01, backend="reference")
    for t in range(6):
        for o, pr in ((opt, problem), (ref, twin)):
            o.zero_grad()
            if t % 2:
                sum(pr.losses(t)).backward()
            else:
                o.backward(pr.losses(t))
            o.step()
    assert_states_close(opt, problem.params(), ref, twin.params(), TOL[("reference", F64)])
    # ... and equal to torch's optimizer on a plain-only run.
    p1 = Problem(SHAPES["small"], 2, dtype=F64, seed=6)
    p2 = p1.clone()
    mine, theirs = NATIVE[name](p1.groups()), TORCH[name](p2.groups())
    for t in range(5):
        for o, pr in ((mine, p1), (theirs, p2)):
            o.zero_grad()
            sum(pr.losses(t)).backward()
            o.step()
    assert_states_close(mine, p1.params(), theirs, p2.params(), TOL[("torch", F64)])


CASES = [
    # name, shapes, K, dtype, options
    ("adam", "odd", 2, F64, dict()),
    ("adam", "odd", 3, F32, dict(weight_decay=0.01, amsgrad=True)),
    ("adam", "many", 8, F32, dict(decoupled_weight_decay=True, weight_decay=0.1)),
    ("adam", "many", 3, F64, dict(solver="ccp", update_weights_every=3)),
    ("adam", "odd", 3, F64, dict(umm="clippy")),
    ("adam", "odd", 2, F32, dict(umm="clippy", clippy_preset="tfrs")),
    ("adam", "many", 3, F32, dict(umm="adatask", amsgrad=True)),
    ("adam", "odd", 8, F64, dict(umm="adatask", update_weights_every=4)),
    ("adam", "odd", 3, F64, dict(weight_norm="none", maximize=True)),
    ("adagrad", "odd", 2, F64, dict(lr_decay=0.1, weight_decay=0.01)),
    ("adagrad", "many", 8, F32, dict(initial_accumulator_value=0.1, solver="ccp")),
    ("adagrad", "odd", 3, F64, dict(umm="clippy", clippy_lambda_rel=0.05)),
    ("adagrad", "odd", 3, F32, dict(umm="adatask", update_weights_every=2)),
    ("rmsprop", "odd", 2, F64, dict(momentum=0.9, centered=True)),
    ("rmsprop", "many", 3, F32, dict(centered=True, weight_decay=0.01)),
    ("rmsprop", "odd", 8, F32, dict(momentum=0.5, umm="clippy")),
    ("rmsprop", "odd", 3, F64, dict(momentum=0.9, umm="adatask", solver="ccp")),
    ("rmsprop", "many", 2, F64, dict(update_weights_every=5)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "name,shapes,k,dtype,options", CASES,
    ids=[f"{c[0]}-{c[1]}-K{c[2]}-{str(c[3])[6:]}-" + _ids(c[4]) for c in CASES],
)
def test_native_equals_reference(name, shapes, k, dtype, options, device):
    if device == "cuda" and dtype == F64:
        pytest.skip("the CUDA step takes float32 and 16-bit parameters")
    problem = Problem(SHAPES[shapes], k, dtype=dtype, seed=11, device=device)
    twin = problem.clone(device="cpu")
    opt = run_pub(NATIVE[name], problem, 10, **options)
    ref = run_pub(NATIVE[name], twin, 10, backend="reference", **options)
    tol = TOL[(device if device == "cuda" else "reference", dtype)]
    assert_close(opt.task_weights, ref.task_weights, tol, "task weights")
    assert_states_close(opt, problem.params(), ref, twin.params(), tol)
    assert [id(p) for p in opt.shared_parameters] == [id(p) for p in problem.shared]
    assert opt.stats["status"] == pub_native.SolveStatus.CONVERGED


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name,options", [("adam", {}), ("rmsprop", dict(momentum=0.9)),
                                          ("adagrad", dict(umm="adatask")),
                                          ("adagrad", {})])
def test_16bit_parameters_have_float32_state(name, options, dtype, device):
    problem = Problem(SHAPES["odd"], 3, dtype=dtype, seed=12, device=device)
    twin = problem.clone(device="cpu")
    opt = run_pub(NATIVE[name], problem, 5, lr=1e-3, **options)
    ref = run_pub(NATIVE[name], twin, 5, lr=1e-3, backend="reference", **options)
    for p in problem.params():  # shared and task-specific alike
        for key, value in opt.state[p].items():
            assert value.dtype == F32, key
    assert_states_close(opt, problem.params(), ref, twin.params(), TOL[("reference", dtype)])


def test_gram_and_weights_match_definition():
    # One step by hand: u_i from Adam's first step, G = UᵀU, α solves Gα = 1/α, θ ← θ − Σα̂u.
    problem = Problem(SHAPES["small"], 3, dtype=F64, seed=13)
    before = [p.detach().clone() for p in problem.shared]
    opt = pub_native.Adam(problem.groups(lrs=(1e-2, 1e-2, 1e-2)), eps=1e-8)
    opt.zero_grad()
    losses = problem.losses(0)
    grads = [torch.autograd.grad(loss, problem.shared, retain_graph=True) for loss in losses]
    opt.backward(losses)
    opt.step()
    # Adam step 1 from zero state: m̂ = g, v̂ = g², so u = lr · g / (|g| + ε) elementwise.
    U = torch.stack([torch.cat([(1e-2 * g / (g.abs() + 1e-8)).reshape(-1) for g in gs])
                     for gs in grads])
    G = U @ U.T
    alpha = torch.as_tensor(pub_native.solve_weights(G.numpy()).weights)
    assert_close(opt.task_weights, alpha / alpha.sum(), 1e-10, "α̂")
    ridged = G + 1e-8 * torch.diag(torch.diag(G))  # the default ridge ρ·diag(G)
    res = ridged @ alpha - 1 / alpha
    assert res.norm() / (1 / alpha).norm() < 1e-10
    step = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, problem.shared)])
    assert_close(step, U.T @ opt.task_weights, 1e-10, "applied update")


@pytest.mark.parametrize("device", DEVICES)
def test_identical_tasks_with_weights_unnormalized_scale_the_step(device):
    # weight_norm="none": K identical tasks give α = 1/sqrt(K)·1/‖u‖, so the applied step is
    # √K·u/‖u‖ (the paper's literal formula), checked against the reference backend.
    problem = Problem(SHAPES["small"], 3, dtype=F32, seed=14, identical=True, device=device)
    twin = problem.clone(device="cpu")
    opt = run_pub(pub_native.Adam, problem, 3, weight_norm="none")
    ref = run_pub(pub_native.Adam, twin, 3, weight_norm="none", backend="reference")
    assert_states_close(opt, problem.params(), ref, twin.params(), TOL[("reference", F32)])


def test_turning_on_weight_decay_mid_run_matches_reference():
    # The kernel configuration (whether the Gram pass reads θ for L2 decay) follows a param
    # group's options when they change between steps.
    problem = Problem(SHAPES["odd"], 2, dtype=F64, seed=44)
    twin = problem.clone()
    opt = pub_native.Adam(problem.groups())
    ref = pub_native.Adam(twin.groups(), backend="reference")
    for t in range(6):
        if t == 3:
            for o in (opt, ref):
                for g in o.param_groups:
                    g["weight_decay"] = 0.5
        for o, pr in ((opt, problem), (ref, twin)):
            o.zero_grad()
            o.backward(pr.losses(t))
            o.step()
    assert_states_close(opt, problem.params(), ref, twin.params(), TOL[("reference", F64)])


@pytest.mark.parametrize("dtype", [BF16, F16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name", sorted(NATIVE))
def test_plain_steps_before_pub_steps_keep_float32_state_for_16bit(name, dtype):
    # Plain steps (loss.backward(), step()) first make the state, then PUB steps continue it:
    # the state is float32 throughout and the run equals the reference's.
    problem = Problem(SHAPES["odd"], 2, dtype=dtype, seed=15)
    twin = problem.clone()
    opt = NATIVE[name](problem.groups())
    ref = NATIVE[name](twin.groups(), backend="reference")
    for t in range(5):
        for o, pr in ((opt, problem), (ref, twin)):
            o.zero_grad()
            if t < 2:
                sum(pr.losses(t)).backward()
            else:
                o.backward(pr.losses(t))
            o.step()
    for p in problem.params():
        assert all(v.dtype == F32 for k, v in opt.state[p].items() if k != "step")
    assert_states_close(opt, problem.params(), ref, twin.params(), TOL[("reference", dtype)])


def _nonfinite_params(dtype, device="cpu"):
    """Two parameters with ±Inf and NaN entries among finite ones, and loss directions (the
    gradients, finite whatever the parameters hold)."""
    gen = torch.Generator().manual_seed(11)
    params, dirs = [], []
    for n in (37, 300):
        p = torch.randn(n, generator=gen, dtype=F64)
        p[3], p[7], p[n - 1] = float("inf"), -float("inf"), float("nan")
        params.append(p.to(dtype=dtype, device=device).requires_grad_())
        dirs.append([torch.randn(n, generator=gen, dtype=F64).to(dtype=dtype, device=device)
                     for _ in range(2)])
    return params, dirs


def _assert_close_nan(actual, expected, tol, what):
    """NaN where expected has NaN, equal infinities, and the rest as assert_close has it."""
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN elsewhere"
    inf = expected.isinf()
    assert torch.equal(actual[inf], expected[inf]), f"{what}: infinities differ"
    finite = expected.isfinite()
    assert_close(actual[finite], expected[finite], tol, what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("name,options", [
    ("adam", dict()), ("adam", dict(amsgrad=True)),
    ("adam", dict(weight_decay=0.1, decoupled_weight_decay=True)),
    ("adagrad", dict()), ("rmsprop", dict(momentum=0.9, centered=True)),
    ("adam", dict(weight_decay=0.1)), ("rmsprop", dict(weight_decay=0.01))], ids=_ids)
def test_nonfinite_parameters_step_as_torch(name, options, dtype, backend, device):
    # torch adds the L2 term only when weight_decay ≠ 0: with 0, an infinite or NaN parameter
    # stays as it is and leaves the state finite (0·Inf would be NaN). With L2 weight decay,
    # torch's update there is NaN: a plain step (K = 1 on .grad) makes it so too, a PUB step
    # that solves for the weights (here with one task) refuses the non-finite update, names
    # the parameter and changes nothing (SPEC section 7).
    l2 = bool(options.get("weight_decay")) and not options.get("decoupled_weight_decay")
    for pub in (False, True):
        mine, dirs = _nonfinite_params(dtype, device)
        theirs = [p.detach().clone().requires_grad_() for p in mine]
        kw = dict(shared=mine) if pub else {}
        opt = NATIVE[name](mine, **options, backend=backend, **kw)
        ref = TORCH[name](theirs, **options)
        if pub and l2:
            opt.backward([sum((p * d[0]).sum() for p, d in zip(mine, dirs))])
            with pytest.raises(FloatingPointError, match="hold Inf or NaN"):
                opt.step()
            for pa, pb in zip(mine, theirs):
                assert torch.equal(pa.isnan(), pb.isnan())
                assert torch.equal(pa.nan_to_num(), pb.nan_to_num()), "changed by a refused step"
            continue
        for t in range(3):
            for o, ps in ((opt, mine), (ref, theirs)):
                o.zero_grad()
                loss = sum((p * d[t % 2]).sum() for p, d in zip(ps, dirs))
                if pub and o is opt:
                    o.backward([loss])
                else:
                    loss.backward()
                o.step()
        tol = _torch_tol(options, dtype)
        for j, (pa, pb) in enumerate(zip(mine, theirs)):
            what = f"pub={pub} param {j}"
            _assert_close_nan(pa.detach(), pb.detach(), tol, what)
            for key, value in ref.state[pb].items():
                if key == "step":
                    continue
                _assert_close_nan(opt.state[pa][key].reshape(value.shape), value, tol,
                                  f"{what} state {key!r}")
            if not l2:
                # The state of an infinite or NaN parameter stays finite, as torch's does.
                for key, value in opt.state[pa].items():
                    if key != "step":
                        assert torch.isfinite(value).all(), f"{what} state {key!r}"


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_nonfinite_parameters_in_a_pub_step(backend):
    # K = 2 with Clippy, which reads θ: an infinite or NaN parameter without weight decay stays
    # as it is, and every other coordinate steps as the float64 reference has it.
    results = []
    for b in (backend, "reference"):
        params, dirs = _nonfinite_params(F64)
        opt = pub_native.Adam(params, shared=params, umm="clippy", backend=b)
        for _ in range(3):
            opt.zero_grad()
            opt.backward([sum((p * d[i]).sum() for p, d in zip(params, dirs)) for i in range(2)])
            opt.step()
        assert torch.isfinite(opt.task_weights).all()
        results.append([p.detach().clone() for p in params])
    for j, (pa, pb) in enumerate(zip(*results)):
        assert pa.isinf().sum() == 2 and pa.isnan().sum() == 1, f"param {j}"
        _assert_close_nan(pa, pb, TOL[("reference", F64)], f"param {j}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("name,options", [
    ("adam", dict()), ("adam", dict(maximize=True)), ("adagrad", dict()),
    ("adagrad", dict(weight_decay=0.1)), ("rmsprop", dict()),
    ("rmsprop", dict(centered=True, momentum=0.9))], ids=_ids)
def test_signed_zeros_step_as_torch(name, options, dtype, backend, device):
    # Every pair of θ, g ∈ {+0, −0}, beside a coordinate that moves: the same values and the
    # same signs of zero as torch's step, in the parameters and the state (plain steps and PUB
    # steps with one task, whose weight is 1).
    theta = torch.tensor([0.0, -0.0, 0.0, -0.0, 1.0], dtype=dtype, device=device)
    grad = torch.tensor([0.0, -0.0, -0.0, 0.0, 0.5], dtype=dtype, device=device)
    for pub in (False, True):
        mine, theirs = theta.clone().requires_grad_(), theta.clone().requires_grad_()
        opt = NATIVE[name]([mine], **options, backend=backend,
                           **(dict(shared=[mine]) if pub else {}))
        ref = TORCH[name]([theirs], **options)
        for _ in range(2):
            if pub:
                opt.zero_grad()
                opt.backward([(mine * grad).sum()])  # ∂/∂θ is grad itself, signs of zero too
            else:
                mine.grad = grad.clone()
            theirs.grad = grad.clone()
            opt.step()
            ref.step()
        pairs = [(mine.detach(), theirs.detach(), "param")]
        pairs += [(opt.state[mine][k], v, k) for k, v in ref.state[theirs].items() if k != "step"]
        for a, b, what in pairs:
            assert torch.equal(a[:4], b[:4]) and torch.equal(a[:4].signbit(), b[:4].signbit()), \
                (pub, what, a.tolist(), b.tolist())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_clippy_without_a_relative_bound_ignores_theta(backend, dtype, device):
    # λ_rel = 0: the bound is λ_abs whatever θ holds, so an infinite or NaN θ[0] clips the other
    # coordinates exactly as a finite one does (0·Inf would be NaN, a bound the minimum ignores,
    # letting the largest update escape the clip).
    steps = []
    for first in (5.0, float("inf"), float("nan")):
        theta = torch.tensor([first, 0.3, -0.2, 0.1], dtype=dtype, device=device,
                             requires_grad=True)
        opt = pub_native.Adam([theta], lr=0.1, shared=[theta], umm="clippy",
                              clippy_lambda_rel=0.0, clippy_lambda_abs=1e-5, backend=backend)
        d = [torch.tensor([1.0, 2.0, -3.0, 0.5], dtype=dtype, device=device),
             torch.tensor([0.5, -1.0, 4.0, 2.0], dtype=dtype, device=device)]
        before = theta.detach().clone()
        opt.backward([(theta * d[i]).sum() for i in range(2)])
        opt.step()
        steps.append((theta.detach() - before)[1:])
        assert steps[-1].abs().max() <= 2e-5, steps[-1]  # clipped to about λ_abs per task
    assert torch.equal(steps[0], steps[1]) and torch.equal(steps[0], steps[2]), steps
