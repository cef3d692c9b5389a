"""The native PUB optimizers (pub_native.Adam / AdaGrad / RMSProp) against independent references.

- K = 1 and K identical tasks: equal to torch.optim for every option combination (7 steps,
  parameters and every state entry).
- Native == the plain-PyTorch reference (pub_native.reference) for K ∈ {2, 3, 8} over 10 steps,
  float32/float64/16-bit, odd sizes, 100+ tensors, several param groups, every UMM, both solvers.
- Shared-parameter detection on an MMoE model, checkpoints, LR schedulers, SPEC §7 errors.
"""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
from torch import nn

import pub_native
from pub_native.reference import ReferenceAdaGrad, ReferenceAdam, ReferenceRMSProp

F64, F32 = torch.float64, torch.float32

# Max-abs error relative to the max-abs of the expected tensor, by comparison and dtype.
TOL = {
    # Same equations, float64, operations in another order: a few ulps after 7-10 steps.
    ("torch", F64): 1e-12,
    ("reference", F64): 1e-11,
    # float32: torch's kernels fuse multiply-adds and divide by sqrt(1 − β2^t) where the native
    # kernel multiplies by its inverse; the per-step rounding differences (~1e-7 relative of an
    # update) carry through the Adam denominators of coordinates with tiny v. 10 steps.
    ("torch", F32): 2e-6,
    # centered RMSProp divides by sqrt(v − a²): the cancellation amplifies those differences.
    ("torch", F32, "centered"): 2e-5,
    # ... plus α̂ from G summed in another order and solved from float32 updates.
    ("reference", F32): 2e-5,
    # 16-bit parameters, float32 state and math: the stored parameter is one rounding of the
    # float32 result, so it may differ by an ulp of the 16-bit type at its own magnitude, which
    # is up to two ulps at the largest (bf16: 2^-7 per unit, f16: 2^-10 per unit).
    ("reference", torch.bfloat16): 2 ** -6,
    ("reference", torch.float16): 2 ** -9,
}

NATIVE = {"adam": pub_native.Adam, "adagrad": pub_native.AdaGrad, "rmsprop": pub_native.RMSProp}
REFERENCE = {"adam": ReferenceAdam, "adagrad": ReferenceAdaGrad, "rmsprop": ReferenceRMSProp}
TORCH = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "rmsprop": torch.optim.RMSprop}


def assert_close(actual, expected, tol, what=""):
    actual = actual.detach().to(F64)
    expected = expected.detach().to(F64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if expected.numel() == 0:
        return
    scale = max(expected.abs().max().item(), 1e-30)
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:g} × {scale:.3e}"


def assert_states_close(opt_a, params_a, opt_b, params_b, tol):
    for j, (pa, pb) in enumerate(zip(params_a, params_b)):
        assert_close(pa, pb, tol, f"param {j}")
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert set(sa) == set(sb), f"param {j}: state keys {sorted(sa)} != {sorted(sb)}"
        for key in sb:
            assert_close(sa[key], sb[key], tol, f"param {j} state {key!r}")


# ---- problems -----------------------------------------------------------------------------------


SHAPES = {
    "small": [(5, 3), (3,)],
    "odd": [(1,), (4097,), (3, 5, 7), (2, 1, 3)],
    "many": [((i % 7) + 1, (i % 5) + 1) for i in range(100)] + [(1,), (33,)],
}


