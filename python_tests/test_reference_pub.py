"""Tests of the plain-PyTorch PUB reference optimizers (pub_native.reference.pub_torch).

Reference layer: before the native optimizers are compared with it, it must equal torch.optim for
one task and for K identical tasks, detect shared parameters, follow SPEC §3–5 on a two-task
step computed by hand, fail cleanly (SPEC §7) and restore exactly from a checkpoint.
"""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
from torch import nn

from pub_native import SolveStatus
from pub_native.reference import ReferenceAdaGrad, ReferenceAdam, ReferenceRMSProp

# Max-abs error relative to the max-abs of the expected tensor.
TOL = {
    # Reference vs torch.optim in float64: the same equations with the operations in another
    # order (β1·m + (1−β1)·g vs torch's lerp, ...) and α̂ = α/Σα = 1/K rounded; a few ulps.
    "vs_torch_f64": 1e-12,
    # Hand-written SPEC equations vs the reference, float64, same data.
    "by_hand_f64": 1e-12,
    # Relative residual ‖Gα − 1/α‖/‖1/α‖ of the native float64 Newton solve (ridge = 0).
    "residual": 1e-10,
}

STEPS = 7  # as PyTorch's own optimizer tests

F64 = torch.float64


def assert_close(actual, expected, rtol, what=""):
    actual = actual.detach().to(F64)
    expected = expected.detach().to(F64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if expected.numel() == 0:
        return
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:g} × {scale:.3e}"


# ----- problems ---------------------------------------------------------------------------------


def make_params(seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 3, generator=g, dtype=F64).to(dtype).requires_grad_()
    b = torch.randn(3, generator=g, dtype=F64).to(dtype).requires_grad_()
    return [w, b]


def batches(seed=1, n=STEPS, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(8, 5, generator=g, dtype=F64).to(dtype),
            torch.randn(8, 3, generator=g, dtype=F64).to(dtype),
        )
        for _ in range(n)
    ]


def regression_loss(params, batch):
    w, b = params
    x, y = batch
    return (x @ w + b - y).pow(2).mean()


def groups(params, lr):
    # Two groups with different learning rates: PUB's Gram runs across groups.
    return [{"params": [params[0]]}, {"params": [params[1]], "lr": lr * 0.5}]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


# ----- 1. one task and K identical tasks equal torch.optim --------------------------------------

ADAM_OPTIONS = [
    {},
    {"weight_decay": 0.1},
    {"amsgrad": True},
    {"maximize": True},
    {"weight_decay": 0.1, "decoupled_weight_decay": True},
    {"amsgrad": True, "weight_decay": 0.05, "maximize": True, "betas": (0.8, 0.99)},
]
ADAGRAD_OPTIONS = [
    {},
    {"lr_decay": 0.1},
    {"initial_accumulator_value": 0.5},
    {"weight_decay": 0.1, "maximize": True, "eps": 1e-6},
]
RMSPROP_OPTIONS = [
    {},
    {"momentum": 0.9},
    {"centered": True},
    {"momentum": 0.5, "centered": True, "weight_decay": 0.1},
    {"maximize": True, "alpha": 0.9},
]
CASES = (
    [(ReferenceAdam, torch.optim.Adam, 0.05, o) for o in ADAM_OPTIONS]
    + [(ReferenceAdaGrad, torch.optim.Adagrad, 0.1, o) for o in ADAGRAD_OPTIONS]
    + [(ReferenceRMSProp, torch.optim.RMSprop, 0.01, o) for o in RMSPROP_OPTIONS]
)
PUB_VARIANTS = [
    {},
    {"update_weights_every": 3},
    {"umm": "adatask"},
    {"umm": "adatask", "update_weights_every": 3},
]


