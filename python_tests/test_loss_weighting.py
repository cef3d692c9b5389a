"""pub_native.balancers.Uncertainty and FAMO: the defining properties of each loss weighting —
gradients against their closed forms, Uncertainty's minimizer s_i = log L_i, FAMO's logit update
(the softmax Jacobian applied to the log-loss decrease) and its invariance to loss scales."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pub_native import balancers as B

TOL = {
    # float64, closed forms: rounding only.
    "exact": 1e-12,
    # Adam's first step is lr·g/(|g| + eps): off from lr·sign(g) by eps/|g| relative.
    "adam_first_step": 1e-6,
    # FAMO's D_i = L_i + 1e-8: a loss scaled to 1e-3 moves by 1e-8/1e-3 relative, so scale
    # invariance holds to ~1e-5 in the weights and ~1e-11 in the gradient's direction.
    "famo_scale": 1e-9,
    # The minimizer of Uncertainty's objective reached by Adam in a few thousand steps.
    "minimizer": 1e-3,
}


class Linear:
    """K tasks on a shared θ with given gradients and positive losses:
    L_i = c_i + ⟨g_i, θ⟩ + b_i (θ = 0, b_i = 0 at the start: L_i = c_i, ∂L_i/∂θ = g_i)."""

    def __init__(self, grads, values):
        self.g = torch.as_tensor(np.asarray(grads, dtype=np.float64))
        self.c = torch.as_tensor(np.asarray(values, dtype=np.float64))
        k, p = self.g.shape
        self.theta = torch.zeros(p, dtype=torch.float64, requires_grad=True)
        self.b = [torch.zeros((), dtype=torch.float64, requires_grad=True) for _ in range(k)]

    @property
    def params(self):
        return [self.theta, *self.b]

    def losses(self, scale=None):
        s = torch.ones(len(self.g), dtype=torch.float64) if scale is None else \
            torch.as_tensor(scale, dtype=torch.float64)
        return [s[i] * (self.c[i] + self.g[i] @ self.theta + self.b[i])
                for i in range(len(self.g))]

    def zero(self):
        for p in self.params:
            p.grad = None


def rand(k, p, seed):
    return np.random.default_rng(seed).normal(size=(k, p))


# -- Uncertainty ---------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["regression", "classification"])
def test_uncertainty_gradients(form):
    t = Linear(rand(3, 4, 0), [0.5, 2.0, 4.0])
    bal = B.Uncertainty(t.params, n_tasks=3, form=form)
    with torch.no_grad():
        bal.log_vars.copy_(torch.tensor([0.3, -0.2, 1.1]))
    bal.backward(t.losses())
    s = bal.log_vars.detach().double()
    w = 0.5 * torch.exp(-s) if form == "regression" else torch.exp(-s)
    torch.testing.assert_close(t.theta.grad, w @ t.g, rtol=0, atol=TOL["exact"])
    torch.testing.assert_close(torch.stack([b.grad for b in t.b]), w, rtol=0, atol=TOL["exact"])
    torch.testing.assert_close(bal.weights, w, rtol=0, atol=TOL["exact"])
    # ∂/∂s_i: regression ½(1 − e^{−s_i} L_i), classification ½ − e^{−s_i} L_i.
    ds = 0.5 * (1 - torch.exp(-s) * t.c) if form == "regression" else 0.5 - torch.exp(-s) * t.c
    torch.testing.assert_close(bal.log_vars.grad.double(), ds, rtol=0, atol=1e-6)


@pytest.mark.parametrize("form, target", [("regression", lambda L: np.log(L)),
                                          ("classification", lambda L: np.log(2 * L))])
def test_uncertainty_minimizer_weights_by_inverse_loss(form, target):
    """For fixed losses the objective is minimized at s_i = log L_i (log 2L_i), where every
    task's weight on its gradient is 1/(2 L_i)."""
    t = Linear(rand(2, 3, 1), [0.2, 5.0])
    bal = B.Uncertainty(t.params, n_tasks=2, form=form)
    bal.log_vars.data = bal.log_vars.data.double()
    opt = torch.optim.Adam(bal.parameters(), lr=0.05)
    for _ in range(3000):
        opt.zero_grad()
        t.zero()
        bal.backward(t.losses())
        opt.step()
    np.testing.assert_allclose(bal.log_vars.detach().numpy(), target(t.c.numpy()),
                               atol=TOL["minimizer"])
    np.testing.assert_allclose(bal.weights.numpy(), 1 / (2 * t.c.numpy()),
                               rtol=10 * TOL["minimizer"])