class Problem:
    """K task losses over shared tensors (quadratics with task-specific linear terms, so the
    tasks conflict) plus one task-specific head per task."""

    def __init__(self, shapes, k, dtype=F64, seed=0, identical=False):
        g = torch.Generator().manual_seed(seed)
        self.k = k
        self.shared = [torch.randn(s, generator=g, dtype=F64).to(dtype).requires_grad_()
                       for s in shapes]
        self.heads = [torch.randn(3, generator=g, dtype=F64).to(dtype).requires_grad_()
                      for _ in range(k)]
        n_tasks = 1 if identical else k
        self.a = [[torch.randn(s, generator=g, dtype=F64) for s in shapes] for _ in range(n_tasks)]
        self.b = [[torch.rand(s, generator=g, dtype=F64) + 0.5 for s in shapes]
                  for _ in range(n_tasks)]
        self.identical = identical

    def params(self):
        return self.shared + self.heads

    def groups(self, lrs=(1e-2, 3e-3, 5e-3)):
        half = len(self.shared) // 2 or 1
        groups = [{"params": self.shared[:half], "lr": lrs[0]}]
        if self.shared[half:]:
            groups.append({"params": self.shared[half:], "lr": lrs[1]})
        groups.append({"params": self.heads, "lr": lrs[2]})
        return groups

    def losses(self, step):
        out = []
        for i in range(self.k):
            j = 0 if self.identical else i
            scale = 1.0 + 0.1 * step
            loss = sum(
                ((a.to(p.dtype) * p).sum() + 0.5 * (b.to(p.dtype) * p * p).sum()) * scale
                for p, a, b in zip(self.shared, self.a[j], self.b[j])
            )
            head = self.heads[0] if self.identical else self.heads[i]
            if self.identical:
                # K identical tasks share one head: each carries 1/K of its loss, so the head's
                # gradient (summed over tasks) is that of one task.
                loss = loss + (head * head).sum() / self.k
            else:
                loss = loss + (head * head).sum() * (1.0 + 0.1 * self.shared[0].reshape(-1)[0])
            out.append(loss)
        return out

    def clone(self):
        return copy.deepcopy(self)


def run_pub(opt_cls, problem, steps, **kw):
    opt = opt_cls(problem.groups(), **kw)
    for t in range(steps):
        opt.zero_grad()
        opt.backward(problem.losses(t))
        opt.step()
    return opt


# ---- K = 1 and K identical tasks == torch.optim -------------------------------------------------


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


def _torch_vs_pub(name, options, k, dtype, umm=None, every=1, steps=7):
    problem = Problem(SHAPES["odd"], 1, dtype=dtype, seed=3, identical=True)
    twin = problem.clone()
    ref = TORCH[name](twin.groups(), **options)
    for t in range(steps):
        ref.zero_grad()
        twin.losses(t)[0].backward()
        ref.step()
    problem.k = k
    problem.heads = problem.heads[:1]
    opt = NATIVE[name](problem.groups(), **options, shared=problem.shared, umm=umm,
                       update_weights_every=every)
    for t in range(steps):
        opt.zero_grad()
        opt.backward(problem.losses(t))
        opt.step()
    tol = TOL[("torch", dtype, "centered")] if options.get("centered") and dtype == F32 \
        else TOL[("torch", dtype)]
    for j, (pa, pb) in enumerate(zip(problem.params(), twin.params())):
        assert_close(pa, pb, tol, f"param {j}")
        if umm == "adatask":
            continue
        for key, value in ref.state[pb].items():
            assert_close(opt.state[pa][key], value, tol, f"param {j} state {key!r}")
    if umm == "adatask" and k == 1:
        for pa, pb in zip(problem.shared, twin.shared):
            for key, value in ref.state[pb].items():
                mine = opt.state[pa]["step" if key == "step" else "task_" + key]
                assert_close(mine.reshape(value.shape), value, tol, key)
    return opt


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize(
    "name,options",
    [(n, o) for n, sets in OPTION_SETS.items() for o in sets],
    ids=lambda v: (v if isinstance(v, str)
                   else ",".join(f"{a}={b}" for a, b in v.items()) or "default"),
)
def test_one_or_identical_tasks_equal_torch(name, options, k, dtype):
    opt = _torch_vs_pub(name, options, k, dtype)
    assert torch.allclose(opt.task_weights, torch.full((k,), 1.0 / k, dtype=F64), atol=1e-12)


@pytest.mark.parametrize("name", sorted(NATIVE))
@pytest.mark.parametrize("umm,every", [(None, 3), ("adatask", 1), ("clippy", 1)])
def test_one_task_with_umm_or_reuse_equals_torch(name, umm, every):
    # One task: AdaTask's per-task state is the state, α̂ = 1 and Clippy with huge thresholds
    # never clips, so each is the base optimizer.
    kw = {}
    if umm == "clippy":
        kw = dict(clippy_lambda_rel=1e6, clippy_lambda_abs=1e6)
    problem = Problem(SHAPES["small"], 1, dtype=F64, seed=4, identical=True)
    twin = problem.clone()
    ref = TORCH[name](twin.groups())
    opt = NATIVE[name](problem.groups(), shared=problem.shared, umm=umm,
                       update_weights_every=every, **kw)
    for t in range(7):
        ref.zero_grad()
        twin.losses(t)[0].backward()
        ref.step()
        opt.zero_grad()
        opt.backward(problem.losses(t))
        opt.step()
    for pa, pb in zip(problem.params(), twin.params()):
        assert_close(pa, pb, TOL[("torch", F64)])