def assert_matches_torch(ref_cls, torch_cls, lr, options, pub_kwargs, num_tasks, explicit_shared):
    params = make_params()
    torch_params = clone_params(params)
    if explicit_shared:
        pub_kwargs = {**pub_kwargs, "shared": params}
    opt = ref_cls(groups(params, lr), lr=lr, **options, **pub_kwargs)
    base = torch_cls(groups(torch_params, lr), lr=lr, **options)
    for step, batch in enumerate(batches()):
        loss = regression_loss(params, batch)
        opt.zero_grad()
        opt.backward([loss] * num_tasks)
        opt.step()
        base.zero_grad()
        regression_loss(torch_params, batch).backward()
        base.step()
        for i, (p, q) in enumerate(zip(params, torch_params, strict=True)):
            assert_close(p, q, TOL["vs_torch_f64"], f"step {step + 1} param {i}")
    assert_close(
        opt.task_weights,
        torch.full((num_tasks,), 1.0 / num_tasks, dtype=F64),
        TOL["vs_torch_f64"],
        "task_weights",
    )
    adatask = pub_kwargs.get("umm") == "adatask"
    for i, (p, q) in enumerate(zip(params, torch_params, strict=True)):
        expected = base.state[q]
        got = opt.state[p]
        keys = {k if k == "step" or not adatask else "task_" + k for k in expected}
        assert set(got) == keys, f"param {i}: state keys {sorted(got)} != {sorted(keys)}"
        assert got["step"].dtype == expected["step"].dtype and got["step"].dim() == 0
        assert float(got["step"]) == float(expected["step"]) == STEPS
        for key, value in expected.items():
            if key == "step":
                continue
            if adatask:
                assert got["task_" + key].shape == (num_tasks, *p.shape)
                for task in range(num_tasks):
                    assert_close(
                        got["task_" + key][task],
                        value,
                        TOL["vs_torch_f64"],
                        f"param {i} task_{key}[{task}]",
                    )
            else:
                assert got[key].dtype == value.dtype
                assert_close(got[key], value, TOL["vs_torch_f64"], f"param {i} {key}")


@pytest.mark.parametrize("pub_kwargs", PUB_VARIANTS, ids=str)
@pytest.mark.parametrize("ref_cls,torch_cls,lr,options", CASES, ids=str)
def test_one_task_equals_torch(ref_cls, torch_cls, lr, options, pub_kwargs):
    # K = 1 shares nothing by detection, so the parameters are declared shared to run PUB.
    assert_matches_torch(ref_cls, torch_cls, lr, options, pub_kwargs, 1, explicit_shared=True)


@pytest.mark.parametrize("pub_kwargs", PUB_VARIANTS, ids=str)
@pytest.mark.parametrize("ref_cls,torch_cls,lr,options", CASES, ids=str)
def test_identical_tasks_equal_torch(ref_cls, torch_cls, lr, options, pub_kwargs):
    # Three copies of one loss: every parameter is reached by 3 tasks, so detected as shared.
    assert_matches_torch(ref_cls, torch_cls, lr, options, pub_kwargs, 3, explicit_shared=False)


@pytest.mark.parametrize("preset", ["paper", "tfrs"])
def test_clippy_inactive_equals_torch(preset):
    # λ_rel = 1e6: the bound λ_rel·|θ| dwarfs every update, so σ = 1.
    assert_matches_torch(
        ReferenceAdam,
        torch.optim.Adam,
        0.05,
        {"weight_decay": 0.1},
        {"umm": "clippy", "clippy_preset": preset, "clippy_lambda_rel": 1e6},
        2,
        explicit_shared=False,
    )


@pytest.mark.parametrize("ref_cls,torch_cls,lr,options", CASES, ids=str)
def test_step_without_pub_backward_is_base_optimizer(ref_cls, torch_cls, lr, options):
    params = make_params()
    torch_params = clone_params(params)
    opt = ref_cls(groups(params, lr), lr=lr, **options)
    base = torch_cls(groups(torch_params, lr), lr=lr, **options)
    for batch in batches():
        for o, ps in ((opt, params), (base, torch_params)):
            o.zero_grad()
            regression_loss(ps, batch).backward()
            o.step()
    assert opt.task_weights is None
    for p, q in zip(params, torch_params, strict=True):
        assert_close(p, q, TOL["vs_torch_f64"], "param")
        assert set(opt.state[p]) == set(base.state[q])
        for key in base.state[q]:
            assert_close(opt.state[p][key], base.state[q][key], TOL["vs_torch_f64"], key)


# ----- 2. shared-parameter detection on an MMoE ---------------------------------------------------


