"""pub_native.balancers.MultiBalance: gradients against an independent autograd computation of
∂(Σ w_i L_i)/∂θ, the Gram against the representation gradients computed separately, the
weight rules' defining properties, the head/trunk split and its errors, and exactness under
torch.distributed (2 gloo processes against one process on the whole batch)."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import free_port
from torch import nn

from pub_native import balancers as B
from pub_native.demo.data import Batch
from pub_native.demo.models import PLE, MMoE
from pub_native.demo.synthetic import MMoERegressor, RegressionBatch, SharedBottomRegressor

TOL = {
    # float64 models: the same sums in another order.
    "f64": 1e-10,
    # float32 models: the trunk backward from z vs one backward of Σ w_i L_i (summation order).
    "f32": 1e-5,
    # Iterative simplex solver (projected gradient), stopped at 1e-12 steps.
    "iterative": 1e-7,
    # Two processes vs one: float32 sums over a split batch, in another order.
    "ddp": 1e-5,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _tab_batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randint(0, 3, (n, 2), generator=g), torch.randn(n, 3, generator=g),
                 torch.randint(0, 2, (n, 2), generator=g).float())


def _reg_batch(n=64, dim=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return RegressionBatch(torch.randn(n, dim, generator=g, dtype=dtype),
                           torch.randn(n, 2, generator=g, dtype=dtype))


MODELS = {
    "mmoe": (lambda: MMoE([3, 3], 3, 2, embed_dim=4, expert_dim=8, tower_dims=(4,)),
             _tab_batch),
    "ple": (lambda: PLE([3, 3], 3, 2, embed_dim=4, expert_dim=8, tower_dims=(4,)), _tab_batch),
    "shared-bottom": (lambda: SharedBottomRegressor(dim=6, hidden=8, tower=4), _reg_batch),
    "mmoe-regressor": (lambda: MMoERegressor(dim=6, n_experts=3, expert_dim=4, tower=4),
                       _reg_batch),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("stacked", [False, True])
def test_gradients_equal_the_weighted_loss_backward(name, stacked):
    make, batch_fn = MODELS[name]
    torch.manual_seed(0)
    model = make()
    batch = batch_fn()
    bal = B.MultiBalance(model.parameters(), ema=0.0)
    for step in range(2):  # the second call reuses the head/trunk split
        for p in model.parameters():
            p.grad = None
        losses, z = model.task_losses(batch, with_representation=True)
        bal.backward(torch.stack(losses) if stacked else losses, z)
        w = bal.weights
        assert w.shape == (2,) and bool((w > 0).all())
        ref = model.task_losses(batch)
        total = sum(float(wi) * loss for wi, loss in zip(w, ref))
        params = list(model.parameters())
        expect = torch.autograd.grad(total, params, allow_unused=True)
        for (pname, p), g in zip(model.named_parameters(), expect):
            if g is None:
                assert p.grad is None, pname
            else:
                torch.testing.assert_close(p.grad, g, rtol=TOL["f32"], atol=TOL["f32"] * 1e-2,
                                           msg=f"step {step}: {pname}")
    # The trunk is what the representation is computed from; heads are the rest.
    trunk = {id(p) for p in bal.trunk}
    assert trunk and all(id(p) not in trunk for head in bal.heads for p in head)


def test_mmoe_split():
    torch.manual_seed(0)
    model = MMoE([3, 3], 3, 2, embed_dim=4, expert_dim=8, tower_dims=(4,))
    names = {id(p): n for n, p in model.named_parameters()}
    bal = B.MultiBalance(model.parameters())
    losses, z = model.task_losses(_tab_batch(), with_representation=True)
    bal.backward(losses, z)
    assert {names[id(p)] for p in bal.trunk} == {
        "embedding.embedding.weight", "embedding.numerical.weight", "embedding.numerical.bias",
        "experts.linear.weight", "experts.linear.bias"}
    for k in range(2):
        assert {names[id(p)] for p in bal.heads[k]} == {
            n for n in names.values() if n.startswith((f"gates.{k}.", f"towers.{k}."))}


def test_gram_is_the_gram_of_the_representation_gradients():
    torch.manual_seed(1)
    model = MMoE([3, 3], 3, 2, embed_dim=4, expert_dim=8, tower_dims=(4,))
    batch = _tab_batch(seed=3)
    bal = B.MultiBalance(model.parameters(), ema=0.0)
    losses, z = model.task_losses(batch, with_representation=True)
    bal.backward(losses, z)
    # Independently: ∂L_i/∂z for both tensors of z, by autograd, one task at a time.
    losses, z = model.task_losses(batch, with_representation=True)
    r = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, z, retain_graph=True)])
         for loss in losses]
    G = torch.stack([torch.stack([ri @ rj for rj in r]) for ri in r]).double()
    torch.testing.assert_close(bal.gram, G, rtol=1e-5, atol=0)
    norms = G.diagonal().sqrt()
    # Two tasks, l2 + min-norm: w_i = ½ (n_1 + n_2) / n_i.
    torch.testing.assert_close(bal.weights, 0.5 * norms.sum() / norms, rtol=1e-6, atol=0)


def test_identical_tasks_are_linear_scalarization():
    torch.manual_seed(2)
    model = SharedBottomRegressor(dim=6, hidden=8, tower=4).double()
    model.towers[1].load_state_dict(model.towers[0].state_dict())
    x = torch.randn(32, 6, dtype=torch.float64)
    y = torch.randn(32, 1, dtype=torch.float64).expand(32, 2)
    batch = RegressionBatch(x, y)
    for solver in B.MultiBalance.SOLVERS:
        for p in model.parameters():
            p.grad = None
        bal = B.MultiBalance(model.parameters(), solver=solver, ema=0.5)
        losses, z = model.task_losses(batch, with_representation=True)
        bal.backward(losses, z)
        torch.testing.assert_close(bal.weights, torch.ones(2, dtype=torch.float64),
                                   rtol=0, atol=TOL["f64"])
        expect = torch.autograd.grad(sum(model.task_losses(batch)), list(model.parameters()))
        for p, g in zip(model.parameters(), expect):
            torch.testing.assert_close(p.grad, g, rtol=TOL["f64"], atol=TOL["f64"])


def _rand_gram(k, seed, scales=None):
    g = np.random.default_rng(seed).normal(size=(k, 7))
    if scales is not None:
        g = g * np.asarray(scales)[:, None]
    return g, g @ g.T


@pytest.mark.parametrize("k", [2, 3, 5])
def test_weights_min_norm_on_normalized_gradients(k):
    g, G = _rand_gram(k, k)
    w = B.multibalance_weights(G)
    n = np.linalg.norm(g, axis=1)
    wp = w * n / n.sum()  # back to the simplex weights of the normalized gradients
    assert wp.min() >= -1e-12 and abs(wp.sum() - 1) < TOL["f64"]
    # KKT of min over the simplex of ‖Σ w'_i ĝ_i‖²: (Ĝw')_i ≥ w'ᵀĜw', equality where w'_i > 0.
    Gn = G / np.outer(n, n)
    Gw, val = Gn @ wp, wp @ Gn @ wp
    assert (Gw >= val - TOL["iterative"]).all()
    assert np.abs(Gw[wp > 1e-6] - val).max() <= TOL["iterative"]


@pytest.mark.parametrize("solver", ["min-norm", "nash", "mean"])
def test_weights_direction_is_invariant_to_task_scales(solver):
    """l2 normalization: scaling task i's gradient by s_i leaves the direction of Σ w_i r_i
    unchanged (only the magnitude of the normalized combination's scale Σ n_j changes)."""
    g, G = _rand_gram(3, 11)
    s = np.array([1e-3, 1.0, 1e3])
    d0 = B.multibalance_weights(G, solver=solver) @ g
    gs = g * s[:, None]
    d1 = B.multibalance_weights(gs @ gs.T, solver=solver) @ gs
    cos = d0 @ d1 / (np.linalg.norm(d0) * np.linalg.norm(d1))
    assert abs(cos - 1) < 1e-9


def test_weights_nash_solves_the_bargaining_equation():
    g, G = _rand_gram(3, 5)
    w = B.multibalance_weights(G, solver="nash")
    n = np.linalg.norm(g, axis=1)
    alpha = w * n / n.sum()
    Gn = G / np.outer(n, n)
    # α ∝ the root of Ĝα = 1/α: Ĝα·α is constant over the tasks (ridge 1e-8 aside).
    prod = (Gn @ alpha) * alpha
    assert prod.max() - prod.min() < 1e-6 * prod.max()


def test_weights_normalizations_and_zero_task():
    g, G = _rand_gram(2, 3)
    # none: K times MGDA's min-norm weights on the raw Gram.
    np.testing.assert_allclose(B.multibalance_weights(G, normalization="none"),
                               2 * B.min_norm_weights(G), atol=TOL["f64"])
    # loss: n_i = L_i.
    L = np.array([0.5, 2.0])
    wp = B.min_norm_weights(G / np.outer(L, L))
    np.testing.assert_allclose(B.multibalance_weights(G, L, normalization="loss"),
                               wp * L.sum() / L, atol=TOL["f64"])
    # A task with a zero representation gradient keeps weight 1 and is left out.
    G3 = np.zeros((3, 3))
    G3[np.ix_([0, 2], [0, 2])] = G
    w3 = B.multibalance_weights(G3)
    assert w3[1] == 1.0
    np.testing.assert_allclose(w3[[0, 2]], B.multibalance_weights(G), atol=TOL["f64"])
    np.testing.assert_array_equal(B.multibalance_weights(np.zeros((2, 2))), [1.0, 1.0])
    with pytest.raises(ValueError, match="loss values"):
        B.multibalance_weights(G, normalization="loss")


def test_ema_of_the_gram_with_bias_correction():
    """Two steps on a linear problem with known representation gradients."""
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    heads = [torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64),
             torch.tensor([0.0, 2.0, 1.0], dtype=torch.float64)]
    beta = 0.8
    bal = B.MultiBalance([theta], ema=beta)
    grams = []
    for step, scale in enumerate((1.0, 3.0)):
        z = theta * 1.0  # the representation: the identity trunk
        losses = [scale ** (i + 1) * (h @ z) for i, h in enumerate(heads)]
        bal.backward(losses, z)
        r = np.stack([scale ** (i + 1) * h.numpy() for i, h in enumerate(heads)])
        grams.append(r @ r.T)
        avg = sum((1 - beta) * beta ** (step - t) * grams[t] for t in range(step + 1))
        expect = B.multibalance_weights(avg / (1 - beta ** (step + 1)))
        np.testing.assert_allclose(bal.weights.numpy(), expect, rtol=TOL["f64"])
        np.testing.assert_allclose(bal.gram.numpy(), grams[-1], rtol=TOL["f64"])