def test_plain_backward_step_is_the_base_optimizer():
    # step() after loss.backward(), before and after PUB steps, is torch's step (K = 1).
    problem = Problem(SHAPES["small"], 2, dtype=F64, seed=5)
    twin = problem.clone()
    opt = pub_native.Adam(problem.groups(), weight_decay=0.01)
    ref = ReferenceAdam(twin.groups(), weight_decay=0.01)
    for t in range(6):
        for o, pr in ((opt, problem), (ref, twin)):
            o.zero_grad()
            if t % 2:
                sum(pr.losses(t)).backward()
            else:
                o.backward(pr.losses(t))
            o.step()
    assert_states_close(opt, problem.params(), ref, twin.params(), TOL[("reference", F64)])


# ---- native == reference ------------------------------------------------------------------------


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


@pytest.mark.parametrize(
    "name,shapes,k,dtype,options", CASES,
    ids=[f"{c[0]}-{c[1]}-K{c[2]}-{str(c[3])[6:]}-" + ",".join(f"{a}={b}" for a, b in c[4].items())
         for c in CASES],
)
def test_native_equals_reference(name, shapes, k, dtype, options):
    problem = Problem(SHAPES[shapes], k, dtype=dtype, seed=11)
    twin = problem.clone()
    opt = run_pub(NATIVE[name], problem, 10, **options)
    ref = run_pub(REFERENCE[name], twin, 10, **options)
    tol = TOL[("reference", dtype)]
    assert_close(opt.task_weights, ref.task_weights, tol, "task weights")
    assert_states_close(opt, problem.params(), ref, twin.params(), tol)
    assert [id(p) for p in opt.shared_parameters] == [id(p) for p in problem.shared]
    assert opt.stats["status"] == pub_native.SolveStatus.CONVERGED


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name,options", [("adam", {}), ("rmsprop", dict(momentum=0.9)),
                                          ("adagrad", dict(umm="adatask"))])
def test_16bit_parameters_have_float32_state(name, options, dtype):
    problem = Problem(SHAPES["odd"], 3, dtype=dtype, seed=12)
    twin = problem.clone()
    opt = run_pub(NATIVE[name], problem, 5, lr=1e-3, **options)
    ref = run_pub(REFERENCE[name], twin, 5, lr=1e-3, **options)
    tol = TOL[("reference", dtype)]
    for p in problem.shared:
        for key, value in opt.state[p].items():
            if key != "step":
                assert value.dtype == F32, key
    assert_states_close(opt, problem.params(), ref, twin.params(), tol)


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
    U = torch.stack([
        torch.cat([(1e-2 * g / (g.abs() + 1e-8)).reshape(-1) for g in gs])
        for gs in grads
    ])
    G = U @ U.T
    w = opt.task_weights
    alpha = torch.as_tensor(pub_native.solve_weights(G.numpy()).weights)
    assert_close(w, alpha / alpha.sum(), 1e-10, "α̂")
    ridged = G + 1e-8 * G.trace() / 3 * torch.eye(3, dtype=F64)  # the default ridge ρ·trG/K
    res = ridged @ alpha - 1 / alpha
    assert res.norm() / (1 / alpha).norm() < 1e-10
    step = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, problem.shared)])
    assert_close(step, U.T @ w, 1e-10, "applied update")


# ---- shared-parameter detection -----------------------------------------------------------------


class MMoE(nn.Module):
    def __init__(self, d_in=6, n_experts=4, d_expert=5, k=2):
        super().__init__()
        self.embedding = nn.Embedding(10, d_in)
        self.experts = nn.ModuleList(nn.Linear(d_in, d_expert) for _ in range(n_experts))
        self.gates = nn.ModuleList(nn.Linear(d_in, n_experts) for _ in range(k))
        self.towers = nn.ModuleList(nn.Linear(d_expert, 1) for _ in range(k))

    def forward(self, idx):
        x = self.embedding(idx).mean(1)
        e = torch.stack([torch.relu(ex(x)) for ex in self.experts], 1)  # (B, E, D)
        outs = []
        for gate, tower in zip(self.gates, self.towers):
            w = torch.softmax(gate(x), -1).unsqueeze(-1)
            outs.append(tower((w * e).sum(1)).squeeze(-1))
        return outs