class MMoE(nn.Module):
    """Multi-gate mixture of experts: shared experts, one gate and one tower per task."""

    def __init__(self, d_in=6, d_hidden=8, n_experts=3, n_tasks=2):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(d_in, d_hidden) for _ in range(n_experts))
        self.gates = nn.ModuleList(nn.Linear(d_in, n_experts) for _ in range(n_tasks))
        self.towers = nn.ModuleList(nn.Linear(d_hidden, 1) for _ in range(n_tasks))

    def task_losses(self, x, y):
        experts = torch.stack([torch.relu(e(x)) for e in self.experts], dim=1)
        losses = []
        for task, (gate, tower) in enumerate(zip(self.gates, self.towers, strict=True)):
            mix = torch.softmax(gate(x), dim=-1).unsqueeze(-1)
            out = tower((mix * experts).sum(dim=1)).squeeze(-1)
            losses.append((out - y[:, task]).pow(2).mean())
        return losses


def mmoe_and_data(seed=0):
    torch.manual_seed(seed)
    model = MMoE().double()
    g = torch.Generator().manual_seed(seed + 1)
    data = [
        (torch.randn(16, 6, generator=g, dtype=F64), torch.randn(16, 2, generator=g, dtype=F64))
        for _ in range(4)
    ]
    return model, data


def shared_indices(opt):
    return opt.state_dict()["pub"]["shared"]


@pytest.mark.parametrize("as_tensor", [False, True], ids=["list", "stacked"])
def test_mmoe_detects_shared_experts(as_tensor):
    model, data = mmoe_and_data()
    params = list(model.parameters())
    expert_ids = {id(p) for p in model.experts.parameters()}
    expected = [i for i, p in enumerate(params) if id(p) in expert_ids]
    opt = ReferenceAdam(model.parameters(), lr=1e-2)
    specific = [p for p in params if id(p) not in expert_ids]
    twin = copy.deepcopy(model)
    twin_specific = [
        p for p in twin.parameters() if id(p) not in {id(q) for q in twin.experts.parameters()}
    ]
    base = torch.optim.Adam(twin_specific, lr=1e-2)
    for x, y in data:
        losses = model.task_losses(x, y)
        opt.zero_grad()
        opt.backward(torch.stack(losses) if as_tensor else losses)
        assert shared_indices(opt) == expected
        for p in model.experts.parameters():
            assert p.grad is None  # shared params get per-task gradients, not .grad
        # Task-specific params: the ordinary gradient of Σ losses and torch's Adam step.
        base.zero_grad()
        sum(twin.task_losses(x, y)).backward()
        for p, q in zip(specific, twin_specific, strict=True):
            assert_close(p.grad, q.grad, TOL["vs_torch_f64"], "specific grad")
        opt.step()
        base.step()
        with torch.no_grad():  # keep the twin's experts in sync to compare the next step
            for p, q in zip(model.experts.parameters(), twin.experts.parameters(), strict=True):
                q.copy_(p)
        for p, q in zip(specific, twin_specific, strict=True):
            assert_close(p, q, TOL["vs_torch_f64"], "specific param")
    assert opt.task_weights.shape == (2,)
    assert abs(float(opt.task_weights.sum()) - 1.0) < 1e-12


def test_explicit_and_group_shared_override_detection():
    model, data = mmoe_and_data()
    x, y = data[0]
    params = list(model.parameters())
    tower0 = list(model.towers[0].parameters())
    index = [i for i, p in enumerate(params) if any(p is q for q in tower0)]
    opt = ReferenceAdam(model.parameters(), shared=tower0)
    opt.backward(model.task_losses(x, y))
    assert shared_indices(opt) == index
    # A 'shared' flag on a group decides for that group; the others are detected.
    opt = ReferenceAdam(
        [
            {"params": list(model.experts.parameters()), "shared": False},
            {"params": list(model.gates.parameters()) + list(model.towers.parameters())},
        ]
    )
    opt.backward(model.task_losses(x, y))
    assert shared_indices(opt) == []
    with pytest.raises(ValueError, match="shared"):
        ReferenceAdam(model.parameters(), shared=[torch.zeros(2, requires_grad=True)])


# ----- 3. SPEC §3–5 by hand on two different tasks ----------------------------------------------