def test_leaf_representation_and_any_optimizer():
    """The representation may be a leaf parameter (no trunk layers): z = θ."""
    theta = torch.tensor([1.0, -2.0], requires_grad=True)
    bal = B.MultiBalance([theta], ema=0.0)
    opt = torch.optim.SGD([theta], lr=0.1)
    losses = [(theta ** 2).sum(), 3 * theta[0]]
    opt.zero_grad()
    bal.backward(losses, theta)
    r = torch.stack([2 * theta.detach(), torch.tensor([3.0, 0.0])])
    w = bal.weights.float()
    torch.testing.assert_close(theta.grad, w @ r)
    before = theta.detach().clone()
    opt.step()
    torch.testing.assert_close(theta.detach(), before - 0.1 * (w @ r))


def test_gradients_accumulate_like_backward():
    torch.manual_seed(4)
    model = SharedBottomRegressor(dim=6, hidden=8, tower=4).double()
    batch = _reg_batch(dtype=torch.float64)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    bal = B.MultiBalance(model.parameters(), ema=0.0)
    losses, z = model.task_losses(batch, with_representation=True)
    bal.backward(losses, z)
    total = sum(float(w) * loss for w, loss in zip(bal.weights, model.task_losses(batch)))
    for p, g in zip(model.parameters(), torch.autograd.grad(total, list(model.parameters()))):
        torch.testing.assert_close(p.grad, g + 1, rtol=TOL["f64"], atol=TOL["f64"])