@pytest.mark.parametrize("as_tensor", [False, True], ids=["list", "stacked"])
def test_mmoe_shared_detection(as_tensor):
    torch.manual_seed(0)
    model = MMoE()
    idx = torch.randint(0, 10, (8, 3))
    y = torch.randn(8)
    opt = pub_native.Adam(model.parameters(), lr=1e-2)
    outs = model(idx)
    losses = [((o - y) ** 2).mean() for o in outs]
    opt.backward(torch.stack(losses) if as_tensor else losses)
    expected = {id(p) for p in itertools.chain(model.embedding.parameters(),
                                               model.experts.parameters())}
    assert {id(p) for p in opt.shared_parameters} == expected
    for module in (*model.gates, *model.towers):
        for p in module.parameters():
            assert p.grad is not None
    for p in opt.shared_parameters:
        assert p.grad is None
    before = {id(p): p.detach().clone() for p in model.parameters()}
    opt.step()
    assert all(not torch.equal(before[id(p)], p) for p in model.parameters())


def test_explicit_shared_and_group_flag_override_detection():
    torch.manual_seed(0)
    model = MMoE()
    idx = torch.randint(0, 10, (8, 3))
    experts = list(model.experts.parameters())
    opt = pub_native.Adam(model.parameters(), shared=experts)
    opt.backward([o.mean() for o in model(idx)])
    assert [id(p) for p in opt.shared_parameters] == [id(p) for p in experts]
    assert model.embedding.weight.grad is not None
    opt2 = pub_native.Adam([{"params": model.experts.parameters(), "shared": True},
                            {"params": model.embedding.parameters(), "shared": False},
                            {"params": itertools.chain(model.gates.parameters(),
                                                       model.towers.parameters())}])
    opt2.backward([o.mean() for o in model(idx)])
    assert [id(p) for p in opt2.shared_parameters] == [id(p) for p in experts]


# ---- checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("name,options", [("adam", dict(amsgrad=True, update_weights_every=3)),
                                          ("adagrad", dict(umm="adatask")),
                                          ("rmsprop", dict(momentum=0.9, umm="clippy",
                                                           solver="ccp"))])
@pytest.mark.parametrize("dtype", [F32, torch.bfloat16], ids=["f32", "bf16"])
def test_checkpoint_continues_bit_for_bit(name, options, dtype):
    problem = Problem(SHAPES["odd"], 3, dtype=dtype, seed=21)
    opt = NATIVE[name](problem.groups(), **options)
    for t in range(4):
        opt.zero_grad()
        opt.backward(problem.losses(t))
        opt.step()
    buf = io.BytesIO()
    torch.save({"problem": problem, "opt": opt.state_dict()}, buf)
    for t in range(4, 9):
        opt.zero_grad()
        opt.backward(problem.losses(t))
        opt.step()
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    fresh = saved["problem"]
    opt2 = NATIVE[name](fresh.groups(), **options)
    opt2.load_state_dict(saved["opt"])
    for t in range(4, 9):
        opt2.zero_grad()
        opt2.backward(fresh.losses(t))
        opt2.step()
    for j, (pa, pb) in enumerate(zip(problem.params(), fresh.params())):
        assert torch.equal(pa, pb), f"param {j}"
        for key in opt.state[pa]:
            assert torch.equal(opt.state[pa][key], opt2.state[pb][key]), (j, key)
    assert torch.equal(opt.task_weights, opt2.task_weights)


def test_state_dict_uses_torch_names_and_loads_weights_only():
    problem = Problem(SHAPES["small"], 2, dtype=F32, seed=22)
    opt = run_pub(pub_native.Adam, problem, 2)
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded["pub"]["num_tasks"] == 2


def test_load_state_dict_mismatch_raises_and_keeps_optimizer():
    problem = Problem(SHAPES["small"], 2, dtype=F32, seed=23)
    opt = run_pub(pub_native.Adam, problem, 2)
    other = Problem(SHAPES["small"], 3, dtype=F32, seed=23)
    sd3 = run_pub(pub_native.Adam, other, 1).state_dict()
    snapshot = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="K = 3"):
        opt.load_state_dict(sd3)
    bad = copy.deepcopy(snapshot)
    bad["state"][0]["exp_avg"] = torch.zeros(7)
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["pub"]["step"] == snapshot["pub"]["step"]
    for key, st in snapshot["state"].items():
        for name, value in st.items():
            assert torch.equal(after["state"][key][name], value)