def two_task_losses(params, batch):
    w, b = params
    x, y = batch
    pred = x @ w + b
    return [
        (pred[:, 0] - y[:, 0]).pow(2).mean() + 0.1 * (pred[:, 1] - y[:, 1]).abs().mean(),
        (torch.tanh(pred[:, 2]) - y[:, 2]).pow(2).mean() + 0.3 * pred[:, 0].mean(),
    ]


def per_task_grads(params, batch):
    losses = two_task_losses(params, batch)
    grads = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
    return [torch.stack([g[i] for g in grads]) for i in range(len(params))]  # per param (K, ...)


def adam_by_hand(g, m, v, t, lr, beta1, beta2, eps):
    m_i = beta1 * m + (1 - beta1) * g
    v_i = beta2 * v + (1 - beta2) * g**2
    return lr * (m_i / (1 - beta1**t)) / ((v_i / (1 - beta2**t)).sqrt() + eps)


@pytest.mark.parametrize("umm", [None, "adatask", "clippy"])
def test_two_tasks_step_by_hand(umm):
    lr, beta1, beta2, eps, wd = 0.05, 0.9, 0.999, 1e-8, 0.01
    lam_rel, lam_abs = 0.02, 1e-4  # small: Clippy must actually clip here
    params = make_params(seed=3)
    kw = {"umm": umm}
    if umm == "clippy":
        kw.update(clippy_lambda_rel=lam_rel, clippy_lambda_abs=lam_abs)
    opt = ReferenceAdam(params, lr=lr, weight_decay=wd, ridge=0.0, **kw)
    data = batches(seed=4, n=3)
    for batch in data[:2]:
        opt.zero_grad()
        opt.backward(two_task_losses(params, batch))
        opt.step()
    key = "task_exp_avg" if umm == "adatask" else "exp_avg"
    theta = [p.detach().clone() for p in params]
    m = [opt.state[p][key].clone() for p in params]
    v = [opt.state[p][key.replace("avg", "avg_sq")].clone() for p in params]
    grads = [g + wd * th for g, th in zip(per_task_grads(params, data[2]), theta, strict=True)]
    u = [
        adam_by_hand(g, mi, vi, 3, lr, beta1, beta2, eps)
        for g, mi, vi in zip(grads, m, v, strict=True)
    ]
    if umm == "clippy":
        clipped = False
        for j, (ui, th) in enumerate(zip(u, theta, strict=True)):
            sigma = ((lam_rel * th.abs() + lam_abs) / ui.abs()).reshape(2, -1).amin(1).clamp(max=1)
            clipped |= bool((sigma < 1).any())
            u[j] = ui * sigma.view(2, *[1] * th.dim())
        assert clipped
    U = torch.cat([ui.reshape(2, -1) for ui in u], dim=1)
    gram = U @ U.T

    opt.zero_grad()
    opt.backward(two_task_losses(params, data[2]))
    opt.step()

    assert_close(opt.gram_matrix, gram, TOL["by_hand_f64"], "G = U Uᵀ")
    alpha = opt.raw_task_weights
    residual = (gram @ alpha - 1 / alpha).norm() / (1 / alpha).norm()
    assert residual <= TOL["residual"]
    assert opt.stats["status"] == SolveStatus.CONVERGED
    assert set(opt.stats) == {"status", "iterations", "residual"}
    alpha_hat = alpha / alpha.sum()
    assert_close(opt.task_weights, alpha_hat, TOL["by_hand_f64"], "α̂ = α/Σα")
    for j, p in enumerate(params):
        shape = (2, *[1] * p.dim())
        step = -(alpha_hat.view(shape) * u[j]).sum(0)
        assert_close(p.detach() - theta[j], step, TOL["by_hand_f64"], "θ_new − θ = −Σ α̂ u_i")
        if umm == "adatask":  # each task's state advances with its own g_i
            expected_m = beta1 * m[j] + (1 - beta1) * grads[j]
            expected_v = beta2 * v[j] + (1 - beta2) * grads[j] ** 2
        else:  # the shared state advances with g_α = Σ α̂_i g_i
            g_alpha = (alpha_hat.view(shape) * grads[j]).sum(0)
            expected_m = beta1 * m[j] + (1 - beta1) * g_alpha
            expected_v = beta2 * v[j] + (1 - beta2) * g_alpha**2
        assert_close(opt.state[p][key], expected_m, TOL["by_hand_f64"], key)
        assert_close(
            opt.state[p][key.replace("avg", "avg_sq")],
            expected_v,
            TOL["by_hand_f64"],
            "second moment",
        )