class _Bypass(nn.Module):
    """A head that reads a trunk parameter around the representation."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(3, 4)
        self.heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(2))

    def forward(self, x):
        z = torch.relu(self.trunk(x))
        out = [h(z).squeeze(1) for h in self.heads]
        out[1] = out[1] + (self.trunk.bias ** 2).sum()
        return z, out


def test_errors():
    model = _Bypass()
    x = torch.randn(8, 3)
    z, out = model(x)
    with pytest.raises(ValueError, match="around it"):
        B.MultiBalance(model.parameters()).backward([o.mean() for o in out], z)
    z, out = model(x)
    losses = [o.mean() for o in out]
    with pytest.raises(ValueError, match="does not require grad"):
        B.MultiBalance(model.parameters()).backward(losses, z.detach())
    with pytest.raises(ValueError, match="representation"):
        B.MultiBalance(model.parameters()).backward(losses)
    h = torch.relu(model.trunk(x))
    z2 = h * 2
    with pytest.raises(ValueError, match="computed from"):
        B.MultiBalance(model.parameters()).backward([(z2.sum() + h.sum())] * 2, [h, z2])
    h = torch.relu(model.trunk(x))
    with pytest.raises(ValueError, match=r"representation\[1\] is representation\[0\]"):
        B.MultiBalance(model.parameters()).backward([h.sum(), 2 * h.sum()], [h, h])
    h = torch.relu(model.trunk(x))
    with pytest.raises(TypeError, match="a tensor or a list or tuple of tensors; got dict"):
        # (its keys were taken for the tensors: "representation[0] must be a tensor, got str")
        B.MultiBalance(model.parameters()).backward([h.sum(), 2 * h.sum()], {"z": h})
    other = torch.randn(8, 4, requires_grad=True)
    with pytest.raises(ValueError, match="no task loss depends"):
        B.MultiBalance(model.parameters()).backward(losses, other)
    for kwargs, match in (({"normalization": "max"}, "normalization"),
                          ({"solver": "cvx"}, "solver"), ({"ema": 1.0}, "ema")):
        with pytest.raises(ValueError, match=match):
            B.MultiBalance(model.parameters(), **kwargs)
    z, out = model(x)
    bad = [out[0].mean() * float("nan"), out[1].mean()]
    model2 = SharedBottomRegressor(dim=3, hidden=4, tower=2)
    zz, outs = model2.representation_and_outputs(x)
    with pytest.raises(FloatingPointError, match=r"task\(s\) \[0\]"):
        B.MultiBalance(model2.parameters()).backward(
            [outs[0].mean() * float("nan"), outs[1].mean()], zz)
    del bad


def test_repr():
    p = torch.zeros(1, requires_grad=True)
    assert repr(B.MultiBalance([p])) == \
        "MultiBalance(normalization='l2', solver='min-norm', ema=0.9)"


def test_a_head_that_reads_another_output_of_the_representations_node_is_refused():
    """z = a of a, b = h.chunk(2, 1) (two outputs of one autograd node) and head 1 reads b: its
    loss reaches the trunk around z, which the first call refuses, naming the fix and changing
    nothing; z = [a, b] then gives the gradients of the weighted losses."""
    torch.manual_seed(0)
    trunk = nn.Linear(4, 8).double()
    heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(2)).double()
    params = [*trunk.parameters(), *heads.parameters()]
    x = torch.randn(16, 4, dtype=torch.float64)

    def forward():
        a, b = trunk(x).chunk(2, dim=1)
        return [heads[0](a).pow(2).mean(), heads[1](b).pow(2).mean()], a, b

    bal = B.MultiBalance(params, solver="mean", normalization="none", ema=0.0)
    losses, a, b = forward()
    with pytest.raises(ValueError, match=r"params\[0\].*around it; pass the tensor"):
        bal.backward(losses, a)
    assert all(p.grad is None for p in params)
    assert bal.heads is None and bal.trunk is None and bal.steps == 0 and bal.weights is None
    losses, a, b = forward()
    bal.backward(losses, [a, b])
    torch.testing.assert_close(bal.weights, torch.ones(2, dtype=torch.float64))
    expect = torch.autograd.grad(sum(forward()[0]), params)
    for p, g in zip(params, expect):
        torch.testing.assert_close(p.grad, g, rtol=TOL["f64"], atol=TOL["f64"])


def _two_heads(seed=0):
    torch.manual_seed(seed)
    trunk = nn.Linear(4, 8)
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(2))
    return trunk, heads, [*trunk.parameters(), *heads.parameters()]


@pytest.mark.parametrize("normalization,term", [
    ("loss", "inf constant"), ("l2", "inf constant"), ("l2", "nan head term"),
    ("l2", "nan head gradient")])
def test_a_non_finite_loss_or_head_gradient_raises_and_changes_nothing(normalization, term):
    """A non-finite loss value whose ∂L/∂z is finite (a constant term, a term of a head
    parameter alone), or a head gradient that is not finite while the loss is: a
    FloatingPointError naming the task, with .grad and the balancer as they were (normalization
    "loss" divided by an infinite loss, gave NaN weights and NaN in every .grad, counted the
    step and saved a state dict that did not load)."""
    trunk, heads, params = _two_heads()
    x = torch.randn(16, 4)
    bal = B.MultiBalance(params, normalization=normalization)
    z = trunk(x)
    bal.backward([h(z).pow(2).mean() for h in heads], z)
    grads = [p.grad.clone() for p in params]
    state = bal.state_dict()
    z = trunk(x)
    bad = heads[1](z).pow(2).mean()
    if term == "inf constant":
        bad = bad + torch.tensor(float("inf"))
    elif term == "nan head term":
        bad = bad + float("nan") * heads[1].weight.sum()
    else:  # d sqrt(u)/du at u = 0 times du/dw = 0: NaN, the loss finite
        bad = bad + torch.sqrt((0.0 * heads[1].weight).sum())
    with pytest.raises(FloatingPointError, match=r"task\(s\) \[1\]"):
        bal.backward([heads[0](z).pow(2).mean(), bad], z)
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)
    assert bal.steps == 1
    after = bal.state_dict()
    assert after["weights"].equal(state["weights"])
    assert after["gram_average"] == state["gram_average"]
    assert after["last_gram"] == state["last_gram"]
    B.MultiBalance(params, normalization=normalization).load_state_dict(after)


def test_a_non_finite_loss_under_a_grad_scaler_is_an_overflow():
    """Under a GradScaler an infinite (scaled) loss is an overflow: no error, the plain sum of
    the task gradients in .grad, the balancer as it was."""
    trunk, heads, params = _two_heads()
    x = torch.randn(16, 4)
    bal = B.MultiBalance(params, normalization="loss")
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    z = trunk(x)
    bal.backward([scaler.scale(h(z).pow(2).mean()) for h in heads], z, scaler=scaler)
    state = bal.state_dict()
    for p in params:
        p.grad = None
    z = trunk(x)
    losses = [heads[0](z).pow(2).mean(), heads[1](z).pow(2).mean() + torch.tensor(math.inf)]
    bal.backward([scaler.scale(loss) for loss in losses], z, scaler=scaler)
    assert bal.stats["updated"] is False and bal.steps == 1
    assert bal.state_dict()["weights"].equal(state["weights"])
    assert bal.state_dict()["gram_average"] == state["gram_average"]
    z = trunk(x)
    expect = torch.autograd.grad(4.0 * sum(h(z).pow(2).mean() for h in heads), params)
    for p, g in zip(params, expect):
        torch.testing.assert_close(p.grad, g)


def test_the_gram_is_float64_for_a_float32_representation():
    """Nearly parallel float32 gradients (1 − cos ~ 1e-7): the Gram of float64 products and
    sums, PSD, and its weights (a float32 accumulation gave 1 − cos < 0 and weights [0, 3, 0]
    instead of ~[1, 1, 1])."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4096, 256, generator=g, dtype=torch.float64) + 3.0
    grads = [(base + 1e-3 * torch.randn(4096, 256, generator=g, dtype=torch.float64)).float()
             for _ in range(3)]
    z = torch.zeros(4096, 256, requires_grad=True)
    bal = B.MultiBalance([z], ema=0.0)
    bal.backward([(z * c).sum() for c in grads], z)
    R = torch.stack([c.double().reshape(-1) for c in grads])
    G = R @ R.T
    torch.testing.assert_close(bal.gram, G, rtol=1e-13, atol=0)
    np.testing.assert_allclose(bal.weights.numpy(), B.multibalance_weights(G.numpy()),
                               rtol=1e-6)
    np.testing.assert_allclose(bal.weights.numpy(), np.ones(3), rtol=1e-5)