# ---- schedulers, zero_grad, repr ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(NATIVE))
@pytest.mark.parametrize("sched", ["step", "onecycle", "plateau"])
def test_lr_schedulers_drive_pub_like_torch(name, sched):
    if sched == "onecycle" and name == "adagrad":
        pytest.skip("Adagrad has no momentum or betas for OneCycleLR's cycle_momentum")
    extra = dict(momentum=0.9) if name == "rmsprop" else {}
    problem = Problem(SHAPES["small"], 1, dtype=F64, seed=31, identical=True)
    twin = problem.clone()
    opt = NATIVE[name](problem.groups(), shared=problem.shared, **extra)
    ref = TORCH[name](twin.groups(), **extra)

    def make(o):
        if sched == "step":
            return torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
        if sched == "onecycle":
            return torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=10,
                                                       cycle_momentum=True)
        return torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5)

    s1, s2 = make(opt), make(ref)
    for t in range(8):
        opt.zero_grad()
        losses = problem.losses(t)
        opt.backward(losses)
        opt.step()
        ref.zero_grad()
        loss = twin.losses(t)[0]
        loss.backward()
        ref.step()
        if sched == "plateau":
            s1.step(1.0)
            s2.step(1.0)
        else:
            s1.step()
            s2.step()
    for g1, g2 in zip(opt.param_groups, ref.param_groups):
        assert g1["lr"] == g2["lr"]
    for pa, pb in zip(problem.params(), twin.params()):
        assert_close(pa, pb, TOL[("torch", F64)])


def test_zero_grad_drops_pending_task_gradients():
    problem = Problem(SHAPES["small"], 2, dtype=F64, seed=32)
    opt = pub_native.Adam(problem.groups())
    opt.backward(problem.losses(0))
    opt.zero_grad(set_to_none=False)
    before = [p.detach().clone() for p in problem.params()]
    opt.step()  # nothing pending and every .grad zero: Adam moves nothing
    assert all(torch.equal(a, b) for a, b in zip(before, problem.params()))


def test_repeated_backward_accumulates():
    problem = Problem(SHAPES["small"], 2, dtype=F64, seed=33)
    twin = problem.clone()
    opt = pub_native.Adam(problem.groups())
    ref = ReferenceAdam(twin.groups())
    for o, pr in ((opt, problem), (ref, twin)):
        o.backward(pr.losses(0))
        o.backward(pr.losses(1))
        o.step()
    assert_states_close(opt, problem.params(), ref, twin.params(), TOL[("reference", F64)])


def test_repr_lists_pub_options_and_groups():
    p = torch.zeros(2, requires_grad=True)
    opt = pub_native.Adam([p], lr=0.5, umm="clippy", clippy_preset="tfrs", solver="ccp")
    text = repr(opt)
    assert text.splitlines()[:2] == [
        "Adam (",
        "PUB: num_tasks=None, solver='ccp', update_weights_every=1, weight_norm='sum', "
        "ridge=1e-08, umm='clippy', clippy_lambda_rel=0.1, clippy_lambda_abs=1e-07",
    ]
    assert "    lr: 0.5" in text and text.endswith(")")


# ---- errors (SPEC §7) ---------------------------------------------------------------------------


def test_backward_rejects_bad_losses():
    problem = Problem(SHAPES["small"], 2, dtype=F64, seed=41)
    opt = pub_native.Adam(problem.groups())
    with pytest.raises(ValueError, match="losses"):
        opt.backward([])
    with pytest.raises(ValueError, match="losses"):
        opt.backward([problem.shared[0]])  # (5, 3): not a scalar
    with pytest.raises(ValueError, match="losses"):
        opt.backward([torch.tensor(1.0), torch.tensor(2.0)])
    with pytest.raises(ValueError, match="losses"):
        opt.backward(torch.zeros(2, 2, requires_grad=True))
    opt.backward(problem.losses(0))
    opt.step()
    with pytest.raises(ValueError, match="K = 2"):
        opt.backward(problem.losses(1) + problem.losses(1)[:1])