def test_uncertainty_trains_with_the_users_optimizer():
    t = Linear(rand(2, 3, 2), [0.5, 3.0])
    bal = B.Uncertainty(t.params, n_tasks=2)
    opt = torch.optim.Adam([{"params": t.params}, {"params": bal.parameters(), "lr": 0.025}])
    opt.zero_grad()
    bal.backward(t.losses())
    opt.step()
    assert (bal.log_vars.detach() != 0).all()  # moved by the same optimizer
    with pytest.raises(ValueError, match="n_tasks"):
        B.Uncertainty(t.params, n_tasks=0)
    with pytest.raises(ValueError, match="form"):
        B.Uncertainty(t.params, n_tasks=2, form="poisson")
    with pytest.raises(ValueError, match="K = 2"):
        bal.backward(t.losses()[:1] * 3)


# -- FAMO ----------------------------------------------------------------------------------------

def test_famo_gradient_is_the_normalized_log_loss_gradient():
    t = Linear(rand(3, 4, 3), [0.5, 2.0, 8.0])
    bal = B.FAMO(t.params, n_tasks=3, max_norm=0.0)
    with torch.no_grad():
        bal.logits.copy_(torch.tensor([0.2, -0.5, 0.1], dtype=torch.float64))
    bal.backward(t.losses())
    z = torch.softmax(bal.logits.detach(), 0)
    d = t.c + 1e-8
    c = (z / d).sum()
    # ∇θ Σ z_i log D_i / c = Σ (z_i / (c D_i)) g_i, also on the task parameters.
    w = z / (c * d)
    torch.testing.assert_close(t.theta.grad, w @ t.g, rtol=0, atol=TOL["exact"])
    torch.testing.assert_close(torch.stack([b.grad for b in t.b]), w, rtol=0, atol=TOL["exact"])
    assert abs(float(bal.weights.sum()) - 1) < TOL["exact"]  # Σ z_i/D_i / c = 1


def test_famo_logit_update_is_the_softmax_jacobian_times_the_log_loss_decrease():
    t = Linear(rand(2, 3, 4), [1.0, 1.0])
    bal = B.FAMO(t.params, n_tasks=2, max_norm=0.0)
    bal.backward(t.losses())
    after = [torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.9, dtype=torch.float64)]
    bal.update(after)
    # δ = log L − log L' = (log 2, −log 0.9); at ξ = 0, z = ½ and J_zᵀδ = z ⊙ (δ − zᵀδ).
    delta = np.log([1.0, 1.0]) - np.log([0.5, 0.9])
    z = np.array([0.5, 0.5])
    grad = z * (delta - z @ delta)
    # Adam's first step (weight decay on ξ = 0 adds nothing): −lr·g/(|g| + eps).
    np.testing.assert_allclose(bal.logits.detach().numpy(), -0.025 * np.sign(grad),
                               rtol=TOL["adam_first_step"])
    # Task 0's log loss fell more: it loses weight.
    p = bal.task_probabilities
    assert p[0] < 0.5 < p[1]
    assert bal.stats["update"] == "explicit"