def test_raw_weights_give_unit_nash_step():
    # weight_norm="none": Gα = 1/α gives ‖Σ α_i u_i‖² = αᵀGα = Σ α_i/α_i = K (SPEC §4).
    params = make_params(seed=5)
    opt = ReferenceRMSProp(params, lr=0.01, momentum=0.5, weight_norm="none", ridge=0.0)
    for batch in batches(seed=6, n=3):
        before = [p.detach().clone() for p in params]
        opt.zero_grad()
        opt.backward(two_task_losses(params, batch))
        opt.step()
        sq_norm = sum(
            float((p.detach() - b).pow(2).sum()) for p, b in zip(params, before, strict=True)
        )
        assert abs(sq_norm - 2.0) <= 1e-9
    assert torch.equal(opt.task_weights, opt.raw_task_weights)


def test_weights_reused_between_updates():
    params = make_params(seed=7)
    opt = ReferenceAdaGrad(params, lr=0.1, update_weights_every=3)
    history = []
    for batch in batches(seed=8):
        opt.zero_grad()
        opt.backward(two_task_losses(params, batch))
        opt.step()
        history.append((opt.task_weights.clone(), opt.gram_matrix))
    for t in (2, 3, 5, 6):  # (t − 1) % 3 != 0: the weights and Gram of step t − 1 are kept
        assert torch.equal(history[t - 1][0], history[t - 2][0])
        assert history[t - 1][1] is history[t - 2][1]
    for t in (4, 7):
        assert not torch.equal(history[t - 1][0], history[t - 2][0])
        assert history[t - 1][1] is not history[t - 2][1]


def test_clippy_presets_and_overrides():
    def run(**kw):
        params = make_params(seed=9)
        opt = ReferenceAdam(params, lr=0.5, umm="clippy", **kw)
        for batch in batches(seed=10, n=3):
            opt.zero_grad()
            opt.backward(two_task_losses(params, batch))
            opt.step()
        return torch.cat([p.detach().flatten() for p in params])

    tfrs = run(clippy_preset="tfrs")
    assert torch.equal(tfrs, run(clippy_lambda_rel=0.1, clippy_lambda_abs=1e-7))
    assert torch.equal(run(), run(clippy_lambda_rel=0.5))
    assert not torch.equal(tfrs, run())


# ----- 4. 16-bit shared parameters ----------------------------------------------------------------


def test_bf16_shared_state_is_float32():
    w = torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True)
    heads = [torch.randn(3, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    opt = ReferenceAdam([w, *heads], lr=1e-2, umm=None)
    x = torch.randn(8, 4, dtype=torch.bfloat16)
    before = w.detach().clone()
    opt.backward([((x @ w) * h).pow(2).mean() for h in heads])
    opt.step()
    assert w.dtype == torch.bfloat16 and not torch.equal(w.detach(), before)
    assert opt.state[w]["exp_avg"].dtype == torch.float32
    assert opt.state[w]["exp_avg_sq"].dtype == torch.float32
    for h in heads:  # task-specific: torch's behaviour, state in the param dtype
        assert opt.state[h]["exp_avg"].dtype == torch.bfloat16


# ----- 5. errors (SPEC §7) ------------------------------------------------------------------------


def test_bad_losses_raise_value_error():
    params = make_params()
    opt = ReferenceAdam(params)
    batch = batches(n=1)[0]
    loss = regression_loss(params, batch)
    for bad in (
        [],
        (),
        torch.stack([loss, loss]).reshape(1, 2),
        [loss.reshape(1)],
        [loss, torch.tensor(1.0)],
        [loss.detach()],
        torch.zeros(2),
    ):
        with pytest.raises(ValueError, match="losses"):
            opt.backward(bad)
    opt.backward([loss, loss])
    with pytest.raises(ValueError, match="losses"):
        opt.backward([loss, loss, loss])


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: ReferenceAdam(p, lr=-1.0), "Invalid learning rate"),
        (lambda p: ReferenceAdam(p, betas=(1.0, 0.9)), "Invalid beta parameter at index 0"),
        (lambda p: ReferenceAdam(p, eps=-1.0), "Invalid epsilon value"),
        (lambda p: ReferenceAdaGrad(p, lr_decay=-0.1), "Invalid lr_decay value"),
        (
            lambda p: ReferenceAdaGrad(p, initial_accumulator_value=-1.0),
            "Invalid initial_accumulator_value value",
        ),
        (lambda p: ReferenceRMSProp(p, alpha=-0.1), "Invalid alpha value"),
        (lambda p: ReferenceRMSProp(p, momentum=-0.1), "Invalid momentum value"),
        (lambda p: ReferenceRMSProp([{"params": p, "weight_decay": -1.0}]), "Invalid weight_decay"),
        (lambda p: ReferenceAdam(p, umm="gradnorm"), "umm"),
        (lambda p: ReferenceAdam(p, solver="lbfgs"), "solver"),
        (lambda p: ReferenceAdam(p, update_weights_every=0), "update_weights_every"),
        (lambda p: ReferenceAdam(p, clippy_lambda_rel=0.1), "clippy"),
    ],
)
def test_bad_hyper_parameters_raise_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make(make_params())