@pytest.mark.parametrize("name,kwargs", [
    ("adam", dict(lr=-1.0)), ("adam", dict(betas=(1.0, 0.9))), ("adam", dict(eps=-1.0)),
    ("adam", dict(weight_decay=-0.1)), ("adagrad", dict(lr_decay=-1.0)),
    ("adagrad", dict(initial_accumulator_value=-1.0)), ("rmsprop", dict(alpha=-0.5)),
    ("rmsprop", dict(momentum=-0.1)),
])
def test_invalid_hyperparameters_use_torch_wording(name, kwargs):
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError) as expected:
        TORCH[name]([p], **kwargs)
    with pytest.raises(ValueError) as got:
        NATIVE[name]([p], **kwargs)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("kwargs,match", [
    (dict(update_weights_every=0), "update_weights_every"), (dict(solver="cvx"), "solver"),
    (dict(weight_norm="max"), "weight_norm"), (dict(ridge=-1.0), "ridge"),
    (dict(umm="pcgrad"), "umm"), (dict(umm="clippy", clippy_preset="x"), "clippy_preset"),
    (dict(clippy_lambda_rel=0.1), "umm='clippy'"),
])
def test_invalid_pub_options(kwargs, match):
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=match):
        pub_native.Adam([p], **kwargs)


def test_unsupported_options_and_tensors_raise():
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(NotImplementedError, match="differentiable"):
        pub_native.Adam([p], differentiable=True)
    with pytest.raises((TypeError, ValueError), match="complex"):
        pub_native.Adam([torch.zeros(2, dtype=torch.complex64, requires_grad=True)])
    emb = nn.Embedding(5, 3, sparse=True)
    opt = pub_native.Adam(emb.parameters(), shared=list(emb.parameters()))
    out = emb(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="sparse"):
        opt.backward([out.sum(), out.mean()])


@pytest.mark.parametrize("name", sorted(NATIVE))
@pytest.mark.parametrize("umm", [None, "clippy", "adatask"])
@pytest.mark.parametrize("reuse", [False, True], ids=["solve", "reuse"])
def test_nan_gradient_raises_and_changes_nothing(name, umm, reuse):
    problem = Problem(SHAPES["odd"], 3, dtype=F32, seed=42)
    opt = NATIVE[name](problem.groups(), umm=umm, update_weights_every=2 if reuse else 1)
    for t in range(3 if reuse else 2):
        opt.zero_grad()
        opt.backward(problem.losses(t))
        opt.step()
    params = [p.detach().clone() for p in problem.params()]
    state = copy.deepcopy(opt.state_dict())
    weights = opt.task_weights
    opt.zero_grad()
    losses = problem.losses(5)
    losses[1] = losses[1] + problem.shared[1].sum() * float("nan")
    opt.backward(losses)
    with pytest.raises(FloatingPointError, match=r"\[1\]"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, problem.params()))
    after = opt.state_dict()
    assert after["pub"]["step"] == state["pub"]["step"]
    assert torch.equal(opt.task_weights, weights)
    for key, st in state["state"].items():
        assert set(after["state"][key]) == set(st)
        for k, v in st.items():
            assert torch.equal(after["state"][key][k], v), (key, k)
    # A good step afterwards works.
    opt.zero_grad()
    opt.backward(problem.losses(6))
    opt.step()


def test_base_step_refusal_leaves_shared_part_untouched():
    # torch refuses capturable=True for CPU tensors when it steps the task-specific params;
    # that refusal must come before the shared parameters or their state change.
    problem = Problem(SHAPES["small"], 2, dtype=F32, seed=43)
    opt = pub_native.Adam(problem.groups(), capturable=True)
    opt.backward(problem.losses(0))
    before = [p.detach().clone() for p in problem.shared]
    with pytest.raises((AssertionError, RuntimeError)):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, problem.shared))
    assert all("exp_avg" not in opt.state[p] for p in problem.shared)


def test_turning_on_weight_decay_mid_run_matches_reference():
    # The native kernel configuration (whether the Gram pass reads θ for L2 decay) follows a
    # param group's options when they change between steps.
    problem = Problem(SHAPES["odd"], 2, dtype=F64, seed=44)
    twin = problem.clone()
    opt = pub_native.Adam(problem.groups())
    ref = ReferenceAdam(twin.groups())
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