def test_a_float32_gradient_whose_square_overflows_float32_is_balanced():
    """‖∂L/∂z‖ ≈ 4e19, finite in float32, its square not: no FloatingPointError; and under a
    GradScaler whose scale grew to 2^70 (scaled gradients of that size), no overflow: the
    weights of the unscaled step (float32 sums took both for an overflow)."""
    trunk, heads, params = _two_heads()
    x = torch.randn(256, 4)

    def losses(c0=1.0):
        z = trunk(x)
        return [heads[0](z).pow(2).mean() * c0, heads[1](z).pow(2).mean()], z

    bal = B.MultiBalance(params, ema=0.0)
    ls, z = losses(1e21)
    r = torch.autograd.grad(ls[0], z, retain_graph=True)[0]
    assert bool(torch.isfinite(r).all()) and r.double().norm() > 1e19
    bal.backward(ls, z)
    assert math.isfinite(bal.gram[0, 0]) and bal.gram[0, 0] > 1e38
    ref = B.MultiBalance(params, ema=0.0)
    ref.backward(*losses())
    scaled = B.MultiBalance(params, ema=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 70)
    ls, z = losses()
    scaled.backward([scaler.scale(loss) for loss in ls], z, scaler=scaler)
    assert scaled.stats["updated"] is True and scaled.steps == 1
    torch.testing.assert_close(scaled.weights, ref.weights, rtol=1e-12, atol=0)