def test_famo_is_invariant_to_loss_scales():
    """Scaling L_i by s_i leaves the direction of the gradient and the logit update unchanged."""
    g = rand(2, 5, 5)
    results = []
    for scale in ([1.0, 1.0], [1e-3, 1e3]):
        t = Linear(g, [0.7, 1.5])
        bal = B.FAMO(t.params, n_tasks=2, max_norm=0.0)
        bal.backward(t.losses(scale))
        grad = t.theta.grad.clone()
        with torch.no_grad():
            t.theta -= 0.1 * torch.as_tensor(g[0])  # a step that helps task 0
        bal.update(t.losses(scale))
        results.append((grad, bal.logits.detach().clone()))
    (g0, xi0), (g1, xi1) = results
    cos = float(g0 @ g1 / (g0.norm() * g1.norm()))
    assert abs(cos - 1) < TOL["famo_scale"]
    torch.testing.assert_close(xi0, xi1, rtol=1e-9, atol=1e-12)


def test_famo_without_update_uses_the_next_losses():
    g = rand(2, 3, 6)
    explicit, implicit = Linear(g, [1.0, 2.0]), Linear(g, [1.0, 2.0])
    a = B.FAMO(explicit.params, n_tasks=2, max_norm=0.0)
    b = B.FAMO(implicit.params, n_tasks=2, max_norm=0.0)
    a.backward(explicit.losses())
    b.backward(implicit.losses())
    nxt = [0.5, 1.5]
    a.update([torch.tensor(v, dtype=torch.float64) for v in nxt])
    explicit.zero()
    implicit.zero()
    implicit.c = torch.tensor(nxt, dtype=torch.float64)
    b.backward(implicit.losses())  # no update() before: these losses serve as L'
    assert b.stats["update"] == "next batch"
    torch.testing.assert_close(b.logits.detach(), a.logits.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("explicit", [True, False], ids=["update", "next batch"])
def test_famo_under_gradient_accumulation_updates_once_per_step_from_the_mean_losses(explicit):
    # Two backward calls on the halves of a batch, one step: the second is no "next batch"
    # (it moved the logits on the halves' difference, with no step in between), and the step's
    # losses are the halves' mean, the whole batch's: the logits then move as for one backward
    # on the whole batch.
    torch.manual_seed(0)
    trunk = torch.nn.Linear(5, 6, dtype=torch.float64)
    heads = [torch.nn.Linear(6, 1, dtype=torch.float64) for _ in range(2)]
    params = [*trunk.parameters(), *(q for h in heads for q in h.parameters())]
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)

    def losses(rows):
        z = torch.tanh(trunk(x[rows]))
        return [((h(z).squeeze(1) - 3.0 ** i * y[rows, i]) ** 2).mean()
                for i, h in enumerate(heads)]

    after = [0.3, 2.0]
    logits = []
    for micro in (True, False):
        bal = B.FAMO(params, n_tasks=2, max_norm=0.0)
        for p in params:
            p.grad = None
        if micro:
            bal.backward(losses(slice(0, 8)))
            bal.backward(losses(slice(8, 16)))  # .grad as the first left it: the same step
            assert bal.stats["update"] == "accumulating"
            assert not bal.logits.detach().any() and bal.steps == 1
        else:
            bal.backward(losses(slice(0, 16)))
        if explicit:
            bal.update(after)
        else:  # the next step's backward, after zero_grad, takes its losses as L'
            for p in params:
                p.grad = None
            bal.backward([torch.tensor(v, dtype=torch.float64, requires_grad=True) * 1.0 +
                          0.0 * sum(q.sum() for q in params) for v in after])
            assert bal.stats["update"] == "next batch"
        logits.append(bal.logits.detach().clone())
    assert logits[0].abs().min() > 0
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", ["ls", "uncertainty", "famo"])
def test_an_optimizer_stepped_in_backward_is_taken_by_the_one_pass_balancers(name):
    # torch's optimizer-in-backward pattern: a post-accumulate hook per parameter steps it and
    # sets its .grad to None. .grad is None before and after the call, as when the losses
    # reach none of the balancer's parameters: the call was refused (after the hooks had
    # stepped the model). The graph tells the two apart; the model steps as with
    # loss.backward() of the weighted losses.
    def run(balanced):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        _step_in_backward(m.parameters())
        kw = {"ls": {}, "uncertainty": {"n_tasks": 2}, "famo": {"n_tasks": 2, "max_norm": 0.0}}
        bal = B.BALANCERS[name](m.parameters(), **kw[name]) if balanced else None
        x = torch.randn(8, 4)
        for _ in range(2):
            out = m(x)
            losses = [out[:, 0].pow(2).mean() + 0.1, out[:, 1].pow(2).mean() + 0.1]
            if balanced:
                bal.backward(losses)
            else:  # w = 1 (LS; Uncertainty's and FAMO's first weights, from zero logits)
                w = [0.5, 0.5] if name == "uncertainty" else [1.0, 1.0]
                if name == "famo":
                    d = torch.stack([loss.detach() for loss in losses]).double() + 1e-8
                    w = (1.0 / d / (1.0 / d).sum()).tolist()
                sum(wi * loss for wi, loss in zip(w, losses)).backward()
            if name != "ls":
                break  # (their weights move after the first call)
        return [p.detach().clone() for p in m.parameters()]

    for got, want in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_famo_keeps_no_gradient_alive_and_an_overflowed_micro_batch_stays_in_its_step():
    # FAMO's accumulation test kept the last backward's .grad tensors (a model's worth of
    # memory past zero_grad); and a micro-batch that overflowed under a GradScaler did not
    # note the .grad it left, so the next micro-batch of the step was taken for the next
    # step ("next batch": the logits moved on the difference between two micro-batches).
    import gc
    import weakref

    torch.manual_seed(0)
    m = torch.nn.Linear(4, 2)
    bal = B.FAMO(m.parameters(), n_tasks=2, max_norm=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    x = torch.randn(8, 4)

    def micro(scale=1.0):
        out = m(x)
        bal.backward([scaler.scale(out[:, 0].pow(2).mean() * scale + 0.1),
                      scaler.scale(out[:, 1].pow(2).mean() + 0.1)], scaler=scaler)

    micro()
    refs = [weakref.ref(p.grad) for p in m.parameters()]
    m.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs)
    micro()  # (a new step: after zero_grad)
    logits = bal.logits.detach().clone()
    micro(float("inf"))  # an overflow in the step's second micro-batch
    micro()
    assert bal.stats["update"] == "accumulating"
    assert torch.equal(bal.logits.detach(), logits)