def test_unsupported_options_raise():
    with pytest.raises(NotImplementedError, match="fused"):
        ReferenceAdam(make_params(), fused=True)
    with pytest.raises(TypeError, match="nesterov"):
        ReferenceRMSProp(make_params(), nesterov=True)


def snapshot(opt, params):
    return (
        [p.detach().clone() for p in params],
        [{k: v.clone() for k, v in opt.state[p].items()} for p in params],
        copy.deepcopy(opt.state_dict()["pub"]),
    )


def assert_unchanged(opt, params, snap):
    old_params, old_state, old_pub = snap
    for p, old in zip(params, old_params, strict=True):
        assert torch.equal(p.detach(), old)
    for p, old in zip(params, old_state, strict=True):
        assert set(opt.state[p]) == set(old)
        for key, value in old.items():
            assert opt.state[p][key].dtype == value.dtype and torch.equal(opt.state[p][key], value)
    pub = opt.state_dict()["pub"]
    assert pub["step"] == old_pub["step"]
    assert torch.equal(pub["task_weights"], old_pub["task_weights"])


@pytest.mark.parametrize("reuse_step", [False, True], ids=["weight-update", "reuse"])
@pytest.mark.parametrize("umm", [None, "adatask", "clippy"])
@pytest.mark.parametrize("cls", [ReferenceAdam, ReferenceAdaGrad, ReferenceRMSProp])
def test_nan_in_one_task_changes_nothing(cls, umm, reuse_step):
    shared = torch.randn(5, 3, dtype=F64, requires_grad=True)
    heads = [torch.randn(3, dtype=F64, requires_grad=True) for _ in range(2)]
    params = [shared, *heads]
    opt = cls(params, lr=0.01, weight_decay=0.01, umm=umm, update_weights_every=2)

    def losses(x, nan=False):
        h = x @ shared
        out = [(h * heads[0]).pow(2).mean(), (torch.tanh(h) * heads[1]).mean()]
        if nan:  # NaN in task 1's gradient on the shared param only
            out[1] = out[1] + 0.0 * (shared * float("nan")).sum()
        return out

    xs = [torch.randn(8, 5, dtype=F64) for _ in range(4)]
    n_good = 3 if reuse_step else 2  # PUB step 4 reuses α̂ (every=2), step 3 recomputes it
    for x in xs[:n_good]:
        opt.zero_grad()
        opt.backward(losses(x))
        opt.step()
    snap = snapshot(opt, params)
    opt.zero_grad()
    opt.backward(losses(xs[3], nan=True))
    with pytest.raises(FloatingPointError, match=r"task\(s\) \[1\]"):
        opt.step()
    assert_unchanged(opt, params, snap)
    opt.zero_grad()  # and the optimizer carries on
    opt.backward(losses(xs[3]))
    opt.step()
    assert opt.state_dict()["pub"]["step"] == n_good + 1