def test_process_group_is_auto_by_default_as_for_the_other_balancers():
    p = torch.zeros(2, requires_grad=True)
    assert B.MultiBalance([p])._process_group == "auto"
    # Something that is not a process group: the other balancers' error, at construction.
    with pytest.raises(TypeError, match="process_group must be"):
        B.MultiBalance([p], process_group=object())
    # None: no data parallelism (without torch.distributed, as with it: see the DDP cases).
    bal = B.MultiBalance([p], process_group=None)
    z = p * 1.0
    bal.backward([(z * 2).sum(), (z ** 2).sum()], z)
    assert bal.steps == 1 and p.grad is not None


# -- torch.distributed: 2 gloo processes against one process on the whole batch ---------------

_DDP_SCRIPT = Path(__file__).with_name("ddp_multibalance.py")
_CASES_SCRIPT = Path(__file__).with_name("ddp_multibalance_cases.py")


def _worker_module(script: Path):
    """The DDP worker script imported as a module (its train() with world=1 is one process);
    skips where torch.distributed is not available."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    sys.path.insert(0, str(script.parent))
    try:
        return importlib.import_module(script.stem)
    finally:
        sys.path.pop(0)


def _assert_ranks_finished(proc, out: Path) -> None:
    """The two gloo processes ran to the end: exit status 0, or both wrote their results and
    the only failure is gloo's abort as they tore the group down ("terminate called without
    an active exception", which a monitored barrier before it still lets through, rarely,
    under load): what the processes computed is whole."""
    if proc.returncode == 0:
        return
    written = all((out / f"rank{r}.json").exists() for r in range(2))
    assert written and "terminate called without an active exception" in proc.stderr, \
        proc.stdout + proc.stderr


def _run_cases(tmp_path, case):
    """Run ddp_multibalance_cases.py's case on 2 gloo processes: (the ranks' results, the
    helper module, whose train(case, world=1, ...) is one process)."""
    helper = _worker_module(_CASES_SCRIPT)
    proc = subprocess.run([sys.executable, str(_CASES_SCRIPT), str(free_port()), str(tmp_path),
                           case], capture_output=True, text=True, timeout=120)
    _assert_ranks_finished(proc, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r, got in enumerate(ranks):
        assert "error" not in got, f"rank {r}: {got['error']}"
    return ranks, helper


def _assert_same_training(got, ref, tol):
    for step, (w_got, w_ref) in enumerate(zip(got["weights"], ref["weights"], strict=True)):
        np.testing.assert_allclose(w_got, w_ref, rtol=tol, atol=0, err_msg=f"weights {step}")
    for step, (g_got, g_ref) in enumerate(zip(got["grams"], ref["grams"], strict=True)):
        np.testing.assert_allclose(g_got, g_ref, rtol=tol, atol=tol * 1e-3,
                                   err_msg=f"Gram {step}")
    for name, value in ref["params"].items():
        np.testing.assert_allclose(got["params"][name], value, rtol=tol, atol=tol,
                                   err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["branch", "swap", "absent", "norep", "sparse"])
def test_ddp_slices_that_reach_different_head_parameters_or_tasks_train_as_one_process(
        tmp_path, case):
    """The processes' slices reach different parts of the heads: a head parameter used on one
    process only (gloo aborted: head buffers of different sizes), two of one size used on one
    process each (the all-reduce added one's gradient to the other's), a task whose loss does
    not reach z on one process (Gram buffers of different sizes). Every process packs the same
    layout: the ranks stay identical and train as one process on the whole batch."""
    ranks, helper = _run_cases(tmp_path, case)
    assert ranks[0]["params"] == ranks[1]["params"]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    ref = helper.train(case, world=1, rank=0)
    for got in ranks:
        _assert_same_training(got, ref, TOL["f64"])
        # (a head's sparse gradient stays sparse through the all-reduce, as in one process)
        assert got["sparse"] == ref["sparse"] == (case == "sparse")


@pytest.mark.slow
def test_ddp_a_later_graph_that_no_longer_fits_the_split_raises_on_every_process(tmp_path):
    # One process's loss reaches a trunk parameter around the representation after the first
    # call: its gradient would be dropped. Every process raises (no hang: the flag travels in
    # the call's one all-reduce), before any gradient is given.
    helper = _worker_module(_CASES_SCRIPT)
    assert "around" in helper.CASES
    proc = subprocess.run([sys.executable, str(_CASES_SCRIPT), str(free_port()), str(tmp_path),
                           "around"], capture_output=True, text=True, timeout=120)
    _assert_ranks_finished(proc, tmp_path)
    errors = [json.loads((tmp_path / f"rank{r}.json").read_text()).get("error", "")
              for r in range(2)]
    assert "params[0] (shape (8, 4)) is behind the representation" in errors[0], errors
    assert "on another process" in errors[1], errors


@pytest.mark.slow
@pytest.mark.parametrize("case", ["group", "alone"])
def test_ddp_process_group_given_or_none(tmp_path, case):
    """process_group as the other balancers take it: a group given without a DDP module (the
    trunk's gradients averaged by MultiBalance: one process on the whole batch), or None (each
    process trains its own model, as one process alone; it was taken for the world and
    refused)."""
    ranks, helper = _run_cases(tmp_path, case)
    if case == "group":
        assert ranks[0]["params"] == ranks[1]["params"]
        ref = helper.train(case, world=1, rank=0)
        for got in ranks:
            _assert_same_training(got, ref, TOL["f64"])
    else:
        assert ranks[0]["params"] != ranks[1]["params"]
        for r, got in enumerate(ranks):
            _assert_same_training(got, helper.train(case, world=1, rank=r), TOL["f64"])



@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tmp_path):
    helper = _worker_module(_DDP_SCRIPT)
    proc = subprocess.run([sys.executable, str(_DDP_SCRIPT), str(free_port()), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    _assert_ranks_finished(proc, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    ref = helper.train(world=1, rank=0)
    for got in ranks:
        for step, (w_got, w_ref) in enumerate(zip(got["weights"], ref["weights"])):
            np.testing.assert_allclose(w_got, w_ref, rtol=TOL["ddp"], err_msg=f"step {step}")
        for name, value in ref["params"].items():
            np.testing.assert_allclose(got["params"][name], value, rtol=TOL["ddp"],
                                       atol=TOL["ddp"], err_msg=name)
        assert math.isfinite(got["gram_00"])
    # The ranks stay identical (the same weights, averaged gradients).
    assert ranks[0]["params"] == ranks[1]["params"]


@pytest.mark.slow
@pytest.mark.parametrize("mode,message", [("whole", "wrap only the trunk"),
                                          ("unwrapped", "wrap the trunk in DDP"),
                                          ("join", "join() (torch.distributed.algorithms.Join")])
def test_ddp_around_the_heads_or_no_ddp_is_refused(tmp_path, mode, message):
    # The whole model in one DDP module (the PUB optimizers' set-up), or no DDP module at all
    # (the replicas drifted apart: the trunk's gradients were each process's own): the first
    # backward names the fix on every process, before any gradient is applied.
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    proc = subprocess.run([sys.executable, str(_DDP_SCRIPT), str(free_port()), str(tmp_path),
                           mode], capture_output=True, text=True, timeout=120)
    _assert_ranks_finished(proc, tmp_path)
    for r in range(2):
        error = json.loads((tmp_path / f"rank{r}.json").read_text())["error"]
        assert error and message in error, error


def test_a_compiled_trunk_trains_as_in_eager_mode_and_a_compiled_model_is_a_clear_error():
    import copy

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Sequential(nn.Embedding(10, 6), nn.Flatten(), nn.Linear(18, 8),
                                       nn.ReLU())
            self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(2))

        def forward(self, idx):
            z = self.trunk(idx)
            return z, [h(z).squeeze(-1) for h in self.heads]

    def run(net, params, steps=3):
        bal = B.MultiBalance(params)
        opt = torch.optim.SGD(params, lr=0.1)
        for s in range(steps):
            g = torch.Generator().manual_seed(s)
            idx, y = torch.randint(0, 10, (16, 3), generator=g), torch.randn(16, generator=g)
            z, outs = net(idx)
            opt.zero_grad()
            bal.backward([((o - y) ** 2).mean() * c for o, c in zip(outs, (1.0, 3.0))], z)
            opt.step()

    torch.manual_seed(0)
    eager = Net()
    part = copy.deepcopy(eager)
    whole = copy.deepcopy(eager)
    run(eager, list(eager.parameters()))
    part.trunk = torch.compile(part.trunk, backend="aot_eager")
    run(part, list(part.parameters()))
    for p, q in zip(eager.parameters(), part.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match=r"compiled region.*torch\.compile\(model\.trunk\)"):
        run(torch.compile(whole, backend="aot_eager"), list(whole.parameters()), steps=1)


def test_a_head_that_a_task_starts_to_read_after_the_split_gets_its_gradient():
    # The split of the first call gave task 1 head 1 alone; when task 1 later reads head 0 too,
    # its gradient of head 0 was dropped. Every call must give Σ_i w_i ∂L_i/∂φ.
    torch.manual_seed(0)
    trunk = torch.nn.Linear(4, 6)
    heads = torch.nn.ModuleList(torch.nn.Linear(6, 1) for _ in range(2))
    params = [*trunk.parameters(), *heads.parameters()]
    x = torch.randn(16, 4)
    bal = B.MultiBalance(params, ema=0.0)
    for step in range(2):
        def forward(step=step):
            z = trunk(x).tanh()
            second = heads[1](z).pow(2).mean()
            if step == 1:
                second = second + heads[0](z).mean() * 5
            return [heads[0](z).pow(2).mean(), second], z
        for p in params:
            p.grad = None
        losses, z = forward()
        bal.backward(losses, z)
        got = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        losses, _ = forward()
        sum(float(w) * loss for w, loss in zip(bal.weights, losses)).backward()
        for a, p in zip(got, params):
            torch.testing.assert_close(a, p.grad, rtol=1e-6, atol=1e-8)


# -- later calls, hooks, layouts --------------------------------------------------------------


def _snapshot(bal, params):
    return ([None if p.grad is None else p.grad.clone() for p in params], bal.steps,
            None if bal.weights is None else bal.weights.clone(), bal.state_dict())


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def _assert_unchanged(bal, params, snap):
    grads, steps, weights, state = snap
    for p, g in zip(params, grads, strict=True):
        assert (p.grad is None) if g is None else torch.equal(p.grad, g)
    assert bal.steps == steps and torch.equal(bal.weights, weights)
    assert _same(bal.state_dict(), state)


@pytest.mark.parametrize("change", ["around", "earlier", "later", "copy", "assign"])
def test_a_later_call_that_no_longer_fits_the_first_split_raises_and_changes_nothing(change):
    """MultiBalance keeps the head/trunk split of its first call. A later graph it no longer
    fits gave some parameters no gradient, silently: a penalty on a trunk parameter added to
    a loss (reached around z), z taken from an earlier or a later layer, a balancer copied
    after its first call or a model reloaded with assign=True (the balancer's tensors are no
    longer the model's: nothing at all was given). Each is an error, with .grad and the
    balancer as they were."""
    torch.manual_seed(0)
    l1, l2 = nn.Linear(4, 8), nn.Linear(8, 8)
    heads = nn.ModuleList(nn.Sequential(nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 1))
                          for _ in range(2))
    model = nn.ModuleDict({"l1": l1, "l2": l2, "heads": heads})
    params = list(model.parameters())
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    bal = B.MultiBalance(params)

    def call(bal, where="l2", penalty=False):
        h = torch.tanh(model["l1"](x))
        z = model["l2"](h)
        rep = {"l1": h, "l2": z}
        if where == "head":  # the first layer of each head counted in the representation
            outs = [hd[2](torch.tanh(hd[0](z))) for hd in model["heads"]]
            rep["head"] = [torch.tanh(hd[0](z)) for hd in model["heads"]]
            outs = [hd[2](r) for hd, r in zip(model["heads"], rep["head"], strict=True)]
        else:
            outs = [hd(z) for hd in model["heads"]]
        losses = [((o.squeeze(1) - y[:, i]) ** 2).mean() for i, o in enumerate(outs)]
        if penalty:
            losses[0] = losses[0] + 1e-2 * (model["l1"].weight ** 2).sum()
        bal.backward(losses, rep[where])

    call(bal)
    call(bal)  # a second call that fits: fine
    if change == "copy":
        import copy as copy_module
        bal = copy_module.deepcopy(bal)
    if change == "assign":
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()},
                              assign=True)
    snap = _snapshot(bal, params)
    match = {"around": r"params\[0\] .* is behind the representation .* around it",
             "earlier": r"params\[2\] .* is behind the representation",
             "later": r"params\[4\] .* is a head parameter at the first call, but it is now "
                      "behind",
             "copy": "no task loss reaches any tensor in params",
             "assign": "no task loss reaches any tensor in params"}[change]
    with pytest.raises(ValueError, match=match):
        call(bal, where={"earlier": "l1", "later": "head"}.get(change, "l2"),
             penalty=change == "around")
    _assert_unchanged(bal, params, snap)


def test_a_tensor_hook_on_the_representation_acts_once_on_the_trunk():
    """z.register_hook(fn) ran in each head pass (on r_i) and again in the trunk's backward
    (on Σ w_i fn(r_i)): a gradient reversal cancelled itself and a scaling was squared. With
    weights of 1 (solver "mean", no normalization) the trunk must get what sum(L).backward()
    gives it; the hook runs once per head pass (K times), none in the trunk pass."""
    torch.manual_seed(0)
    trunk = nn.Linear(6, 16)
    heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(2))
    params = [*trunk.parameters(), *heads.parameters()]
    x, y = torch.randn(32, 6), torch.randn(32, 2)

    def run(balanced, fn):
        for p in params:
            p.grad = None
        calls = []
        z = trunk(x)
        z.register_hook(lambda g: (calls.append(1), fn(g))[1])
        z.register_hook(lambda g: g + 0.0)  # a second hook: the order is kept
        losses = [((h(z).squeeze(1) - y[:, i]) ** 2).mean() for i, h in enumerate(heads)]
        if balanced:
            B.MultiBalance(params, solver="mean", normalization="none").backward(losses, z)
        else:
            sum(losses).backward()
        assert len(z._backward_hooks) == 2  # put back after the call
        return [p.grad.clone() for p in params], len(calls)

    for fn in (lambda g: -g, lambda g: 3.0 * g):
        want, n_plain = run(False, fn)
        got, n_balanced = run(True, fn)
        assert n_plain == 1 and n_balanced == 2
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_retain_grad_on_the_representation_and_hooks_removed_in_the_trunk_pass():
    """z.retain_grad(): z.grad is Σ_i w_i r_i, as loss.backward() gives Σ_i r_i (each head
    pass added its r_i too: Σ_i (1 + w_i) r_i). A hook on z removed by another hook while the
    trunk's pass runs stays removed (it was put back after the call)."""
    torch.manual_seed(0)
    trunk = nn.Linear(6, 16)
    heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(2))
    params = [*trunk.parameters(), *heads.parameters()]
    x, y = torch.randn(32, 6), torch.randn(32, 2)
    bal = B.MultiBalance(params, ema=0.0)
    for _ in range(2):  # (weights that are not 1)
        z = trunk(x)
        z.retain_grad()
        handle = z.register_hook(lambda g: g)
        # (runs in the trunk's pass)
        remover = trunk.weight.register_hook(lambda g, handle=handle: handle.remove())
        losses = [((h(z).squeeze(1) - 4.0 ** i * y[:, i]) ** 2).mean()
                  for i, h in enumerate(heads)]
        r = [torch.autograd.grad(loss, z, retain_graph=True)[0] for loss in losses]
        z.grad = None  # (those passes retained theirs)
        bal.backward(losses, z)
        want = sum(w * ri for w, ri in zip(bal.weights.tolist(), r, strict=True))
        torch.testing.assert_close(z.grad, want.to(z.dtype), rtol=1e-6, atol=1e-7)
        assert len(z._backward_hooks) == 0
        remover.remove()