@pytest.mark.parametrize("loop", ["in backward", "grad.data.zero_", "overflow first"])
def test_famo_tells_a_new_step_from_a_micro_batch(loop):
    # What makes a backward the next step and not another micro-batch of the same step: an
    # optimizer stepped in backward leaves no .grad (every call was taken for a micro-batch
    # of the first step: the logits never moved); .grad zeroed through .data keeps its version
    # counter (the same), but the step moved the parameters'; and a step whose first micro-batch
    # overflowed under a GradScaler is a step of its own (its second micro-batch went into the
    # step before, which the skip then uncounted).
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 2)
    x = torch.randn(8, 4)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    if loop == "in backward":
        _step_in_backward(m.parameters())
    bal = B.FAMO(m.parameters(), n_tasks=2, max_norm=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    steps = 4
    for t in range(steps):
        micro = 2 if loop == "overflow first" else 1
        for j in range(micro):
            out = m(x)
            bad = loop == "overflow first" and t == 1 and j == 0
            ls = [out[:, 0].pow(2).mean() * (float("inf") if bad else 1.0) + 0.1,
                  out[:, 1].pow(2).mean() + 0.2 * t + 0.1]
            if loop == "overflow first":
                bal.backward([scaler.scale(loss) for loss in ls], scaler=scaler)
            else:
                bal.backward(ls)
            if t and j == 0 and not bad:
                assert bal.stats["update"] in ("next batch", "skipped"), (t, bal.stats)
        if loop == "overflow first":
            scaler.step(opt)
            scaler.update()
        elif loop == "grad.data.zero_":
            opt.step()
        if loop == "grad.data.zero_":
            for p in m.parameters():
                p.grad.data.zero_()
        else:
            opt.zero_grad()
    # Every optimizer step counted once, the skipped one not (once the next backward saw it).
    assert bal.steps == (steps - 1 if loop == "overflow first" else steps)
    assert bal.logits.detach().abs().min() > 0


@pytest.mark.parametrize("form", ["floats", "numpy", "numpy scalars", "1-D tensor"])
def test_famo_update_takes_loss_values_as_numbers_or_tensors(form):
    # The losses after the step are numbers to FAMO: floats and numpy arrays raised an
    # AttributeError ('float' object has no attribute 'detach'). Each form updates the logits
    # exactly as a list of tensors does.
    values = [0.5, 0.9]
    given = {"floats": values, "numpy": np.array(values), "numpy scalars":
             [np.float32(0.5), np.float64(0.9)],
             "1-D tensor": torch.tensor(values, dtype=torch.float64)}[form]
    results = []
    for after in ([torch.tensor(v, dtype=torch.float64) for v in values], given):
        t = Linear(rand(2, 3, 4), [1.0, 1.0])
        bal = B.FAMO(t.params, n_tasks=2, max_norm=0.0)
        bal.backward(t.losses())
        bal.update(after)
        results.append(bal.logits.detach().clone())
    assert torch.equal(results[0], results[1])


def test_famo_refuses_non_finite_min_losses_and_loss_values_it_cannot_read():
    t = Linear(rand(2, 3, 4), [1.0, 1.0])
    with pytest.raises(ValueError, match="min_losses must be finite"):
        B.FAMO(t.params, n_tasks=2, min_losses=[float("nan"), 0.0])
    bal = B.FAMO(t.params, n_tasks=2, max_norm=0.0)
    bal.backward(t.losses())
    logits = bal.logits.detach().clone()
    for bad, error in (("ab", TypeError), (0.5, TypeError), ([0.5, "x"], TypeError),
                       ([0.5, torch.ones(2)], ValueError), (torch.tensor(0.5), ValueError)):
        with pytest.raises(error, match="losses_after"):
            bal.update(bad)
    assert torch.equal(bal.logits.detach(), logits)
    bal.update([0.5, 0.9])
    assert bal.stats["update"] == "explicit"


def test_famo_clips_the_shared_gradient_and_checks_losses():
    g = 10 * rand(2, 4, 7)
    t = Linear(g, [1.0, 2.0])
    bal = B.FAMO(t.params, n_tasks=2, max_norm=0.01)
    bal.backward(t.losses())
    assert bal.shared == [t.theta]
    assert float(t.theta.grad.norm()) == pytest.approx(0.01, rel=1e-6)
    bad = Linear(g, [-1.0, 2.0])
    with pytest.raises(ValueError, match="above its min_losses"):
        B.FAMO(bad.params, n_tasks=2).backward(bad.losses())
    shifted = B.FAMO(bad.params, n_tasks=2, min_losses=[-2.0, 0.0])
    shifted.backward(bad.losses())  # L − m > 0 with the lower bounds given
    with pytest.raises(RuntimeError, match="preceding backward"):
        B.FAMO(t.params, n_tasks=2).update(t.losses())
    for kwargs, match in (({"gamma": -1}, "gamma"), ({"w_lr": math.inf}, "w_lr"),
                          ({"min_losses": [0.0]}, "min_losses")):
        with pytest.raises(ValueError, match=match):
            B.FAMO(t.params, n_tasks=2, **kwargs)


def test_reprs():
    p = torch.zeros(1, requires_grad=True)
    assert repr(B.FAMO([p], n_tasks=2)) == "FAMO(n_tasks=2, gamma=0.01, w_lr=0.025, max_norm=1.0)"
    assert repr(B.Uncertainty([p], n_tasks=3)) == "Uncertainty(n_tasks=3, form='regression')"


def _step_in_backward(params) -> None:
    """torch's optimizer-in-backward pattern: each parameter stepped (SGD, lr 0.1) by a hook as
    its gradient is accumulated, and its .grad set to None."""
    opts = {p: torch.optim.SGD([p], lr=0.1) for p in params}

    def step(p):
        opts[p].step()
        opts[p].zero_grad()

    for p in opts:
        p.register_post_accumulate_grad_hook(step)