def test_plain_step_on_adatask_state_raises():
    params = make_params()
    opt = ReferenceAdam(params, umm="adatask")
    batch = batches(n=1)[0]
    opt.backward([regression_loss(params, batch)] * 2)
    opt.step()
    opt.zero_grad()
    regression_loss(params, batch).backward()
    with pytest.raises(RuntimeError, match="per-task state"):
        opt.step()


# ----- 6. checkpoints -----------------------------------------------------------------------------


def roundtrip(sd):
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("dtype", [F64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("umm", [None, "adatask"])
@pytest.mark.parametrize(
    "cls,options",
    [
        (ReferenceAdam, {"amsgrad": True}),
        (ReferenceAdaGrad, {"initial_accumulator_value": 0.1}),
        (ReferenceRMSProp, {"momentum": 0.9, "centered": True}),
    ],
)
def test_state_dict_roundtrip_continues_identically(cls, options, umm, dtype):
    torch.manual_seed(0)
    shared = torch.randn(5, 3, dtype=dtype, requires_grad=True)
    heads = [torch.randn(3, dtype=dtype, requires_grad=True) for _ in range(2)]
    xs = [torch.randn(8, 5, dtype=dtype) for _ in range(STEPS)]

    def losses(ps, x):
        h = x @ ps[0]
        return [(h * ps[1]).pow(2).mean(), (torch.tanh(h) * ps[2]).mean()]

    params = [shared, *heads]
    opt = cls(params, lr=0.01, umm=umm, update_weights_every=2, **options)
    for x in xs[:3]:
        opt.zero_grad()
        opt.backward(losses(params, x))
        opt.step()
    sd = roundtrip(opt.state_dict())
    params2 = clone_params(params)
    opt2 = cls(params2, lr=0.01, umm=umm, update_weights_every=2, **options)
    opt2.load_state_dict(sd)
    assert opt2.num_tasks == 2
    if dtype == torch.bfloat16:
        assert all(
            v.dtype == torch.float32 for k, v in opt2.state[params2[0]].items() if k != "step"
        )
    for x in xs[3:]:
        for o, ps in ((opt, params), (opt2, params2)):
            o.zero_grad()
            o.backward(losses(ps, x))
            o.step()
    assert torch.equal(opt.task_weights, opt2.task_weights)
    assert opt.stats == opt2.stats
    for p, q in zip(params, params2, strict=True):
        assert torch.equal(p, q)
        assert set(opt.state[p]) == set(opt2.state[q])
        for key, value in opt.state[p].items():
            assert value.dtype == opt2.state[q][key].dtype
            assert torch.equal(value, opt2.state[q][key])


def test_load_state_dict_with_other_k_or_shapes_fails_and_changes_nothing():
    params = make_params()
    batch = batches(n=1)[0]
    source = ReferenceAdam(params)
    source.backward([regression_loss(params, batch)] * 2)
    source.step()
    sd = roundtrip(source.state_dict())

    target_params = clone_params(params)
    target = ReferenceAdam(target_params)
    target.backward([regression_loss(target_params, batch)] * 3)
    target.step()
    snap = snapshot(target, target_params)
    with pytest.raises(ValueError, match="K"):
        target.load_state_dict(sd)
    assert_unchanged(target, target_params, snap)

    bad = roundtrip(source.state_dict())
    bad["pub"]["num_tasks"] = 3
    bad["pub"]["task_weights"] = torch.full((3,), 1 / 3, dtype=F64)
    bad["pub"]["raw_task_weights"] = None
    bad["state"][0]["exp_avg"] = torch.zeros(5, 4, dtype=F64)
    with pytest.raises(ValueError, match="shape"):
        target.load_state_dict(bad)
    assert_unchanged(target, target_params, snap)


def test_identical_tasks_all_combinations_smoke():
    # Wider option grid, fewer steps: every Adam flag combination with K = 2 identical tasks.
    for amsgrad, maximize, decoupled in itertools.product([False, True], repeat=3):
        assert_matches_torch(
            ReferenceAdam,
            torch.optim.Adam,
            0.05,
            {
                "amsgrad": amsgrad,
                "maximize": maximize,
                "weight_decay": 0.1,
                "decoupled_weight_decay": decoupled,
            },
            {},
            2,
            explicit_shared=False,
        )