def test_head_gradients_keep_the_parameters_layout_and_sparse_heads_work():
    """A channels_last head convolution got a contiguous (NCHW) .grad, where autograd gives
    the parameter's layout; an nn.Embedding(sparse=True) in a head raised torch's
    NotImplementedError (a norm of a sparse tensor). Both give what sum(L).backward() gives
    (weights of 1), the gradient in the parameter's layout and sparse where torch's is."""
    torch.manual_seed(0)
    trunk = nn.Conv2d(3, 4, 3, padding=1).to(memory_format=torch.channels_last)
    conv = nn.Conv2d(4, 4, 3, padding=1).to(memory_format=torch.channels_last)
    emb = nn.Embedding(10, 4, sparse=True)
    params = [*trunk.parameters(), *conv.parameters(), *emb.parameters()]
    x = torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last)
    ids = torch.tensor([1, 3, 3])

    def run(balanced):
        for p in params:
            p.grad = None
        z = trunk(x)
        losses = [conv(z).square().mean(), (z.mean((2, 3)) @ emb(ids).T).square().mean()]
        if balanced:
            B.MultiBalance(params, solver="mean", normalization="none").backward(losses, z)
        else:
            sum(losses).backward()
        return [p.grad for p in params]

    want, got = run(False), run(True)
    for p, g, w in zip(params, got, want, strict=True):
        assert g.is_sparse == w.is_sparse
        if g.is_sparse:
            g, w = g.to_dense(), w.to_dense()
        else:
            assert g.stride() == w.stride() == p.stride()
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gram", [[[-1.0, 0.0], [0.0, 1.0]], [[1.0, 5.0], [5.0, 1.0]],
                                  [[1.0, 0.5], [-0.5, 1.0]],
                                  # (tested on correlations: another task's scale hides nothing)
                                  [[1e10, 0, 0], [0, 1, 2], [0, 2, 1]],
                                  [[0, 1e-3, 0], [1e-3, 1, 0], [0, 0, 1]]])
def test_a_state_dict_whose_gram_is_no_gram_is_refused(gram):
    trunk, heads, params = _two_heads()
    heads.append(nn.Linear(8, 1))
    params += list(heads[2].parameters())
    bal = B.MultiBalance(params)
    z = trunk(torch.randn(16, 4))
    bal.backward([h(z).pow(2).mean() for h in heads][:len(gram)], z)
    state = bal.state_dict()
    before = bal.state_dict()
    state["gram_average"] = gram
    with pytest.raises(ValueError, match="not a Gram matrix"):
        bal.load_state_dict(state)
    assert _same(bal.state_dict(), before)


def test_a_scaler_like_object_and_a_generator_of_representation_tensors_are_taken():
    # What any object with get_scale() and any iterable of tensors gave before the arguments
    # were checked: the same .grad as a GradScaler at scale 1 and a list.
    class Scale:
        def get_scale(self):
            return 1.0

    trunk, heads, params = _two_heads()
    x = torch.randn(16, 4)
    results = []
    for scaler, as_gen in ((None, False), (Scale(), True)):
        for p in params:
            p.grad = None
        z = trunk(x)
        rep = (t for t in [z]) if as_gen else [z]
        B.MultiBalance(params).backward([h(z).pow(2).mean() for h in heads], rep,
                                        scaler=scaler)
        results.append([p.grad.clone() for p in params])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
